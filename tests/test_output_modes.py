"""Outputs are created with the user's umask, like any other file the user writes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from pixart_lightning.shapes.synth import synthesize


def test_synth_output_follows_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        synthesize(tmp_path / "world", count=2, seed=0, resolution=16, samples_per_shard=2, progress=False)
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "world").stat().st_mode) == 0o755
    assert [p.name for p in tmp_path.iterdir()] == ["world"]  # no partial folder left beside it
