"""Gaussian diffusion (IDDPM recipe as used by PixArt-α): schedules, losses and samplers."""

from pixart_lightning.diffusion.gaussian_diffusion import GaussianDiffusion, create_diffusion
from pixart_lightning.diffusion.losses import (
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
)
from pixart_lightning.diffusion.sampling import sample

__all__ = [
    "GaussianDiffusion",
    "approx_standard_normal_cdf",
    "create_diffusion",
    "discretized_gaussian_log_likelihood",
    "mean_flat",
    "normal_kl",
    "sample",
]
