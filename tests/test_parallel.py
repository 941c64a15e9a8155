"""DDP and FSDP2 on the CPU over gloo, 2 processes: the same training as one process with the same global batch.

Each case runs tests/multiproc_train.py in a subprocess (Lightning starts the second process), a few
stage-2 steps with gradient clipping and the EMA on; tests/multiproc_precision.py compares the two in bf16-mixed.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).with_name("multiproc_train.py")
PRECISION_SCRIPT = SCRIPT.with_name("multiproc_precision.py")
ROOT = SCRIPT.parents[1]


@pytest.fixture(scope="module")
def train(tmp_path_factory):
    out = tmp_path_factory.mktemp("multiproc")

    @functools.cache
    def run(tag: str, *args: str) -> dict:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.run([sys.executable, str(SCRIPT), str(out), tag, *args], env=env, capture_output=True,
                              text=True, timeout=600)
        if proc.returncode:
            return {"error": proc.stderr, "out": out}
        result = json.loads((out / f"{tag}.json").read_text())
        return result | {"weights": load_file(out / f"{tag}.safetensors"),
                         "ema": load_file(out / f"{tag}-ema.safetensors"), "out": out}

    return run


def assert_same_weights(a: dict, b: dict, atol: float) -> None:
    for part in ("weights", "ema"):
        assert a[part].keys() == b[part].keys()
        worst = max((a[part][k] - b[part][k]).abs().max().item() for k in a[part])
        assert worst <= atol, (part, worst)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_train_like_one_with_the_global_batch(train, strategy: str) -> None:
    """Losses, weights and EMA after 4 steps match one process: gradients are averaged, not summed."""
    one = train("single")
    two = train(strategy, "--strategy", strategy, "--devices", "2")
    assert "error" not in two, two.get("error")
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert_same_weights(one, two, atol=2e-5)  # lr 1e-2 amplifies reduction-order rounding; about 6e-6 observed
    if strategy == "fsdp":
        assert two["sharded"] == [True, True]  # the model and its EMA are both sharded


@pytest.mark.parametrize("sharded", ["true", "false"])
def test_fsdp_checkpoint_resumes_exactly(train, sharded: str) -> None:
    """Stopped at step 2 and resumed from its checkpoint (a folder of shards, or one gathered file)."""
    whole = train("fsdp", "--strategy", "fsdp", "--devices", "2")
    first = train(f"fsdp-{sharded}-a", "--strategy", "fsdp", "--devices", "2", "--stop-at", "2",
                  "--sharded-checkpoint", sharded)
    assert "error" not in first, first.get("error")
    checkpoint = first["out"] / f"fsdp-{sharded}-a.ckpt"
    assert checkpoint.is_dir() == (sharded == "true")
    if sharded == "true":
        assert len(list(checkpoint.glob("*.distcp"))) == 2
    second = train(f"fsdp-{sharded}-b", "--strategy", "fsdp", "--devices", "2", "--resume", str(checkpoint),
                   "--sharded-checkpoint", sharded)
    assert "error" not in second, second.get("error")
    assert first["losses"] + second["losses"] == pytest.approx(whole["losses"], rel=1e-6)
    assert_same_weights(whole, second, atol=1e-6)


def test_resuming_with_another_world_size_is_refused(train) -> None:
    first = train("fsdp-true-a", "--strategy", "fsdp", "--devices", "2", "--stop-at", "2", "--sharded-checkpoint", "true")
    refused = train("one-from-two", "--strategy", "fsdp", "--resume", str(first["out"] / "fsdp-true-a.ckpt"))
    assert "written by 2 processes and this run has 1" in refused["error"]


def test_gradient_clipping_by_global_norm() -> None:
    """Clipping uses the norm over all parameters (under FSDP the same code reduces the shards' partial norms)."""
    from pixart_lightning.training.parallel import clip_grad_norm

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p)
    expected = torch.sqrt(sum((p.grad**2).sum() for p in params))
    norm = clip_grad_norm(params, 0.5)
    assert norm == pytest.approx(expected.item(), rel=1e-6)
    assert torch.sqrt(sum((p.grad**2).sum() for p in params)) == pytest.approx(0.5, rel=1e-4)


def test_fit_parallelizes_the_training_model_and_keeps_its_parameter_names(tmp_path: Path) -> None:
    """The stage's configure_model hands its model to parallelize(): activation checkpointing is turned on there
    (for the training model only: the EMA copy only samples), and the state-dict keys stay the model's own."""
    import lightning as L
    from torch.utils.data import DataLoader

    from tests.multiproc_train import GlobalBatches, small_stage2

    module = small_stage2(1, "model.gradient_checkpointing=true")
    keys = list(module.state_dict())
    assert not module.model.gradient_checkpointing  # nothing is applied before the Trainer configures the model
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=DataLoader(GlobalBatches(0, 1, 0, 1), batch_size=None))
    assert module.model.gradient_checkpointing and not module.ema.model.gradient_checkpointing
    assert list(module.state_dict()) == keys


def test_fsdp_computes_like_ddp_under_bf16_mixed(tmp_path: Path) -> None:
    """bf16-mixed: FSDP gathers bf16 weights but, like DDP under autocast, leaves the residual stream and the raw
    micro-condition sizes in fp32 (a size of 1001 stays 1001, not bf16's 1000) while the matmuls run in bf16."""
    runs = {strategy: subprocess.Popen([sys.executable, str(PRECISION_SCRIPT), str(tmp_path), strategy, "--strategy",
                                        strategy], env={**os.environ, "PYTHONPATH": str(ROOT)},
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for strategy in ("ddp", "fsdp")}  # side by side: most of each run is start-up
    for proc in runs.values():
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-4000:]
    ddp, fsdp = (json.loads((tmp_path / f"{strategy}.json").read_text()) for strategy in runs)
    assert fsdp["dtypes"] == ddp["dtypes"] == {"block 2 input": "torch.float32", "size embedder input": "torch.float32",
                                               "block 2 matmul output": "torch.bfloat16"}
    assert torch.tensor(fsdp["size_embedding"]).equal(torch.tensor(ddp["size_embedding"]))
    # What is left: FSDP's bf16 copies of the few weights used outside matmuls (the adaLN tables); 4e-5 observed,
    # against bf16's 4e-3 rounding.
    assert fsdp["losses"] == pytest.approx(ddp["losses"], rel=2e-4)


def _load_from_own_path(rank: int, folder: Path, port: int) -> None:
    """One of two gloo processes: ``DataParallelStrategy.load_checkpoint`` asked for this rank's own file."""
    from pixart_lightning.training.parallel import DataParallelStrategy

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    loaded = DataParallelStrategy().load_checkpoint(folder / f"rank{rank}.ckpt")
    (folder / f"loaded-by-{rank}.json").write_text(json.dumps(loaded))
    torch.distributed.destroy_process_group()


def test_ddp_ranks_load_the_checkpoint_rank_zero_chose(tmp_path: Path) -> None:
    """Only rank 0 checks checkpoint hashes, so another rank may have picked a newer, silently corrupted file:
    every rank loads rank 0's choice."""
    for rank in (0, 1):
        torch.save({"written_for": rank}, tmp_path / f"rank{rank}.ckpt")
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    torch.multiprocessing.spawn(_load_from_own_path, args=(tmp_path, port), nprocs=2)
    loaded = [json.loads((tmp_path / f"loaded-by-{rank}.json").read_text()) for rank in (0, 1)]
    assert loaded == [{"written_for": 0}] * 2


def test_runner_trains_two_stages_under_fsdp(tmp_path: Path) -> None:
    """`pixart-lightning run` with 2 FSDP processes and activation checkpointing: stage 1 hands its consolidated
    weights to stage 2; sharded checkpoint folders, each file recorded with the sha256 its rank computed while
    writing it; samples and manifests from rank 0."""
    from callbacks.checkpoints import read_index
    from pixart_lightning.files import sha256
    from tests.test_stages import small

    overrides = [o for o in small(tmp_path) if not o.startswith(("stage1.train.max_steps", "stage1.data.batch_size"))]
    command = [sys.executable, "-m", "pixart_lightning.cli", "run", str(ROOT / "configs" / "demo"), "--stages", "1,2",
               *overrides, "stage1.train.max_steps=6", "train.strategy=fsdp", "train.devices=2",
               "train.accelerator=cpu", "model.gradient_checkpointing=true"]
    proc = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    one, two = (json.loads((tmp_path / f"stage{s}" / "manifest.json").read_text()) for s in (1, 2))
    assert one["status"] == two["status"] == "done"
    assert two["parent"]["sha256"] == one["weights"]["final"]["sha256"]
    folder = tmp_path / "stage2" / "checkpoints"
    assert (folder / "step-0000003.ckpt").is_dir()  # checkpoint_every=3
    [entry] = read_index(folder)
    on_disk = sorted(f for f in (folder / entry["path"]).rglob("*") if f.is_file())
    assert {folder / name: record for name, record in entry["files"].items()} == {
        f: {"bytes": f.stat().st_size, "sha256": sha256(f)} for f in on_disk}
    assert len(on_disk) == 4  # the two ranks' shards, .metadata and meta.pt
    assert (tmp_path / "stage2" / "samples" / "final.png").is_file()
    assert proc.stdout.count("summary:") == 1


@pytest.mark.parametrize("devices", [1, 2])
def test_global_batch_trains_alike_with_gradient_accumulation(train, devices: int) -> None:
    """data.global_batch_size=8 as 1 process x 2 micro-batches of 4, or 2 processes x 2 micro-batches of 2,
    trains like 1 process with batch 8: the same losses, weights and EMA (noise follows the sample's slot)."""
    one = train("single")
    split = train(f"accumulate-{devices}", "--strategy", "ddp" if devices > 1 else "auto", "--devices", str(devices),
                  "--accumulate", "2")
    assert "error" not in split, split.get("error")
    assert split["losses"] == pytest.approx(one["losses"], rel=1e-5) and len(split["losses"]) == 4
    assert_same_weights(one, split, atol=2e-5)
