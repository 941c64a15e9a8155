"""The shard reader: sources, bad samples, buckets in step across ranks, exact resume, padded features."""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from pixart_lightning.config import DataSection
from pixart_lightning.data.features import FEATURES_KEY, encode_features
from pixart_lightning.data.shards import DataError, ShardStream


def spec(shards, **changes) -> DataSection:
    fields = dict(shards=str(shards), batch_size=4, resolution=16, shuffle_buffer=8, seed=3)
    return DataSection(**{**fields, **changes})


def take(stream, n: int) -> list[dict]:
    return list(itertools.islice(iter(stream), n))


def png(color: tuple[int, int, int], size=(20, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_batches_carry_images_captions_labels(world_shards: Path) -> None:
    batch = take(ShardStream(spec(world_shards)), 1)[0]
    assert batch["pixels"].shape == (4, 3, 16, 16) and batch["pixels"].abs().max() <= 1
    assert all("background" in c for c in batch["caption"]) and batch["label"].min() >= 0


def test_resume_skips_exactly_the_consumed_batches(world_shards: Path) -> None:
    """With 2 workers, skipping k batches continues with batch k of the uninterrupted stream."""
    def keys(skip: int, n: int) -> list[list[str]]:
        loader = DataLoader(ShardStream(spec(world_shards), skip_batches=skip), batch_size=None, num_workers=2)
        return [b["key"] for b in itertools.islice(loader, n)]

    whole = keys(0, 9)
    assert keys(5, 4) == whole[5:]
    assert keys(6, 3) == whole[6:]


def test_buckets_same_shape_and_in_step_across_ranks(world_shards: Path) -> None:
    """Every batch is one bucket; ranks 0 and 1 train the same bucket at each step on different samples."""
    s = spec(world_shards, multi_scale=True, resolution=24, min_ratio=0.5, max_ratio=2.0)
    rank0 = take(ShardStream(s, 4, rank=0, world_size=2), 8)
    rank1 = take(ShardStream(s, 4, rank=1, world_size=2), 8)
    shapes0 = [b["pixels"].shape for b in rank0]
    assert shapes0 == [b["pixels"].shape for b in rank1]
    assert len(set(shapes0)) > 1  # more than one bucket is used
    assert all(float(b["aspect_ratio"][0]) == pytest.approx(b["pixels"].shape[2] / b["pixels"].shape[3], abs=0.2)
               for b in rank0)
    assert not set(rank0[0]["key"]) & set(rank1[0]["key"])


def test_image_folder_with_bad_files(tmp_path: Path) -> None:
    """Image folders load; a corrupt image and an empty caption are skipped and counted."""
    for i in range(6):
        (tmp_path / f"img{i}.png").write_bytes(png((40 * i, 0, 0)))
        (tmp_path / f"img{i}.txt").write_text(f"picture {i}")
    (tmp_path / "img2.png").write_bytes(b"\x89PNG broken")
    (tmp_path / "img4.txt").write_text("   ")
    batch = take(ShardStream(spec(tmp_path, batch_size=4, shuffle_buffer=1)), 1)[0]
    assert sorted(batch["key"]) == ["img0", "img1", "img3", "img5"]
    assert batch["skipped"] == {"undecodable (UnidentifiedImageError)": 1, "empty caption": 1}


def test_truncated_tar_is_skipped_and_counted(tmp_path: Path) -> None:
    """img2dataset-style tars (.jpg/.txt/.json); a truncated one yields what it can and counts the loss."""
    def write(name: str, n: int) -> Path:
        path = tmp_path / name
        with tarfile.open(path, "w") as tar:
            for i in range(n):
                for ext, data in (("png", png((0, 30 * i, 0))), ("txt", b"a green thing"),
                                  ("json", json.dumps({"aesthetic": 6.0}).encode())):
                    info = tarfile.TarInfo(f"{Path(name).stem}-{i:03d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        return path

    write("a.tar", 4)
    broken = write("b.tar", 4)
    broken.write_bytes(broken.read_bytes()[:3700])  # cut inside the second sample's image
    batches = take(ShardStream(spec(tmp_path, batch_size=2, shuffle_buffer=1)), 3)
    skipped = {k: v for b in batches for k, v in b["skipped"].items()}
    assert skipped["unreadable tar data (ReadError)"] == 1
    keys = [k for b in batches for k in b["key"]]
    assert "b-000" in keys and "b-001" not in keys and len(keys) == 6


def test_pattern_matching_nothing_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="do not exist"):
        ShardStream(spec(tmp_path / "data-{000000..000009}.tar"))
    with pytest.raises(DataError, match="no .tar shards and no images"):
        ShardStream(spec(tmp_path))


def test_aesthetic_filter_and_precomputed_features(tmp_path: Path) -> None:
    """min_aesthetic drops samples; precomputed caption features keep their dtype, padded to the batch's longest;
    precomputed latents replace the image, and a latent of a size no bucket has is skipped and counted."""
    with tarfile.open(tmp_path / "f.tar", "w") as tar:
        for i, (score, length) in enumerate([(6.0, 3), (2.0, 5), (7.0, 5), (8.0, 2), (9.0, 2)]):
            side = 3 if i == 4 else 2  # 16 px / latent factor 8 = 2
            feats = encode_features(t5=torch.full((length, 8), i, dtype=torch.bfloat16),
                                    latent_mean=torch.full((4, side, side), float(i)), latent_std=torch.ones(4, side, side))
            for ext, data in (("txt", b"x"), ("json", json.dumps({"aesthetic": score}).encode()), (FEATURES_KEY, feats)):
                info = tarfile.TarInfo(f"{i:03d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    batch = take(ShardStream(spec(tmp_path, batch_size=3, shuffle_buffer=1, min_aesthetic=5.0), latent_factor=8), 1)[0]
    assert batch["key"] == ["000", "002", "003"]
    assert batch["caption_features"].shape == (3, 5, 8) and batch["caption_features"].dtype == torch.bfloat16
    assert batch["caption_mask"].sum(1).tolist() == [3, 5, 2]
    assert torch.all(batch["caption_features"][2, 2:] == 0)
    assert "pixels" not in batch and batch["latent_mean"].shape == (3, 4, 2, 2)
    assert batch["latent_mean"][:, 0, 0, 0].tolist() == [0.0, 2.0, 3.0]
    later = take(ShardStream(spec(tmp_path, batch_size=3, shuffle_buffer=1, min_aesthetic=5.0), latent_factor=8), 2)[1]
    assert later["skipped"].get("latent of another size (3x3)") == 1


def test_stage1_reads_imagenet_style_shards_without_captions(tmp_path: Path) -> None:
    """jpg + cls samples: accepted when captions are not needed (stage 1), skipped when they are."""
    with tarfile.open(tmp_path / "in.tar", "w") as tar:
        for i in range(4):
            buffer = io.BytesIO()
            Image.new("RGB", (20, 20), (i * 50, 0, 0)).save(buffer, format="JPEG")
            for ext, data in (("jpg", buffer.getvalue()), ("cls", str(i + 10).encode())):
                info = tarfile.TarInfo(f"{i:03d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    batch = take(ShardStream(spec(tmp_path, shuffle_buffer=1), captions=False), 1)[0]
    assert batch["label"].tolist() == [10, 11, 12, 13]
    with pytest.raises(DataError, match="no usable sample"):
        take(ShardStream(spec(tmp_path, shuffle_buffer=1)), 1)
