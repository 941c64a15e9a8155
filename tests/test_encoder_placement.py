"""Frozen encoders only where they are used: 2 CPU processes train on precomputed latents and T5 features."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pixart_lightning.data.extract import ExtractSettings, extract
from pixart_lightning.data.synth import synthesize
from pixart_lightning.tiny_models import build_tiny_models

SCRIPT = Path(__file__).with_name("encoder_use.py")
ROOT = SCRIPT.parents[1]
DEMO = ROOT / "configs" / "demo"


def events(log: dict, after: str | None = None) -> list[str]:
    """The process's event names, all or those after the first ``after`` marker."""
    names = [e["event"] for e in log["events"]]
    return names[names.index(after) + 1 :] if after else names


def test_with_features_only_rank_0_loads_t5_and_none_once_the_prompts_are_stored(tmp_path: Path) -> None:
    """Stage 2 (FID on) then stage 3 (FID off) under DDP on latents + T5 features: rank 0 loads T5 to store the
    sample, alignment and FID prompts' features, rank 1 never; stage 3 finds them stored and nobody loads T5. The
    VAE is loaded to decode only: on rank 1 for FID, never in stage 3, where only rank 0 samples."""
    tiny = build_tiny_models(tmp_path / "tiny")
    world = tmp_path / "world"
    synthesize(world, count=32, seed=0, resolution=16, samples_per_shard=16, progress=False)
    extract(str(world), tmp_path / "features", ExtractSettings(
        vae=str(tiny["vae"]), text_encoder=str(tiny["t5"]), resolution=16, max_length=16), progress=False)
    config = tmp_path / "config"
    config.mkdir()
    (config / "base.yaml").write_text((DEMO / "base.yaml").read_text())
    (config / "stage2.yaml").write_text(f"fid:\n  reference: {world}\n")
    (config / "stage3.yaml").write_text("train:\n  max_steps: 2\n")
    overrides = [
        f"out_dir={tmp_path / 'run'}", f"data.shards={tmp_path / 'features'}", f"vae.name={tiny['vae']}",
        f"text_encoder.name={tiny['t5']}", "text_encoder.max_length=16", "data.resolution=16", "model.depth=2",
        "model.hidden_size=48", "model.patch_size=2", "data.batch_size=2", "data.num_workers=0",
        "data.shuffle_buffer=8", "train.max_steps=2", "train.devices=2", "train.strategy=ddp", "train.threads=1",
        "train.progress_bar=false", "samples.steps=2", "samples.cfg_scales=[1.0]", "eval.alignment_prompts=2",
        "samples.prompts=[a red circle,a blue square]", "fid.num_images=4", "fid.batch_size=2", "fid.steps=2",
        "fid.reference_count=8",
    ]
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), str(config), *overrides],
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert "t5" not in events(rank1)
    assert "t5" in events(rank0) and "t5" not in events(rank0, after="stage3")
    assert "vae" in events(rank1) and "vae" not in events(rank1, after="stage3")
