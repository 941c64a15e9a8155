"""One unit of a run (a stage, or one phase of a stage), its folder and the files it leaves there."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pixart_lightning.config import StageConfig

FINAL, FINAL_EMA, MANIFEST = "final.safetensors", "final-ema.safetensors", "manifest.json"
SAVED_CONFIG = "config.yaml"
"""The unit's resolved config, as it trained."""
CHECKPOINTS, SAMPLES, ALIGNMENT = "checkpoints", "samples", "alignment.json"
"""The resumable checkpoints (+ ``index.json``), the sample grids, the alignment scores."""


class RunnerError(RuntimeError):
    """A run cannot proceed as asked (missing parent stage, changed parent); the message says what to do."""


def read_unit_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of the stage folder that is ``path`` or holds the file ``path``; {} where there is none."""
    path = Path(path)
    manifest = (path if path.is_dir() else path.parent) / MANIFEST
    return json.loads(manifest.read_text()) if manifest.is_file() else {}


@dataclass
class Unit:
    """One training run: a stage, or one phase of a multi-phase stage."""

    stage: int
    phase: str | None
    cfg: StageConfig

    @property
    def dir(self) -> Path:
        base = self.cfg.run_dir / f"stage{self.stage}"
        return base / self.phase if self.phase else base

    @property
    def label(self) -> str:
        return f"stage {self.stage}" + (f" ({self.phase})" if self.phase else "")

    def manifest(self) -> dict[str, Any]:
        return read_unit_manifest(self.dir / MANIFEST)  # named as a file in the folder: the folder may not exist yet

    @property
    def done(self) -> bool:
        return self.manifest().get("status") == "done" and (self.dir / FINAL).is_file()
