"""pixart-lightning: train PixArt-α through its three stages with PyTorch Lightning."""

__version__ = "0.1.0"
