"""Backbone configuration and the registry of named sizes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

ConditioningMode = Literal["class", "text"]
CAPTION_TOKENS = 120
"""The paper's caption length in T5 tokens: the null caption's length, what captions are cut or padded to."""


@dataclass(kw_only=True)
class PixArtConfig:
    """Everything that fixes the shape and behaviour of one PixArt-α / DiT backbone."""

    depth: int = 28
    """Number of transformer blocks."""
    hidden_size: int = 1152
    """Token width D."""
    num_heads: int = 16
    """Attention heads; must divide ``hidden_size``."""
    patch_size: int = 2
    """Side of a square latent patch."""
    mlp_ratio: float = 4.0
    """Width of the MLP hidden layer relative to D."""
    in_channels: int = 4
    """Latent channels (4 for the SD VAE)."""
    learn_sigma: bool = True
    """Predict the variance interpolation too (2x the output channels), as IDDPM/PixArt do."""
    mode: ConditioningMode = "text"
    """``class``: DiT adaLN-Zero with a label embedding (stage 1). ``text``: adaLN-single with
    cross-attention over caption features (stages 2-3)."""
    num_classes: int = 1000
    """Class mode: number of labels; one extra row is the null class for guidance."""
    class_dropout_prob: float = 0.1
    """Probability of replacing a label or caption by the null one during training."""
    caption_channels: int = 4096
    """Text mode: width of the caption features (T5-XXL: 4096)."""
    max_caption_tokens: int = CAPTION_TOKENS
    """Text mode: length of the null caption embedding; captions may be shorter, not longer."""
    learned_null_caption: bool = False
    """Train the null caption embedding (a parameter) instead of keeping it fixed (a buffer, as
    the official code does)."""
    micro_conditions: bool = False
    """Text mode: add resolution and aspect-ratio embeddings to the timestep embedding."""
    sample_size: int = 32
    """Latent side at the native resolution (256 px / 8 = 32); sets the position-embedding base."""
    interpolation_scale: float = 1.0
    """PixArt's ``lewei_scale``: position-embedding coordinates are divided by it."""
    freq_shift: float = 0.0
    """Timestep sinusoid frequency shift; 0 is DiT and PixArt, 1 matches diffusers' DiT port."""
    mlp_norm_eps: float = 1e-6
    """eps of the LayerNorm before the MLP; 1e-6 is DiT and PixArt, 1e-5 is diffusers' DiT port."""

    def __post_init__(self) -> None:
        problems = []
        if self.hidden_size % self.num_heads:
            problems.append(f"num_heads={self.num_heads} must divide hidden_size={self.hidden_size}")
        if self.hidden_size % 4:
            problems.append(f"hidden_size={self.hidden_size} must be divisible by 4 (2-D sin-cos embedding)")
        if self.mode not in ("class", "text"):
            problems.append(f"mode={self.mode!r}: valid choices are 'class', 'text'")
        if self.micro_conditions and self.mode != "text":
            problems.append("micro_conditions needs mode='text'")
        if self.micro_conditions and self.hidden_size % 3:
            problems.append(f"micro_conditions needs hidden_size divisible by 3, got {self.hidden_size}")
        if self.sample_size % self.patch_size:
            problems.append(f"sample_size={self.sample_size} must be divisible by patch_size={self.patch_size}")
        if problems:
            raise ValueError("invalid PixArtConfig: " + "; ".join(problems))

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def replace(self, **changes) -> PixArtConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_name(cls, name: str, **overrides) -> PixArtConfig:
        """Build the config of a named size, e.g. ``PixArt-XL/2``; fields may be overridden."""
        if name not in MODEL_SIZES:
            raise ValueError(f"unknown model size {name!r}; valid choices: {', '.join(MODEL_SIZES)}")
        return cls(**{**MODEL_SIZES[name], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def official_interpolation_scale(sample_size: int) -> float:
    """PixArt-α's position-embedding scale for a latent side: 1 at 256 and 512 px, 2 at 1024 px (the official
    inference table {256: 1, 512: 1, 1024: 2}; diffusers' ``max(sample_size // 64, 1)``)."""
    return float(max(sample_size // 64, 1))


def _size(depth: int, hidden_size: int, num_heads: int, patch_size: int) -> dict:
    return dict(depth=depth, hidden_size=hidden_size, num_heads=num_heads, patch_size=patch_size)


# DiT's family of widths (Peebles & Xie, 2023); PixArt-α only released XL/2.
MODEL_SIZES: dict[str, dict] = {
    **{f"PixArt-XL/{p}": _size(28, 1152, 16, p) for p in (2, 4, 8)},
    **{f"PixArt-L/{p}": _size(24, 1024, 16, p) for p in (2, 4, 8)},
    **{f"PixArt-B/{p}": _size(12, 768, 12, p) for p in (2, 4, 8)},
    **{f"PixArt-S/{p}": _size(12, 384, 6, p) for p in (2, 4, 8)},
    # CPU-sized: the demo trains these on two cores in minutes.
    "PixArt-tiny/2": _size(4, 192, 6, 2),
    "PixArt-tiny/4": _size(4, 192, 6, 4),
    "PixArt-debug/2": _size(2, 48, 4, 2),
}
