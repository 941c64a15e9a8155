"""LoRA adapters out of pixart-lightning (interop/lora.py): a PEFT folder on diffusers' transformer, merged weights
in every format `convert` writes, `sample --lora`; adapters for another base and files without adapters refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pixart_lightning.cli import main
from pixart_lightning.config.schema import LoRASection
from pixart_lightning.interop import (
    IncompatibleCheckpointError,
    export_diffusers,
    load_diffusers,
    load_weights,
    save_weights,
    to_official,
)
from pixart_lightning.interop.lora import Adapters, to_peft_state
from pixart_lightning.models import PixArt
from pixart_lightning.shapes.tiny_models import build_tiny_t5, build_tiny_vae
from pixart_lightning.training import lora
from tests.conftest import randomize, tiny_config

SETTINGS = LoRASection(rank=2, alpha=3.0, targets="all")


def trained_lora(folder: Path, **config) -> tuple[Path, Path, PixArt]:
    """Base weights, the adapters file of a LoRA trained on them (random B: not a no-op) and that model merged."""
    base = randomize(PixArt(tiny_config(**config))).eval()
    weights = save_weights(base, folder / "base.safetensors")
    lora.add_adapters(base, SETTINGS)
    with torch.no_grad():
        for name, parameter in base.named_parameters():
            if lora.is_adapter_key(name):
                parameter.copy_(torch.randn_like(parameter) * 0.1)
    adapters = lora.save_adapters(base, folder / "final-lora.safetensors", SETTINGS)
    return weights, adapters, lora.merged(base)


def test_peft_folder_on_the_diffusers_transformer_equals_the_merged_model(tmp_path):
    """`export-lora` splits the fused qkv / kv adapters; PeftModel over the exported base reproduces merged()."""
    from diffusers import PixArtTransformer2DModel
    from peft import PeftModel

    weights, adapters, merged = trained_lora(tmp_path, micro_conditions=True)
    assert main(["export-lora", str(adapters), str(tmp_path / "peft")]) == 0
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert "transformer_blocks.0.attn1.to_k" in config["target_modules"]
    assert "transformer_blocks.1.attn2.to_v" in config["target_modules"]
    transformer = PixArtTransformer2DModel.from_pretrained(export_diffusers(load_weights(weights), tmp_path / "t"))
    adapted = PeftModel.from_pretrained(transformer, tmp_path / "peft").eval()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 5, 16, generator=gen)
    t, mask = torch.tensor([10, 700]), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    cond = dict(resolution=torch.tensor([[64.0, 64.0]] * 2), aspect_ratio=torch.tensor([[1.0]] * 2))
    with torch.no_grad():
        ours = merged(x, t, y, mask, **cond)
        theirs = adapted(x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask,
                         added_cond_kwargs=cond).sample
        plain = load_weights(weights)(x, t, y, mask, **cond)
    assert (ours - plain).abs().max() > 1e-2  # the adapters change the output
    assert (ours - theirs).abs().max() <= 1e-5


def test_convert_merge_lora_writes_the_merged_model_in_every_format(tmp_path):
    weights, adapters, merged = trained_lora(tmp_path)
    expected = merged.state_dict()
    for out in ("merged.safetensors", "merged.pth", "merged-diffusers"):
        assert main(["convert", str(weights), str(tmp_path / out), "--merge-lora", str(adapters)]) == 0
    for name, state in [("native", load_weights(tmp_path / "merged.safetensors").state_dict()),
                        ("diffusers", load_diffusers(tmp_path / "merged-diffusers").state_dict())]:
        assert state.keys() == expected.keys(), name
        assert all(torch.equal(state[k], expected[k]) for k in expected), name
    official = torch.load(tmp_path / "merged.pth", weights_only=True)["state_dict"]
    assert all(torch.equal(official[k], v) for k, v in to_official(merged).items())


def test_sample_with_lora_draws_what_the_merged_weights_draw_and_the_pipeline_holds_them(tmp_path):
    """From a LoRA stage folder too (its EMA adapters where it kept them, as sampling takes a stage's EMA weights);
    `export-pipeline --lora` writes the merged transformer."""
    weights, adapters, merged = trained_lora(tmp_path, caption_channels=32, sample_size=4)
    stage = tmp_path / "stage4"
    stage.mkdir()
    save_weights(merged, stage / "final.safetensors")
    adapters.rename(stage / "final-lora.safetensors")
    merged_weights = save_weights(merged, tmp_path / "merged.safetensors")
    encoders = ["--text-encoder", str(build_tiny_t5(tmp_path / "t5")), "--vae", str(build_tiny_vae(tmp_path / "vae"))]
    assert main(["export-pipeline", str(weights), str(tmp_path / "pipe"), "--lora", str(stage), *encoders]) == 0
    exported, expected_state = load_diffusers(tmp_path / "pipe").state_dict(), merged.state_dict()
    assert all(torch.equal(exported[k], v) for k, v in expected_state.items())
    common = [*encoders, "--prompt", "a red circle", "--num", "1", "--steps", "3", "--seed", "2"]
    for name, source in [("merged", ["--ckpt", str(merged_weights)]),
                         ("file", ["--ckpt", str(weights), "--lora", str(stage / "final-lora.safetensors")]),
                         ("stage", ["--ckpt", str(weights), "--lora", str(stage)])]:
        assert main(["sample", *source, *common, "--out", str(tmp_path / name)]) == 0
    expected = np.array(Image.open(tmp_path / "merged" / "000-00.png"))
    for name in ("file", "stage"):
        assert np.array_equal(np.array(Image.open(tmp_path / name / "000-00.png")), expected), name


def test_lora_refusals_are_one_line_and_say_what_differs(tmp_path, capsys):
    weights, adapters, merged = trained_lora(tmp_path)
    other = save_weights(randomize(PixArt(tiny_config(hidden_size=96))), tmp_path / "other.safetensors")

    def refused(*argv: str) -> str:
        assert main(list(argv)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    err = refused("convert", str(other), str(tmp_path / "x.safetensors"), "--merge-lora", str(adapters))
    assert "trained on another base" in err and "blocks.0.attn.qkv: adapter 48 -> 144, layer 96 -> 288" in err
    assert "hidden_size 48 != 96" in err
    err = refused("convert", str(weights), str(tmp_path / "x.safetensors"), "--merge-lora", str(weights))
    assert "holds no LoRA adapters (no pixart-lightning-lora metadata)" in err

    plain_stage = tmp_path / "stage3"  # a stage trained without model.lora
    plain_stage.mkdir()
    save_weights(merged, plain_stage / "final.safetensors")
    assert "holds no LoRA adapters (final-lora.safetensors)" in refused(
        "convert", str(weights), str(tmp_path / "x.safetensors"), "--merge-lora", str(plain_stage))
    assert "not a stage folder" in refused(
        "convert", str(weights), str(tmp_path / "x.safetensors"), "--merge-lora", str(tmp_path))

    lora_stage = tmp_path / "stage4"  # its final weights already hold its adapters
    lora_stage.mkdir()
    save_weights(merged, lora_stage / "final.safetensors")
    adapters.rename(lora_stage / "final-lora.safetensors")
    (lora_stage / "manifest.json").write_text(json.dumps({"parent": {"path": str(weights), "sha256": "0"}}))
    err = refused("convert", str(lora_stage), str(tmp_path / "x.safetensors"), "--merge-lora", str(lora_stage))
    assert "already holds its stage's adapters merged" in err and str(weights) in err
    assert not (tmp_path / "x.safetensors").exists()


def test_a_layer_without_a_diffusers_counterpart_is_refused_by_name():
    a, b = torch.zeros(2, 48), torch.zeros(48, 2)
    adapters = Adapters({"blocks.0.attn.proj": (a, b), "blocks.0.extra": (a, b)}, rank=2, alpha=2.0, dropout=0.0,
                        config=tiny_config(), source=Path("x.safetensors"))
    with pytest.raises(IncompatibleCheckpointError, match="blocks.0.extra has no diffusers counterpart"):
        to_peft_state(adapters)
