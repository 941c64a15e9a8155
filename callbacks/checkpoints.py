"""Resumable checkpoints every N steps: written atomically, recorded with their size and sha256, last K kept.

``checkpoints/step-NNNNNNN.ckpt`` (a file, or a folder of shards under FSDP) is written under a
temporary name and renamed (``AtomicCheckpointIO``, ``ShardedStrategy``), each file hashed as its bytes
go out. Then rank 0 records it in ``checkpoints/index.json`` with the bytes and sha256 of each file,
without reading it back. On resume, :func:`latest_good` takes the newest checkpoint whose files still
match their record. A checkpoint truncated by a full disk, or corrupted on a flaky filesystem, is passed
over with a warning, and the one before it is used. Only the newest ``keep`` checkpoints stay on disk.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.utilities.rank_zero import rank_zero_only

from callbacks.steps import step_ended
from pixart_lightning.files import FileRecord, sha256, write_json_atomic, written_record

log = logging.getLogger(__name__)
INDEX = "index.json"


def _files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


class DamagedCheckpoints(RuntimeError):
    """Checkpoints are recorded but none is intact: the stage is not silently restarted from its first step."""


def describe(path: Path) -> dict[str, FileRecord]:
    """Bytes and sha256 of each file of a checkpoint just written (one file, or a folder of shards), as its writers
    hashed them on the way out; a file written some other way is read to hash it."""
    return {str(f.relative_to(path.parent)): written_record(f) or {"bytes": f.stat().st_size, "sha256": sha256(f)}
            for f in _files(path)}


def read_index(folder: Path) -> list[dict[str, Any]]:
    index = folder / INDEX
    return json.loads(index.read_text()) if index.is_file() else []


def verify(folder: Path, entry: dict[str, Any], hashes: bool = True) -> str | None:
    """Why the recorded checkpoint is unusable, or None when every file matches its record: its size, and with
    ``hashes`` its sha256 (a read of the whole checkpoint)."""
    for name, record in entry["files"].items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != record["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, {record['bytes']} were written"
        if hashes and sha256(path) != record["sha256"]:
            return f"{name} does not match its sha256"
    return None


def latest_good(folder: Path) -> Path | None:
    """The newest recorded checkpoint that verifies; damaged ones are reported (rank 0) and passed over.

    Only global rank 0 reads the files to check their sha256: every rank doing it would read the checkpoint once per
    rank at each start (640 GB for 64 ranks at XL). The other ranks check that the files are there with their
    recorded sizes, and load what rank 0 chose: the strategies broadcast rank 0's path when they load it
    (``parallel.DataParallelStrategy``, Lightning's ``ModelParallelStrategy``). Their choice differs only when a
    file kept its size but not its content. When none is intact, :class:`DamagedCheckpoints` is raised rather than
    training from the first step again (and rather than leaving the other ranks waiting for a rank 0 that loads
    nothing).
    """
    rank_zero = rank_zero_only.rank == 0
    entries = sorted(read_index(folder), key=lambda e: e["step"], reverse=True)
    for entry in entries:
        problem = verify(folder, entry, hashes=rank_zero)
        if problem is None:
            return folder / entry["path"]
        if rank_zero:
            log.warning("checkpoint %s (step %d) is damaged: %s; trying the one before", entry["path"], entry["step"],
                        problem)
            print(f"warning: checkpoint {folder / entry['path']} is damaged ({problem}); trying an older one",
                  flush=True)
    if entries:
        raise DamagedCheckpoints(f"none of the {len(entries)} checkpoints recorded in {folder} is intact (warnings "
                                 f"above); delete {folder} to train this stage again from its first step")
    return None


class Checkpoints(L.Callback):
    """Save every ``every_n_steps`` (and on request, e.g. on preemption); keep the newest ``keep``."""

    def __init__(self, folder: Path, every_n_steps: int, keep: int):
        self.folder, self.every, self.keep = Path(folder), every_n_steps, keep

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if step_ended(trainer, batch_idx) and trainer.global_step % self.every == 0:
            self.save(trainer)

    def save(self, trainer: L.Trainer) -> Path:
        """Write the step's checkpoint (collective under FSDP), then record it and prune (rank 0).

        The files are hashed while they are written, so recording reads nothing: the save takes the time to serialise
        and write the checkpoint, which is what has to fit in Slurm's warning before a preemption
        (``callbacks/preemption.py``).
        """
        name = f"step-{trainer.global_step:07d}.ckpt"
        path = self.folder / name
        trainer.save_checkpoint(path, weights_only=False)  # the whole training state, to resume from
        if trainer.is_global_zero:
            entries = [e for e in read_index(self.folder) if e["step"] != trainer.global_step]
            entries.append({"step": trainer.global_step, "path": name, "files": describe(path)})
            entries.sort(key=lambda e: e["step"])
            stale = [self.folder / old["path"] for old in entries[: -self.keep]]
            # The index first: a crash between the two then leaves stray files, never an index of deleted ones.
            write_json_atomic(self.folder / INDEX, entries[-self.keep:])
            for target in stale + list(self.folder.glob("*.tmp")):  # and what saves killed mid-write left
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        trainer.strategy.barrier("checkpoint recorded")
        return path
