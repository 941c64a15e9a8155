"""The fast paths keep the numbers: no host syncs and no copies from host memory in a training step, matmul
attention equals SDPA, compiled blocks equal eager ones (and compiling falls back to eager where it cannot work)."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, Dataset

from pixart_lightning.config import load_stage
from pixart_lightning.encoders.vae import PixelSpace
from pixart_lightning.models.attention import CPU_MATMUL_ATTENTION, attention
from pixart_lightning.training import compilation
from stages import STAGE_MODULES
from tests.multiproc_train import DEMO, GLOBAL_BATCH, SIDE, GlobalBatches, small_stage2

# Ops that make the host wait for the device: reading a value (item, bool, int, tolist) or an output whose
# shape depends on values.
SYNCING_OPS = {"_local_scalar_dense", "is_nonzero", "equal", "nonzero", "masked_select", "_unique2"}
# Ops that turn host memory into a tensor (torch.from_numpy, torch.tensor(data), torch.as_tensor): inside a step
# on a GPU each is followed by a blocking copy from the host; on CPU they show the same code path.
HOST_DATA_OPS = {"lift_fresh", "lift_fresh_copy"}


class SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.host_data: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNCING_OPS:
            self.ops.append(name)
        if name in HOST_DATA_OPS:
            self.host_data.append(name)
        return func(*args, **(kwargs or {}))


class CountSyncs(L.Callback):
    """Syncing and host-data ops per training step, from batch start to batch end (forward, backward, clipping,
    AdamW, EMA)."""

    def __init__(self):
        self.per_step: list[SyncCounter] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.per_step.append(SyncCounter())
        self.per_step[-1].__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.per_step[-1].__exit__(None, None, None)


class LabelBatches(Dataset):
    """Stage 1's batches for ``GlobalBatches``' images: class labels instead of captions."""

    def __init__(self, steps: int):
        self.images = GlobalBatches(0, steps, 0, 1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        batch = self.images[i]
        return {"latent_mean": batch["latent_mean"], "latent_std": batch["latent_std"], "key": batch["key"],
                "label": torch.arange(GLOBAL_BATCH) * 3}


def small_stage1(steps: int):
    """``small_stage2``'s model and training as stage 1 (the demo's 27 classes)."""
    cfg = load_stage(DEMO, 1, [
        "data.shards=unused", "model.depth=2", "model.hidden_size=48", "model.patch_size=2",
        f"data.resolution={SIDE}", f"data.batch_size={GLOBAL_BATCH}", "train.accelerator=cpu", "train.precision=32",
        f"train.max_steps={steps}", "optim.warmup_steps=1", "optim.ema_rate=0.9",
    ])
    torch.manual_seed(0)
    return STAGE_MODULES[1](cfg, STAGE_MODULES[1].initial_model(cfg, None, None), PixelSpace(), None)


def fit(module, steps: int, tmp_path: Path, callbacks=(), log_every: int = 50, batches: Dataset | None = None
        ) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks),
                        log_every_n_steps=log_every, default_root_dir=tmp_path)
    batches = batches if batches is not None else GlobalBatches(0, steps, 0, 1)
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    return trainer


@pytest.mark.parametrize("stage", [1, 2])
def test_a_training_step_reads_nothing_back_from_the_device(stage: int, tmp_path: Path) -> None:
    """Forward, hybrid loss, backward, clipping, the non-finite guard, fused AdamW and the EMA queue work
    without waiting for it; the host reads only on logging steps (here every 3rd) and at the last step. Nor
    does a step after the first make tensors from host memory (the first copies the diffusion schedule to the
    device once)."""
    counter = CountSyncs()
    module = small_stage1(7) if stage == 1 else small_stage2(7)
    fit(module, 7, tmp_path, [counter], log_every=3, batches=LabelBatches(7) if stage == 1 else None)
    assert module.trainer.optimizers[0].defaults["fused"]
    quiet = {step: seen for step, seen in enumerate(counter.per_step) if (step + 1) % 3 and step != 6}
    assert len(quiet) == 4 and all(seen.ops == [] for seen in quiet.values()), [s.ops for s in counter.per_step]
    host_data = {step: seen.host_data for step, seen in quiet.items() if step > 0}
    assert all(ops == [] for ops in host_data.values()), host_data
    with SyncCounter() as seen:  # the counter is not blind
        torch.ones(2).sum().item(), bool(torch.ones(()) > 0), torch.ones(3).nonzero()
        torch.from_numpy(np.ones(2)), torch.tensor([1.0])
    assert seen.ops == ["_local_scalar_dense", "_local_scalar_dense", "nonzero"]
    assert seen.host_data == ["lift_fresh", "lift_fresh"]


@pytest.mark.parametrize("bad", [-1, 27])
def test_stage_1_checks_its_labels_on_the_host(bad: int) -> None:
    """Before the batch moves (no device read in the step); a label outside the classes is a one-line error."""
    module, batch = small_stage1(1), LabelBatches(1)[0]
    assert module.on_before_batch_transfer(batch, 0) is batch
    batch["label"][3] = bad
    with pytest.raises(ValueError, match=r"stage 1 needs class labels in \[0, 27\) in every sample .*got \[0, 3, 6, "):
        module.on_before_batch_transfer(batch, 0)


def test_matmul_attention_on_cpu_equals_sdpa() -> None:
    gen = torch.Generator().manual_seed(0)
    B, H, d = 3, 4, 8
    for N, M in [(36, 36), (36, 7), (300, 300)]:  # the last takes SDPA itself
        q, k, v = (torch.randn(B, n, H, d, generator=gen) for n in (N, M, M))
        mask = torch.ones(B, M, dtype=torch.long)
        mask[1, M // 2:] = 0
        for m in (None, mask):
            ref = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                attn_mask=None if m is None else m.bool()[:, None, None, :]).transpose(1, 2).reshape(B, N, H * d)
            torch.testing.assert_close(attention(q, k, v, m), ref, atol=1e-5, rtol=1e-5)
    assert 36 * 36 <= CPU_MATMUL_ATTENTION < 300 * 300


def test_compiled_blocks_train_like_eager_ones(tmp_path: Path) -> None:
    if compilation.compile_unavailable(torch.device("cpu")):
        pytest.skip(compilation.compile_unavailable(torch.device("cpu")))
    torch._dynamo.reset()
    eager, compiled = small_stage2(3), small_stage2(3, "model.compile=true")
    fit(eager, 3, tmp_path / "eager")
    fit(compiled, 3, tmp_path / "compiled")
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in compiled.model.blocks)
    for a, b in zip(eager.model.parameters(), compiled.model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_compiling_falls_back_to_eager_without_a_compiler(monkeypatch, caplog) -> None:
    monkeypatch.setattr(compilation.shutil, "which", lambda name: None)
    blocks = small_stage2(1).model.blocks
    with caplog.at_level(logging.WARNING):
        assert compilation.compile_blocks(blocks, torch.device("cpu")) is False
    assert "no C++ compiler" in caplog.text and "run eagerly" in caplog.text
    assert all(getattr(b, "_compiled_call_impl", None) is None for b in blocks)


def test_the_benchmarks_run_and_print_their_ratios() -> None:
    """The one-command benchmarks of docs/performance.md, in their smallest form."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    step = subprocess.run([sys.executable, "benchmarks/train_step.py", "--steps", "2", "--warmup", "1"],
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert step.returncode == 0, step.stderr[-2000:]
    assert "ours/diffusers images/s:" in step.stdout and "diffusers" in step.stdout
    cost = subprocess.run([sys.executable, "benchmarks/cost_projection.py", "--mfu", "0.4", "--gpu", "H100"],
                          cwd=root, capture_output=True, text=True, timeout=120)
    assert cost.returncode == 0, cost.stderr[-2000:]
    assert "752.7" in cost.stdout and "H100-days" in cost.stdout
