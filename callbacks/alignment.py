"""Alignment while a stage trains, against the training time it took: time to quality, in ``alignment-curve.json``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
from tqdm.auto import tqdm

from callbacks.steps import interim_step_ended
from pixart_lightning.evaluation.alignment import attribute_line
from pixart_lightning.evaluation.fid import append_record
from pixart_lightning.evaluation.stage_samples import score_alignment
from pixart_lightning.training.parallel import is_sharded

CURVE = "alignment-curve.json"


class AlignmentCurve(L.Callback):
    """Scores the held-out prompts every ``eval.every_n_steps`` steps and at the end, with the weights the stage
    samples with. Each record holds the step, ``train_seconds`` and the accuracy of every attribute; rank 0 logs them
    to TensorBoard (``curve/*``) and appends them to ``<out_dir>/alignment-curve.json``. The last result is kept as
    ``final`` (the runner's end-of-stage score, not measured twice).

    ``train_seconds`` adds up the steps' own time, from each batch's start to its end (forward, backward, optimizer
    and EMA), so variants compare by what they trained: no data waits, checkpoints, sample grids, FID or these
    measurements (the trainer calls this callback first at a batch's end, before the others' work). It is saved with
    the checkpoints, so a resumed stage counts on. On a GPU it is the host's time, which the device catches up with
    at each measurement."""

    def __init__(self, every_n_steps: int, out_dir: str | Path):
        self.every_n_steps = every_n_steps
        self.path = Path(out_dir) / CURVE
        self.train_seconds = 0.0
        self.final: dict[str, Any] | None = None
        self._batch_started = 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"train_seconds": self.train_seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train_seconds = state_dict["train_seconds"]

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._batch_started = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.train_seconds += time.perf_counter() - self._batch_started
        if interim_step_ended(trainer, batch_idx, self.every_n_steps):
            self.measure(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.final = self.measure(trainer, pl_module)

    def measure(self, trainer: L.Trainer, pl_module: Any) -> dict[str, Any] | None:
        """The alignment result at the current step on rank 0, its record appended (every rank generates under
        FSDP); None elsewhere."""
        if not (trainer.is_global_zero or is_sharded(pl_module.model)):
            return None
        model = pl_module.sampling_model(pl_module.cfg.samples.use_ema)
        result = score_alignment(model, pl_module.encoders, pl_module.cfg, trainer.precision)
        if not trainer.is_global_zero:
            return None
        record = {"step": trainer.global_step, "train_seconds": round(self.train_seconds, 2),
                  **{k: v for k, v in result.items() if k.endswith("accuracy")}}
        for logger in trainer.loggers:
            logger.log_metrics({f"curve/{k}": v for k, v in record.items() if k.endswith("accuracy")},
                               step=trainer.global_step)
            logger.save()
        append_record(self.path, record)
        with tqdm.external_write_mode():
            print(f"step {trainer.global_step} ({record['train_seconds']:.0f} s): {attribute_line(result)}", flush=True)
        return result


def time_to_quality(curve: list[dict[str, Any]], levels: tuple[float, ...] = (0.5, 0.8)) -> str:
    """E.g. "all right 0.50 at step 900 (201 s), 0.80 not in 1800 steps": the first record of an alignment curve
    whose ``all_accuracy`` reaches each level."""
    parts = []
    for level in levels:
        hit = next((r for r in curve if r["all_accuracy"] >= level), None)
        parts.append(f"{level:.2f} at step {hit['step']} ({hit['train_seconds']:.0f} s)" if hit else
                     f"{level:.2f} not in {curve[-1]['step']} steps")
    return "all right " + ", ".join(parts)
