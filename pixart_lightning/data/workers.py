"""Which share of the shards a data-tool process works on, and on which device.

``data caption`` and ``data extract`` run as one process per GPU (torchrun or srun); shard i belongs
to process i mod world size, so the processes need no communication and a rerun redoes only what is
missing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TypeVar

import torch

T = TypeVar("T")


def process_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world size): as given, else from torchrun's (RANK, WORLD_SIZE) or Slurm's (SLURM_PROCID,
    SLURM_NTASKS) environment, else (0, 1)."""
    if (rank is None) != (world_size is None):
        raise ValueError("give the rank and the world size together (or neither, to take them from the environment)")
    if rank is None or world_size is None:
        rank, world_size = 0, 1
        for rank_var, size_var in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
            if rank_var in os.environ and size_var in os.environ:
                rank, world_size = int(os.environ[rank_var]), int(os.environ[size_var])
                break
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    return rank, world_size


def process_device(rank: int) -> torch.device:
    """This process's GPU (LOCAL_RANK under torchrun, SLURM_LOCALID under srun, else rank mod GPUs), or the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local = os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID"))
    return torch.device("cuda", int(local) if local is not None else rank % torch.cuda.device_count())


def share(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """This process's items: every world_size-th from rank."""
    return list(items[rank::world_size])
