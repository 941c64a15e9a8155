"""Data parallelism: DDP, or FSDP2 (``fully_shard`` per transformer block) through Lightning's ModelParallelStrategy;
and :func:`parallelize`, the one place that readies the model for a run (activation checkpointing, compile, FSDP).

Why FSDP2 through ``ModelParallelStrategy`` rather than Lightning's ``FSDPStrategy`` (FSDP1):

- parameters are sharded one by one as DTensors, not flattened, so the optimizer, the EMA and gradient
  clipping see ordinary (sharded) tensors of the model's own shapes;
- ``MixedPrecisionPolicy`` keeps the sharded master weights in fp32, all-gathers them in bf16 and
  reduces gradients in fp32: ``bf16-mixed`` without a bf16 copy of the optimizer state;
- checkpoints are ``torch.distributed.checkpoint`` folders written by every rank at once, each rank hashing its
  own files as it writes them;
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
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
from lightning.fabric.strategies.model_parallel import _rekey_optimizer_state_if_needed
from lightning.fabric.utilities.load import _METADATA_FILENAME
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from torch import Tensor, nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

from pixart_lightning.config import StageConfig, TrainSection
from pixart_lightning.files import FileRecord, HashingWriter, note_written, publish_folder
from pixart_lightning.models import PixArt
from pixart_lightning.training import lora
from pixart_lightning.training.compilation import compile_blocks

T = TypeVar("T")


def rank_zero_result(compute: Callable[[], T]) -> T | None:
    """``compute()`` run by global rank 0 alone, its result shared with every rank once torch.distributed is up.

    The runner starts a stage before Lightning creates the process group (in ``trainer.fit``); until then the other
    ranks get None. They need not wait for rank 0's answer: what rank 0 does with it (refuse to start) ends the job
    anyway, as Slurm's ``srun --kill-on-bad-exit=1`` and torchrun stop every process when one fails, and Lightning's
    own launcher starts the other processes only inside ``trainer.fit``.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        result = [compute() if torch.distributed.get_rank() == 0 else None]
        torch.distributed.broadcast_object_list(result, src=0)
        return result[0]
    return compute() if rank_zero_only.rank == 0 else None


class _HashingFileSystem(FileSystem):
    """The local file system of ``torch.distributed.checkpoint``, hashing each file it writes as the bytes go out."""

    def __init__(self):
        super().__init__()
        self.records: dict[Path, FileRecord] = {}

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[Any]:
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with HashingWriter(path) as stream:
            yield stream
        self.records[Path(path)] = stream.record

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        super().rename(path, new_path)
        self.records[Path(new_path)] = self.records.pop(Path(path))


class _HashingCheckpointWriter(FileSystemWriter):
    """``torch.distributed.checkpoint``'s writer for a folder, keeping the record of each file it writes."""

    def __init__(self, folder: Path):
        super().__init__(folder)
        self.fs = _HashingFileSystem()

    def records(self) -> dict[str, FileRecord]:
        """This rank's files, by name within the folder."""
        return {str(path.relative_to(self.path)): record for path, record in self.fs.records.items()}


class ShardedStrategy(ModelParallelStrategy):
    """FSDP2 over all processes. A sharded checkpoint folder is written beside its name and renamed when every rank
    has finished, so a crash mid-save leaves the previous checkpoint whole; each rank hashes its files as it writes
    them, and rank 0 notes every file's record (``files.note_written``) for the checkpoint index."""

    def __init__(self, train: TrainSection):
        super().__init__(data_parallel_size=train.devices * train.num_nodes, tensor_parallel_size=1,
                         save_distributed_checkpoint=train.sharded_checkpoint)
        self.train_cfg = train

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)  # one file via checkpoint_io
        path = Path(self.broadcast(filepath))
        tmp = path.with_name(path.name + ".tmp")
        if self.global_rank == 0 and tmp.exists():
            shutil.rmtree(tmp)
        self.barrier("checkpoint tmp cleared")
        records = self._gather(self._write_shards(checkpoint, tmp))  # rank 0 has them once every rank has written
        if self.global_rank == 0:
            publish_folder(tmp, path, replace=True)
            for name, record in records.items():
                note_written(path / name, record)
        self.barrier("checkpoint published")

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's, except under LoRA: there a checkpoint holds the adapters and their average but not the frozen
        base (the model as built holds it), so only the other weights are read: exactly those, as DDP's strict load
        wants (:func:`refuse_other_weights`)."""
        frozen = lora.frozen_base_keys(self.lightning_module)
        if not frozen:
            return super().load_checkpoint(checkpoint_path, weights_only)
        path = Path(self.broadcast(checkpoint_path))
        wanted = {k: v for k, v in get_model_state_dict(self.model).items() if k not in frozen}
        sharded = path.is_dir()
        if sharded:  # read into this rank's parts of the wanted weights and of the optimizer states
            refuse_other_weights(path, sharded_weights(path), wanted)
            optimizer_states = [get_optimizer_state_dict(self.model, o) for o in self.optimizers]
            torch.distributed.checkpoint.load(
                {"state_dict": wanted, **{f"optimizer_{i}": s for i, s in enumerate(optimizer_states)}},
                checkpoint_id=path)
            checkpoint = torch.load(path / _METADATA_FILENAME, weights_only=weights_only)
        else:  # one gathered file, which every rank reads
            checkpoint = torch.load(path, mmap=True, map_location="cpu", weights_only=weights_only)
            held = checkpoint.pop("state_dict")
            refuse_other_weights(path, held, wanted)
            wanted = {k: held[k] for k in wanted}
            optimizer_states = [_rekey_optimizer_state_if_needed(s, self.model) for s in checkpoint["optimizer_states"]]
        options = StateDictOptions(full_state_dict=not sharded, broadcast_from_rank0=not sharded, strict=False)
        set_model_state_dict(self.model, wanted, options=options)
        for optimizer, state in zip(self.optimizers, optimizer_states):
            set_optimizer_state_dict(self.model, optimizer, state, options=options)
        return checkpoint

    def _write_shards(self, checkpoint: dict[str, Any], folder: Path) -> dict[str, FileRecord]:
        """This rank's shards, and on rank 0 the metadata, in Lightning's layout; the records of the files written."""
        folder.mkdir(parents=True, exist_ok=True)
        state = {"state_dict": checkpoint.pop("state_dict"),
                 **{f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))}}
        writer = _HashingCheckpointWriter(folder)
        torch.distributed.checkpoint.save(state, storage_writer=writer)
        records = writer.records()
        if self.global_rank == 0:
            with HashingWriter(folder / _METADATA_FILENAME) as out:
                torch.save(checkpoint, out)
            records[_METADATA_FILENAME] = out.record
        return records

    def _gather(self, records: dict[str, FileRecord]) -> dict[str, FileRecord]:
        """Every rank's records on rank 0 (empty elsewhere)."""
        everyone = [None] * self.world_size if self.global_rank == 0 else None
        torch.distributed.gather_object(records, everyone, dst=0)
        return {name: record for ranks in everyone or [] for name, record in ranks.items()}


def sharded_weights(folder: Path) -> set[str]:
    """The keys of the module weights a folder of shards holds (its metadata's ``state_dict.*`` entries)."""
    held = FileSystemReader(folder).read_metadata().state_dict_metadata
    return {k.removeprefix("state_dict.") for k in held if k.startswith("state_dict.")}


def refuse_other_weights(path: Path, held: Iterable[str], wanted: Iterable[str]) -> None:
    """Refuse a LoRA checkpoint that does not hold exactly the weights the stage trains: a missing one would stay at
    its start, and an extra one (the adapters of layers no longer targeted, after narrowing ``model.lora.targets``)
    would be dropped unseen, ``torch.distributed.checkpoint.load`` reading only what it is asked for."""
    held, wanted = set(held), set(wanted)
    for keys, says in ((sorted(wanted - held), "lacks {} of the weights this LoRA stage trains"),
                       (sorted(held - wanted), "holds {} weights this LoRA stage does not train")):
        if keys:
            named = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
            raise ValueError(f"{path} {says.format(len(keys))} ({named}): it was written with other model.lora "
                             "settings; resume with those, or delete the stage folder's checkpoints/ to restart it")


class DataParallelStrategy(DDPStrategy):
    """DDP that loads the checkpoint rank 0 chose, as ``ModelParallelStrategy`` does: only rank 0 reads the
    candidates to check their hashes (``callbacks/checkpoints.latest_good``)."""

    def __init__(self):
        super().__init__(find_unused_parameters=False, gradient_as_bucket_view=True)

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        return super().load_checkpoint(self.broadcast(checkpoint_path), weights_only)


def make_strategy(train: TrainSection) -> str | DataParallelStrategy | ShardedStrategy:
    """The Lightning strategy for ``train.strategy`` (``auto``: DDP when there is more than one process)."""
    if train.strategy == "fsdp":
        return ShardedStrategy(train)
    if train.strategy == "ddp" or train.devices * train.num_nodes > 1:
        return DataParallelStrategy()
    return "auto"


def is_sharded(module: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in module.parameters())


def parallelize(model: PixArt, cfg: StageConfig, device: torch.device, mesh: DeviceMesh | None = None,
                average: PixArt | None = None) -> None:
    """Ready the training ``model`` for the run as ``cfg.model`` and ``cfg.train`` say, in place.

    The order is torchtitan's (``parallelize_llama``), each step applying to what the one before produced:

    0. LoRA adapters (``model.lora``), to the EMA copy too (starting equal): they replace Linear modules, so they
       go in before anything holds on to the modules (compiled graphs, FSDP's parameter groups);
    1. activation checkpointing, so that backward recomputes each block's forward (adapters included);
    2. ``torch.compile`` of each block, so that what checkpointing recomputes is the compiled block;
    3. FSDP (with a ``mesh``): ``fully_shard`` per block, whose hooks gather a block's parameters around its
       compiled forward (outside the graph: FSDP's hooks are hidden from the compiler).

    Steps 1-3 work in place, so the parameter names (checkpoints, the diffusers key map) stay the model's own;
    adapters rename their base layers' (``training/lora.py`` merges them back for the handoff).
    ``average``, the EMA copy, is sharded on the same mesh so that the two models' shards pair up; it only
    samples, so it is neither checkpointed nor compiled. Calling again (Lightning may configure the model more
    than once) changes nothing.
    """
    if cfg.model.lora is not None:
        lora.add_adapters(model, cfg.model.lora, seed=cfg.train.seed)
        if average is not None:
            lora.add_adapters(average, cfg.model.lora, like=model)
    checkpoint_activations(model, cfg.model.gradient_checkpointing)
    if cfg.model.compile:
        compile_blocks(model.blocks, device)
    if mesh is not None and not is_sharded(model):
        for module in (model, average):
            if module is not None:
                shard(module, cfg.train, mesh, device.type)


def checkpoint_activations(model: PixArt, enabled: bool = True) -> None:
    """Recompute each block's activations in backward instead of keeping them: memory for compute.

    The model's own switch (``torch.utils.checkpoint`` around each block in its forward) rather than torch's
    ``checkpoint_wrapper``, which would rename every block parameter.
    """
    model.gradient_checkpointing = enabled


def shard(model: nn.Module, train: TrainSection, mesh, device_type: str) -> None:
    """``fully_shard`` every transformer block, then the rest of the model, as ``train.sharding`` says.

    Under ``bf16-mixed`` the weights are gathered in bf16 but the modules' inputs are left as they come
    (``cast_forward_inputs=False``, the root's too), which is what DDP under autocast computes: the residual stream
    between blocks, the caption features and the raw micro-condition sizes stay fp32 (bf16 would turn a size of
    1001 into 1000), and autocast runs the matmuls inside each block in bf16.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if train.sharding == "hybrid":  # replicate across nodes, shard within a node
        mesh = init_device_mesh(device_type, (train.num_nodes, train.devices), mesh_dim_names=("replicate", "shard"))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)
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
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def consolidated(model: PixArt, average: PixArt | None, device: torch.device) -> tuple[PixArt | None, PixArt | None]:
    """(model, EMA model) as plain, unsharded modules on rank 0, whatever the strategy, the EMA copy in eval mode
    (it only samples and is saved); unsharded ones are returned as they are, on every rank. Adapted models keep
    their adapters (over an fp32 base) for ``lora.merged`` and ``lora.save_adapters``.

    Collective under FSDP (every rank must call it; the others get ``(None, None)``).
    """
    if not is_sharded(model):
        return model, average.eval() if average is not None else None
    plain: list[PixArt | None] = []
    for module in (model, average):
        state = full_state_dict(module) if module is not None else {}
        if module is None or torch.distributed.get_rank() != 0:
            plain.append(None)
            continue
        copy = PixArt(module.cfg)
        if lora.is_adapted(module):
            lora.add_adapters_like(copy, module)
        copy.load_state_dict(state)
        plain.append(copy.to(device).eval())
    return plain[0], plain[1]
