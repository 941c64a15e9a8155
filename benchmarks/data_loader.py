"""Precomputed features: bytes per sample vs PixArt-α's layout, and training-loader throughput per worker.

    python benchmarks/data_loader.py                  # both parts, about a minute on 2 cores
    python benchmarks/data_loader.py --samples 2048 --workers 1,2

Storage: our T5 features (bf16 or fp16, trimmed to the caption's tokens, optionally packed: see
``pixart_lightning/data/features.py``) next to PixArt-α's file for the same caption: fp32 (1, 120, 4096)
plus its mask in ``np.savez_compressed``, the raw array being 1,966,080 bytes. Bytes are measured on
files written here, tar member overhead included for ours. Feature values are stand-ins: normal
values with a few large channels, rounded to bf16 as T5-XXL computes them (what the official file
then stores in fp32), so the compressed sizes are estimates for real features; the raw sizes are exact.

Throughput: 256-px samples (latent moments 4 x 32 x 32 fp16 and T5 features) written as webdataset
shards, read through the training loader (``ShardStream`` in a ``DataLoader``, batch 64), at the tiny
T5 width (64) and T5-XXL's (4096). From samples/s per worker it prints how many loader workers keep
one GPU fed at PixArt-XL/2-256 training rates (``TARGET_RATES``).
"""

from __future__ import annotations

import argparse
import io
import itertools
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pixart_lightning.config import DataSection  # noqa: E402
from pixart_lightning.data.features import FEATURES_KEY, encode_features  # noqa: E402
from pixart_lightning.data.shards import ShardStream  # noqa: E402
from pixart_lightning.shapes import world  # noqa: E402
from pixart_lightning.shapes.tiny_models import word_level_t5_tokenizer  # noqa: E402

OFFICIAL_TOKENS, XXL_DIM = 120, 4096
# Images per second per GPU that the loader must sustain for PixArt-XL/2 at 256 px.
TARGET_RATES = {"issue-7 bar on H100 (40 % MFU)": 440, "Open-Sora PixArt-XL/2 on H800": 141}


def t5_like(length: int, dim: int, rng: np.random.Generator) -> torch.Tensor:
    """Stand-in features: unit-scale normals with 8 outlier channels, rounded to bf16."""
    x = rng.standard_normal((length, dim), dtype=np.float32) * 0.25
    x[:, :8] *= 20
    return torch.from_numpy(x).to(torch.bfloat16)


def official_bytes(length: int, rng: np.random.Generator) -> int:
    """PixArt-α's ``np.savez_compressed`` of fp32 (1, 120, D) features and the (1, 120) mask.

    T5 computes an output at every padded position too (not zeros, not copies), and the file keeps all 120.
    """
    padded = t5_like(OFFICIAL_TOKENS, XXL_DIM, rng).float().numpy()[None]
    mask = np.zeros((1, OFFICIAL_TOKENS), dtype=np.int64)
    mask[0, :length] = 1
    buffer = io.BytesIO()
    np.savez_compressed(buffer, caption_feature=padded, attention_mask=mask)
    return buffer.getbuffer().nbytes


def tar_member_bytes(data: bytes) -> int:
    """Bytes the member takes in a tar: a 512-byte header plus the data padded to 512."""
    return 512 + math.ceil(len(data) / 512) * 512


def storage(rng: np.random.Generator) -> None:
    tokenizer = word_level_t5_tokenizer(world.shapes_corpus())
    demo = [len(tokenizer(world.caption_for(world.sample_scene(np.random.default_rng(i), 0.5),
                                            np.random.default_rng(i))).input_ids) for i in range(200)]
    sets = {"demo dense captions (tiny tokenizer)": demo, **{f"{n} tokens each": [n] * 20 for n in (32, 64, 96, 120)}}
    raw_official = OFFICIAL_TOKENS * XXL_DIM * 4
    print(f"\nT5 feature bytes per sample at width {XXL_DIM}; PixArt-α raw fp32 (120, 4096) = {raw_official:,} B")
    print(f"{'captions':38s} {'tokens':>7s} {'official npz':>13s} {'ours bf16':>10s} {'ours packed':>12s} "
          f"{'bf16/raw':>9s} {'packed/raw':>11s} {'packed/npz':>11s}")
    for name, lengths in sets.items():
        official = ours_raw = ours_packed = 0
        for length in lengths[:20]:
            features = t5_like(length, XXL_DIM, rng)
            official += official_bytes(length, rng)
            ours_raw += tar_member_bytes(encode_features(t5=features))
            ours_packed += tar_member_bytes(encode_features(compress_t5=True, t5=features))
        n = len(lengths[:20])
        print(f"{name:38s} {np.mean(lengths):7.1f} {official / n:13,.0f} {ours_raw / n:10,.0f} {ours_packed / n:12,.0f} "
              f"{ours_raw / n / raw_official:9.1%} {ours_packed / n / raw_official:11.1%} {ours_packed / official:11.1%}")


def write_shards(folder: Path, count: int, dim: int, compress: bool, rng: np.random.Generator) -> None:
    with wds.ShardWriter(str(folder / "shard-%06d.tar"), maxcount=256, verbose=0, encoder=False) as sink:
        for i in range(count):
            length = int(rng.integers(60, OFFICIAL_TOKENS + 1))  # dense captions, many near the 120 cap
            latent = torch.from_numpy(rng.standard_normal((4, 32, 32), dtype=np.float32)).half()
            features = encode_features(compress_t5=compress, t5=t5_like(length, dim, rng), latent_mean=latent,
                                       latent_std=latent.abs())
            sink.write({"__key__": f"{i:08d}", "txt": b"a dense caption", "json": b'{"original_size": [256, 256]}',
                        FEATURES_KEY: features})


def throughput(folder: Path, workers: int, batch: int, batches: int) -> float:
    """Samples per second through the training loader, after two warm-up batches."""
    spec = DataSection(shards=str(folder), resolution=256, batch_size=batch, num_workers=workers, shuffle_buffer=256)
    loader = DataLoader(ShardStream(spec, granularity=16, latent_factor=8), batch_size=None, num_workers=workers,
                        prefetch_factor=4)
    stream = iter(loader)
    for _ in range(2):
        next(stream)
    start = time.perf_counter()
    for b in itertools.islice(stream, batches):
        assert b["latent_mean"].shape == (batch, 4, 32, 32)
    return batches * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1024, help="samples written per configuration")
    parser.add_argument("--workers", default="1", help="comma-separated loader worker counts")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--skip-storage", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    if not args.skip_storage:
        storage(rng)
    print(f"\nloader throughput, 256 px, batch {args.batch}, T5 lengths uniform in 60..120 tokens")
    print(f"{'T5 width':>8s} {'packed':>7s} {'workers':>8s} {'MB/sample':>10s} {'samples/s':>10s} {'per worker':>11s}  "
          + "  ".join(f"workers for {r} img/s" for r in TARGET_RATES.values()))
    for dim, compress in ((64, False), (XXL_DIM, False), (XXL_DIM, True)):
        with tempfile.TemporaryDirectory() as tmp:
            write_shards(Path(tmp), args.samples, dim, compress, rng)
            size = sum(p.stat().st_size for p in Path(tmp).glob("*.tar")) / args.samples / 2**20
            batches = max(4, args.samples // args.batch - 4)
            for workers in (int(w) for w in args.workers.split(",")):
                rate = throughput(Path(tmp), workers, args.batch, batches)
                per_worker = rate / workers
                needed = "  ".join(f"{math.ceil(r / per_worker):>{len(f'workers for {r} img/s')}d}"
                                   for r in TARGET_RATES.values())
                print(f"{dim:8d} {str(compress):>7s} {workers:8d} {size:10.3f} {rate:10.0f} {per_worker:11.0f}  {needed}")
    print("\nrates: " + "; ".join(f"{r} img/s = {name}" for name, r in TARGET_RATES.items()))


if __name__ == "__main__":
    main()
