"""Prompts (or class labels) to images with our backbone, sampler, text encoder and VAE."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from .diffusion import sample
from .models.pixart import PixArt
from .text_encoder import T5TextEncoder
from .vae import VAE, PixelSpace


def condition(
    model: PixArt, prompts: Sequence[str] | None, labels: Sequence[int] | None, encoder: T5TextEncoder | None,
    height: int, width: int,
) -> dict[str, Tensor]:
    """The model's keyword inputs for a batch: class labels, or caption features, mask and micro-conditions."""
    if model.cfg.mode == "class":
        if labels is None:
            raise ValueError("a class-mode model needs class labels")
        return {"y": torch.tensor(list(labels), dtype=torch.long)}
    if prompts is None or encoder is None:
        raise ValueError("a text-mode model needs prompts and a text encoder")
    features, mask = encoder.encode(list(prompts), trim=True)
    kwargs = {"y": features.float(), "mask": mask}
    if model.cfg.micro_conditions:
        batch = len(prompts)
        kwargs["resolution"] = torch.tensor([[float(height), float(width)]]).expand(batch, 2)
        kwargs["aspect_ratio"] = torch.full((batch, 1), height / width)
    return kwargs


@torch.no_grad()
def generate(
    model: PixArt,
    vae: VAE | PixelSpace,
    *,
    prompts: Sequence[str] | None = None,
    labels: Sequence[int] | None = None,
    encoder: T5TextEncoder | None = None,
    height: int = 256,
    width: int = 256,
    sampler: str = "dpm++",
    steps: int | None = None,
    cfg_scale: float = 4.5,
    seed: int = 0,
    progress: bool = False,
    prediction: str = "epsilon",
) -> Tensor:
    """Sample images (B, 3, H, W) as uint8; one per prompt or label."""
    factor = vae.downsample_factor
    if height % (factor * model.cfg.patch_size) or width % (factor * model.cfg.patch_size):
        raise ValueError(f"height and width must be multiples of {factor * model.cfg.patch_size} (VAE factor x patch)")
    kwargs = condition(model, prompts, labels, encoder, height, width)
    device = next(model.parameters()).device
    kwargs = {k: v.to(device) for k, v in kwargs.items()}
    batch = kwargs["y"].shape[0]
    shape = (batch, model.cfg.in_channels, height // factor, width // factor)
    generator = torch.Generator().manual_seed(seed)
    latents = sample(model.eval(), shape, kwargs, sampler=sampler, steps=steps, cfg_scale=cfg_scale,
                     generator=generator, device=device, progress=progress, learn_sigma=model.cfg.learn_sigma,
                     prediction=prediction)
    images = vae.decode(latents.to(vae.device, vae.dtype))
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def save_grid(images: Tensor, path: str | Path, columns: int | None = None, scale: int = 1) -> Path:
    """Tile (B, 3, H, W) uint8 images into one PNG, optionally enlarged for small demo images."""
    batch, _, h, w = images.shape
    columns = columns or min(batch, 8)
    rows = -(-batch // columns)
    grid = torch.zeros(3, rows * h, columns * w, dtype=torch.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[:, r * h : (r + 1) * h, c * w : (c + 1) * w] = image
    picture = Image.fromarray(grid.permute(1, 2, 0).numpy())
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return path
