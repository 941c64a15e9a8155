"""PixArt-α's noise schedule, the one set of numbers every sampler uses: 1000 linear βs from 1e-4 to 0.02.

:class:`~pixart_lightning.diffusion.gaussian_diffusion.GaussianDiffusion` (training and the ancestral sampler) builds
its tables from :func:`linear_betas`; diffusers' schedulers (the DPM-Solver++ sampler, exported pipelines) get the
same βs through :func:`diffusers_schedule`, so the two cannot drift apart.
"""

from __future__ import annotations

from typing import Any

import numpy as np

NUM_TIMESTEPS = 1000
BETA_START = 1e-4
BETA_END = 0.02

DIFFUSERS_PREDICTION_TYPES = {"epsilon": "epsilon", "v": "v_prediction"}
"""What the mean channels predict (``diffusion.prediction``) -> the ``prediction_type`` of diffusers' schedulers."""


def linear_betas(num_timesteps: int = NUM_TIMESTEPS) -> np.ndarray:
    """Linearly spaced float64 noise schedule from :data:`BETA_START` to :data:`BETA_END`."""
    return np.linspace(BETA_START, BETA_END, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """Pick `steps` evenly spaced timesteps from 0..num_timesteps-1, both ends included."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"cannot pick {steps} steps out of {num_timesteps}")
    return sorted({int(i) for i in np.round(np.linspace(0, num_timesteps - 1, steps))})


def diffusers_schedule(prediction: str) -> dict[str, Any]:
    """This schedule, and what the model predicts, as keyword arguments of a diffusers scheduler."""
    return {
        "num_train_timesteps": NUM_TIMESTEPS,
        "beta_start": BETA_START,
        "beta_end": BETA_END,
        "beta_schedule": "linear",
        "prediction_type": DIFFUSERS_PREDICTION_TYPES[prediction],
    }
