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
    samples with. Each record holds the step, ``train_seconds`` (wall time since training started, the time of these
    measurements left out, so variants compare by what they trained) and the accuracy of every attribute; rank 0
    logs them to TensorBoard (``curve/*``) and appends them to ``<out_dir>/alignment-curve.json``."""

    def __init__(self, every_n_steps: int, out_dir: str | Path):
        self.every_n_steps = every_n_steps
        self.path = Path(out_dir) / CURVE
        self._started = 0.0
        self._measuring = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._started, self._measuring = time.perf_counter(), 0.0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if interim_step_ended(trainer, batch_idx, self.every_n_steps):
            self.measure(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.measure(trainer, pl_module)

    def measure(self, trainer: L.Trainer, pl_module: Any) -> dict[str, Any] | None:
        """One record at the current step on rank 0 (every rank generates under FSDP); None elsewhere."""
        if not (trainer.is_global_zero or is_sharded(pl_module.model)):
            return None
        begin = time.perf_counter()
        model = pl_module.sampling_model(pl_module.cfg.samples.use_ema)
        result = score_alignment(model, pl_module.encoders, pl_module.cfg, trainer.precision)
        record = {"step": trainer.global_step, "train_seconds": round(begin - self._started - self._measuring, 2),
                  **{k: v for k, v in result.items() if k.endswith("accuracy")}}
        self._measuring += time.perf_counter() - begin
        if not trainer.is_global_zero:
            return None
        for logger in trainer.loggers:
            logger.log_metrics({f"curve/{k}": v for k, v in record.items() if k.endswith("accuracy")},
                               step=trainer.global_step)
        append_record(self.path, record)
        with tqdm.external_write_mode():
            print(f"step {trainer.global_step} ({record['train_seconds']:.0f} s): {attribute_line(result)}", flush=True)
        return record


def time_to_quality(curve: list[dict[str, Any]], levels: tuple[float, ...] = (0.5, 0.8)) -> str:
    """E.g. "all right 0.50 at step 900 (201 s), 0.80 not in 1800 steps": the first record of an alignment curve
    whose ``all_accuracy`` reaches each level."""
    parts = []
    for level in levels:
        hit = next((r for r in curve if r["all_accuracy"] >= level), None)
        parts.append(f"{level:.2f} at step {hit['step']} ({hit['train_seconds']:.0f} s)" if hit else
                     f"{level:.2f} not in {curve[-1]['step']} steps")
    return "all right " + ", ".join(parts)
