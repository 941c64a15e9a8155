"""The text encoder (T5) and the VAE, loaded at first use, from hub ids or local folders."""
