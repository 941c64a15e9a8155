"""Training callbacks: checkpoints, preemption, sample grids, FID, throughput/MFU."""
