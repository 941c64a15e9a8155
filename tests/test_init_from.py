"""``model.init_from`` for every stage: each checkpoint format, the per-stage handoffs, fit checks, the runner."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import huggingface_hub
import pytest
import torch
from conftest import randomize
from test_stages import DEMO, small

from pixart_lightning.config import ConfigError, load_stage
from pixart_lightning.files import sha256
from pixart_lightning.hub import ModelNotAvailableError
from pixart_lightning.interop import export_diffusers, save_weights, to_official
from pixart_lightning.interop.init_from import checkpoint_record, resolve_checkpoint
from pixart_lightning.interop.state_dicts import IncompatibleCheckpointError
from pixart_lightning.models import PixArt
from pixart_lightning.runner.chain import run
from stages import STAGE_MODULES

TINY_T5_WIDTH = 64  # the width of the demo's tiny T5 (runner/inputs.py builds it with d_model=64)


def stage_cfg(out: Path, stage: int, *extra: str):
    return load_stage(DEMO, stage, small(out, *extra))


def start(out: Path, stage: int, source: Path | str) -> PixArt:
    """The model stage ``stage`` of the small demo starts from with ``model.init_from=source``."""
    cfg = stage_cfg(out, stage, f"model.init_from={source}")
    return STAGE_MODULES[stage].initial_model(cfg, None, TINY_T5_WIDTH)


@pytest.fixture(scope="module")
def text_model(tmp_path_factory) -> PixArt:
    """A stage-2-shaped text model of the small demo, its weights random (so that copies are told apart)."""
    cfg = stage_cfg(tmp_path_factory.mktemp("cfg"), 2)
    return randomize(PixArt(cfg.pixart_config(caption_channels=TINY_T5_WIDTH))).eval()


@pytest.fixture(scope="module")
def sources(tmp_path_factory, text_model) -> dict[str, Path]:
    """The text model saved in every format ``model.init_from`` reads."""
    folder = tmp_path_factory.mktemp("sources")
    official = folder / "PixArt-tiny.pth"
    torch.save({"state_dict": to_official(text_model)}, official)
    pipeline = folder / "pipeline"
    export_diffusers(text_model, pipeline / "transformer")
    (pipeline / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline"}))
    return {
        "official .pth": official,
        "safetensors": save_weights(text_model, folder / "text.safetensors"),
        "diffusers transformer": export_diffusers(text_model, folder / "transformer"),
        "diffusers pipeline": pipeline,
    }


def same_tensors(model: PixArt, reference: PixArt, skip: tuple[str, ...] = ()) -> bool:
    theirs = reference.state_dict()
    return all(torch.equal(v, theirs[k]) for k, v in model.state_dict().items() if k in theirs and k not in skip)


@pytest.mark.parametrize("kind", ["official .pth", "safetensors", "diffusers transformer", "diffusers pipeline"])
def test_each_format_starts_stage_2_as_is_and_stage_3_at_its_resolution(tmp_path, sources, text_model, kind):
    stage2 = start(tmp_path, 2, sources[kind])
    assert stage2.cfg.mode == "text" and same_tensors(stage2, text_model)
    assert set(stage2.state_dict()) == set(text_model.state_dict())
    stage3 = start(tmp_path, 3, sources[kind])
    wanted = stage_cfg(tmp_path, 3).pixart_config(caption_channels=TINY_T5_WIDTH)
    assert (stage3.cfg.sample_size, stage3.cfg.interpolation_scale) == (wanted.sample_size, wanted.interpolation_scale)
    assert stage3.cfg.micro_conditions and same_tensors(stage3, text_model)


def test_a_class_checkpoint_enters_stage_2_through_class_to_text(tmp_path):
    dit = randomize(PixArt(stage_cfg(tmp_path, 1).pixart_config()))
    path = tmp_path / "DiT-tiny.pt"
    torch.save(to_official(dit), path)
    model = start(tmp_path, 2, path)
    assert model.cfg.mode == "text" and model.cfg.caption_channels == TINY_T5_WIDTH
    assert torch.equal(model.state_dict()["blocks.1.attn.qkv.weight"], dit.state_dict()["blocks.1.attn.qkv.weight"])
    with pytest.raises(IncompatibleCheckpointError, match="stage 3 starts from a text-conditional"):
        start(tmp_path, 3, path)


def test_an_official_container_gives_its_ema_weights(tmp_path, text_model, capsys):
    ema = randomize(PixArt(text_model.cfg), seed=1)
    path = tmp_path / "PixArt-train.pth"
    torch.save({"state_dict": to_official(text_model), "state_dict_ema": to_official(ema)}, path)
    model = start(tmp_path, 2, path)
    assert same_tensors(model, ema) and not same_tensors(model, text_model)
    assert "EMA weights ('state_dict_ema')" in capsys.readouterr().out


def test_a_checkpoint_of_another_shape_is_refused_naming_the_keys(tmp_path, text_model):
    deeper = PixArt(text_model.cfg.replace(depth=3, caption_channels=32))
    path = save_weights(deeper, tmp_path / "deeper.safetensors")
    with pytest.raises(IncompatibleCheckpointError) as err:
        start(tmp_path, 2, path)
    message = str(err.value)
    assert "depth: checkpoint 3, config 2 (model.size / model.depth)" in message
    assert "caption_channels: checkpoint 32, config 64 (text_encoder.name)" in message
    assert "hidden_size" not in message


def test_a_hub_id_resolves_through_the_cache_and_offline_misses_say_how_to_fetch(tmp_path, monkeypatch, text_model):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelNotAvailableError, match="hf download PixArt-alpha/PixArt-XL-2-512x512"):
        resolve_checkpoint("PixArt-alpha/PixArt-XL-2-512x512")
    # A pipeline in the cache, laid out as huggingface_hub writes it, resolves to its snapshot folder.
    repo = tmp_path / "hub" / "models--PixArt-alpha--PixArt-tiny"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    export_diffusers(text_model, repo / "snapshots" / commit / "transformer")
    assert resolve_checkpoint("PixArt-alpha/PixArt-tiny") == repo / "snapshots" / commit
    assert same_tensors(start(tmp_path, 2, "PixArt-alpha/PixArt-tiny"), text_model)


def test_a_folder_is_hashed_as_the_listing_of_its_weight_files(sources):
    record = checkpoint_record(str(sources["diffusers pipeline"]))
    assert set(record["files"]) == {"transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
                                    "transformer/null_caption.safetensors"}
    folder = sources["diffusers pipeline"]
    listing = "".join(f"{sha256(folder / name)}  {name}\n" for name in sorted(record["files"]))
    assert record["sha256"] == hashlib.sha256(listing.encode()).hexdigest()


def test_stage_3_alone_runs_from_init_from_and_records_it_as_its_parent(tmp_path, sources):
    checkpoint = sources["safetensors"]
    out = tmp_path / "run"
    overrides = small(out, f"stage3.model.init_from={checkpoint}", "stage3.fid.reference=''")
    [unit] = run(DEMO, [3], overrides)
    manifest = json.loads((unit.dir / "manifest.json").read_text())
    assert manifest["status"] == "done"
    assert manifest["parent"] == {"path": str(checkpoint), "sha256": sha256(checkpoint)}
    assert unit.dir.parent.is_dir() and not (unit.dir.parent / "stage2").exists()
    with pytest.raises(ConfigError, match="model.init_from: ./missing.pth does not exist"):
        run(DEMO, [3], small(tmp_path / "other", "stage3.model.init_from=./missing.pth"))
