"""The training progress bar: one per unit, labelled with it, counting optimizer steps, with loss and images/s."""

from __future__ import annotations

import sys
from time import perf_counter
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

from callbacks.steps import step_ended


class StageProgressBar(TQDMProgressBar):
    """``stage 2:  40%|████      | 400/1000 [01:02<01:33, 6.4it/s, loss=0.412, images/s=205.3]``.

    The bar counts optimizer steps out of ``max_steps`` (a resumed unit starts where it stopped, whatever the
    epochs) and refreshes every ``refresh_rate`` steps, when the logged loss is new. images/s is steps/s x
    ``global_batch`` since the last refresh (wall-clock, as ``train/images_per_s``: a window with samples or FID in
    it reads slower). The bar opens with the first batch (after any FID at the start) and closes after the last
    step, before the stage's final samples and FID print.
    """

    def __init__(self, label: str, global_batch: int, refresh_rate: int = 1):
        super().__init__(refresh_rate=refresh_rate)
        self.label = label
        self.global_batch = global_batch
        self._since: tuple[float, int] | None = None  # (time, step) where the images/s window opened
        self._images_per_s: float | None = None

    def init_train_tqdm(self) -> Tqdm:
        return Tqdm(
            desc=self.label, total=self.trainer.max_steps, initial=self.trainer.global_step,
            position=2 * self.process_position, disable=self.is_disabled, leave=True, dynamic_ncols=True,
            file=sys.stdout, smoothing=0, bar_format=self.BAR_FORMAT,
        )

    def on_train_start(self, *_: Any) -> None:
        """Nothing yet: the bar opens with the first batch."""

    def on_train_epoch_start(self, *_: Any) -> None:
        """Nothing: the bar counts steps across epochs."""

    def on_train_batch_start(self, trainer: L.Trainer, *_: Any) -> None:
        if self._train_progress_bar is None:
            self.train_progress_bar = self.init_train_tqdm()
            self._since = (perf_counter(), trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step, bar = trainer.global_step, self.train_progress_bar
        if not (step_ended(trainer, batch_idx) and self._should_update(step, bar.total)):
            return
        bar.n = step
        bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=step < bar.total)
        if step >= bar.total:
            bar.close()  # which draws the last step, once

    def on_train_epoch_end(self, *_: Any) -> None:
        """Nothing: the bar counts steps across epochs."""

    def on_train_end(self, *_: Any) -> None:
        if self._train_progress_bar is not None:
            self.train_progress_bar.close()

    def on_exception(self, *_: Any) -> None:
        """Close the bar, so that what the runner prints about the stop starts on a line of its own."""
        self.on_train_end()

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """The progress-bar metrics (the loss), without Lightning's ``v_num`` (the logger's version), with images/s."""
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        start, first = self._since or (perf_counter(), trainer.global_step)
        now, step = perf_counter(), trainer.global_step
        if step > first:
            self._images_per_s = (step - first) * self.global_batch / (now - start)
            self._since = (now, step)
        if self._images_per_s is not None:
            metrics["images/s"] = f"{self._images_per_s:.1f}"
        return metrics
