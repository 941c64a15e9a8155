"""One unit of a run (a stage, or one phase of a stage), its folder and the files it leaves there."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pixart_lightning.config import StageConfig

FINAL, FINAL_EMA, MANIFEST = "final.safetensors", "final-ema.safetensors", "manifest.json"


class RunnerError(RuntimeError):
    """A run cannot proceed as asked (missing parent stage, changed parent); the message says what to do."""


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
        path = self.dir / MANIFEST
        return json.loads(path.read_text()) if path.is_file() else {}

    @property
    def done(self) -> bool:
        return self.manifest().get("status") == "done" and (self.dir / FINAL).is_file()
