"""Which frozen encoders each rank builds, and its peak host memory, in a 2-process DDP run on precomputed features.

Stage 2 (with FID) then stage 3 of a tiny demo-shaped config on latents + T5 features that tiny encoders extracted;
the run itself is tests/encoder_use.py (:func:`run_on_features`, which the placement test runs too), logging every
T5/VAE construction and ru_maxrss per rank.

    python benchmarks/encoder_memory.py                 # the tiny T5 (24.8k parameters)
    python benchmarks/encoder_memory.py --big-t5        # a 134M-parameter random T5: the memory that scales
    python benchmarks/encoder_memory.py --tree OLD      # another checkout (copy tests/encoder_use.py into it)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", type=Path, default=ROOT, help="the checkout to run (default: this one)")
    parser.add_argument("--big-t5", action="store_true", help="a 134M-parameter T5 instead of the tiny one")
    args = parser.parse_args()
    sys.path.insert(0, str(args.tree.resolve() / "tests"))
    from encoder_use import run_on_features  # the tree's own driver; it puts the tree's package first on the path

    from pixart_lightning.shapes.tiny_models import build_tiny_t5

    work = Path(tempfile.mkdtemp(prefix="encoder-memory-"))
    t5 = build_tiny_t5(work / "t5-big", d_model=1024, num_layers=8, num_heads=16, d_ff=4096) if args.big_t5 else None
    for rank, log in enumerate(run_on_features(work, t5)):
        built = [f"{e['event']}({e['params']:,})" if "params" in e else e["event"] for e in log["events"]]
        print(f"rank {rank}: peak RSS {log['peak_rss_kib'] / 1024:.0f} MiB; in order: {' '.join(built)}")


if __name__ == "__main__":
    main()
