"""Ingestion from folders and tars, feature extraction, and training on the extracted features."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image
from webdataset.tariterators import tarfile_samples

from pixart_lightning.cli import main
from pixart_lightning.data.extract import ExtractSettings, extract
from pixart_lightning.data.features import FEATURES_KEY, decode_features
from pixart_lightning.data.ingest import ingest
from pixart_lightning.encoders.text import T5TextEncoder
from pixart_lightning.runner.chain import run
from pixart_lightning.shapes.synth import synthesize
from pixart_lightning.shapes.tiny_models import build_tiny_models

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo"


def jpeg(size: tuple[int, int], color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="JPEG")
    return buffer.getvalue()


def samples(path: Path) -> list[dict]:
    return list(tarfile_samples([{"url": str(path)}]))


def all_samples(folder: Path) -> list[dict]:
    return [s for shard in sorted(folder.glob("*.tar")) for s in samples(shard)]


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


class Recorder(L.Callback):
    """Per step: the batch's keys, the loss, and whether the batch carried precomputed latents."""

    def __init__(self) -> None:
        self.steps: list[tuple[list[str], float, bool]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append((list(batch["key"]), float(outputs["loss"]), "latent_mean" in batch))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    return build_tiny_models(tmp_path_factory.mktemp("tiny"))


def test_ingest_image_folder(tmp_path: Path) -> None:
    """Captions from .txt or .json beside the image; a corrupt JPEG is skipped and counted; keys are stable."""
    images = tmp_path / "images" / "sub"
    images.mkdir(parents=True)
    (images / "wide.photo.jpg").write_bytes(jpeg((64, 32)))
    (images / "wide.photo.txt").write_text("a wide red photo")
    (images / "tall.png").write_bytes(jpeg((20, 60)))  # a JPEG named .png still decodes
    (images / "tall.json").write_text(json.dumps({"caption": "a tall one"}))
    (images / "nocap.jpg").write_bytes(jpeg((30, 30)))
    (images / "broken.jpg").write_bytes(jpeg((64, 64))[:200])
    manifest = ingest([str(tmp_path / "images")], tmp_path / "a", samples_per_shard=2, progress=False)
    assert manifest["count"] == 3 and manifest["skipped"] == {"undecodable (OSError)": 1}
    assert manifest["skipped_names"]["undecodable (OSError)"] == [str(images / "broken.jpg")]
    assert len(manifest["shards"]) == 2 and sum(manifest["bucket_counts"].values()) == 3
    got = {json.loads(s["json"])["source"].split(":")[-1]: s for s in all_samples(tmp_path / "a")}
    wide, tall, nocap = got["sub/wide.photo"], got["sub/tall"], got["sub/nocap"]
    assert "." not in wide["__key__"] and wide["jpg"] == (images / "wide.photo.jpg").read_bytes()
    assert wide["txt"] == b"a wide red photo" and tall["txt"] == b"a tall one" and "txt" not in nocap
    meta = json.loads(wide["json"])
    assert meta["original_size"] == [32, 64] and meta["aspect_ratio"] == 0.5
    again = ingest([str(tmp_path / "images")], tmp_path / "b", progress=False)
    assert again["count"] == 3
    assert sorted(s["__key__"] for s in all_samples(tmp_path / "b")) == sorted(s["__key__"] for s in got.values())
    with pytest.raises(FileExistsError):
        ingest([str(tmp_path / "images")], tmp_path / "a", progress=False)


def test_ingest_tars_with_truncated_shard(tmp_path: Path) -> None:
    """img2dataset tars: original_height/width win over the decoded size; a truncated tar is counted."""
    src = tmp_path / "src"
    src.mkdir()
    members = []
    for i in range(3):
        meta = {"caption": f"photo {i}", "original_height": 480, "original_width": 640}
        members += [(f"{i:09d}.jpg", jpeg((32, 24))), (f"{i:09d}.txt", f"photo {i}".encode()),
                    (f"{i:09d}.json", json.dumps(meta).encode())]
    write_tar(src / "00000.tar", members)
    broken = write_tar(src / "00001.tar", members)
    broken.write_bytes(broken.read_bytes()[:800])  # cut inside the first image
    manifest = ingest([str(src)], tmp_path / "out", progress=False)
    assert manifest["count"] == 3
    assert manifest["skipped"] == {"unreadable tar data (ReadError)": 1}, manifest["skipped"]
    meta = json.loads(all_samples(tmp_path / "out")[0]["json"])
    assert meta["original_size"] == [480, 640] and meta["caption"] == "photo 0"


def test_cli_ingest_reports_a_pattern_matching_nothing(tmp_path: Path, capsys) -> None:
    assert main(["data", "ingest", str(tmp_path / "nothing-*.tar"), "--out", str(tmp_path / "o")]) == 2
    assert "matches no file" in capsys.readouterr().err


def test_extract_latents_per_bucket_and_trimmed_t5(tmp_path: Path, tiny: dict[str, Path]) -> None:
    """Latent moments at each bucket's size, T5 features trimmed to the caption's tokens, split by rank, resumable."""
    shards = tmp_path / "world"
    synthesize(shards, count=24, seed=0, resolution=32, buckets=[(32, 32), (16, 48), (48, 16)],
               samples_per_shard=8, progress=False)
    settings = ExtractSettings(vae=str(tiny["vae"]), text_encoder=str(tiny["t5"]), resolution=32, multi_scale=True,
                               min_ratio=0.25, max_ratio=4.0, t5_dtype="bf16", max_length=16)
    out = tmp_path / "features"
    first = extract(str(shards), out, settings, batch_size=5, rank=1, world_size=2, progress=False)
    assert first == {"shards_done_here": 1} and not (out / "manifest.json").exists()
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000001.tar"]
    manifest = extract(str(shards), out, settings, batch_size=5, rank=0, world_size=2, progress=False)
    assert manifest["count"] == 24 and manifest["bucket_counts"] == json.loads(
        (shards / "world.json").read_text())["bucket_counts"]
    encoder = T5TextEncoder.from_pretrained(tiny["t5"], max_length=16)
    for sample in samples(out / "shard-000000.tar"):
        features = decode_features(sample[FEATURES_KEY])
        meta = json.loads(sample["json"])
        h, w = meta["bucket"]
        assert "png" not in sample and features["latent_mean"].shape == (4, h // 8, w // 8)
        assert features["latent_std"].dtype == torch.float16 and features["t5"].dtype == torch.bfloat16
        reference, mask = encoder.encode([sample["txt"].decode()])
        assert features["t5"].shape[0] == int(mask.sum()) < 16
        torch.testing.assert_close(features["t5"].float(), reference[0, : int(mask.sum())], atol=0.05, rtol=0.02)
    written = {p: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    again = extract(str(shards), out, settings, rank=0, world_size=1, progress=False)
    assert again["count"] == 24 and written == {p: p.stat().st_mtime_ns for p in out.glob("*.tar")}  # none redone
    with pytest.raises(FileExistsError, match=r"other settings \(vae: '.*' there, 'pixel' asked; .*\); run with its "
                                              r"settings to resume it, or write the new features to another folder$"):
        extract(str(shards), out, ExtractSettings(vae="pixel", text_encoder=None, resolution=32), progress=False)


def test_a_failed_extract_leaves_nothing_a_corrected_rerun_must_match(tmp_path: Path, tiny: dict[str, Path]) -> None:
    """The settings are recorded with the first finished shard: a run that fails on loading its T5 leaves no
    extract.json (and no partial shard), so the rerun with the right T5 is not refused for "other settings"."""
    shards, out = tmp_path / "world", tmp_path / "features"
    synthesize(shards, count=6, seed=0, resolution=16, samples_per_shard=3, progress=False)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        extract(str(shards), out, ExtractSettings(vae="pixel", text_encoder=str(tmp_path / "no-t5"), resolution=16),
                progress=False)
    assert list(out.iterdir()) == []
    manifest = extract(str(shards), out, ExtractSettings(vae="pixel", text_encoder=str(tiny["t5"]), resolution=16),
                       progress=False)
    assert manifest["count"] == 6 and json.loads((out / "extract.json").read_text())["text_encoder"] == str(tiny["t5"])


def test_training_on_extracted_features_matches_on_the_fly(tmp_path: Path, tiny: dict[str, Path]) -> None:
    """Stage 2 on extracted latents + T5 features trains the same losses as with both encoders in the loop."""
    config = tmp_path / "config"
    config.mkdir()
    (config / "base.yaml").write_text((DEMO / "base.yaml").read_text())
    (config / "stage2.yaml").write_text("train:\n  max_steps: 4\n")
    shards = tmp_path / "world"
    synthesize(shards, count=64, seed=0, resolution=32, samples_per_shard=16, progress=False)
    extract(str(shards), tmp_path / "features", ExtractSettings(
        vae=str(tiny["vae"]), text_encoder=str(tiny["t5"]), resolution=32, max_length=32), progress=False)

    def losses(source: Path, name: str) -> list[tuple[list[str], float, bool]]:
        recorder = Recorder()
        run(config, None, [
            f"out_dir={tmp_path / name}", f"data.shards={source}", f"vae.name={tiny['vae']}",
            f"text_encoder.name={tiny['t5']}", "data.resolution=32", "model.depth=2", "model.hidden_size=48", "model.patch_size=2",
            "data.batch_size=8", "data.num_workers=0", "data.shuffle_buffer=16", "train.progress_bar=false",
            "eval.alignment_prompts=0", "samples.steps=2", "samples.cfg_scales=[1.0]", "samples.prompts=[a]",
        ], callbacks=[recorder])
        return recorder.steps

    on_the_fly, precomputed = losses(shards, "fly"), losses(tmp_path / "features", "pre")
    assert [k for k, _, _ in on_the_fly] == [k for k, _, _ in precomputed]
    assert not any(p for _, _, p in on_the_fly) and all(p for _, _, p in precomputed)
    for (_, a, _), (_, b, _) in zip(on_the_fly, precomputed):
        assert b == pytest.approx(a, rel=1e-3)  # fp16 storage; observed about 1e-5


def test_cli_chain_ingest_caption_extract(tmp_path: Path, tiny: dict[str, Path], capsys) -> None:
    """The data commands chain: a folder -> shards -> dense captions (tiny random LLaVA) -> features of them."""

    images = tmp_path / "images"
    images.mkdir()
    for i in range(5):
        (images / f"im{i}.jpg").write_bytes(jpeg((40, 32), (40 * i, 90, 20)))
        (images / f"im{i}.txt").write_text(f"photo number {i}")
    llava = tiny["llava"]
    assert main(["data", "ingest", str(images), "--out", str(tmp_path / "shards"), "--samples-per-shard", "3"]) == 0
    assert main(["data", "caption", str(tmp_path / "shards"), str(tmp_path / "dense"), "--model", str(llava),
                 "--max-new-tokens", "12", "--batch-size", "2"]) == 0
    assert main(["data", "extract", str(tmp_path / "dense"), str(tmp_path / "features"), "--vae", "pixel",
                 "--text-encoder", str(tiny["t5"]), "--resolution", "32", "--caption-key", "dense.txt"]) == 0
    assert "wrote features of 5 samples" in capsys.readouterr().out
    for sample in all_samples(tmp_path / "features"):
        features = decode_features(sample[FEATURES_KEY])
        assert sample["txt"].startswith(b"photo number") and sample["dense.txt"]
        assert features["latent_mean"].shape == (3, 32, 32) and features["t5"].shape[1] == 32
    assert main(["data", "extract", str(tmp_path / "dense"), str(tmp_path / "f2"), "--no-latents", "--no-text"]) == 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_packed_t5_is_lossless_and_smaller(dtype: torch.dtype) -> None:
    from pixart_lightning.data.features import encode_features

    features = (torch.randn(57, 512) * 0.3).to(dtype)
    packed, raw = encode_features(compress_t5=True, t5=features), encode_features(t5=features)
    assert torch.equal(decode_features(packed)["t5"], features)
    assert len(packed) < 0.9 * len(raw)
    with pytest.raises(ValueError, match="unreadable"):
        decode_features(packed[:-40])


def test_cli_stats_prints_the_table_and_writes_json(tmp_path: Path, capsys) -> None:
    members = []
    for i, (short, dense) in enumerate([("a dog", "A brown dog sits on a wooden bench beside a red door."),
                                        ("cat", "A small cat sleeps on a blue blanket near a window.")]):
        members += [(f"{i:04d}.txt", short.encode()), (f"{i:04d}.dense.txt", dense.encode())]
    write_tar(tmp_path / "s.tar", members)
    assert main(["data", "stats", str(tmp_path), "--json", str(tmp_path / "stats.json")]) == 0
    out = capsys.readouterr().out
    assert "original" in out and "dense" in out and "nouns/caption" in out and "skipped: none" in out
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["columns"]["original"]["total_nouns"] == 2 and stats["columns"]["dense"]["nouns_per_caption"] == 3.0
    assert stats["skipped"] == {}
