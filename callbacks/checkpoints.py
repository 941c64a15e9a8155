"""Resumable checkpoints every N steps: written atomically, recorded with their size and sha256, last K kept.

``checkpoints/step-NNNNNNN.ckpt`` (a file, or a folder of shards under FSDP) is written under a
temporary name and renamed (``AtomicCheckpointIO``, ``ShardedStrategy``). Then rank 0 records it in
``checkpoints/index.json`` with its bytes and the sha256 of each file. On resume,
:func:`latest_good` takes the newest checkpoint whose files still match their record. A checkpoint
truncated by a full disk, or corrupted on a flaky filesystem, is passed over with a warning, and the
one before it is used. Only the newest ``keep`` checkpoints stay on disk.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import lightning as L

from pixart_lightning.files import sha256, write_json_atomic

log = logging.getLogger(__name__)
INDEX = "index.json"


def _files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def describe(path: Path) -> dict[str, dict[str, Any]]:
    """Bytes and sha256 of each file of a checkpoint (one file, or a folder of shards)."""
    return {str(f.relative_to(path.parent)): {"bytes": f.stat().st_size, "sha256": sha256(f)} for f in _files(path)}


def read_index(folder: Path) -> list[dict[str, Any]]:
    index = folder / INDEX
    return json.loads(index.read_text()) if index.is_file() else []


def verify(folder: Path, entry: dict[str, Any]) -> str | None:
    """Why the recorded checkpoint is unusable, or None when every file matches its record."""
    for name, record in entry["files"].items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != record["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, {record['bytes']} were written"
        if sha256(path) != record["sha256"]:
            return f"{name} does not match its sha256"
    return None


def latest_good(folder: Path) -> Path | None:
    """The newest recorded checkpoint that verifies; bad ones are reported and passed over."""
    for entry in sorted(read_index(folder), key=lambda e: e["step"], reverse=True):
        problem = verify(folder, entry)
        if problem is None:
            return folder / entry["path"]
        log.warning("checkpoint %s (step %d) is damaged: %s; trying the one before", entry["path"], entry["step"],
                    problem)
        print(f"warning: checkpoint {folder / entry['path']} is damaged ({problem}); using an older one", flush=True)
    return None


class Checkpoints(L.Callback):
    """Save every ``every_n_steps`` (and on request, e.g. on preemption); keep the newest ``keep``."""

    def __init__(self, folder: Path, every_n_steps: int, keep: int):
        self.folder, self.every, self.keep = Path(folder), every_n_steps, keep

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step % self.every == 0:
            self.save(trainer)

    def save(self, trainer: L.Trainer) -> Path:
        """Write the step's checkpoint (collective under FSDP), then record it and prune (rank 0)."""
        name = f"step-{trainer.global_step:07d}.ckpt"
        path = self.folder / name
        trainer.save_checkpoint(path)
        if trainer.is_global_zero:
            entries = [e for e in read_index(self.folder) if e["step"] != trainer.global_step]
            entries.append({"step": trainer.global_step, "path": name, "files": describe(path)})
            entries.sort(key=lambda e: e["step"])
            for old in entries[: -self.keep]:
                target = self.folder / old["path"]
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
            write_json_atomic(self.folder / INDEX, entries[-self.keep:])
        trainer.strategy.barrier("checkpoint recorded")
        return path
