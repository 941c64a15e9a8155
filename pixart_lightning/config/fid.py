"""The ``fid`` section: what pins an FID measurement, and its own checks."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

from pixart_lightning.config.schema import Sampler, choice_problem, literal_fields

Extractor = Literal["inception", "tiny"]
EXTRACTORS: tuple[str, ...] = typing.get_args(Extractor)
INCEPTION_SIZE = 299
"""The side, in pixels, clean-fid's Inception-v3 takes its images at."""


@dataclass(kw_only=True)
class FIDSection:
    """What pins an FID measurement (``pixart_lightning/evaluation/fid.py``, ``callbacks/fid.py``); FID is off
    without a ``reference``."""

    every_n_steps: int = 0
    """0: at the end of the stage only."""
    at_start: bool = False
    """Also measure before the first step, so a stage's starting FID is recorded."""
    num_images: int = 30000
    """Images generated (one per caption), at least 2."""
    captions: str = ""
    """Caption file (JSON list of {"id", "caption"[, "label"]}, COCO captions JSON, or .txt one per line) or a
    shard/image folder; empty: the captions of the ``reference`` samples."""
    caption_key: str = "txt"
    """Caption of a shard sample: a tar member (``txt``) or a json field."""
    seed: int = 0
    """Draws the pinned subset when there are more captions than ``num_images``; chunk ``c`` samples with ``seed + c``."""
    reference: str = ""
    """Real images: a folder of shards, a shard pattern or an image folder; empty: FID off."""
    reference_count: int = 0
    """Use the first N reference images (in source order), at least 2; 0: all."""
    extractor: Extractor = "inception"
    """``inception`` (clean-fid's Inception-v3, from ``inception_weights``) or ``tiny`` (offline, hand-made)."""
    inception_weights: str = ""
    """``inception-2015-12-05.pt`` or its folder; empty: ~/.cache/pixart-lightning/ or clean-fid's /tmp copy."""
    resize: int = INCEPTION_SIZE
    """Side, in pixels, images are resized to before the extractor (Inception: 299 only)."""
    batch_size: int = 32
    """Images generated per batch, at least 1."""
    decode_batch: int = 8
    """Images the VAE decodes at once; 0: the whole ``batch_size``. One full-size activation of the SD VAE's decoder
    (128 channels) takes 0.5 GB per 1024-px image in fp32: 17 GB for a batch of 32 at once."""
    sampler: Sampler = "dpm++"
    """The sampler generating the images."""
    steps: int = 20
    """Sampler steps, at least 1."""
    cfg_scale: float = 4.5
    """Classifier-free guidance scale."""
    cache_dir: str = ""
    """Where reference statistics are cached; empty: ~/.cache/pixart-lightning/fid."""

    @property
    def enabled(self) -> bool:
        return bool(self.reference)

    def problems(self, prefix: str = "fid") -> list[str]:
        """Every invalid field, named ``<prefix>.<field>`` (for the config's one-go validation)."""
        found = [choice_problem(key, value, choices)
                 for key, value, choices in literal_fields(self, f"{prefix}.") if value not in choices]
        for name, least in (("num_images", 2), ("batch_size", 1), ("steps", 1), ("resize", 1)):
            if getattr(self, name) < least:
                found.append(f"{prefix}.{name}={getattr(self, name)}: must be at least {least}")
        if self.every_n_steps < 0:
            found.append(f"{prefix}.every_n_steps={self.every_n_steps}: must be 0 (end of stage only) or positive")
        if self.decode_batch < 0:
            found.append(f"{prefix}.decode_batch={self.decode_batch}: must be 0 (the whole batch) or positive")
        if self.reference_count == 1 or self.reference_count < 0:
            found.append(f"{prefix}.reference_count={self.reference_count}: must be 0 (all images) or at least 2")
        if self.extractor == "inception" and self.resize != INCEPTION_SIZE:
            found.append(f"{prefix}.resize={self.resize}: the Inception extractor takes {INCEPTION_SIZE} x {INCEPTION_SIZE}")
        return found
