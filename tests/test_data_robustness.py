"""Odd and broken input for the data tools: each case is skipped and counted, refused clearly, or read right."""

from __future__ import annotations

import io
import json
import os
import stat
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from pixart_lightning.config import DataSection
from pixart_lightning.data.buckets import bucket_table
from pixart_lightning.data.caption import recaption
from pixart_lightning.data.caption_stats import caption_statistics, format_table, read_captions
from pixart_lightning.data.counts import Counts
from pixart_lightning.data.extract import ExtractSettings, extract
from pixart_lightning.data.features import decode_features, encode_features
from pixart_lightning.data.ingest import ingest
from pixart_lightning.data.samples import caption_text, fit_to_bucket, open_image, original_size, sample_meta
from pixart_lightning.data.shards import DataError, ShardStream, resolve_sources
from pixart_lightning.shapes.tiny_models import build_tiny_llava
from tests.test_ingest_extract import all_samples, jpeg, write_tar


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_open_image_applies_exif_orientation_and_composites_alpha() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    upright = open_image(encoded(Image.new("RGB", (60, 20), (200, 0, 0)), "JPEG", exif=exif))
    assert upright.size == (20, 60)
    clear_red = open_image(encoded(Image.new("RGBA", (4, 4), (255, 0, 0, 0)), "PNG"))
    assert clear_red.getpixel((0, 0)) == (255, 255, 255)  # a fully transparent pixel is the white behind it


def test_metadata_and_captions_of_the_wrong_type() -> None:
    with pytest.raises(ValueError, match="not an object"):
        sample_meta({"json": b"[1, 2]"})
    assert caption_text({}, "caption", {"caption": 5}) is None
    assert caption_text({"txt": b"\xff\xfe"}, "txt", {}) is None
    assert caption_text({"txt": b"  a cat "}, "txt", {}) == "a cat"
    assert original_size({"original_height": "n/a", "original_width": 3}, (7, 8)) == (7, 8)
    assert original_size({"original_size": [480, 640]}, (7, 8)) == (480, 640)


def test_fit_to_bucket_resamples_only_the_kept_region() -> None:
    """A 20000 x 2 banner goes to the widest bucket in about the time of the bucket itself."""
    table = bucket_table(256, 16)
    start = time.perf_counter()
    ratio, pixels = fit_to_bucket(Image.new("RGB", (20000, 2), (10, 20, 30)), table)
    assert time.perf_counter() - start < 1.0
    assert ratio == min(table) and pixels.shape == (3, *table[ratio]) and int(pixels[2, 0, 0]) == 30


def test_malformed_features_raise_value_error() -> None:
    with pytest.raises(ValueError, match="come together"):
        decode_features(encode_features(latent_mean=torch.zeros(4, 2, 2)))
    with pytest.raises(ValueError, match=r"\(C, h, w\)"):
        decode_features(encode_features(latent_mean=torch.zeros(2, 2), latent_std=torch.zeros(2, 2)))


def test_sources_remote_urls_and_brace_glob(tmp_path: Path) -> None:
    for part in ("a", "b"):
        (tmp_path / part).mkdir()
        write_tar(tmp_path / part / "s.tar", [("0.txt", b"x")])
        (tmp_path / part / "manifest.json").write_text("{}")
    both = resolve_sources(f"{tmp_path}/{{a,b}}/*")
    assert [str(Path(u).relative_to(tmp_path)) for u in both] == ["a/manifest.json", "a/s.tar", "b/manifest.json", "b/s.tar"]
    assert resolve_sources(f"{tmp_path}/{{a,b}}/*.tar") == [str(tmp_path / "a" / "s.tar"), str(tmp_path / "b" / "s.tar")]
    signed = "https://example.invalid/shard-{000..001}.tar?sig=abc"
    assert resolve_sources(signed) == ["https://example.invalid/shard-000.tar?sig=abc",
                                       "https://example.invalid/shard-001.tar?sig=abc"]


def test_ingest_refuses_sources_with_the_same_name_and_buckets_by_stored_size(tmp_path: Path) -> None:
    for year in ("2023", "2024"):
        (tmp_path / year / "images").mkdir(parents=True)
        (tmp_path / year / "images" / "a.jpg").write_bytes(jpeg((32, 32)))
    with pytest.raises(DataError, match="share the name 'images'"):
        ingest([str(tmp_path / "2023" / "images"), str(tmp_path / "2024" / "images")], tmp_path / "o", progress=False)
    # img2dataset centre-crops to a square but records the original 480 x 640: the bucket follows the square.
    src = tmp_path / "src"
    src.mkdir()
    write_tar(src / "00000.tar", [("0.jpg", jpeg((32, 32))), ("0.json", b'{"original_height": 480, "original_width": 640}'),
                                  ("1.jpg", jpeg((32, 32))), ("1.json", b"[1]")])
    manifest = ingest([str(src)], tmp_path / "out", progress=False)
    assert manifest["bucket_counts"] == {"1024x1024": 1} and manifest["skipped"] == {"undecodable (ValueError)": 1}
    assert json.loads(all_samples(tmp_path / "out")[0]["json"])["original_size"] == [480, 640]


def test_extract_guards(tmp_path: Path) -> None:
    """The source folder is never overwritten; an unreadable shard is not marked done; latents-less output keeps
    its images; broken json is skipped and counted."""
    src = tmp_path / "src"
    src.mkdir()
    write_tar(src / "a.tar", [("0.jpg", jpeg((16, 16))), ("0.txt", b"x"), ("1.jpg", jpeg((16, 16))),
                              ("1.json", b"{bad"), ("1.txt", b"y")])
    settings = ExtractSettings(vae="pixel", text_encoder=None, resolution=16)
    with pytest.raises(ValueError, match="must not be the source"):
        extract(str(src), src, settings, progress=False)
    manifest = extract(str(src), tmp_path / "f", settings, progress=False)
    assert manifest["count"] == 1 and manifest["skipped"] == {"unreadable json (JSONDecodeError)": 1}
    (src / "b.tar").symlink_to(tmp_path / "missing.tar")
    with pytest.raises(DataError, match="could not be read"):
        extract(str(src), tmp_path / "g", settings, progress=False)
    assert not (tmp_path / "g" / "b.stats.json").exists()


def test_loader_stops_when_the_bucket_schedule_cannot_be_met(tmp_path: Path) -> None:
    """A manifest whose bucket counts promise shapes the images never have is a clear error, not a silent hang."""
    members = []
    for i in range(40):
        members += [(f"{i:03d}.jpg", jpeg((32, 32))), (f"{i:03d}.txt", b"a square")]
    write_tar(tmp_path / "s.tar", members)
    (tmp_path / "manifest.json").write_text(json.dumps({"bucket_counts": {"512x2048": 1}}))
    spec = DataSection(shards=str(tmp_path), resolution=32, multi_scale=True, batch_size=1, shuffle_buffer=1)
    with pytest.raises(DataError, match="bucket_counts do not match"):
        next(iter(ShardStream(spec, granularity=8)))


def test_every_tool_keeps_what_precedes_the_cut_of_a_truncated_tar(tmp_path: Path) -> None:
    """Cut inside s3's image: ingest, caption, stats and extract all keep s0-s2 and count the cut once."""
    members = []
    for i in range(4):
        noise = Image.effect_noise((32, 32), 30 + i).convert("RGB")  # spans several tar blocks
        members += [(f"s{i}.png", encoded(noise, "PNG")), (f"s{i}.txt", f"noise {i}".encode())]
    data = write_tar(tmp_path / "whole.tar", members).read_bytes()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "cut.tar").write_bytes(data[: data.index(b"s3.png") + 1024])
    source, cut = str(tmp_path / "src"), {"unreadable tar data (ReadError)": 1}

    ingested = ingest([source], tmp_path / "ingested", progress=False)
    assert [json.loads(s["json"])["source"].split(":")[-1] for s in all_samples(tmp_path / "ingested")] == ["s0", "s1", "s2"]
    captioned = recaption(source, tmp_path / "dense", model=str(build_tiny_llava(tmp_path / "llava")),
                          max_new_tokens=2, progress=False)
    assert [s["__key__"] for s in all_samples(tmp_path / "dense")] == ["s0", "s1", "s2"]
    skipped = Counts()
    assert read_captions(source, ("txt",), skipped) == {"txt": ["noise 0", "noise 1", "noise 2"]}
    extracted = extract(source, tmp_path / "features", ExtractSettings(vae="pixel", text_encoder=None, resolution=16),
                        progress=False)
    assert (ingested["count"], captioned["count"], extracted["count"]) == (3, 3, 3)
    assert ingested["skipped"] == captioned["skipped"] == skipped.counts == extracted["skipped"] == cut
    assert format_table(caption_statistics({"original": []}), skipped).endswith(
        f"skipped: unreadable tar data (ReadError): 1 ({tmp_path / 'src' / 'cut.tar'})")


def test_ingest_takes_every_format_pil_opens_and_names_what_it_ignores(tmp_path: Path) -> None:
    """GIF, TIFF and BMP (in a folder or a tar) are stored as the PNG every tool decodes from them; a tar member,
    a file or a caption that ingest does not take is named in the manifest."""
    photo = Image.effect_noise((24, 16), 50).convert("RGB")
    folder = tmp_path / "photos"
    folder.mkdir()
    for fmt in ("GIF", "TIFF", "BMP"):
        (folder / f"a-{fmt.lower()}.{fmt.lower()}").write_bytes(encoded(photo, fmt))
    (folder / "lost.txt").write_text("a caption without its image")
    (folder / "data.xyz").write_text("?")
    (tmp_path / "tars").mkdir()
    write_tar(tmp_path / "tars" / "s.tar", [("0.gif", encoded(photo, "GIF")), ("0.xyz", b"?")])
    (tmp_path / "tars" / "notes.md").write_text("beside the shards")
    manifest = ingest([str(folder), str(tmp_path / "tars")], tmp_path / "out", progress=False)
    stored = {json.loads(s["json"])["source"]: s for s in all_samples(tmp_path / "out")}
    assert manifest["count"] == len(stored) == 4 and all("png" in s for s in stored.values())
    tiff = stored[f"{folder}:a-tiff"]
    assert open_image(tiff["png"]).tobytes() == open_image(encoded(photo, "TIFF")).tobytes()
    assert json.loads(tiff["json"])["converted_from"] == "tiff"
    assert manifest["ignored_names"] == {
        "caption or metadata with no image": [str(folder / "lost.txt")],
        "not a tar shard (in a folder of shards)": [str(tmp_path / "tars" / "notes.md")],
        "unsupported extension": [str(folder / "data.xyz")],
        "unsupported tar member": [f"{tmp_path / 'tars' / 's.tar'}:0.xyz"]}


def test_ingest_output_follows_the_umask(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(jpeg((16, 16)))
    previous = os.umask(0o022)
    try:
        ingest([str(tmp_path / "images")], tmp_path / "out", progress=False)
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755


def test_extract_refuses_what_training_refuses_before_loading_a_model(tmp_path: Path) -> None:
    """The resolution (the multi-scale base too) must be a multiple of patch size x VAE factor, as in the stage
    config; the VAE named here does not exist, so any model load would fail otherwise."""
    write_tar(tmp_path / "s.tar", [("0.jpg", jpeg((16, 16))), ("0.txt", b"x")])
    for multi_scale in (False, True):
        settings = ExtractSettings(vae=str(tmp_path / "no-vae"), text_encoder=None, resolution=50,
                                   multi_scale=multi_scale)
        with pytest.raises(ValueError, match="data.resolution=50 .* nearest valid resolutions are 48 or 64"):
            extract(str(tmp_path), tmp_path / "f", settings, progress=False)
    with pytest.raises(ValueError, match="nearest valid resolutions are 16$"):
        extract(str(tmp_path), tmp_path / "f", ExtractSettings(vae="pixel", text_encoder=None, resolution=12,
                                                              patch_size=16), progress=False)
    assert not (tmp_path / "f").exists()
