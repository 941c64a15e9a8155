"""Prompts (or class labels) to images with our backbone, sampler, text encoder and VAE."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from pixart_lightning.diffusion import sample
from pixart_lightning.diffusion.sampling import DEFAULT_CFG_SCALE, DEFAULT_SAMPLER
from pixart_lightning.encoders.text import LazyTextEncoder, PromptFeatures, T5TextEncoder
from pixart_lightning.encoders.vae import VAE, LazyVAE, PixelSpace
from pixart_lightning.models.pixart import PixArt

Encoder = T5TextEncoder | LazyTextEncoder | PromptFeatures
@contextmanager
def tf32_on_cuda(device: torch.device) -> Iterator[None]:
    """TF32 for the fp32 matmuls and convolutions on CUDA while generating; the previous settings after."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def under_autocast(model: PixArt, dtype: torch.dtype | None, device: torch.device) -> Callable[..., Tensor]:
    """The backbone as training runs it: under ``dtype`` autocast (none: as it is), its output in fp32 so that the
    guidance and the solver's arithmetic stay in fp32."""
    if dtype is None:
        return model

    def forward(*args, **kwargs) -> Tensor:
        with torch.autocast(device.type, dtype=dtype):
            return model(*args, **kwargs).float()

    return forward


def decode(vae: VAE | LazyVAE | PixelSpace, latents: Tensor, batch: int = 0, bf16: bool = False) -> Tensor:
    """uint8 images (B, 3, H, W) on the CPU, decoded ``batch`` latents at a time (0: all at once).

    ``bf16``: the decoder under bf16 autocast (fine for the SD and SDXL VAEs; fp16 is not offered, it overflows
    in SDXL's decoder).
    """
    if batch < 0:
        raise ValueError(f"decode_batch={batch}: must be 0 (the whole batch) or positive")
    images = []
    for part in latents.split(batch or len(latents)):
        with torch.autocast(vae.device.type, dtype=torch.bfloat16, enabled=bf16):
            decoded = vae.decode(part)
        images.append(((decoded.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu())
    return torch.cat(images)


def condition(
    model: PixArt, prompts: Sequence[str] | None, labels: Sequence[int] | None, encoder: Encoder | None,
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
    vae: VAE | LazyVAE | PixelSpace,
    *,
    prompts: Sequence[str] | None = None,
    labels: Sequence[int] | None = None,
    encoder: Encoder | None = None,
    height: int = 256,
    width: int = 256,
    sampler: str = DEFAULT_SAMPLER,
    steps: int | None = None,
    cfg_scale: float = DEFAULT_CFG_SCALE,
    seed: int = 0,
    progress: bool = False,
    prediction: str = "epsilon",
    precision: str = "32",
    decode_batch: int = 0,
) -> Tensor:
    """Sample images (B, 3, H, W) as uint8; one per prompt or label.

    ``precision`` (a Lightning precision, e.g. the trainer's) is the one training runs under, so that an EMA model
    generates alike whether it is sharded (FSDP computes in bf16 under ``bf16-mixed``) or not: the backbone under
    bf16 autocast and the VAE decoder under bf16 autocast for ``bf16-mixed`` (fp32 otherwise: fp16 is refused, see
    ``config.FP16_REFUSED``), and fp32 matmuls as TF32 on CUDA. ``decode_batch`` bounds the images decoded at once
    (0: all).
    """
    factor = vae.downsample_factor
    if height % (factor * model.cfg.patch_size) or width % (factor * model.cfg.patch_size):
        raise ValueError(f"height and width must be multiples of {factor * model.cfg.patch_size} (VAE factor x patch)")
    kwargs = condition(model, prompts, labels, encoder, height, width)
    device = next(model.parameters()).device
    kwargs = {k: v.to(device) for k, v in kwargs.items()}
    batch = kwargs["y"].shape[0]
    shape = (batch, model.cfg.in_channels, height // factor, width // factor)
    generator = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if str(precision) == "bf16-mixed" else None
    with tf32_on_cuda(device):
        latents = sample(under_autocast(model.eval(), dtype, device), shape, kwargs, sampler=sampler, steps=steps,
                         cfg_scale=cfg_scale, generator=generator, device=device, progress=progress,
                         learn_sigma=model.cfg.learn_sigma, prediction=prediction)
        return decode(vae, latents, decode_batch, bf16=dtype == torch.bfloat16)


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
