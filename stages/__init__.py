"""One LightningModule per PixArt-α training stage, on a shared base (issue #3)."""
