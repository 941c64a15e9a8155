"""Check 10: LoRA r16 against full fine-tuning of XL/2 at 512 px in bf16-mixed with activation checkpointing, the two
taking turns step by step (``benchmarks/finetune.py``): images/s and peak memory per side, the largest batch each
would fit on this device and on a 24 GiB card, and whether LoRA trains batch 8 in 24 GiB.

The largest batches are projected, not searched: a doubling search of XL/2 through the Trainer takes minutes per
side. A side's peak at batch B is its resident state (weights, optimizer state, EMA: what was allocated when a step
began) plus B times the step's memory per image, so the largest batch is what fits that line under the capacity.
The 24 GiB verdict at the measured batch reads the measured peak; :data:`CONTEXT_GIB` is kept back for the CUDA
context and the allocator's slack, which allocated bytes do not count."""

from __future__ import annotations

import math

import torch

from pixart_lightning.gpu_check import benchmark
from pixart_lightning.gpu_check.harness import Context

CARD_GIB = 24.0
CONTEXT_GIB = 1.0
"""Device memory a process needs beyond what PyTorch reports allocated (CUDA context, cached blocks)."""
GOAL_BATCH_24GIB = 8


def projected_largest_batch(resident_gib: float, peak_gib: float, batch: int, capacity_gib: float) -> int:
    """The largest batch whose projected peak (resident + batch x memory per image at ``batch``) fits
    ``capacity_gib`` less :data:`CONTEXT_GIB`; 0 if even the resident state does not."""
    per_image = max(peak_gib - resident_gib, 1e-9) / batch
    return max(0, math.floor((capacity_gib - CONTEXT_GIB - resident_gib) / per_image))


def check_finetune(ctx: Context) -> None:
    """Both sides at ``finetune_batch`` with activation checkpointing; their figures, then the projections (GPU)."""
    s = ctx.sizes
    finetune = benchmark("finetune")
    setup = finetune.Setup(config=s.config, stage=2, device=str(ctx.device), batch=s.finetune_batch,
                           resolution=s.resolution_512, caption_channels=s.caption_channels, steps=s.finetune_steps,
                           warmup=s.warmup, reference=False)
    row = finetune.measure(setup, finetune.VARIANTS["eager+ckpt"], checkpoint=False)
    print(finetune.format_row(row), flush=True)
    for side in finetune.SIDES:
        ctx.record(side, row[side])
    failed = [f"{side}: {row[side]['error']}" for side in finetune.SIDES
              if row[side].get("error") not in (None, "out of memory")]
    if failed:
        raise RuntimeError("; ".join(failed))
    if "ratio" in row:
        ctx.record("lora_over_full", row["ratio"])
    if ctx.device.type != "cuda":
        return
    capacity = torch.cuda.get_device_properties(ctx.device).total_memory / 2**30
    for side in finetune.SIDES:
        figures = row[side]
        if "error" in figures:
            continue
        resident, peak, batch = figures["resident_gib"], figures["peak_gib"], figures["batch"]
        ctx.record(f"{side}_largest_batch_projected", projected_largest_batch(resident, peak, batch, capacity))
        ctx.record(f"{side}_largest_batch_24gib_projected", projected_largest_batch(resident, peak, batch, CARD_GIB))
    lora = row["lora"]
    if "error" not in lora and lora["batch"] >= GOAL_BATCH_24GIB:
        ctx.record("lora_fits_24gib_at_measured_batch", lora["peak_gib"] + CONTEXT_GIB <= CARD_GIB)
