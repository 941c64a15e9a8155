"""Check 7: sampling speed at 1024 px, and the user's commands end to end: the PixArtAlphaPipeline that
`pixart-lightning export-pipeline` writes draws on the device the image that `pixart-lightning sample` saves as a PNG
for the same prompt and seed."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pixart_lightning.cli import main as cli
from pixart_lightning.encoders.text import T5TextEncoder
from pixart_lightning.encoders.vae import VAE
from pixart_lightning.evaluation.generate import generate
from pixart_lightning.gpu_check.harness import Context
from pixart_lightning.gpu_check.training import activate_zero_layers
from pixart_lightning.interop import save_weights
from pixart_lightning.models import PixArt, PixArtConfig
from pixart_lightning.shapes.tiny_models import build_tiny_t5, build_tiny_vae

PROMPTS = ("a large red circle in the center on a white background",
           "a small blue square in the upper left on a yellow background",
           "a large green triangle in the lower right on a black background",
           "a large yellow circle on the left on a purple background")
SAME_IMAGE_LEVELS = 3
"""Largest per-pixel difference (of 255) still counted as the same image: the pipeline runs on the device, the CLI
on the CPU, and cuDNN convolutions default to TF32."""


def tiny_encoders(folder: Path) -> tuple[Path, Path]:
    """A plain tiny T5 (no position code: diffusers' pipeline runs the bare T5 encoder) and a tiny VAE (8x)."""
    return build_tiny_t5(folder / "t5", position_code=False), build_tiny_vae(folder / "vae")


def seconds_per_image(ctx: Context, t5: Path, vae_folder: Path) -> None:
    """DPM-Solver++ at the sampling resolution with guidance 4.5, bf16-mixed on a GPU (as training runs there), after
    one short warm-up run."""
    s = ctx.sizes
    device = ctx.device
    encoder = T5TextEncoder.from_pretrained(t5)
    vae = VAE.from_pretrained(vae_folder).to(device)
    cfg = PixArtConfig.from_name(s.sample_size, caption_channels=encoder.dim,
                                 sample_size=s.sample_resolution // vae.downsample_factor)
    model = activate_zero_layers(PixArt(cfg)).to(device)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(s.sample_batch)]

    def run(steps: int) -> float:
        start = time.perf_counter()
        generate(model, vae, prompts=prompts, encoder=encoder, height=s.sample_resolution, width=s.sample_resolution,
                 steps=steps, cfg_scale=4.5, seed=0, precision="bf16-mixed" if device.type == "cuda" else "32")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    ctx.record("warmup_s", run(2))
    total = ctx.record("total_s", run(s.sample_steps))
    ctx.record("seconds_per_image", total / s.sample_batch)
    ctx.record("setup", f"{s.sample_size} at {s.sample_resolution} px, {s.sample_steps} DPM-Solver++ steps, "
                        f"batch {s.sample_batch}, guidance 4.5; tiny VAE decoder (not the SD VAE's cost)")


def pipeline_matches_sample(ctx: Context, t5: Path, vae: Path, prediction: str) -> dict[str, float | bool]:
    """A small random model saved with its prediction type, exported with ``export-pipeline`` and sampled with
    ``sample`` (CPU) into a PNG; the exported pipeline samples the same prompt and seed on the device. Guidance 1:
    diffusers guides with T5("") where our sampler uses the model's null caption."""
    s = ctx.sizes
    folder = ctx.work / f"pipeline-{prediction}"
    side, steps = s.pipeline_resolution, s.sample_steps
    cfg = PixArtConfig.from_name("PixArt-debug/2", caption_channels=T5TextEncoder.from_pretrained(t5).dim,
                                 sample_size=side // 8)
    weights = save_weights(activate_zero_layers(PixArt(cfg), std=0.2), folder / "model.safetensors", prediction)
    for args in (["export-pipeline", str(weights), str(folder / "pipeline"), "--text-encoder", str(t5), "--vae", str(vae)],
                 ["sample", "--ckpt", str(weights), "--prompt", PROMPTS[0], "--text-encoder", str(t5), "--vae", str(vae),
                  "--height", str(side), "--width", str(side), "--num", "1", "--steps", str(steps), "--cfg", "1.0",
                  "--seed", "0", "--out", str(folder / "sample")]):
        if cli(args) != 0:
            raise RuntimeError(f"pixart-lightning {args[0]} failed (its error is printed above)")
    from diffusers import PixArtAlphaPipeline

    pipe = PixArtAlphaPipeline.from_pretrained(folder / "pipeline").to(ctx.device)
    theirs = pipe(PROMPTS[0], height=side, width=side, num_inference_steps=steps, guidance_scale=1.0,
                  use_resolution_binning=False, clean_caption=False, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images[0]
    ours = np.asarray(Image.open(folder / "sample" / "000-00.png").convert("RGB")).astype(np.int16)
    difference = np.abs(ours - np.round(theirs * 255).astype(np.int16))
    return {"max_difference": int(difference.max()), "mean_difference": float(difference.mean()),
            "same_image": int(difference.max()) <= SAME_IMAGE_LEVELS}


def check_sampling(ctx: Context) -> None:
    t5, vae = tiny_encoders(ctx.work)
    seconds_per_image(ctx, t5, vae)
    for prediction in ("epsilon", "v"):
        ctx.record(f"pipeline_vs_sample_{prediction}", pipeline_matches_sample(ctx, t5, vae, prediction))
