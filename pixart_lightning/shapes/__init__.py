"""The embedded default: the shapes world, its synthetic dataset and its offline encoders."""
