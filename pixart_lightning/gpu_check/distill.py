"""Check 11: stage 4 on the device. (a) Seconds per image of an XL/2 model at 512 px sampled as a consistency student
(``lcm``, 4 steps, unguided) and as its teacher (``dpm++``, 20 steps, guided: the doubled batch), timed as the
stage's own few-step comparison times them (``evaluation/few_step.py``); random weights, since time does not depend
on them. (b) A few steps of the real stage-4 module (``ConsistencyDistillation``) at 512 px in bf16-mixed with
activation checkpointing, full and then LoRA: step time, images/s, peak memory, and how the resident state splits
into student, teacher, target network and gradients + AdamW state.

Stage 4 distils a trained model, so its module starts from ``model.init_from``: a random XL/2 of the stage's own
shape is written first and both variants start from it, as a user's run starts from stage 3's weights."""

from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pixart_lightning.config import StageConfig
from pixart_lightning.diffusion.sampling import DEFAULT_CFG_SCALE, DEFAULT_STEPS
from pixart_lightning.encoders.text import T5TextEncoder
from pixart_lightning.encoders.vae import VAE
from pixart_lightning.evaluation.few_step import (
    STUDENT_SAMPLER,
    TEACHER_SAMPLER,
    TEACHER_STEPS,
    Contender,
    seconds_per_image,
)
from pixart_lightning.gpu_check import benchmark
from pixart_lightning.gpu_check.finetune import projected_largest_batch
from pixart_lightning.gpu_check.harness import Context
from pixart_lightning.gpu_check.memory import is_out_of_memory, peak_gib, release_memory, start_peak_window
from pixart_lightning.gpu_check.sampling import PROMPTS, tiny_encoders
from pixart_lightning.interop import save_weights
from pixart_lightning.models import PixArt, PixArtConfig

STAGE = 4
STUDENT_STEPS = DEFAULT_STEPS[STUDENT_SAMPLER]
VARIANT = "eager+ckpt"
"""Activation checkpointing, as PixArt-LCM trains (``configs/pixart-xl2/stage4.yaml``); eager, so that no compilation
eats the budget (the teacher copy's blocks would compile too)."""
STAGE4_LORA = ("model.lora.rank=32", "model.lora.alpha=32", "model.lora.targets=attention+mlp")
"""The LoRA variant ``configs/pixart-xl2/stage4.yaml`` names (PixArt-LCM's rank 32), over check 10's base dtype."""


def check_distill(ctx: Context) -> None:
    sampling_speed(ctx)
    training_steps(ctx)


def sampling_speed(ctx: Context) -> None:
    """The student's and the teacher's seconds per image on one model and one batch of prompts, each the fastest of
    the comparison's repeats (the first warms up), with the tiny VAE decoding (not the SD VAE's cost)."""
    s = ctx.sizes
    t5, vae_folder = tiny_encoders(ctx.work)
    encoder = T5TextEncoder.from_pretrained(t5)
    vae = VAE.from_pretrained(vae_folder).to(ctx.device)
    cfg = PixArtConfig.from_name(s.sample_size, caption_channels=encoder.dim,
                                 sample_size=s.distill_resolution // vae.downsample_factor)
    with ctx.device:
        model = PixArt(cfg)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(s.distill_sample_batch)]
    generation = {"height": s.distill_resolution, "width": s.distill_resolution,
                  "precision": "bf16-mixed" if ctx.device.type == "cuda" else "32"}
    seconds = {}
    for contender in (Contender("student", model, STUDENT_SAMPLER, STUDENT_STEPS, 1.0),
                      Contender("teacher", model, TEACHER_SAMPLER, TEACHER_STEPS, DEFAULT_CFG_SCALE)):
        seconds[contender.role] = ctx.record(f"{contender.role}_seconds_per_image",
                                             seconds_per_image(contender, vae, encoder, prompts, **generation))
    ctx.record("teacher_over_student", seconds["teacher"] / seconds["student"])
    ctx.record("sampling_setup", f"{s.sample_size} at {s.distill_resolution} px, batch {s.distill_sample_batch}: "
                                 f"{STUDENT_SAMPLER} {STUDENT_STEPS} steps unguided vs {TEACHER_SAMPLER} {TEACHER_STEPS} "
                                 f"steps guided {DEFAULT_CFG_SCALE}; {generation['precision']}; tiny VAE decoder")


def training_steps(ctx: Context) -> None:
    """Full distillation, then LoRA when the time left exceeds what the full variant took."""
    s = ctx.sizes
    train_step = benchmark("train_step")
    setup = train_step.Setup(config=s.config, stage=STAGE, device=str(ctx.device), batch=s.distill_batch,
                             resolution=s.distill_resolution, caption_channels=s.caption_channels,
                             steps=s.distill_steps, warmup=s.warmup, reference=False)
    variant = train_step.VARIANTS[VARIANT]
    start = time.monotonic()
    teacher = save_weights(starting_model(train_step.stage_config(setup, variant), s.caption_channels, ctx.device),
                           ctx.work / "teacher.safetensors")
    setup = replace(setup, overrides=(f"model.init_from={teacher}",))
    lora = (*benchmark("finetune").lora_overrides(setup, variant), *STAGE4_LORA)
    for name, overrides in (("full", ()), ("lora", lora)):
        if name == "lora" and ctx.time_left() < time.monotonic() - start:
            ctx.cut_short(f"LoRA variant not run: {ctx.time_left():.0f} s left, the full one took "
                          f"{time.monotonic() - start:.0f} s")
            return
        start = time.monotonic()
        ctx.record(name, distill_or_oom(replace(setup, overrides=setup.overrides + overrides), variant, ctx.work / name))


def starting_model(cfg: StageConfig, caption_channels: int, device: torch.device) -> PixArt:
    """A random model of the shape the stage trains (what ``ConsistencyDistillation.initial_model`` accepts),
    built on the device (an XL model initialises there in a fraction of the CPU's time)."""
    with device:
        return PixArt(cfg.pixart_config(caption_channels=caption_channels))


def distill_or_oom(setup, variant, folder: Path) -> dict[str, Any]:
    """:func:`distill_steps`, with running out of memory reported as the variant's ``error``."""
    try:
        return distill_steps(setup, variant, folder)
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        return {"batch": setup.batch, "error": f"out of memory: {str(error).splitlines()[0][:200]}"}
    finally:
        release_memory()


def distill_steps(setup, variant, folder: Path) -> dict[str, Any]:
    """Train the stage-4 module for ``setup.warmup + setup.steps`` steps (``benchmarks/train_step.py``'s batches and
    Trainer); the median step after warm-up, the resident state part by part (its total does not grow with the
    batch), on a GPU the run's peak, the most a step adds to what was allocated when it began, and the largest
    batch the device would fit (projected from the resident total and the peak, as check 10 projects it)."""
    train_step = benchmark("train_step")
    device = setup.torch_device
    bench = train_step.prepare(setup, variant, folder)
    timer = train_step.Alternate(None, bench.batches, setup.warmup)
    start_peak_window(device)
    trainer = train_step.fit(bench, device, [timer], folder / "run")
    module, batch = bench.module, bench.cfg.data.batch_size
    step = statistics.median(timer.times["ours"])
    resident = resident_gib({"student": module.model, "teacher": module.teacher.copy, "target": module.averaged})
    resident["grads_adamw"] = benchmark("finetune").state_bytes(module.model, trainer.optimizers[0]) / 2**30
    step_peaks = [p for p in timer.peaks["ours"] if p is not None]
    figures: dict[str, Any] = {
        "batch": batch, "height": bench.height, "width": bench.width, "precision": bench.cfg.train.precision,
        "params": sum(p.numel() for p in module.model.parameters()),
        "trainable_params": sum(p.numel() for p in module.model.parameters() if p.requires_grad),
        "steps": len(timer.times["ours"]), "step_ms": step * 1e3, "images_per_s": batch / step,
        "resident_gib": resident, "resident_total_gib": sum(resident.values()),
        "step_peak_gib": max(step_peaks) if step_peaks else None, "peak_gib": peak_gib(device),
    }
    if device.type == "cuda":
        capacity = torch.cuda.get_device_properties(device).total_memory / 2**30
        figures["device_gib"] = capacity
        figures["largest_batch_projected"] = projected_largest_batch(figures["resident_total_gib"],
                                                                     figures["peak_gib"], batch, capacity)
    return figures


def resident_gib(parts: dict[str, nn.Module | None]) -> dict[str, float]:
    """GiB of each part's parameters and buffers not already counted for an earlier part: a copy counts whole, what
    is shared counts once, under the first part (the LoRA teacher is the student with its adapters off: 0)."""
    seen: set[int] = set()
    sizes = {}
    for name, module in parts.items():
        total = 0
        tensors = itertools.chain(module.parameters(), module.buffers()) if module is not None else ()
        for tensor in tensors:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        sizes[name] = total / 2**30
    return sizes
