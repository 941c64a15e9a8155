"""Shared fixtures: tiny backbones with every weight randomised (a fresh model outputs zeros)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pixart_lightning.models import PixArt, PixArtConfig
from pixart_lightning.shapes.synth import synthesize


def randomize(model: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Give every parameter and buffer random values, so zero-initialised paths are exercised too."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * std)
    return model


def tiny_config(**changes) -> PixArtConfig:
    """A 2-block model with every feature of the real one (width divisible by 3 and 4)."""
    fields = dict(depth=2, hidden_size=48, num_heads=4, patch_size=2, caption_channels=16, sample_size=8)
    if changes.get("mode") == "class":
        fields["num_classes"] = 10
    return PixArtConfig(**{**fields, **changes})


def tiny_model(**changes) -> PixArt:
    return randomize(PixArt(tiny_config(**changes))).eval()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def world_shards(tmp_path_factory) -> Path:
    """A small shapes world in 3 aspect-ratio buckets, 4 shards of 40 samples."""
    folder = tmp_path_factory.mktemp("shards") / "world"
    synthesize(folder, count=160, seed=0, resolution=16, buckets=[(16, 16), (16, 32), (32, 16)],
               samples_per_shard=40, progress=False)
    return folder
