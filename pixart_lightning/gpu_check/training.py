"""Checks 2, 3 and 5: the training step at 256 px (ours vs diffusers, like with like), at 512 px in a multi-scale
bucket with micro-conditions, and bf16 numerics. They run ``benchmarks/train_step.py``'s measurement."""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
import torch
from torch import nn

from pixart_lightning.gpu_check import benchmark
from pixart_lightning.gpu_check.harness import Context

GOAL_MFU_256, GOAL_SPEEDUP_256, GOAL_MFU_512 = 0.40, 1.3, 0.45


def variant_names(ctx: Context) -> list[str]:
    names = list(benchmark("train_step").VARIANTS)
    return names if ctx.sizes.compile else [n for n in names if not n.startswith("compiled")]


def flat_row(row: dict[str, Any], matmul_tflops: float | None) -> dict[str, Any]:
    """A pair's figures as one flat row (``ours_mfu``, ``diffusers_step_ms``, ...), with MFU against the measured
    matmul peak (``*_mfu_practical``) beside the datasheet's."""
    flat = {k: v for k, v in row.items() if not isinstance(v, dict)}
    for side in ("ours", "diffusers"):
        for key, value in row.get(side, {}).items():
            flat[f"{side}_{key}"] = value
        if side in row and matmul_tflops:
            flat[f"{side}_mfu_practical"] = row[side]["tflops"] / matmul_tflops
    return flat


def measure_variants(ctx: Context, setup, names: list[str], key: str) -> list[dict[str, Any]]:
    """Measure each variant in turn into ``ctx.figures[key]``; stop when less time is left than the last one took."""
    train_step = benchmark("train_step")
    rows = ctx.figures.setdefault(key, [])
    last = 0.0
    for name in names:
        if ctx.time_left() < last:
            ctx.cut_short(f"{name} and later variants not run: {ctx.time_left():.0f} s left, the last took {last:.0f} s")
            break
        start = time.monotonic()
        row = train_step.measure_or_oom(setup, train_step.VARIANTS[name])
        last = time.monotonic() - start
        rows.append(flat_row(row, ctx.shared.get("matmul_tflops")))
        print(train_step.format_rows([row]), flush=True)
    return rows


def best(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [row[key] for row in rows if row.get(key) is not None]
    return max(values) if values else None


def check_train_256(ctx: Context) -> None:
    """Stage 2's step at 256 px in bf16, ours and diffusers' in one run, pair by pair: eager, compiled, and each with
    activation checkpointing on both sides."""
    s = ctx.sizes
    setup = benchmark("train_step").Setup(
        config=s.config, stage=2, device=str(ctx.device), batch=s.batch_256, resolution=s.resolution_256,
        caption_channels=s.caption_channels, steps=s.steps, warmup=s.warmup)
    rows = measure_variants(ctx, setup, variant_names(ctx), "pairs")
    best_mfu = ctx.record("best_ours_mfu", best(rows, "ours_mfu"))
    if best_mfu is not None:
        ctx.record("mfu_goal_met", best_mfu >= GOAL_MFU_256)
    speedups = [row["speedup"] for row in rows if "speedup" in row]
    if speedups:
        ctx.record("speedup_min", min(speedups))
        ctx.record("speedup_max", max(speedups))
        ctx.record("speedup_goal_met", min(speedups) >= GOAL_SPEEDUP_256)


def check_train_512(ctx: Context) -> None:
    """Stage 3's step at 512 px: the bucket nearest 3:4, micro-conditions on; ours alone, compiled where it can be."""
    s = ctx.sizes
    setup = benchmark("train_step").Setup(
        config=s.config, stage=3, device=str(ctx.device), batch=s.batch_512, resolution=s.resolution_512,
        aspect_ratio=0.75, caption_channels=s.caption_channels, steps=s.steps, warmup=s.warmup, reference=False,
        overrides=("data.multi_scale=true",))
    rows = measure_variants(ctx, setup, ["compiled" if s.compile else "eager"], "runs")
    best_mfu = ctx.record("best_ours_mfu", best(rows, "ours_mfu"))
    if best_mfu is not None:
        ctx.record("mfu_goal_met", best_mfu >= GOAL_MFU_512)


def activate_zero_layers(model: nn.Module, std: float = 0.02, seed: int = 0) -> nn.Module:
    """Draw every all-zero parameter from N(0, std²). A fresh PixArt zero-initialises its output, gates and
    cross-attention projections, so it predicts zeros and every precision gives the same loss; a trained model
    does not."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


def same_batch_losses(module, batch: dict[str, Any], device: torch.device) -> dict[str, float]:
    """The module's loss on one batch with the same timesteps and noise, in fp32 and under bf16 autocast."""
    module.to(device)
    batch = module.transfer_batch_to_device(module.on_before_batch_transfer(dict(batch), 0), device, 0)
    x0 = module.latents(batch)
    kwargs = module.conditioning(batch)
    gen = torch.Generator(device).manual_seed(0)
    t = torch.randint(0, module.diffusion.num_timesteps, (x0.shape[0],), device=device, generator=gen)
    noise = torch.randn(x0.shape, device=device, generator=gen)
    losses = {}
    with torch.no_grad():
        for name, bf16 in (("fp32", False), ("bf16", True)):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                losses[name] = float(module.diffusion.training_losses(module.model, x0, t, kwargs, noise)["loss"].mean())
    return losses


class Interrupted(Exception):
    """Raised by :class:`StepLosses` to stop a run the way a crash would."""


class StepLosses(L.Callback):
    """Each optimizer step's loss by step, read on the host (a check may pay that sync); optionally stops the run
    by raising :class:`Interrupted` once step ``stop_at`` has its loss."""

    def __init__(self, stop_at: int | None = None):
        self.losses: dict[int, float] = {}
        self.stop_at = stop_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step - 1  # the optimizer step this batch made
        self.losses[step] = float(outputs["loss"])
        if step == self.stop_at:
            raise Interrupted(f"interrupted after step {step}")


def check_numerics(ctx: Context) -> None:
    """bf16-mixed against fp32 on the same batch, then steps in bf16-mixed: every loss finite, no step skipped."""
    s = ctx.sizes
    train_step = benchmark("train_step")
    setup = train_step.Setup(
        config=s.config, stage=2, device=str(ctx.device), batch=s.numerics_batch, resolution=s.resolution_256,
        caption_channels=s.caption_channels, steps=s.numerics_steps - 1, warmup=0, precision="bf16-mixed",
        reference=False)
    built = train_step.prepare(setup, train_step.VARIANTS["eager"], ctx.work)
    activate_zero_layers(built.module.model)
    losses = same_batch_losses(built.module, built.batches[0], ctx.device)
    ctx.record("loss_fp32", losses["fp32"])
    ctx.record("loss_bf16", losses["bf16"])
    ctx.record("relative_difference", abs(losses["bf16"] - losses["fp32"]) / abs(losses["fp32"]))
    recorder = StepLosses()
    train_step.fit(built, ctx.device, [recorder], ctx.work / "run")
    losses = list(recorder.losses.values())
    ctx.record("steps", len(losses))
    ctx.record("non_finite_losses", sum(not math.isfinite(v) for v in losses))
    ctx.record("skipped_steps", built.module.nonfinite.steps["total"])
    ctx.record("first_loss", losses[0])
    ctx.record("last_loss", losses[-1])
