"""The Lightning Trainer of a unit: strategy, precision, logger, our callbacks, and atomic checkpoint files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning.pytorch.plugins.io import TorchCheckpointIO

from callbacks.alignment import AlignmentCurve
from callbacks.checkpoints import Checkpoints
from callbacks.fid import FIDCallback
from callbacks.preemption import Preemption
from callbacks.progress import StageProgressBar
from callbacks.samples import SampleGrid
from callbacks.throughput import Throughput
from pixart_lightning.config import StageConfig
from pixart_lightning.files import atomic_write, note_written
from pixart_lightning.runner.console import QuietTrainer, quiet_lightning
from pixart_lightning.runner.logs import TENSORBOARD, ChainLogger, ResumedLog, UnitLog
from pixart_lightning.runner.unit import SAMPLES
from pixart_lightning.training.parallel import make_strategy


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written whole or not at all, straight to the file (not through a copy in memory) and
    hashed as the bytes go out: the checkpoint index records the hash without reading the file again."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        with atomic_write(path) as out:
            torch.save(checkpoint, out)
        note_written(path, out.record)


def make_trainer(
    cfg: StageConfig, folder: Path, checkpoints: Checkpoints, callbacks: list[L.Callback] | None = None,
    evaluation: bool = True, devices: list[int] | None = None, log: UnitLog | None = None,
) -> L.Trainer:
    """The stage's Trainer: strategy, precision and the per-step callbacks (checkpoints, preemption,
    throughput), plus samples, FID and the alignment curve when ``evaluation`` (off in benchmarks, which time the
    step alone).
    ``devices`` picks device indices (a benchmark on one chosen GPU); default: ``train.devices`` of them.
    ``log``: the progress bar's label and the TensorBoard folder and step offset (the runner's: the chain's
    folder, after the units before this one); default: ``folder/tensorboard`` from step 0."""
    log = log or UnitLog("training", folder / TENSORBOARD)
    batches = cfg.batch_plan()
    # Our own SIGUSR1 handling (callbacks/preemption.py) replaces Lightning's, which saves inside the signal handler.
    # torchrun inside a Slurm allocation: every child sees the same SLURM_PROCID, so the ranks come from torchrun's
    # variables (Lightning's own detection order, which a forced SLURMEnvironment would override).
    with quiet_lightning():  # detect() warns as the Trainer does (runner/console.py)
        slurm = SLURMEnvironment.detect() and not TorchElasticEnvironment.detect()
    environment = [SLURMEnvironment(auto_requeue=False)] if slurm else []
    samples = [SampleGrid(cfg.samples, folder / SAMPLES, cfg.text_mode)] if evaluation else []
    fid = [FIDCallback(cfg.fid, folder, progress=cfg.train.progress_bar)] if evaluation and cfg.fid.enabled else []
    curve = [AlignmentCurve(cfg.eval.every_n_steps, folder)] if evaluation and cfg.eval.every_n_steps else []
    # The bar reads the logged loss on the host: refresh it when there is a new one, not every step.
    bar = StageProgressBar(log.label, batches.global_batch, refresh_rate=cfg.train.log_every)
    progress = [bar] if cfg.train.progress_bar else []
    return QuietTrainer(
        accelerator=cfg.train.accelerator, devices=devices or cfg.train.devices, num_nodes=cfg.train.num_nodes,
        strategy=make_strategy(cfg.train), precision=cfg.train.precision,
        max_steps=cfg.train.max_steps, log_every_n_steps=cfg.train.log_every,
        accumulate_grad_batches=batches.accumulation, logger=ChainLogger(log),
        callbacks=[
            *curve, checkpoints, ResumedLog(), *samples, Preemption(checkpoints),  # the curve's clock stops first
            Throughput(every_n_steps=cfg.train.log_every, peak_tflops=cfg.train.peak_tflops),
            *fid, *progress, *(callbacks or []),
        ],
        plugins=[AtomicCheckpointIO(), *environment], enable_progress_bar=cfg.train.progress_bar,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=folder, use_distributed_sampler=False,
        enable_checkpointing=False,  # ours (callbacks/checkpoints.py), not Lightning's default ModelCheckpoint
    )
