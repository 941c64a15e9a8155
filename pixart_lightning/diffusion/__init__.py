"""Gaussian diffusion (IDDPM recipe as used by PixArt-α): schedule, losses and samplers.

``PREDICTIONS`` (what the model's mean channels predict) and ``SAMPLERS`` are the choices configs are checked
against; import them from here.
"""

from pixart_lightning.diffusion.gaussian_diffusion import PREDICTIONS, GaussianDiffusion, create_diffusion
from pixart_lightning.diffusion.losses import (
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
)
from pixart_lightning.diffusion.sampling import SAMPLERS, sample

__all__ = [
    "PREDICTIONS",
    "SAMPLERS",
    "GaussianDiffusion",
    "approx_standard_normal_cdf",
    "create_diffusion",
    "discretized_gaussian_log_likelihood",
    "mean_flat",
    "normal_kl",
    "sample",
]
