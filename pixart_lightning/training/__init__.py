"""What every stage's training shares below the LightningModule: the step's random draws, the optimizer, the
non-finite guard, EMA, parallelism (checkpointing, compilation, FSDP) and FLOP counts."""
