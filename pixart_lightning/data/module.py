"""The LightningDataModule: one ShardStream per rank, resumed at the batch the checkpoint reached."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader

from ..config import DataSection
from .shards import ShardStream


class ShardDataModule(L.LightningDataModule):
    """Builds the stream when training starts, after Lightning has restored the step from a checkpoint."""

    def __init__(self, spec: DataSection, granularity: int, captions: bool = True, latent_factor: int = 8):
        super().__init__()
        self.spec = spec
        self.granularity = granularity
        self.captions = captions
        self.latent_factor = latent_factor

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        # The data position is the number of batches consumed; a step boundary checkpoint makes it exact.
        consumed = trainer.global_step * trainer.accumulate_grad_batches if trainer is not None else 0
        stream = ShardStream(
            self.spec,
            self.granularity,
            rank=trainer.global_rank if trainer is not None else 0,
            world_size=trainer.world_size if trainer is not None else 1,
            skip_batches=consumed,
            captions=self.captions,
            latent_factor=self.latent_factor,
        )
        return DataLoader(
            stream, batch_size=None, num_workers=self.spec.num_workers, pin_memory=torch.cuda.is_available(),
            persistent_workers=False, prefetch_factor=4 if self.spec.num_workers else None,
        )
