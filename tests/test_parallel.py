"""DDP and FSDP2 on the CPU over gloo, 2 processes: the same training as one process with the same global batch.

Each case runs tests/multiproc_train.py in a subprocess (Lightning starts the second process), a few
stage-2 steps with gradient clipping and the EMA on.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).with_name("multiproc_train.py")
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
    from pixart_lightning.parallel import clip_grad_norm

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p)
    expected = torch.sqrt(sum((p.grad**2).sum() for p in params))
    norm = clip_grad_norm(params, 0.5)
    assert norm == pytest.approx(expected.item(), rel=1e-6)
    assert torch.sqrt(sum((p.grad**2).sum() for p in params)) == pytest.approx(0.5, rel=1e-4)


def test_runner_trains_two_stages_under_fsdp(tmp_path: Path) -> None:
    """`pixart-lightning run` with 2 FSDP processes and activation checkpointing: stage 1 hands its consolidated
    weights to stage 2; sharded checkpoint folders; samples and manifests from rank 0."""
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
    assert (tmp_path / "stage2" / "checkpoints" / "step-0000003.ckpt").is_dir()  # checkpoint_every=3
    assert (tmp_path / "stage2" / "samples" / "final.png").is_file()
    assert proc.stdout.count("summary:") == 1
