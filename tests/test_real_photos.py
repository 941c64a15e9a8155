"""Real photographs and broken files through every data command and into training: nothing silently lost.

The photos are scikit-image's bundled samples (a dev dependency; no download): astronaut, coffee, chelsea, camera
(grayscale), logo (RGBA), rocket, and an animated GIF, saved small in every format a photo collection holds, plus
the files a real collection also holds by mistake. Every input file must end up in the output or be named in a
count, and the reruns a user makes after a failure must recover.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import skimage
import torch
from PIL import Image

from pixart_lightning.cli import main
from pixart_lightning.runner.chain import run
from tests.test_data_robustness import encoded
from tests.test_ingest_extract import DEMO, Recorder, all_samples, samples
from tests.test_ingest_extract import tiny as tiny  # noqa: F401 - the tiny T5, VAE and LLaVA fixture

SAMPLES = Path(skimage.__file__).parent / "data"


def photo(name: str, size: tuple[int, int]) -> Image.Image:
    """A bundled sample photo, shrunk to ``size`` (w, h) so that every command stays fast."""
    with Image.open(SAMPLES / name) as image:
        return image.resize(size, Image.BICUBIC)


def rotated_jpeg() -> bytes:
    """Chelsea stored on her side (60 x 40) with the EXIF tag that turns her upright (40 x 60)."""
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    return encoded(photo("chelsea.png", (40, 60)).rotate(90, expand=True), "JPEG", exif=exif)


def photo_folder(root: Path) -> dict[str, bytes]:
    """The collection as {relative path: bytes}: photos in every format, captions, metadata and broken files."""
    coffee = photo("coffee.png", (96, 64))
    files = {
        "astronaut.png": encoded(photo("astronaut.png", (48, 48)), "PNG"),
        "astronaut.txt": b"an astronaut in front of a flag",
        "coffee.jpg": encoded(coffee, "JPEG"),
        "coffee.json": json.dumps({"caption": "a cup of coffee"}).encode(),
        "gray/camera.png": encoded(photo("camera.png", (40, 40)), "PNG"),
        "logo-rgba.png": encoded(photo("logo.png", (40, 40)), "PNG"),
        "animated.gif": (SAMPLES / "no_time_for_that_tiny.gif").read_bytes(),
        "chelsea.tif": encoded(photo("chelsea.png", (45, 30)), "TIFF"),
        "rocket.webp": encoded(photo("rocket.jpg", (64, 43)), "WEBP"),
        "astronaut-small.bmp": encoded(photo("astronaut.png", (24, 24)), "BMP"),
        "wide-4x1.jpg": encoded(coffee.crop((0, 24, 96, 48)), "JPEG"),
        "tall-1x4.png": encoded(photo("astronaut.png", (64, 64)).crop((24, 0, 40, 64)), "PNG"),
        "tiny-8x8.png": encoded(photo("coffee.png", (8, 8)), "PNG"),
        "rotated.jpg": rotated_jpeg(),
        "café-フォト.jpg": encoded(photo("chelsea.png", (36, 24)), "JPEG"),
        "café-フォト.txt": "un chat roux, à Paris".encode(),
        # what a real collection also holds
        "truncated.jpg": encoded(coffee, "JPEG")[:300],
        "empty.png": b"",
        "notes.png": b"not an image, only text named .png",
        "orphan.txt": b"a caption whose image was deleted",
        "readme.xyz": b"an unsupported extension",
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def cut_tar(path: Path) -> list[str]:
    """A webdataset tar of three photos cut inside the third one's image; the keys of the complete samples."""
    with tarfile.open(path, "w") as tar:
        for i, name in enumerate(("astronaut.png", "chelsea.png", "coffee.png")):
            for ext, data in (("png", encoded(photo(name, (32, 32)), "PNG")), ("txt", name.encode())):
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    data = path.read_bytes()
    path.write_bytes(data[: data.index(b"0002.png") + 1024])
    return ["0000", "0001"]


def named(manifest: dict) -> set[str]:
    """Every name a manifest's counts list (skipped samples, ignored files)."""
    return {name for field in ("skipped_names", "ignored_names") for names in manifest[field].values() for name in names}


def test_real_photo_collection_from_folder_to_training(tmp_path: Path, tiny: dict[str, Path], capsys) -> None:
    photos, tars = tmp_path / "photos", tmp_path / "tars"
    photos.mkdir()
    tars.mkdir()
    files = photo_folder(photos)
    complete = cut_tar(tars / "cut.tar")
    shards, dense, features = tmp_path / "shards", tmp_path / "dense", tmp_path / "features"

    # ingest: every file is in the output or named in a count
    assert main(["data", "ingest", str(photos), str(tars), "--out", str(shards), "--samples-per-shard", "8"]) == 0
    printed = capsys.readouterr().out
    assert "ignored: caption or metadata with no image: 1" in printed and "readme.xyz" in printed
    manifest = json.loads((shards / "manifest.json").read_text())
    written = {json.loads(s["json"])["source"]: s for s in all_samples(shards)}
    counted = named(manifest)
    for name in files:
        source = f"{photos}:{Path(name).with_suffix('')}"
        assert source in written or source in counted or str(photos / name) in counted, name
    assert {f"{tars / 'cut.tar'}:{key}" for key in complete} <= set(written) and str(tars / "cut.tar") in counted
    assert manifest["skipped"] == {"undecodable (OSError)": 1, "undecodable (UnidentifiedImageError)": 2,
                                   "unreadable tar data (ReadError)": 1}
    assert manifest["ignored"] == {"caption or metadata with no image": 1, "unsupported extension": 1}
    assert manifest["count"] == len(written) == 13 + len(complete)
    meta = {source.split(":")[-1]: json.loads(s["json"]) for source, s in written.items()}
    assert meta["rotated"]["original_size"] == [60, 40]  # EXIF orientation applied
    assert meta["animated"]["converted_from"] == "gif" and meta["chelsea"]["original_size"] == [30, 45]
    assert written[f"{photos}:café-フォト"]["txt"] == "un chat roux, à Paris".encode()
    assert written[f"{photos}:coffee"]["txt"] == b"a cup of coffee"

    # caption: every ingested sample gets a dense caption; a rerun keeps the manifest's totals
    caption = ["data", "caption", str(shards), str(dense), "--model", str(tiny["llava"]), "--max-new-tokens", "4",
               "--batch-size", "4"]
    assert main(caption) == 0
    assert "tokens/s" in capsys.readouterr().out
    first = json.loads((dense / "caption-manifest.json").read_text())
    assert first["count"] == manifest["count"] and first["skipped"] == {}
    assert main(caption) == 0
    assert json.loads((dense / "caption-manifest.json").read_text()) == first

    # stats: the table covers every sample
    assert main(["data", "stats", str(dense)]) == 0
    table = capsys.readouterr().out
    assert ["original", "5"] in [line.split()[:2] for line in table.splitlines()] and "skipped: none" in table

    # extract: a resolution training refuses is refused before any model loads; a run that fails (a T5 folder that
    # does not exist) leaves nothing that stops the corrected rerun
    extract = ["data", "extract", str(dense), str(features), "--vae", str(tiny["vae"]), "--multi-scale",
               "--caption-key", "dense.txt", "--max-length", "16", "--batch-size", "8"]
    assert main([*extract, "--text-encoder", str(tiny["t5"]), "--resolution", "50"]) == 2
    assert "the nearest valid resolutions are 48 or 64" in capsys.readouterr().err and not features.exists()
    assert main([*extract, "--text-encoder", str(tmp_path / "no-t5"), "--resolution", "32"]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main([*extract, "--text-encoder", str(tiny["t5"]), "--resolution", "32"]) == 0
    result = json.loads((features / "manifest.json").read_text())
    assert result["count"] == manifest["count"] and result["skipped"] == {}
    buckets = {tuple(json.loads(s["json"])["bucket"]) for shard in features.glob("*.tar") for s in samples(shard)}
    assert {(32, 32), (16, 64), (64, 16)} <= buckets

    # training: a few stage-3 steps on the multi-scale features
    config = tmp_path / "config"
    config.mkdir()
    (config / "base.yaml").write_text((DEMO / "base.yaml").read_text())
    (config / "stage3.yaml").write_text("train:\n  max_steps: 3\n")
    recorder = Recorder()
    run(config, None, [
        f"out_dir={tmp_path / 'run'}", f"data.shards={features}", f"vae.name={tiny['vae']}",
        f"text_encoder.name={tiny['t5']}", "text_encoder.max_length=16", "data.caption_key=dense.txt",
        "data.resolution=32", "data.multi_scale=true", "model.depth=2", "model.hidden_size=48", "model.patch_size=2",
        "data.batch_size=2", "data.num_workers=0", "data.shuffle_buffer=4", "train.progress_bar=false",
        "eval.alignment_prompts=0", "samples.steps=2", "samples.cfg_scales=[1.0]", "samples.prompts=[a]",
    ], callbacks=[recorder])
    assert len(recorder.steps) == 3 and all(latents for _, _, latents in recorder.steps)
    assert all(torch.isfinite(torch.tensor(loss)) for _, loss, _ in recorder.steps)
