"""Text/class-conditional sampling: DPM-Solver++ or ancestral with classifier-free guidance, or the consistency
sampler of a stage-4 student, whose guidance was folded in when it was distilled."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers import DPMSolverMultistepScheduler, SchedulerMixin
from torch import Tensor, nn
from tqdm.auto import tqdm

from pixart_lightning.diffusion.consistency import lcm_scheduler
from pixart_lightning.diffusion.gaussian_diffusion import (
    ModelOutputFn,
    Prediction,
    check_prediction,
    create_diffusion,
    randn,
)
from pixart_lightning.diffusion.schedule import diffusers_schedule

SAMPLERS = ("dpm++", "ancestral", "lcm")
DEFAULT_STEPS = {"dpm++": 20, "ancestral": 100, "lcm": 4}
"""Steps each sampler takes when the caller names none."""
DEFAULT_SAMPLER = "dpm++"
"""The sampler of every model but a consistency student, when the caller names none."""
DEFAULT_CFG_SCALE = 4.5
"""Classifier-free guidance scale when the caller names none (PixArt-α's)."""
CONSISTENCY_SAMPLER = "lcm"
"""The sampler of a consistency-distilled (stage-4) model."""
UNGUIDED = (CONSISTENCY_SAMPLER,)
"""Samplers of models with the guidance inside them (a consistency student): they take ``cfg_scale=1`` only."""


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


def diffusers_scheduler(sampler: str, prediction: Prediction) -> SchedulerMixin:
    """The diffusers scheduler that ``sampler`` steps with (``dpm++`` or ``lcm``), for a model predicting ε or v;
    what an exported pipeline carries."""
    if sampler == CONSISTENCY_SAMPLER:
        return lcm_scheduler(prediction)
    if sampler == "dpm++":
        return dpm_solver_scheduler(prediction)
    raise ValueError(f"sampler {sampler!r} has no diffusers scheduler; choose dpm++ or lcm")


def _scheduler_loop(
    scheduler: SchedulerMixin,
    fn: ModelOutputFn,
    shape: Sequence[int],
    steps: int,
    generator: torch.Generator | None,
    device: torch.device,
    progress: bool,
) -> Tensor:
    """A diffusers scheduler's sampling loop on the ε (or v) channels, drawing every noise from ``generator`` in the
    order ``PixArtAlphaPipeline`` draws it (the starting latents, then each step's), so that both give one image."""
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
    sampler: str = DEFAULT_SAMPLER,
    steps: int | None = None,
    cfg_scale: float = DEFAULT_CFG_SCALE,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    learn_sigma: bool = True,
    prediction: Prediction = "epsilon",
) -> Tensor:
    """Generate latents x_0 of `shape` from `model` with classifier-free guidance.

    ``lcm`` samples a consistency student (stage 4) in ``steps`` consistency steps (diffusers' ``LCMScheduler``,
    :func:`~pixart_lightning.diffusion.consistency.lcm_scheduler`): each maps x_t to x_0 and re-noises it to the
    next timestep, the last returns x_0. Its guidance was folded in at distillation, so ``cfg_scale`` must be 1.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if sampler in UNGUIDED and cfg_scale != 1.0:
        raise ValueError(f"the {sampler} sampler draws a consistency-distilled model, whose guidance is folded in: "
                         f"sample it with cfg_scale=1 (got {cfg_scale})")
    check_prediction(prediction)
    steps = steps or DEFAULT_STEPS[sampler]
    device = torch.device(device) if device is not None else _default_device(model)
    fn = guided_model_fn(model, model_kwargs, cfg_scale)

    if sampler != "ancestral":
        return _scheduler_loop(diffusers_scheduler(sampler, prediction), fn, shape, steps, generator, device, progress)
    diffusion = create_diffusion(steps, learn_sigma=learn_sigma, prediction=prediction)
    return diffusion.p_sample_loop(fn, shape, generator=generator, device=device, progress=progress)
