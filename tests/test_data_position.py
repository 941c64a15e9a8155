"""Data positions: exact O(1) resume from saved worker positions, per-sample reads when shards are fewer than slots,
and a shuffle buffer bounded in bytes."""

from __future__ import annotations

import io
import itertools
import tarfile
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from pixart_lightning.config import DataSection
from pixart_lightning.data.features import FEATURES_KEY, encode_features
from pixart_lightning.data.module import ShardDataModule
from pixart_lightning.data.shards import ShardStream

T5_SHAPE = (120, 512)  # bf16: 120 KiB a sample, like T5 features



def spec(shards: Path, **changes) -> DataSection:
    fields = dict(shards=str(shards), batch_size=4, resolution=16, shuffle_buffer=8, seed=3)
    return DataSection(**{**fields, **changes})


def write_feature_shards(folder: Path, shards: int, per_shard: int, t5_shape: tuple[int, int],
                         varied: bool = False) -> Path:
    """Tars of precomputed-feature samples (2x2 latents, the given T5 features, a caption); ``varied``: caption
    lengths from 1 to ``t5_shape[0]``, as trimmed T5 features are."""
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with tarfile.open(folder / f"{s:04d}.tar", "w") as tar:
            for i in range(per_shard):
                length = 1 + (i * 37 + s * 11) % t5_shape[0] if varied else t5_shape[0]
                feats = encode_features(latent_mean=torch.full((4, 2, 2), float(i)), latent_std=torch.ones(4, 2, 2),
                                        t5=torch.full((length, t5_shape[1]), float(s), dtype=torch.bfloat16))
                for ext, data in (("txt", f"sample {s}-{i}".encode()), (FEATURES_KEY, feats)):
                    info = tarfile.TarInfo(f"{s:04d}-{i:04d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return folder


class CountingStream(ShardStream):
    """The real stream, counting the samples it decodes."""

    decoded = 0

    def _decode(self, raw, ref):
        self.decoded += 1
        return super()._decode(raw, ref)


def newest_positions(batches: list[dict]) -> dict:
    """What a data module keeps: the position of each worker's newest batch."""
    return {b["position"].worker: b["position"] for b in batches}


def keys(batches) -> list[list[str]]:
    return [b["key"] for b in batches]


@pytest.mark.parametrize("layout", [
    dict(world_size=1),  # 2 slots, 4 shards: each slot reads whole shards
    dict(world_size=4, rank=1),  # 8 slots, 4 shards: every slot takes its samples of every shard (tar index)
    dict(world_size=4, rank=1, multi_scale=True, resolution=24, min_ratio=0.5, max_ratio=2.0),  # + bucket queues
])
def test_resume_from_saved_positions_equals_the_uninterrupted_stream(world_shards: Path, layout: dict) -> None:
    """With 2 DataLoader workers, the stream resumed from the positions of the first k batches continues with batch
    k of the uninterrupted stream, however many epochs, shards, buffered and queued samples lie behind it."""
    rank, world_size = layout.pop("rank", 0), layout.pop("world_size")
    s = spec(world_shards, **layout)

    def loader(skip: int = 0, positions: dict | None = None) -> DataLoader:
        stream = ShardStream(s, 4, rank=rank, world_size=world_size, skip_batches=skip, positions=positions)
        return DataLoader(stream, batch_size=None, num_workers=2)

    whole = list(itertools.islice(loader(), 36))
    for k in (7, 29):  # past the first epoch of every slot
        resumed = itertools.islice(loader(k, newest_positions(whole[:k])), 36 - k)
        assert keys(resumed) == keys(whole[k:])


def test_resume_at_a_late_step_decodes_only_what_the_buffer_held(tmp_path: Path) -> None:
    """Resuming at step 10,000 (50 epochs) decodes the few samples the saved buffer held, as at step 100; the
    replay of a checkpoint without positions decodes every sample since step 0."""
    s = spec(write_feature_shards(tmp_path, shards=10, per_shard=20, t5_shape=(4, 8)), batch_size=1)
    late = 10_000
    stream = iter(ShardStream(s))
    whole = list(itertools.islice(stream, late + 3))
    for step in (100, late):
        resumed = CountingStream(s, skip_batches=step, positions=newest_positions(whole[:step]))
        assert keys(itertools.islice(resumed, 3)) == keys(whole[step:step + 3])
        assert resumed.decoded <= 20 + 3  # the buffer's samples (at most one shard's worth) and the 3 batches
    replayed = CountingStream(s, skip_batches=late)
    assert keys(itertools.islice(replayed, 3)) == keys(whole[late:late + 3])
    assert replayed.decoded >= late


def test_few_shards_each_slot_reads_only_its_share_of_bytes(tmp_path: Path) -> None:
    """2 shards, world size 64: each of the 64 slots reads its own samples' bytes plus the tar headers, about
    1.4/64 of the data, not every byte of every shard."""
    folder = write_feature_shards(tmp_path, shards=2, per_shard=64, t5_shape=T5_SHAPE)
    total = sum(p.stat().st_size for p in folder.glob("*.tar"))
    s = spec(folder, batch_size=1, shuffle_buffer=1)

    def bytes_read() -> int:
        return int(next(line for line in Path("/proc/self/io").read_text().splitlines()
                        if line.startswith("rchar")).split()[1])

    per_slot = []
    for rank in range(64):
        stream = ShardStream(s, rank=rank, world_size=64)
        before = bytes_read()
        batches = list(itertools.islice(stream, 2))  # one epoch: its sample of each shard
        per_slot.append(bytes_read() - before)
        assert len({b["key"][0].split("-")[0] for b in batches}) == 2
    assert max(per_slot) < 2 * total / 64, (max(per_slot), total)


def test_shuffle_buffer_stays_within_its_byte_budget(tmp_path: Path) -> None:
    """Samples of 120 KiB of T5 features in a 1 MiB buffer: at most 8 wait, not ``shuffle_buffer`` (100) of them;
    with a budget they do not reach, the sample count bounds the buffer as before."""
    s = spec(write_feature_shards(tmp_path, shards=2, per_shard=20, t5_shape=T5_SHAPE), batch_size=1,
             shuffle_buffer=100, shuffle_buffer_mb=1.0)
    sample_bytes = T5_SHAPE[0] * T5_SHAPE[1] * 2 + 2 * 4 * 2 * 2 * 4
    held = [len(b["position"].buffer) for b in itertools.islice(ShardStream(s), 60)]
    assert max(held) * sample_bytes <= 2**20 and max(held) == 2**20 // sample_bytes
    counted = [len(b["position"].buffer) for b in itertools.islice(ShardStream(spec(s.shards, shuffle_buffer=8)), 20)]
    assert set(counted) == {7}


def test_resume_is_exact_when_the_byte_budget_binds(tmp_path: Path) -> None:
    """Samples of 1 to 120 caption tokens in a budget of a few of them: one large sample can take several pops,
    and a batch can end in the middle of them; a resume from any batch still continues the same sequence."""
    s = spec(write_feature_shards(tmp_path, shards=4, per_shard=30, t5_shape=(120, 64), varied=True), batch_size=2,
             shuffle_buffer=100, shuffle_buffer_mb=0.05)
    whole = list(itertools.islice(ShardStream(s), 70))
    for k in range(1, 60):
        resumed = ShardStream(s, skip_batches=k, positions=newest_positions(whole[:k]))
        assert keys(itertools.islice(resumed, 10)) == keys(whole[k:k + 10]), k


class KeyRecorder(L.LightningModule):
    """A one-parameter module that records the keys of the batches it trains on and, as the stages do, reports
    their positions to the data module."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.keys: list[list[str]] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.keys.append(batch["key"])
        self.trainer.datamodule.record_position(batch["position"])
        return (self.weight * batch["pixels"].mean()).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class SaveMidStep(L.Callback):
    """Checkpoint after the first micro-batch of the third optimizer step, then stop."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 4:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


def test_checkpoint_saves_the_positions_of_the_batches_in_its_steps(world_shards: Path, tmp_path: Path) -> None:
    """A real Trainer with 2 workers and gradient accumulation over 2 batches, checkpointed between micro-batches
    while Lightning prefetches ahead: the checkpoint holds the positions as of its optimizer steps (4 batches),
    and a data module loading it continues with batch 4 of the uninterrupted stream."""
    s = spec(world_shards, num_workers=2)
    whole = keys(itertools.islice(DataLoader(ShardStream(s), batch_size=None, num_workers=2), 8))
    trainer = L.Trainer(accelerator="cpu", max_steps=10, accumulate_grad_batches=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[SaveMidStep(tmp_path / "mid.ckpt")])
    module = KeyRecorder()
    trainer.fit(module, datamodule=ShardDataModule(s, granularity=8))
    checkpoint = torch.load(tmp_path / "mid.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2 and module.keys == whole[:5]
    resumed = ShardDataModule(s, granularity=8)
    resumed.load_state_dict(checkpoint["ShardDataModule"])
    assert keys(itertools.islice(resumed.train_dataloader(), 4)) == whole[4:8]
