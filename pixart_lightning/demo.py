"""The model-core chain on tiny offline models: DiT -> re-parameterised PixArt -> diffusers pipeline.

Until the training stages land, this is what ``make demo`` runs. Every step is the real code path
(the same functions the stages and the CLI call); the weights are untrained, so the pictures show
structure, not content.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .generate import generate, save_grid
from .interop import export_diffusers, load_model, save_weights
from .interop.pipeline import export_pipeline
from .models import PixArt, PixArtConfig, class_to_text
from .text_encoder import T5TextEncoder
from .tiny_models import build_tiny_models
from .vae import VAE

PROMPTS = ["a large red circle in the center on a white background", "a small blue square in the upper left on a yellow background"]


def run_demo(out: Path, resolution: int = 64) -> dict[str, Path]:
    """Run every model-core step once and return the files it wrote."""
    torch.manual_seed(0)
    written: dict[str, Path] = {}
    step = _Steps()
    paths = step("build the tiny T5 (offline tokenizer) and VAE", build_tiny_models, out / "models")
    encoder, vae = T5TextEncoder.from_pretrained(paths["t5"]), VAE.from_pretrained(paths["vae"])
    latent = resolution // vae.downsample_factor

    # Stage-1 shape: a class-conditional DiT (as if initialised from a DiT checkpoint).
    dit = PixArt(PixArtConfig.from_name("PixArt-tiny/2", mode="class", num_classes=27, sample_size=latent))
    for block in [*dit.blocks, dit.final_layer]:  # give adaLN-Zero something to hand over
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.02)
    torch.nn.init.normal_(dit.final_layer.linear.weight, std=0.02)
    written["stage1"] = step("save the class-mode model", save_weights, dit, out / "stage1.safetensors")
    written["stage1_dit_diffusers"] = step("export it as a diffusers DiT folder", export_diffusers, dit, out / "dit-diffusers")

    # Stage 1 -> 2 handoff.
    text = step("re-parameterise to adaLN-single + cross-attention", class_to_text, load_model(written["stage1"]), caption_channels=encoder.dim)
    x, t = torch.randn(2, 4, latent, latent), torch.full((2,), 500)
    features, mask = encoder.encode(PROMPTS, trim=True)
    with torch.no_grad():
        gap = (text.eval()(x, t, features, mask) - dit.eval()(x, t)).abs().max().item()
    print(f"    text model vs class model at t=500, any caption: max |diff| = {gap:.2e}")
    written["stage2_init"] = step("save the text-mode model", save_weights, text, out / "stage2-init.safetensors")

    for sampler in ("dpm++", "ancestral"):
        images = step(f"sample with {sampler} (class mode)", generate, dit, vae, labels=[0, 5, 13, 26], height=resolution, width=resolution, sampler=sampler)
        written[f"class_{sampler}"] = save_grid(images, out / f"samples-class-{sampler}.png", scale=4)
        images = step(f"sample with {sampler} (text mode, cfg 4.5)", generate, text, vae, prompts=PROMPTS, encoder=encoder, height=resolution, width=resolution, sampler=sampler)
        written[f"text_{sampler}"] = save_grid(images, out / f"samples-text-{sampler}.png", scale=4)

    written["pipeline"] = step("export a PixArtAlphaPipeline", export_pipeline, text, out / "pipeline", paths["t5"], paths["vae"])
    from diffusers import PixArtAlphaPipeline

    pipe = step("load it with PixArtAlphaPipeline.from_pretrained", PixArtAlphaPipeline.from_pretrained, written["pipeline"])
    pipe.set_progress_bar_config(disable=True)
    result = step("generate through diffusers", pipe, PROMPTS[0], height=resolution, width=resolution, num_inference_steps=20,
                  use_resolution_binning=False, clean_caption=False, generator=torch.Generator().manual_seed(0))
    written["pipeline_sample"] = out / "samples-diffusers-pipeline.png"
    result.images[0].resize((resolution * 4, resolution * 4)).save(written["pipeline_sample"])
    print("\nwrote:")
    for name, path in written.items():
        print(f"  {name:22s} {path}")
    return written


class _Steps:
    """Numbered, timed progress lines for the demo."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, title: str, fn, *args, **kwargs):
        self.count += 1
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        print(f"[{self.count:2d}] {title} ({time.perf_counter() - start:.1f} s)", flush=True)
        return result
