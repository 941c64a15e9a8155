"""Run-folder resolution: the weights, encoders, prediction, resolution and FID settings a folder or file means."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

from pixart_lightning.config import load_stage, to_yaml
from pixart_lightning.encoders.vae import PixelSpace
from pixart_lightning.interop import load_weights, save_weights
from pixart_lightning.runner.folders import (
    load_run_artifacts,
    resolve_prediction,
    sampling_weights,
    saved_config,
    stage_weights,
)
from pixart_lightning.runner.unit import read_unit_manifest as read_manifest

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo"


def stage_folder(folder: Path, ema: bool = True, **manifest) -> Path:
    """A finished class-mode stage in pixel space, predicting v: final weights, their EMA (different), a manifest."""
    save_weights(tiny_model(mode="class", in_channels=3), folder / "final.safetensors", "v")
    if ema:
        ema_model = tiny_model(mode="class", in_channels=3).apply(_scaled)
        save_weights(ema_model, folder / "final-ema.safetensors", "v")
    (folder / "manifest.json").write_text(json.dumps({"vae": "pixel", **manifest}))
    return folder


def _scaled(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters(recurse=False):
            p.mul_(0.5)


def test_stage_weights_are_the_raw_ones_unless_ema_is_asked_for(tmp_path: Path) -> None:
    stage = stage_folder(tmp_path / "stage1")
    assert stage_weights(stage) == stage / "final.safetensors"
    assert stage_weights(stage, ema=True) == stage / "final-ema.safetensors"
    assert stage_weights(stage / "final.safetensors") == stage / "final.safetensors"
    with pytest.raises(ValueError, match="give a stage folder"):
        stage_weights(stage / "final.safetensors", ema=True)
    (stage / "final-ema.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="ema_rate=0"):
        stage_weights(stage, ema=True)


def test_sampling_weights_prefer_the_ema_and_refuse_a_stage_in_phases(tmp_path: Path) -> None:
    stage = stage_folder(tmp_path / "stage3")
    assert sampling_weights(stage) == stage / "final-ema.safetensors"
    assert sampling_weights(stage_folder(tmp_path / "no-ema", ema=False)) == tmp_path / "no-ema" / "final.safetensors"
    for phase in ("low", "high"):
        stage_folder(tmp_path / "phased" / phase)
    with pytest.raises(ValueError, match=r"in phases; pass one of its phase folders \(high, low\)"):
        sampling_weights(tmp_path / "phased")


def test_the_manifest_is_read_from_the_stage_folder_or_beside_the_weights(tmp_path: Path) -> None:
    stage = stage_folder(tmp_path / "stage1", resolution=24)
    assert read_manifest(stage)["resolution"] == read_manifest(stage / "final.safetensors")["resolution"] == 24
    assert read_manifest(tmp_path) == {}
    assert resolve_prediction(stage / "final.safetensors") == "v"  # as the weights record
    assert resolve_prediction(stage / "final.safetensors", "epsilon") == "epsilon"  # what is chosen outranks all


def test_run_artifacts_come_from_the_stage_folder(tmp_path: Path) -> None:
    stage = stage_folder(tmp_path / "stage1", resolution=24)
    run = load_run_artifacts(stage)
    ema, raw = (load_weights(stage / name).state_dict() for name in ("final-ema.safetensors", "final.safetensors"))
    assert all(torch.equal(v, ema[k]) for k, v in run.model.state_dict().items())  # the EMA weights, not the raw
    assert any(not torch.equal(v, raw[k]) for k, v in run.model.state_dict().items())
    assert isinstance(run.vae, PixelSpace) and run.encoder is None
    assert (run.prediction, run.resolution) == ("v", 24)
    (stage / "manifest.json").write_text(json.dumps({"vae": "pixel"}))
    assert load_run_artifacts(stage, prediction="epsilon").resolution == 8  # the model's sample size x factor 1


def test_the_stage_config_is_read_through_the_config_loader(tmp_path: Path) -> None:
    cfg = load_stage(DEMO, 3)
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    assert saved_config(tmp_path).fid == cfg.fid
    assert saved_config(tmp_path / "config.yaml") is None and saved_config(tmp_path / "elsewhere") is None
