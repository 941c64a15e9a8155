"""Data parallelism: DDP, or FSDP2 (``fully_shard`` per transformer block) through Lightning's ModelParallelStrategy.

Why FSDP2 through ``ModelParallelStrategy`` rather than Lightning's ``FSDPStrategy`` (FSDP1):

- parameters are sharded one by one as DTensors, not flattened, so the optimizer, the EMA and gradient
  clipping see ordinary (sharded) tensors of the model's own shapes;
- ``MixedPrecisionPolicy`` keeps the sharded master weights in fp32, all-gathers them in bf16 and
  reduces gradients in fp32: ``bf16-mixed`` without a bf16 copy of the optimizer state;
- checkpoints are ``torch.distributed.checkpoint`` folders written by every rank at once;
- it runs on the CPU over gloo, so the sharded path is tested without a GPU (``FSDPStrategy``
  refuses the CPU).

Sharding strategies map onto ``fully_shard`` as: ``full`` = reshard after forward (ZeRO-3), ``grad_op`` =
keep the gathered parameters until backward (ZeRO-2-like: more memory, no second all-gather), and
``hybrid`` = a 2-D mesh that shards within a node and replicates across nodes (HSDP).
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from .config import TrainSection


class ShardedStrategy(ModelParallelStrategy):
    """FSDP2 over all processes; a sharded checkpoint folder is written beside its name and renamed when
    every rank has finished, so a crash mid-save leaves the previous checkpoint whole."""

    def __init__(self, train: TrainSection):
        super().__init__(data_parallel_size=train.devices * train.num_nodes, tensor_parallel_size=1,
                         save_distributed_checkpoint=train.sharded_checkpoint)
        self.train_cfg = train

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)  # one file via checkpoint_io
        path = Path(filepath)
        tmp = path.with_name(path.name + ".tmp")
        if self.global_rank == 0 and tmp.exists():
            shutil.rmtree(tmp)
        self.barrier("checkpoint tmp cleared")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier("checkpoint written")
        if self.global_rank == 0:
            old = path.with_name(path.name + ".old")
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)
            if old.is_dir():
                shutil.rmtree(old)
            elif old.exists():
                old.unlink()
        self.barrier("checkpoint published")


def make_strategy(train: TrainSection) -> str | DDPStrategy | ShardedStrategy:
    """The Lightning strategy for ``train.strategy`` (``auto``: DDP when there is more than one process)."""
    if train.strategy == "fsdp":
        return ShardedStrategy(train)
    if train.strategy == "ddp" or train.devices * train.num_nodes > 1:
        return DDPStrategy(find_unused_parameters=False, gradient_as_bucket_view=True)
    return "auto"


def is_sharded(module: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in module.parameters())


def shard(model: nn.Module, train: TrainSection, mesh, device_type: str) -> None:
    """``fully_shard`` every transformer block, then the rest of the model, as ``train.sharding`` says."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if train.sharding == "hybrid":  # replicate across nodes, shard within a node
        mesh = init_device_mesh(device_type, (train.num_nodes, train.devices), mesh_dim_names=("replicate", "shard"))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if train.precision == "bf16-mixed" else MixedPrecisionPolicy())
    reshard = train.sharding != "grad_op"
    for block in model.blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)


def local(tensor: Tensor) -> Tensor:
    """This rank's shard of a DTensor (a view: in-place ops update the DTensor), or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float) -> Tensor:
    """Clip by the global gradient norm, sharded (DTensor) or not; the norm as a plain tensor."""
    parameters = [p for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters], foreach=True)
    if isinstance(norm, DTensor):  # a partial norm per shard: reduce it to the full one
        norm = norm.full_tensor()
    if math.isfinite(max_norm):
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm, foreach=True)
    return norm


def full_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The module's complete state on the CPU. Collective when sharded: every rank calls, rank 0 gets it."""
    if not is_sharded(module):
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
