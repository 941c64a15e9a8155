"""Fixed-prompt sample grids during training: TensorBoard images and PNGs in the run folder."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image

from callbacks.steps import interim_step_ended
from pixart_lightning.config import SamplesSection
from pixart_lightning.evaluation.generate import save_grid
from pixart_lightning.evaluation.stage_samples import sample_images
from pixart_lightning.training.parallel import is_sharded


class SampleGrid(L.Callback):
    """One row per guidance scale, one column per prompt (or class label), same seeds every time."""

    def __init__(self, cfg: SamplesSection, out_dir: Path, text_mode: bool):
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.text_mode = text_mode

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if interim_step_ended(trainer, batch_idx, self.cfg.every_n_steps):
            self.log_grid(trainer, pl_module, f"step-{trainer.global_step:06d}")

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        self.log_grid(trainer, pl_module, "final")

    def log_grid(self, trainer: L.Trainer, pl_module, name: str) -> Path | None:
        """Sample, save ``samples/<name>.png`` and log it as the ``samples`` image.

        Rank 0 samples alone, except under FSDP, where every rank must join the sharded forward passes.
        """
        conditions = self.cfg.prompts if self.text_mode else self.cfg.labels
        if not conditions or not (trainer.is_global_zero or is_sharded(pl_module.model)):
            return None
        key = "prompts" if self.text_mode else "labels"
        model = pl_module.sampling_model(self.cfg.use_ema)
        rows = [
            sample_images(model, pl_module.encoders, pl_module.cfg, trainer.precision, **{key: list(conditions)},
                          cfg_scale=scale, seed=self.cfg.seed)
            for scale in self.cfg.cfg_scales
        ]
        images = torch.cat(rows)
        if not trainer.is_global_zero:
            return None
        path = save_grid(images, self.out_dir / f"{name}.png", columns=len(conditions), scale=self.cfg.scale)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                grid = np.asarray(Image.open(path).convert("RGB"))
                logger.experiment.add_image("samples", grid, trainer.global_step, dataformats="HWC")
        return path
