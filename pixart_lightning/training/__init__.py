"""What every stage's training shares below the LightningModule: EMA, parallelism, compilation, FLOP counts."""
