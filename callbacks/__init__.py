"""Training callbacks: FID, sample logging, throughput/MFU, EMA (issue #6)."""
