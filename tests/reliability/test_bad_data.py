"""Fault injection: bad samples (undecodable images, empty or non-UTF-8 captions, wrong-size latents, a truncated
tar) are skipped and counted while training goes on; above data.max_bad_fraction the run stops with a report."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from pixart_lightning.data.accounting import TrainingStopped
from pixart_lightning.data.features import FEATURES_KEY, encode_features
from pixart_lightning.runner.chain import run
from tests.test_ingest_extract import write_tar

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo"


def png(i: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (i * 7 % 256, 40, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


KINDS = ("undecodable", "empty caption", "non-UTF-8 caption", "wrong-size latent")


def shards(folder: Path, bad_every: int) -> None:
    """64 samples per shard in 2 shards plus a truncated third; every ``bad_every``-th sample is broken in one
    of four ways."""
    folder.mkdir()
    for s in range(3):
        members = []
        for i in range(64):
            key, image, caption = f"{s}-{i:03d}", png(i), b"a picture"
            extra = []
            if i % bad_every == 0:
                kind = KINDS[(i // bad_every) % 4]
                if kind == "undecodable":
                    image = image[:40]
                elif kind == "empty caption":
                    caption = b"   "
                elif kind == "non-UTF-8 caption":
                    caption = b"\xff\xfe bad"
                else:
                    extra = [(f"{key}.{FEATURES_KEY}", encode_features(latent_mean=torch.zeros(3, 5, 5),
                                                                      latent_std=torch.zeros(3, 5, 5)))]
            members += [(f"{key}.png", image), (f"{key}.txt", caption), *extra]
        path = write_tar(folder / f"{s:03d}.tar", members)
        if s == 2:
            path.write_bytes(path.read_bytes()[:5000])  # a truncated shard


def train(tmp_path: Path, data: Path, max_bad: float, steps: int = 6) -> dict:
    config = tmp_path / "config"
    config.mkdir(exist_ok=True)
    (config / "base.yaml").write_text((DEMO / "base.yaml").read_text())
    (config / "stage2.yaml").write_text(f"train:\n  max_steps: {steps}\n")
    run(config, None, [
        f"out_dir={tmp_path / 'run'}", f"data.shards={data}", "data.resolution=16", "model.depth=2",
        "model.hidden_size=48", "data.batch_size=8", "data.num_workers=0", "data.shuffle_buffer=8",
        f"data.max_bad_fraction={max_bad}", "train.progress_bar=false", "eval.alignment_prompts=0", "samples.steps=2",
        "samples.cfg_scales=[1.0]", "samples.prompts=[a]",
    ])
    return json.loads((tmp_path / "run" / "stage2" / "manifest.json").read_text())


def test_bad_samples_are_skipped_and_counted(tmp_path: Path) -> None:
    shards(tmp_path / "data", bad_every=8)
    manifest = train(tmp_path, tmp_path / "data", max_bad=0.5, steps=20)  # 160 samples: both shards and more
    skipped = manifest["skipped_samples"]
    assert manifest["status"] == "done"
    for reason in ("undecodable (UnidentifiedImageError)", "empty caption", "non-UTF-8 caption",
                   "latent of another size (5x5)"):
        assert skipped.get(reason, 0) >= 2, skipped
    assert any(reason.startswith("unreadable tar data") for reason in skipped), skipped


def test_too_much_bad_data_stops_the_run_with_a_report(tmp_path: Path) -> None:
    shards(tmp_path / "data", bad_every=2)
    with pytest.raises(TrainingStopped, match=r"samples read were bad \(.*> data.max_bad_fraction=0.1\)"):
        train(tmp_path, tmp_path / "data", max_bad=0.1, steps=30)
