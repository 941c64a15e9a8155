"""LoRA fine-tuning (``model.lora``, training/lora.py): only the adapters train, average and are checkpointed; the
handoff is the merged model, the adapters saved beside it; a resumed LoRA stage continues exactly."""

from __future__ import annotations

import copy
import re
import shutil
from pathlib import Path

import pytest
import torch
from peft.tuners.lora import LoraLayer
from safetensors import safe_open

from pixart_lightning.config import ConfigError, load_stage
from pixart_lightning.config.schema import LORA_TARGETS, LoRASection
from pixart_lightning.interop import load_weights
from pixart_lightning.models import PixArt
from pixart_lightning.runner.chain import run
from pixart_lightning.training import lora
from pixart_lightning.training.ema import EMA
from tests.conftest import randomize, tiny_config
from tests.test_stages import DEMO, Recorder, small


def adapted(targets: str = "attention", mode: str = "text", **settings) -> PixArt:
    model = randomize(PixArt(tiny_config(mode=mode)))
    lora.add_adapters(model, LoRASection(rank=2, targets=targets, **settings))
    return model


def adapted_layers(model: PixArt) -> set[str]:
    """The names of the layers holding adapters, numbered blocks written as ``blocks.N``."""
    return {re.sub(r"blocks\.\d+", "blocks.N", name) for name, m in model.named_modules()
            if isinstance(m, LoraLayer)}


def inputs(model: PixArt, batch: int = 2) -> tuple[torch.Tensor, ...]:
    cfg, gen = model.cfg, torch.Generator().manual_seed(1)
    x = torch.randn(batch, cfg.in_channels, 8, 8, generator=gen)
    y = torch.randn(batch, 5, cfg.caption_channels, generator=gen)
    return x, torch.tensor([10, 500]), y


def test_every_target_set_of_the_config_names_its_layers() -> None:
    attention = {"blocks.N.attn.qkv", "blocks.N.attn.proj", "blocks.N.cross_attn.q_linear",
                 "blocks.N.cross_attn.kv_linear", "blocks.N.cross_attn.proj"}
    mlp = {"blocks.N.mlp.fc1", "blocks.N.mlp.fc2"}
    assert tuple(lora.TARGETS) == LORA_TARGETS
    assert adapted_layers(adapted("attention")) == attention
    assert adapted_layers(adapted("attention+mlp")) == attention | mlp
    assert adapted_layers(adapted("all")) == attention | mlp | {"t_block.1", "y_embedder.y_proj.fc1",
                                                                "y_embedder.y_proj.fc2"}
    modulation = {"blocks.N.adaLN_modulation.1", "final_layer.adaLN_modulation.1"}
    assert adapted_layers(adapted("all", mode="class")) == {"blocks.N.attn.qkv", "blocks.N.attn.proj"} | mlp | modulation


def test_only_the_adapters_train_and_average() -> None:
    model = randomize(PixArt(tiny_config()))
    ema = EMA(model, rate=0.5)
    lora.add_adapters(model, LoRASection(rank=2))
    lora.add_adapters(ema.model, LoRASection(rank=2), like=model)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    expected = sum(2 * (m.in_features + m.out_features) for m in layers)
    assert sum(p.numel() for p in lora.trainable(model)) == expected
    assert all(lora.is_adapter_key(n) for n, p in model.named_parameters() if p.requires_grad)
    assert not any(p.requires_grad for p in ema.model.parameters())
    for name, p in ema.model.named_parameters():  # the average starts at the model's adapters
        assert torch.equal(p, model.get_parameter(name))
    base = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW(lora.trainable(model), lr=1e-2)
    b = "blocks.0.attn.qkv.lora_B.default.weight"
    average = ema.model.get_parameter(b).clone()
    for _ in range(3):
        model(*inputs(model)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update(model)
        average = 0.5 * average + 0.5 * model.get_parameter(b).detach()
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
    assert all(model.get_parameter(n).grad is None for n in base)
    assert model.get_parameter(b).abs().sum() > 0  # B starts at zero: it moved, and its average with it
    torch.testing.assert_close(ema.model.get_parameter(b), average)
    assert all(torch.equal(ema.model.get_parameter(n), model.get_parameter(n)) for n in base)


def test_adapters_start_alike_on_every_process_whatever_was_drawn_before() -> None:
    """FSDP keeps each rank's shard of its own copy: A must not depend on the global random state."""
    starts = []
    for global_seed, seed in ((1, 0), (2, 0), (1, 5)):
        model = PixArt(tiny_config())
        torch.manual_seed(global_seed)
        lora.add_adapters(model, LoRASection(rank=2), seed=seed)
        starts.append(model.get_parameter("blocks.0.attn.qkv.lora_A.default.weight"))
    assert torch.equal(starts[0], starts[1]) and not torch.equal(starts[0], starts[2])


def test_the_frozen_base_keys_are_the_adapted_models_weights_but_the_adapters() -> None:
    holder = torch.nn.Module()
    holder.model = adapted()
    assert lora.frozen_base_keys(holder) == {f"model.{k}" for k in holder.model.state_dict() if ".lora_" not in k}
    assert "model.blocks.0.attn.qkv.base_layer.weight" in lora.frozen_base_keys(holder)
    assert lora.frozen_base_keys(randomize(PixArt(tiny_config()))) == set()  # no adapters, nothing left out


@pytest.mark.parametrize("base_dtype", ["fp32", "bf16"])
def test_the_merged_model_computes_what_the_adapted_one_does(base_dtype: str) -> None:
    model = adapted("all", base_dtype=base_dtype).eval()
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the adapters something to add
            p.data.normal_(0, 0.05)
    bases = {p.dtype for n, p in model.named_parameters() if n.endswith("base_layer.weight")}
    assert bases == {torch.bfloat16 if base_dtype == "bf16" else torch.float32}
    assert {p.dtype for p in lora.trainable(model)} == {torch.float32}  # fp32 master weights either way
    plain = lora.merged(model)
    assert lora.is_adapted(model) and not lora.is_adapted(plain)
    assert set(plain.state_dict()) == set(PixArt(model.cfg).state_dict())
    reference = copy.deepcopy(model).float()  # the adapted model in fp32 (a bf16 base: its rounded values)
    with torch.no_grad():
        torch.testing.assert_close(plain(*inputs(model)), reference(*inputs(model)), rtol=0, atol=1e-5)
        with torch.autocast("cpu", torch.bfloat16):  # how a bf16 base trains: under bf16-mixed
            torch.testing.assert_close(model(*inputs(model)).float(), plain(*inputs(model)).float(), rtol=0, atol=5e-2)


def test_rank_0_and_an_unknown_target_set_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_stage(DEMO, 2, [f"out_dir={tmp_path}", "model.lora={rank: 0, targets: everything}"])
    message = str(caught.value)
    assert "model.lora.rank=0: must be at least 1" in message
    assert "model.lora.targets='everything': valid choices are attention, attention+mlp, all" in message
    with pytest.raises(ConfigError, match="model.lora.base_dtype=bf16 needs train.precision=bf16-mixed"):
        load_stage(DEMO, 2, [f"out_dir={tmp_path}", "model.lora={base_dtype: bf16}", "train.precision='32'"])
    assert load_stage(DEMO, 2, [f"out_dir={tmp_path}"]).model.lora is None  # full fine-tuning by default


class BaseWatch(Recorder):
    """Also checks that the frozen base never moves and that activations are recomputed (checkpointing on)."""

    def on_train_start(self, trainer, pl_module):
        assert pl_module.model.gradient_checkpointing and lora.is_adapted(pl_module.model)
        self.base = {n: p.detach().clone() for n, p in pl_module.model.named_parameters() if not p.requires_grad}

    def on_train_end(self, trainer, pl_module):
        self.unchanged = all(torch.equal(p, self.base[n]) for n, p in pl_module.model.named_parameters()
                             if n in self.base)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory) -> Path:
    """A briefly trained stage 1 (its zero-initialised output layer must have moved for adapters to learn)."""
    out = tmp_path_factory.mktemp("lora-parent")
    run(DEMO, [1], settings(out))
    return out / "stage1"


def settings(out: Path, *extra: str) -> list[str]:
    return small(out, "stage1.train.max_steps=5", "eval.alignment_prompts=0", "fid.reference=''",
                 "stage2.train.max_steps=7", "model.gradient_checkpointing=true",
                 "stage2.model.lora={rank: 2, targets: attention+mlp}", *extra)


def lora_stage(stage1: Path, out: Path, callback: Recorder) -> Path:
    """Stage 2 under LoRA after a copy of ``stage1``; its folder."""
    if not (out / "stage1").exists():
        shutil.copytree(stage1, out / "stage1")
    run(DEMO, [2], settings(out), callbacks=[callback])
    return out / "stage2"


def test_lora_stage_checkpoints_adapters_only_resumes_exactly_and_hands_on_merged_weights(
    stage1: Path, tmp_path: Path
) -> None:
    whole = BaseWatch()
    folder = lora_stage(stage1, tmp_path / "whole", whole)
    assert whole.unchanged

    checkpoint = torch.load(folder / "checkpoints" / "step-0000006.ckpt", weights_only=False)
    assert set(checkpoint["state_dict"]) - {"ema.updates"} and all(
        lora.is_adapter_key(k) for k in checkpoint["state_dict"] if k != "ema.updates")
    assert (folder / "checkpoints" / "step-0000006.ckpt").stat().st_size < (folder / "final.safetensors").stat().st_size / 4

    merged = load_weights(folder / "final.safetensors")  # a plain model: stage 3, sample, eval read it unchanged
    assert set(merged.state_dict()) == set(PixArt(merged.cfg).state_dict())
    parent = load_weights(stage1 / "final.safetensors")
    assert not torch.equal(merged.get_parameter("blocks.0.attn.qkv.weight"), parent.get_parameter("blocks.0.attn.qkv.weight"))
    assert torch.equal(merged.get_parameter("x_embedder.proj.weight"), parent.get_parameter("x_embedder.proj.weight"))
    for name in ("final-lora.safetensors", "final-ema-lora.safetensors"):
        with safe_open(folder / name, "pt") as f:
            assert f.metadata()["rank"] == "2" and f.metadata()["targets"] == "attention+mlp"
            assert "blocks.0.mlp.fc1.lora_A.weight" in f.keys() and all(".lora_" in k for k in f.keys())

    broken = BaseWatch(fail_at=4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        lora_stage(stage1, tmp_path / "broken", broken)
    resumed = BaseWatch()
    resumed_folder = lora_stage(stage1, tmp_path / "broken", resumed)
    assert sorted(resumed.steps) == [4, 5, 6, 7] and resumed.unchanged
    for step in (4, 5, 6, 7):
        assert resumed.steps[step][0] == whole.steps[step][0]
        assert resumed.steps[step][1] == pytest.approx(whole.steps[step][1], rel=1e-5, abs=1e-6)
    for name in ("final.safetensors", "final-ema.safetensors"):
        after = load_weights(resumed_folder / name).state_dict()
        for key, value in load_weights(folder / name).state_dict().items():
            torch.testing.assert_close(after[key], value, rtol=1e-5, atol=1e-6)
