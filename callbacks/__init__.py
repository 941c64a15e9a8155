"""Training callbacks: checkpoints, preemption, sample grids, FID, throughput/MFU.

The EMA is not a callback: the stage module updates it after each optimizer step
(:mod:`pixart_lightning.training.ema`, ``stages/base.py``).
"""
