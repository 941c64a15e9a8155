"""Frozen ``AutoencoderKL`` mapping images in [-1, 1] to scaled latents and back."""

from __future__ import annotations

import os

import torch
from diffusers import AutoencoderKL
from diffusers.utils import is_accelerate_available
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor, nn

from pixart_lightning.encoders.lazy import Lazy
from pixart_lightning.hub import load_pretrained, pipeline_subfolder

DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"
PIXEL_SPACE = "pixel"
"""The VAE name that means no VAE: the model denoises pixels (the embedded default)."""
SD_VAE_DOWNSAMPLE = 8
"""The Stable Diffusion VAE's downsampling factor (pixels per latent along a side), for when no VAE is loaded."""
SD_VAE_SCALE = 0.18215
"""The Stable Diffusion VAE's latent scale: latents times it have about unit variance (``vae.scale_factor``)."""


class VAE(nn.Module):
    """Frozen KL autoencoder; latents are multiplied by ``scale_factor`` to get roughly unit variance."""

    def __init__(self, model: AutoencoderKL, scale_factor: float = SD_VAE_SCALE):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.scale_factor = scale_factor

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike = DEFAULT_VAE,
        scale_factor: float = SD_VAE_SCALE,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        subfolder: str | None = None,
    ) -> VAE:
        """Load from a Hub id or folder; a local pipeline folder's ``vae/`` is found. ``dtype=None`` means float32."""
        # Without accelerate, diffusers warns on every load unless low_cpu_mem_usage is off.
        kwargs = {
            "subfolder": subfolder or pipeline_subfolder(name_or_path, "vae"),
            "low_cpu_mem_usage": is_accelerate_available(),
        }
        if dtype is not None:
            kwargs["dtype"] = dtype
        model = load_pretrained(AutoencoderKL.from_pretrained, name_or_path, "VAE", **kwargs)
        return cls(model.to(device), scale_factor)

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel along each side (8 for the SD VAE)."""
        return 2 ** (len(self.model.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        """Channels of the latent (4 for the SD VAE)."""
        return self.model.config.latent_channels

    @property
    def device(self) -> torch.device:
        """Device of the autoencoder weights."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the autoencoder weights."""
        return next(self.model.parameters()).dtype

    def train(self, mode: bool = True) -> VAE:
        """Stay in eval mode whatever a parent module asks."""
        return super().train(False)

    @torch.no_grad()
    def encode_posterior(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Unscaled posterior mean and std (B, C, H/f, W/f) of images (B, 3, H, W) in [-1, 1]."""
        posterior = self.model.encode(images.to(self.device, self.dtype)).latent_dist
        return posterior.mean, posterior.std

    def latents_from_posterior(self, mean: Tensor, std: Tensor, noise: Tensor | None = None) -> Tensor:
        """Scaled latents from posterior moments: the mean, or the draw mean + std * noise."""
        if noise is not None:
            mean = mean + std * noise.to(mean.dtype)
        return mean * self.scale_factor

    def encode(self, images: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Scaled latents of images in [-1, 1]: the posterior mean, or a draw if ``sample``."""
        mean, std = self.encode_posterior(images)
        noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype) if sample else None
        return self.latents_from_posterior(mean, std, noise)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] from scaled latents."""
        images = self.model.decode(latents.to(self.device, self.dtype) / self.scale_factor).sample
        return images.clamp(-1.0, 1.0)


class PixelSpace(nn.Module):
    """The identity autoencoder: diffusion runs on the pixels themselves (the offline demo's choice).

    A randomly initialised VAE cannot encode or decode anything meaningful and the real SD VAE
    cannot be downloaded offline, so the embedded demo trains on small images directly. Same
    interface as :class:`VAE`, with ``downsample_factor`` 1 and 3 latent channels.
    """

    downsample_factor = 1
    latent_channels = 3

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)  # carries device and dtype

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    @property
    def dtype(self) -> torch.dtype:
        return self._anchor.dtype

    def encode_posterior(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """A point mass at the image: mean = the image, std = 0."""
        return images, torch.zeros_like(images)

    def latents_from_posterior(self, mean: Tensor, std: Tensor, noise: Tensor | None = None) -> Tensor:
        return mean

    def encode(self, images: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Images in [-1, 1] are already the latents."""
        return images

    def decode(self, latents: Tensor) -> Tensor:
        return latents.clamp(-1.0, 1.0)


class LazyVAE(Lazy[VAE]):
    """A :class:`VAE` loaded at its first encode or decode, its geometry read from the config file alone.

    Training on precomputed latents never encodes (scaling a posterior draw needs the scale factor only), so only a
    process that decodes (samples, FID, alignment) or trains on images ever holds the weights.
    """

    def __init__(self, name_or_path: str | os.PathLike = DEFAULT_VAE, scale_factor: float = SD_VAE_SCALE,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.name_or_path = str(name_or_path)
        self.scale_factor = scale_factor
        self.dtype = dtype or torch.float32
        subfolder = pipeline_subfolder(name_or_path, "vae") or ""
        config = load_pretrained(AutoencoderKL.load_config, self.name_or_path, "VAE config", subfolder=subfolder)
        self.downsample_factor = 2 ** (len(config["block_out_channels"]) - 1)
        self.latent_channels = config["latent_channels"]

    def _build(self) -> VAE:
        return VAE.from_pretrained(self.name_or_path, self.scale_factor, self.dtype, self.device)

    latents_from_posterior = VAE.latents_from_posterior  # reads only ``scale_factor``: no weights needed

    def encode_posterior(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.load().encode_posterior(images)

    def decode(self, latents: Tensor) -> Tensor:
        return self.load().decode(latents)
