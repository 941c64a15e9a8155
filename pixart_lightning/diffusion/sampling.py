"""Text/class-conditional sampling with classifier-free guidance (DPM-Solver++ or ancestral)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers import DPMSolverMultistepScheduler
from torch import Tensor, nn
from tqdm.auto import tqdm

from pixart_lightning.diffusion.gaussian_diffusion import (
    ModelOutputFn,
    Prediction,
    check_prediction,
    create_diffusion,
    randn,
)
from pixart_lightning.diffusion.schedule import diffusers_schedule

SAMPLERS = ("dpm++", "ancestral")
DEFAULT_STEPS = {"dpm++": 20, "ancestral": 100}
"""Steps each sampler takes when the caller names none."""


def guided_model_fn(
    model: Callable[..., Tensor], model_kwargs: dict[str, Any] | None, cfg_scale: float
) -> ModelOutputFn:
    """Wrap `model` as fn(x, t) applying classifier-free guidance through `force_drop_ids`."""
    model_kwargs = model_kwargs or {}

    if cfg_scale == 1.0:
        return lambda x, t: model(x, t, **model_kwargs)

    def fn(x: Tensor, t: Tensor) -> Tensor:
        batch, channels = x.shape[:2]
        doubled = {
            k: torch.cat([v, v]) if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == batch else v
            for k, v in model_kwargs.items()
        }
        # First half keeps its condition, second half is swapped for the model's null embedding.
        drop = torch.zeros(2 * batch, dtype=torch.long, device=x.device)
        drop[batch:] = 1
        out = model(torch.cat([x, x]), torch.cat([t, t]), force_drop_ids=drop, **doubled)
        cond, uncond = out[:batch], out[batch:]
        guided = uncond[:, :channels] + cfg_scale * (cond[:, :channels] - uncond[:, :channels])
        return torch.cat([guided, cond[:, channels:]], dim=1)

    return fn


def dpm_solver_scheduler(prediction: Prediction) -> DPMSolverMultistepScheduler:
    """diffusers' second-order multistep DPM-Solver++ over the training schedule, for a model predicting ε or v."""
    return DPMSolverMultistepScheduler(**diffusers_schedule(prediction), algorithm_type="dpmsolver++", solver_order=2)


def _dpm_solver_pp(
    fn: ModelOutputFn,
    shape: Sequence[int],
    steps: int,
    generator: torch.Generator | None,
    device: torch.device,
    progress: bool,
    prediction: Prediction,
) -> Tensor:
    """Second-order multistep DPM-Solver++ on the ε (or v) channels."""
    scheduler = dpm_solver_scheduler(prediction)
    scheduler.set_timesteps(steps, device=device)
    x = randn(shape, generator, device) * scheduler.init_noise_sigma
    for t in tqdm(scheduler.timesteps, disable=not progress):
        t_batch = t.to(device=device, dtype=torch.long).expand(x.shape[0])
        mean_prediction = fn(x, t_batch)[:, : x.shape[1]]
        x = scheduler.step(mean_prediction, t, x, generator=generator).prev_sample
    return x


def _default_device(model: Callable[..., Tensor]) -> torch.device:
    """Device of the model's first parameter, else CPU."""
    if isinstance(model, nn.Module):
        param = next(model.parameters(), None)
        if param is not None:
            return param.device
    return torch.device("cpu")


@torch.no_grad()
def sample(
    model: Callable[..., Tensor],
    shape: Sequence[int],
    model_kwargs: dict[str, Any] | None,
    *,
    sampler: str = "dpm++",
    steps: int | None = None,
    cfg_scale: float = 4.5,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    learn_sigma: bool = True,
    prediction: Prediction = "epsilon",
) -> Tensor:
    """Generate latents x_0 of `shape` from `model` with classifier-free guidance."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    check_prediction(prediction)
    steps = steps or DEFAULT_STEPS[sampler]
    device = torch.device(device) if device is not None else _default_device(model)
    fn = guided_model_fn(model, model_kwargs, cfg_scale)

    if sampler == "dpm++":
        return _dpm_solver_pp(fn, shape, steps, generator, device, progress, prediction)
    diffusion = create_diffusion(steps, learn_sigma=learn_sigma, prediction=prediction)
    return diffusion.p_sample_loop(fn, shape, generator=generator, device=device, progress=progress)
