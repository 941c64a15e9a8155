"""The frozen encoders by name and dtype: what the runner, the CLI and the feature extractor load."""

from __future__ import annotations

import torch

from pixart_lightning.encoders.text import LazyTextEncoder, T5TextEncoder
from pixart_lightning.encoders.vae import PIXEL_SPACE, SD_VAE_SCALE, VAE, LazyVAE, PixelSpace
from pixart_lightning.models.config import CAPTION_TOKENS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""The config's dtype names (``text_encoder.dtype``, ``data extract --t5-dtype``) -> torch dtypes."""


def load_text_encoder(
    name: str, max_length: int = CAPTION_TOKENS, dtype: str = "fp32", lazy: bool = False
) -> T5TextEncoder | LazyTextEncoder:
    """The T5, or with ``lazy`` a handle that loads it at its first use."""
    if lazy:
        return LazyTextEncoder(name, max_length, DTYPES[dtype])
    return T5TextEncoder.from_pretrained(name, max_length=max_length, dtype=DTYPES[dtype])


def load_vae(
    name: str, scale_factor: float = SD_VAE_SCALE, dtype: str = "fp32", lazy: bool = False
) -> VAE | LazyVAE | PixelSpace:
    """The VAE (nothing to load in pixel space), or with ``lazy`` a handle that loads it at its first use."""
    if name == PIXEL_SPACE:
        return PixelSpace()
    if lazy:
        return LazyVAE(name, scale_factor, DTYPES[dtype])
    return VAE.from_pretrained(name, scale_factor=scale_factor, dtype=DTYPES[dtype])
