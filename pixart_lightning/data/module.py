"""The LightningDataModule: one ShardStream per rank, resumed where the checkpoint's batches left off.

Every batch carries its worker's position (:class:`~.positions.WorkerPosition`). The training step reports the
position of each batch it trains on (:meth:`ShardDataModule.record_position`; batches Lightning has only
prefetched do not count), and a checkpoint saves, for every worker of every rank, the newest one within the
optimizer steps taken (:meth:`ShardDataModule.state_dict`).
A resumed stream continues from those without reading anything before them. A checkpoint without them (older,
or written with another number of processes or workers) falls back to replaying: each worker reads, decodes
and drops its share of the ``global_step x accumulate_grad_batches`` consumed batches.
"""

from __future__ import annotations

import logging
from collections import defaultdict, deque
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from pixart_lightning.config import DataSection
from pixart_lightning.data.positions import WorkerPosition
from pixart_lightning.data.shards import ShardStream
from pixart_lightning.encoders.vae import SD_VAE_DOWNSAMPLE

log = logging.getLogger(__name__)


def gather_on_rank_zero(value: Any) -> list[Any]:
    """Every rank's value, in rank order, on rank 0 (the rank that writes checkpoints); [] on the others.

    A collective: every rank calls it, as every rank takes part in saving a checkpoint.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(value, gathered, dst=0)
    return gathered or []


class ShardDataModule(L.LightningDataModule):
    """Builds the stream when training starts, after Lightning has restored the step and this module's state
    from a checkpoint."""

    def __init__(self, spec: DataSection, granularity: int, captions: bool = True, latent_factor: int = SD_VAE_DOWNSAMPLE):
        super().__init__()
        self.spec = spec
        self.granularity = granularity
        self.captions = captions
        self.latent_factor = latent_factor
        self.restored: dict[int, WorkerPosition] = {}
        """This rank's positions from the checkpoint, by worker of the original run."""
        self.taken: defaultdict[int, deque[WorkerPosition]] = defaultdict(deque)
        """Per worker, the positions of its newest batches trained on: under gradient accumulation a checkpoint
        may come between micro-batches, and it saves the newest within the optimizer steps taken."""

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _workers(self) -> int:
        return max(1, self.spec.num_workers)

    def _batches_in_steps(self) -> int | None:
        """Batches consumed by the optimizer steps taken (None without a trainer: every batch taken counts)."""
        trainer = self.trainer
        return trainer.global_step * trainer.accumulate_grad_batches if trainer is not None else None

    def train_dataloader(self) -> DataLoader:
        positions = self.restored
        consumed = max(p.batch for p in positions.values()) + 1 if positions else self._batches_in_steps() or 0
        accumulate = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        depth = accumulate // self._workers() + 2  # a step's micro-batches per worker, and one more
        self.taken = defaultdict(lambda: deque(maxlen=depth))
        for worker, position in positions.items():
            self.taken[worker].append(position)
        rank, world_size = self._rank_and_world()
        stream = ShardStream(
            self.spec, self.granularity, rank=rank, world_size=world_size, skip_batches=consumed,
            captions=self.captions, latent_factor=self.latent_factor, positions=positions,
        )
        return DataLoader(
            stream, batch_size=None, num_workers=self.spec.num_workers, pin_memory=torch.cuda.is_available(),
            persistent_workers=False, prefetch_factor=4 if self.spec.num_workers else None,
        )

    def record_position(self, position: WorkerPosition) -> None:
        """Called by the training step with its batch's position (the training step, not the loader: Lightning
        fetches batches ahead of the one being trained on)."""
        self.taken[position.worker].append(position)

    def state_dict(self) -> dict[str, Any]:
        """Per rank, per worker: the position of its newest batch within the optimizer steps taken."""
        limit = self._batches_in_steps()
        mine = {}
        for worker, taken in self.taken.items():
            settled = [p for p in taken if limit is None or p.batch < limit]
            if settled:
                mine[worker] = settled[-1].to_state()
        return {"workers": self._workers(), "positions": gather_on_rank_zero(mine)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rank, world_size = self._rank_and_world()
        saved = (len(state["positions"]), state["workers"])
        if saved != (world_size, self._workers()):
            log.warning("the checkpoint's data position was saved by %d processes x %d workers and this run has "
                        "%d x %d: the consumed batches are replayed instead (slower)", *saved, world_size,
                        self._workers())
            return
        self.restored = {int(w): WorkerPosition.from_state(s) for w, s in state["positions"][rank].items()}
