"""FID during training: at the stage's start (optional), every N steps and at its end; TensorBoard and fid.json."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from tqdm.auto import tqdm

from callbacks.steps import interim_step_ended
from pixart_lightning.config import FIDSection
from pixart_lightning.evaluation.captions import Caption, pinned_captions
from pixart_lightning.evaluation.extractors import FeatureExtractor, load_extractor
from pixart_lightning.evaluation.fid import append_record, check_settings, evaluate_fid

RECORDS, CAPTION_IDS = "fid.json", "fid-captions.json"


class FIDCallback(L.Callback):
    """Measures the EMA model's FID (the plain model without EMA) on every rank, generation sharded, under the
    training precision.

    Rank 0 logs ``eval/fid`` at the global step and appends the full record (everything that pins the
    protocol) to ``<out_dir>/fid.json``; the pinned caption list goes to ``<out_dir>/fid-captions.json``.
    """

    def __init__(self, settings: FIDSection, out_dir: str | Path, captions: Sequence[Caption] | None = None,
                 progress: bool = False):
        """``captions``: the pinned list, when the caller has it (else read from the settings at the first
        measurement)."""
        check_settings(settings)
        self.settings = settings
        self.out_dir = Path(out_dir)
        self.captions = list(captions) if captions is not None else None
        self.progress = progress
        self._extractor: FeatureExtractor | None = None
        self._last_step: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self.settings.at_start and trainer.global_step == 0:  # a resumed stage recorded its start already
            self.evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if interim_step_ended(trainer, batch_idx, self.settings.every_n_steps):
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: L.Trainer, pl_module: Any) -> dict[str, Any] | None:
        """One measurement at the current step (once per step); the record on rank 0, None elsewhere."""
        if self._last_step == trainer.global_step:
            return None
        self._last_step = trainer.global_step
        if self.captions is None:
            self.captions = pinned_captions(self.settings)
        if self._extractor is None:
            self._extractor = load_extractor(self.settings, pl_module.device)
        model = pl_module.sampling_model(use_ema=True)
        if model.cfg.mode == "text":  # stored once; only rank 0 loads T5, and only for captions not stored yet
            pl_module.encoders.prepare_prompts([c.caption for c in self.captions], trainer.strategy)
        resolution = pl_module.cfg.data.resolution
        record = evaluate_fid(
            model, pl_module.encoders.vae, pl_module.encoders.prompt_encoder, self.settings,
            height=resolution, width=resolution, prediction=pl_module.cfg.diffusion.prediction, captions=self.captions,
            extractor=self._extractor, rank=trainer.global_rank, world_size=trainer.world_size, device=pl_module.device,
            ids_file=self.out_dir / CAPTION_IDS, precision=trainer.precision, progress=self.progress,
        )
        if record is None:
            return None
        record = {"step": trainer.global_step, **record}
        for logger in trainer.loggers:
            logger.log_metrics({"eval/fid": record["fid"]}, step=trainer.global_step)
            logger.save()
        append_record(self.out_dir / RECORDS, record)
        with tqdm.external_write_mode():  # above the training bar, which is open for a measurement every N steps
            print(f"step {trainer.global_step}: FID {record['fid']:.2f} ({record['num_images']} images, "
                  f"{record['extractor']['name']}, {sum(record['seconds'].values()):.0f} s)", flush=True)
        return record
