"""GPU-days for PixArt-α's training schedule from a per-GPU training rate, next to the paper's A100-days.

The schedule is the paper's (steps x global batch per stage); the paper's cost is its V100-days / 2.2, which
sum to the README's 753 A100-days. A rate comes either measured, as images/s per GPU at a resolution (the
``benchmarks/train_step.py`` figure on that GPU), or as an MFU, turned into images/s through the model's FLOPs
per image (``pixart_lightning/training/flops.py``; stage 1 is class-conditional, cheaper per image). A resolution
without a measured rate runs at the MFU of the nearest measured one.

    python benchmarks/cost_projection.py --rate 256=440 --rate 512=120 --gpu H100   # measured images/s per GPU
    python benchmarks/cost_projection.py --mfu 0.127 --gpu H800                     # Open-Sora's PixArt-XL/2 rate
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pixart_lightning.encoders.vae import SD_VAE_DOWNSAMPLE  # noqa: E402
from pixart_lightning.models import PixArtConfig  # noqa: E402
from pixart_lightning.training.flops import PEAK_TFLOPS, train_flops_per_image  # noqa: E402

# (stage, resolution, steps, global batch, the paper's A100-days = its V100-days / 2.2)
SCHEDULE = [
    ("1 pixel dependency", 256, 300_000, 1024, 88 / 2.2),
    ("2 text-image alignment", 256, 150_000, 11392, 672 / 2.2),
    ("3 high aesthetics", 256, 90_000, 11392, 416 / 2.2),
    ("3 high resolution", 512, 100_000, 2560, 320 / 2.2),
    ("3 high resolution", 1024, 16_000, 384, 160 / 2.2),
]


def flops_per_image(stage: str, resolution: int) -> float:
    mode = "class" if stage.startswith("1") else "text"
    cfg = PixArtConfig.from_name("PixArt-XL/2", mode=mode, sample_size=resolution // SD_VAE_DOWNSAMPLE)
    return train_flops_per_image(cfg, resolution, resolution)


def project(rates: dict[int, float], mfu: float | None, peak_tflops: float) -> list[tuple]:
    """Rows (stage, resolution, images, images/s, MFU, GPU-days, paper A100-days)."""
    text_flops = {res: flops_per_image("2", res) for res in (256, 512, 1024)}
    measured_mfu = {res: rate * text_flops[res] / (peak_tflops * 1e12) for res, rate in rates.items()}
    rows = []
    for stage, res, steps, batch, paper in SCHEDULE:
        if mfu is not None:
            stage_mfu = mfu
        else:
            nearest = min(measured_mfu, key=lambda r: abs(r - res))
            stage_mfu = measured_mfu[nearest]
        rate = (rates[res] if res in rates and not stage.startswith("1") and mfu is None
                else stage_mfu * peak_tflops * 1e12 / flops_per_image(stage, res))
        images = steps * batch
        rows.append((stage, res, images, rate, stage_mfu, images / rate / 86400, paper))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", action="append", default=[], metavar="RES=IMAGES_PER_S",
                        help="measured training images/s per GPU at a resolution (repeatable)")
    parser.add_argument("--mfu", type=float, help="instead of rates: one model-FLOPs utilisation for all stages")
    parser.add_argument("--gpu", default="H100", help=f"peak bf16 TFLOP/s from: {', '.join(PEAK_TFLOPS)}")
    args = parser.parse_args()
    if (args.mfu is None) == (not args.rate):
        parser.error("give --rate (one or more) or --mfu")
    if args.gpu not in PEAK_TFLOPS:
        parser.error(f"unknown --gpu {args.gpu!r}; valid choices: {', '.join(PEAK_TFLOPS)}")
    rates = {int(res): float(rate) for res, rate in (r.split("=") for r in args.rate)}
    rows = project(rates, args.mfu, PEAK_TFLOPS[args.gpu])

    print(f"PixArt-α schedule on {args.gpu} ({PEAK_TFLOPS[args.gpu]:.0f} TFLOP/s bf16 peak), "
          + (f"MFU {args.mfu:.1%}" if args.mfu is not None else "rates " + ", ".join(args.rate)))
    print(f"  {'stage':24s} {'px':>5s} {'images':>8s} {'img/s/GPU':>10s} {'MFU':>6s} "
          f"{args.gpu + '-days':>10s} {'paper A100-days':>16s}")
    for stage, res, images, rate, mfu, days, paper in rows:
        print(f"  {stage:24s} {res:5d} {images / 1e6:7.0f}M {rate:10.1f} {mfu:6.1%} {days:10.1f} {paper:16.1f}")
    ours, paper = sum(r[5] for r in rows), sum(r[6] for r in rows)
    print(f"  {'total':24s} {'':5s} {sum(r[2] for r in rows) / 1e6:7.0f}M {'':10s} {'':6s} {ours:10.1f} {paper:16.1f}"
          f"   ({ours / paper:.1%} of the paper's GPU-days)")


if __name__ == "__main__":
    main()
