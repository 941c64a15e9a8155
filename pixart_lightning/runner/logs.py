"""The chain's TensorBoard run: every unit's events in one ``runs/<name>/tensorboard/`` folder on one step axis.

TensorBoard merges the event files of a folder into one run, so the chain's loss is one curve: each unit writes
its own event file there at ``step_offset`` + its own step, ``step_offset`` being the steps of the units before
it in the plan. The offset comes from the plan, not from what ran, so a resumed or re-run unit lands where it
did the first time; ``trainer/stage_step`` holds the unit's own step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.compat.proto.event_pb2 import Event, SessionLog
from torch.utils.tensorboard.writer import FileWriter, SummaryWriter

from pixart_lightning.runner.unit import Unit

TENSORBOARD = "tensorboard"
STAGE_STEP = "trainer/stage_step"


def chain_tensorboard(run_dir: str | Path) -> Path:
    """The chain's one TensorBoard folder (``tensorboard --logdir`` it, or the run folder)."""
    return Path(run_dir) / TENSORBOARD


@dataclass(frozen=True)
class UnitLog:
    """How a unit reports: its progress bar's label, and where its TensorBoard events go on which step axis."""

    label: str
    tensorboard: Path
    step_offset: int = 0


def unit_log(units: list[Unit], unit: Unit) -> UnitLog:
    """The unit's log in the chain of ``units`` (the plan, every stage of the config folder, in order). A finished
    unit counts the steps it trained (its manifest's), which a later command line may plan differently."""
    place = [(u.stage, u.phase) for u in units].index((unit.stage, unit.phase))
    offset = sum(u.manifest().get("steps", u.cfg.train.max_steps) if u.done else u.cfg.train.max_steps
                 for u in units[:place])
    return UnitLog(unit.label, chain_tensorboard(unit.cfg.run_dir), offset)


class _ShiftedFileWriter(FileWriter):
    def __init__(self, log_dir: str, step_offset: int, *args: Any):
        super().__init__(log_dir, *args)
        self.step_offset = step_offset

    def add_event(self, event: Event, step: int | None = None, walltime: float | None = None) -> None:
        super().add_event(event, None if step is None else int(step) + self.step_offset, walltime)


class ShiftedWriter(SummaryWriter):
    """A SummaryWriter whose every event lands ``step_offset`` steps later: scalars, images, anything a callback
    writes through ``logger.experiment``."""

    def __init__(self, log_dir: str, step_offset: int, **kwargs: Any):
        self.step_offset = step_offset  # before SummaryWriter's __init__, which opens the file
        super().__init__(log_dir, **kwargs)

    def _get_file_writer(self) -> FileWriter:
        """SummaryWriter's own (which Lightning calls too), with the shifted file writer (no ``purge_step``)."""
        if self.all_writers is None or self.file_writer is None:
            self.file_writer = _ShiftedFileWriter(
                self.log_dir, self.step_offset, self.max_queue, self.flush_secs, self.filename_suffix
            )
            self.all_writers = {self.file_writer.get_logdir(): self.file_writer}
        return self.file_writer


class ChainLogger(TensorBoardLogger):
    """A unit's TensorBoard logger on the chain's step axis (:class:`UnitLog`).

    Every event is numbered by the optimizer steps done when it was logged, as the callbacks (samples, FID,
    throughput) number theirs: Lightning numbers its own step metrics by the steps done *before* them, and marks
    them with an ``epoch`` scalar (always 0 here: runs are counted in steps), which is dropped.
    """

    def __init__(self, log: UnitLog):
        super().__init__(save_dir=str(log.tensorboard.parent), name="", version=log.tensorboard.name)
        self.step_offset = log.step_offset
        self._stage_step: int | None = None

    @property
    @rank_zero_experiment
    def experiment(self) -> SummaryWriter:
        if self._experiment is None:
            self._experiment = ShiftedWriter(self.log_dir, self.step_offset, **self._kwargs)
        return self._experiment

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        metrics = dict(metrics)
        if metrics.pop("epoch", None) is not None and step is not None:
            step += 1
        if step and step != self._stage_step:  # step 0 shares its place with the previous unit's last step
            metrics[STAGE_STEP] = self._stage_step = step
        super().log_metrics(metrics, step)

    @rank_zero_only
    def resumed_at(self, step: int) -> None:
        """Have TensorBoard drop what an interrupted run of this unit logged after ``step`` (its checkpoint), which
        the resumed run logs again: a session start at the next step discards the events from it on."""
        restart = Event(session_log=SessionLog(status=SessionLog.START))
        self.experiment._get_file_writer().add_event(restart, step + 1)


class ResumedLog(L.Callback):
    """Tells the unit's :class:`ChainLogger` where a resumed run starts, once its checkpoint is restored."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step > 0:
            for logger in trainer.loggers:
                if isinstance(logger, ChainLogger):
                    logger.resumed_at(trainer.global_step)
