"""Check 4: FSDP2 on one device through the real runner (``train.strategy=fsdp``, Lightning's
ModelParallelStrategy), with activation checkpointing and compilation on: stage 2 on extracted features, an
interrupted run resumed from its checkpoint, peak memory with and without activation checkpointing, and the largest
batch at 512 px."""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist

from pixart_lightning.config import StageConfig, load_stage
from pixart_lightning.data.extract import ExtractSettings, extract
from pixart_lightning.gpu_check import PROJECT, benchmark
from pixart_lightning.gpu_check.harness import Context
from pixart_lightning.gpu_check.memory import largest_batch, peak_gib, start_peak_window
from pixart_lightning.gpu_check.training import Interrupted, StepLosses
from pixart_lightning.runner.chain import run
from pixart_lightning.shapes.synth import synthesize
from pixart_lightning.shapes.tiny_models import build_tiny_t5, build_tiny_vae

STEPS, CHECKPOINT_AT = 4, 2
"""The first run checkpoints after its second step and is interrupted once its third step (index 2) has a loss;
the resumed run must compute that loss again from the checkpoint."""


def feature_data(ctx: Context, folder: Path, cfg: StageConfig) -> dict[str, str]:
    """Shapes-world images turned into latents and caption features by the tiny VAE and T5 (random features of the
    real format): the paths the stage config needs."""
    s = ctx.sizes
    t5, vae = build_tiny_t5(folder / "t5"), build_tiny_vae(folder / "vae")
    synthesize(folder / "images", count=s.fsdp_images, seed=0, resolution=s.fsdp_resolution,
               samples_per_shard=max(1, s.fsdp_images // 2), progress=False)
    extract(str(folder / "images"), folder / "features", ExtractSettings(
        vae=str(vae), text_encoder=str(t5), resolution=s.fsdp_resolution, max_length=cfg.text_encoder.max_length,
        patch_size=cfg.pixart_config().patch_size),
        device=str(ctx.device), rank=0, world_size=1, progress=False)
    return {"data.shards": str(folder / "features"), "vae.name": str(vae), "text_encoder.name": str(t5)}


def runner_overrides(ctx: Context, folder: Path) -> list[str]:
    s = ctx.sizes
    cuda = ctx.device.type == "cuda"
    return [
        f"out_dir={folder / 'run'}", "train.strategy=fsdp", "train.devices=1", f"train.accelerator={'gpu' if cuda else 'cpu'}",
        f"train.precision={'bf16-mixed' if cuda else '32'}", "model.gradient_checkpointing=true",
        f"model.compile={str(s.compile).lower()}", f"train.max_steps={STEPS}", f"train.checkpoint_every={CHECKPOINT_AT}",
        f"data.resolution={s.fsdp_resolution}", f"data.batch_size={s.fsdp_batch}", "data.num_workers=1",
        "data.shuffle_buffer=16", "train.progress_bar=false", "eval.alignment_prompts=0",
        "samples.prompts=[a red circle]", "samples.cfg_scales=[1.0]", "samples.steps=2", "fid.reference=''",
        *([f"model.size={s.fsdp_model}"] if s.fsdp_model else []),
    ]


def stage2_folder(ctx: Context, folder: Path) -> Path:
    """A config folder holding only stage 2 (so it starts from fresh weights), on the sizes' base config."""
    config = folder / "config"
    config.mkdir(parents=True, exist_ok=True)
    (config / "base.yaml").write_text((PROJECT / ctx.sizes.fsdp_config / "base.yaml").read_text())
    (config / "stage2.yaml").write_text(f"train:\n  max_steps: {STEPS}\n")
    return config


def ensure_process_group(device: torch.device) -> None:
    """A one-process group for sharding outside the runner (the runner's Trainer leaves its own in place)."""
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def check_fsdp(ctx: Context) -> None:
    folder = ctx.work
    config = stage2_folder(ctx, folder)
    overrides = runner_overrides(ctx, folder)
    cfg = load_stage(config, 2, [*overrides, "data.shards=unused"])
    overrides += [f"{k}={v}" for k, v in feature_data(ctx, folder, cfg).items()]

    first = StepLosses(stop_at=CHECKPOINT_AT)
    start_peak_window(ctx.device)
    try:
        run(config, [2], overrides, callbacks=[first])
    except Interrupted:
        pass
    ctx.record("runner_peak_gib", peak_gib(ctx.device))
    ctx.record("losses_before_interruption", [first.losses[k] for k in sorted(first.losses)])
    resumed = StepLosses()
    run(config, [2], overrides, callbacks=[resumed])
    ctx.record("resumed_from_step", min(resumed.losses))
    before, after = first.losses[CHECKPOINT_AT], resumed.losses[CHECKPOINT_AT]
    ctx.record("resumed_loss_difference", abs(after - before))
    ctx.record("resume_identical", after == before)
    ensure_process_group(ctx.device)  # for the FSDP2 steps outside Lightning (benchmarks/strategy_memory.py)
    _memory_without_and_with_checkpointing(ctx)
    _largest_batch_512(ctx)


def _variant_args(ctx: Context, resolution: int) -> argparse.Namespace:
    s = ctx.sizes
    return argparse.Namespace(size=s.search_size, resolution=resolution, tokens=120, warmup=1, steps=1)


def _memory_without_and_with_checkpointing(ctx: Context) -> None:
    s = ctx.sizes
    memory = benchmark("strategy_memory")
    for checkpointing in (False, True):
        if ctx.time_left() <= 0:
            ctx.cut_short("peak memory not measured: no time left")
            return
        _, peak = memory.run_variant(_variant_args(ctx, s.fsdp_resolution), ctx.device, True, checkpointing,
                                     s.fsdp_batch)
        ctx.record(f"peak_gib_{'with' if checkpointing else 'without'}_activation_checkpointing",
                   peak if ctx.device.type == "cuda" else None)


def _largest_batch_512(ctx: Context) -> None:
    """Doubling search for the largest batch at 512 px under FSDP2 with activation checkpointing."""
    s = ctx.sizes
    memory = benchmark("strategy_memory")
    args = _variant_args(ctx, s.search_resolution)
    result = largest_batch(lambda b: memory.run_variant(args, ctx.device, True, True, b), s.search_start,
                           s.search_limit, ctx.time_left)
    ctx.record("largest_batch_512", result)
    if result["stopped_by"] == "time":
        ctx.cut_short("batch search stopped by the time budget")
