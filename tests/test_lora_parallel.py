"""LoRA under FSDP2 (2 CPU processes over gloo), activation checkpointing and torch.compile.

The 2-process runs use tests/multiproc_train.py (a few stage-2 or stage-4 steps on fixed global batches); the bf16
frozen base beside fp32 adapters is sharded directly in two spawned processes.
"""

from __future__ import annotations

import copy
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader

from pixart_lightning.config.schema import LoRASection, TrainSection
from pixart_lightning.models import PixArt
from pixart_lightning.training import lora, parallel
from pixart_lightning.training.compilation import compile_blocks, compile_unavailable
from tests.conftest import randomize, tiny_config
from tests.test_lora import adapted, inputs
from tests.test_parallel import ROOT, SCRIPT, assert_same_weights

ADAPTERS = "model.lora={rank: 2, targets: attention+mlp}"


def train(out: Path, tag: str, *args: str) -> dict:
    """One run of the driver on a random base (a fresh model's zero output layer gives adapters no gradient)."""
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out), tag, "--randomize", "--set", ADAPTERS, *args],
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / f"{tag}.json").read_text()) | {
        part: load_file(out / f"{tag}{suffix}.safetensors") for part, suffix in
        (("weights", ""), ("ema", "-ema"), ("adapters", "-lora"))}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    return train(tmp_path_factory.mktemp("lora-single"), "single")


def checkpointed_weights(checkpoint: Path) -> tuple[set[str], set[str]]:
    """The module weights and the optimizer states' parameters a checkpoint (a folder of shards or one file) holds."""
    if checkpoint.is_dir():
        held = FileSystemReader(checkpoint).read_metadata().state_dict_metadata
        return ({k.removeprefix("state_dict.") for k in held if k.startswith("state_dict.")},
                {k.removeprefix("optimizer_0.state.").rsplit(".", 1)[0] for k in held  # less .exp_avg, .step
                 if k.startswith("optimizer_0.state.")})
    saved = torch.load(checkpoint, weights_only=True)
    return set(saved["state_dict"]), set(saved["optimizer_states"][0]["state"])  # parameter ids: checked below


@pytest.mark.parametrize("sharded", ["true", "false"])
def test_fsdp_trains_adapters_like_one_process_checkpoints_them_alone_and_resumes_exactly(
    one_process: dict, tmp_path: Path, sharded: str
) -> None:
    """4 steps as 1 process and as 2 FSDP processes (saving a checkpoint at step 2, a folder of shards or one
    gathered file, and going on), then steps 3-4 again from it: the same losses, merged handoff weights, EMA and
    adapters; the checkpoint holds the adapters, their average and their optimizer state alone."""
    one = one_process
    whole = train(tmp_path, "fsdp", "--strategy", "fsdp", "--devices", "2", "--stop-at", "2", "--keep-going",
                  "--sharded-checkpoint", sharded)
    assert whole["sharded"] == [True, True] and whole["step"] == 4
    assert whole["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert_same_weights(one, whole, atol=2e-5)  # merged from the consolidated shards as from the plain model
    assert not any("lora_" in k or "base_layer" in k for k in whole["weights"])  # a plain model's keys
    worst = max((one["adapters"][k] - whole["adapters"][k]).abs().max().item() for k in one["adapters"])
    assert one["adapters"].keys() == whole["adapters"].keys() and worst <= 2e-5

    checkpoint = tmp_path / "fsdp.ckpt"
    assert checkpoint.is_dir() == (sharded == "true")
    weights, moments = checkpointed_weights(checkpoint)
    adapters = {k for k in weights if lora.is_adapter_key(k)}
    assert adapters and weights - adapters == {"ema.updates"}
    assert {k.split(".")[0] for k in adapters} == {"model", "ema"}  # the adapters and their average
    assert len(moments) == len(adapters) // 2 and all(isinstance(k, int) or lora.is_adapter_key(k) for k in moments)

    resumed = train(tmp_path, "resumed", "--strategy", "fsdp", "--devices", "2", "--resume", str(checkpoint),
                    "--sharded-checkpoint", sharded)
    assert resumed["losses"] == pytest.approx(whole["losses"][2:], rel=1e-6)
    assert_same_weights(whole, resumed, atol=1e-6)


def test_stage4_distils_adapters_as_two_fsdp_processes_as_one(tmp_path: Path) -> None:
    """Consistency distillation under LoRA, where the teacher is the frozen base with the adapters off and the target
    the adapters' average: sharded over 2 processes, the same losses and weights as 1 process."""
    stage4 = ("--stage", "4", "--steps", "3", "--set", "data.multi_scale=false")  # no micro-conditions in the batches
    one = train(tmp_path, "single", *stage4)
    two = train(tmp_path, "fsdp", *stage4, "--strategy", "fsdp", "--devices", "2")
    assert two["sharded"] == [True, True] and len(set(one["losses"])) == 3
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    # FSDP sums the gradients in another order; Adam (lr 1e-2) scales the rounding of near-zero ones up to about
    # 1e-4 of the weights (2.5e-5 measured, weights within 0.25)
    assert_same_weights(one, two, atol=5e-5)
    assert max((one["adapters"][k] - two["adapters"][k]).abs().max().item() for k in one["adapters"]) <= 5e-5


def checkpointed_adapters(targets: str) -> dict[str, torch.Tensor]:
    """The weights a LoRA stage's checkpoint holds for a model adapted at ``targets``, as the stage names them."""
    holder = torch.nn.Module()
    holder.model = adapted("attention+mlp" if targets == "wide" else "attention")
    frozen = lora.frozen_base_keys(holder)
    return {k: v for k, v in holder.state_dict().items() if k not in frozen}


@pytest.mark.parametrize("sharded", [True, False])
def test_resuming_with_narrower_or_wider_lora_targets_is_refused(tmp_path: Path, sharded: bool) -> None:
    """What the FSDP load checks before reading (``dcp.load`` reads only the keys asked for, dropping the rest):
    the adapters of layers no longer targeted are refused like missing ones, from a shard folder or one file."""
    written = checkpointed_adapters("wide")
    if sharded:  # one process writes a folder of shards without a process group
        torch.distributed.checkpoint.save({"state_dict": written}, checkpoint_id=tmp_path / "step.ckpt")
        held = parallel.sharded_weights(tmp_path / "step.ckpt")
    else:
        held = written.keys()
    assert held == written.keys()
    narrow = checkpointed_adapters("narrow")
    parallel.refuse_other_weights(tmp_path, held, written)
    extra = len(written) - len(narrow)
    first = re.escape("model.blocks.0.mlp.fc1.lora_A.default.weight")
    with pytest.raises(ValueError, match=rf"holds {extra} weights this LoRA stage does not train \({first}, .*, \.\.\.\): "
                                         r"it was written with other model\.lora settings; resume with those"):
        parallel.refuse_other_weights(tmp_path, held, narrow)
    with pytest.raises(ValueError, match=f"lacks {extra} of the weights this LoRA stage trains"):
        parallel.refuse_other_weights(tmp_path, narrow, held)


def _shard_a_bf16_base(rank: int, port: int) -> None:
    """One of two gloo processes: a model with a bf16 frozen base and fp32 adapters, sharded under bf16-mixed,
    computes the adapters' gradients the unsharded one does, and consolidates to the same merged weights."""
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = randomize(PixArt(tiny_config()))
    lora.add_adapters(model, LoRASection(rank=2, targets="all", base_dtype="bf16"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    reference = copy.deepcopy(model)
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (2,))
    parallel.shard(model, TrainSection(precision="bf16-mixed", devices=2, strategy="fsdp"), mesh, "cpu")
    shards = dict(model.named_parameters())
    assert shards["blocks.0.attn.qkv.base_layer.weight"].to_local().dtype == torch.bfloat16
    assert {p.to_local().dtype for p in lora.trainable(model)} == {torch.float32}
    for module in (model, reference):
        with torch.autocast("cpu", torch.bfloat16):
            out = module(*inputs(module), force_drop_ids=torch.zeros(2, dtype=torch.long))
        out.float().square().mean().backward()
    for name, p in reference.named_parameters():
        if p.requires_grad:  # FSDP gathers the fp32 tables outside the Linear layers in bf16: within its rounding
            torch.testing.assert_close(shards[name].grad.full_tensor(), p.grad, rtol=2e-2, atol=2e-3)
        else:
            assert shards[name].grad is None
    plain, _ = parallel.consolidated(model, None, torch.device("cpu"))
    if rank == 0:
        expected = lora.merged(reference).state_dict()
        for key, value in lora.merged(plain).state_dict().items():
            assert torch.equal(value, expected[key]), key
    torch.distributed.destroy_process_group()


def test_a_bf16_frozen_base_shards_beside_fp32_adapters() -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    torch.multiprocessing.spawn(_shard_a_bf16_base, args=(port,), nprocs=2)


def adapted_for_training() -> PixArt:
    """A random model with random adapters (B too), in training mode."""
    model = randomize(PixArt(tiny_config()))
    lora.add_adapters(model, LoRASection(rank=2, targets="all"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    return model.train()


def adapter_gradients(model: PixArt) -> dict[str, torch.Tensor]:
    model(*inputs(model), force_drop_ids=torch.zeros(2, dtype=torch.long)).square().mean().backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_activation_checkpointing_recomputes_adapters_to_the_same_gradients() -> None:
    plain = adapted_for_training()
    recomputed = copy.deepcopy(plain)
    parallel.checkpoint_activations(recomputed)
    expected = adapter_gradients(plain)
    assert expected and all(g.abs().sum() > 0 for g in expected.values())
    for name, grad in adapter_gradients(recomputed).items():
        torch.testing.assert_close(grad, expected[name], rtol=0, atol=0)


def test_compiled_blocks_with_adapters_and_checkpointing_give_the_eager_gradients(monkeypatch) -> None:
    """The blocks compile through peft's LoRA layers inside activation checkpointing, without graph breaks. On the
    CPU the graphs run through AOT autograd without code generation (``aot_eager``): C++ code generation for the
    blocks takes minutes here, which tells nothing more about the adapters."""
    reason = compile_unavailable(torch.device("cpu"))
    if reason is not None:
        pytest.skip(reason)
    eager = adapted_for_training()
    compiled = copy.deepcopy(eager)
    parallel.checkpoint_activations(compiled)
    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self: compile_module(self, backend="aot_eager"))
    monkeypatch.setattr(torch._dynamo.config, "suppress_errors", False)  # compile_blocks sets it: restored after
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert compile_blocks(compiled.blocks, torch.device("cpu"))
    gradients = adapter_gradients(compiled)
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]
    for name, grad in adapter_gradients(eager).items():
        torch.testing.assert_close(gradients[name], grad, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
