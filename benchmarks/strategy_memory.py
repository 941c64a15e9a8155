"""Memory and step time of one GPU's training step: plain (what DDP runs per GPU) vs FSDP2, with and without
activation checkpointing, and the largest batch that fits.

    python benchmarks/strategy_memory.py --size PixArt-XL/2 --resolution 256 --batch 64      # a GPU
    python benchmarks/strategy_memory.py --size PixArt-XL/2 --resolution 512 --max-batch     # search per variant
    python benchmarks/strategy_memory.py                                                     # CPU smoke run, tiny

The step is the stage-2 one: hybrid loss on caption-conditioned PixArt, backward, fused AdamW,
EMA update, bf16 autocast (GPU) over fp32 weights. FSDP runs ``fully_shard`` per block on a
one-process mesh: on one GPU it shards nothing, so its figure is FSDP's overhead; the memory it saves
grows with the number of GPUs (parameters, gradients and AdamW state divided by N).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pixart_lightning.config import ModelSection, StageConfig, TrainSection  # noqa: E402
from pixart_lightning.diffusion import create_diffusion  # noqa: E402
from pixart_lightning.models import PixArt, PixArtConfig  # noqa: E402
from pixart_lightning.training.ema import EMA  # noqa: E402
from pixart_lightning.training.parallel import clip_grad_norm, parallelize  # noqa: E402


def run_variant(args, device: torch.device, fsdp: bool, checkpointing: bool, batch: int) -> tuple[float, float]:
    """(median step seconds, peak GiB) of one variant; raises torch.OutOfMemoryError when it does not fit."""
    channels = 4096 if "XL" in args.size else 64
    latent = args.resolution // 8
    cfg = PixArtConfig.from_name(args.size, caption_channels=channels, sample_size=latent)
    torch.manual_seed(0)
    model = PixArt(cfg).to(device)
    ema = EMA(model, 0.9999).to(device)
    precision = "bf16-mixed" if device.type == "cuda" else "32"
    stage_cfg = StageConfig(model=ModelSection(gradient_checkpointing=checkpointing),
                            train=TrainSection(strategy="fsdp" if fsdp else "auto", precision=precision))
    mesh = init_device_mesh(device.type, (1,)) if fsdp else None
    parallelize(model, stage_cfg, device, mesh, average=ema.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.03, eps=1e-10,
                                  fused=device.type == "cuda", foreach=device.type != "cuda")
    diffusion = create_diffusion(learn_sigma=cfg.learn_sigma)
    x0 = torch.randn(batch, 4, latent, latent, device=device)
    y = torch.randn(batch, args.tokens, channels, device=device)
    mask = torch.ones(batch, args.tokens, dtype=torch.long, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")  # as bf16-mixed

    def step() -> float:
        start = time.perf_counter()
        t = torch.randint(0, 1000, (batch,), device=device)
        with autocast:
            loss = diffusion.training_losses(model, x0, t, {"y": y, "mask": mask})["loss"].mean()
        loss.backward()
        clip_grad_norm(model.parameters(), 0.01)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(model)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        step()
    times = [step() for _ in range(args.steps)]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return statistics.median(times), peak


def largest_batch(args, device, fsdp: bool, checkpointing: bool) -> int:
    """Doubling, then bisection, on out-of-memory."""
    fits, fails = 0, None
    batch = args.batch
    while fails is None or fails - fits > max(1, fits // 16):
        try:
            run_variant(args, device, fsdp, checkpointing, batch)
            fits = batch
        except torch.OutOfMemoryError:
            fails = batch
        torch.cuda.empty_cache()  # the variant's model and optimizer are gone with its frame
        batch = batch * 2 if fails is None else (fits + fails) // 2
    return fits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="PixArt-tiny/2")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=120)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--max-batch", action="store_true", help="search the largest batch per variant (GPU)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.size}, {args.resolution} px, batch {args.batch}, {args.tokens} caption tokens, {where}, "
          f"torch {torch.__version__}")
    print(f"  {'variant':32s} {'step ms':>9s} {'img/s':>8s} {'peak GiB':>9s}" + ("  max batch" if args.max_batch else ""))
    for fsdp in (False, True):
        for checkpointing in (False, True):
            name = f"{'FSDP2' if fsdp else 'plain (DDP per GPU)'}{' + act. ckpt' if checkpointing else ''}"
            seconds, peak = run_variant(args, device, fsdp, checkpointing, args.batch)
            line = f"  {name:32s} {seconds * 1e3:9.1f} {args.batch / seconds:8.1f} {peak:9.2f}"
            if args.max_batch:
                line += f"  {largest_batch(args, device, fsdp, checkpointing):9d}"
            print(line, flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
