"""The latent-consistency parameterisation that stage 4 trains and its sampler uses: one owner for both.

A consistency student maps a noisy latent x_t straight to x_0 as ``c_skip(t) * x_t + c_out(t) * x̂_0(x_t, t)``,
where x̂_0 is the backbone's prediction (ε or v) turned into x_0. The boundary condition c_skip(0) = 1,
c_out(0) = 0 makes the map the identity at t = 0. diffusers' ``LCMScheduler`` applies exactly these scalings when
it samples, so training takes them from the same scheduler (:func:`lcm_scheduler`), as it takes ᾱ, and the two
cannot drift apart.

Distillation (Luo et al. 2023, "Latent Consistency Models") walks the teacher's probability-flow ODE on the skipping
schedule: a step of the guided teacher from t_{n+k} to t_n (one DDIM step, :meth:`LatentConsistency.teacher_step`)
gives x_{t_n}, and the student at t_{n+k} is pulled towards the target network's consistency output at t_n.
"""

from __future__ import annotations

import torch
from diffusers import LCMScheduler
from torch import Tensor

from pixart_lightning.diffusion.gaussian_diffusion import check_prediction
from pixart_lightning.diffusion.losses import mean_flat
from pixart_lightning.diffusion.schedule import NUM_TIMESTEPS, diffusers_schedule

LCM_ORIGINAL_STEPS = 50
"""The teacher's skipping schedule: distillation walks 1000 training timesteps in this many DDIM steps (LCM's
``num_ddim_timesteps`` and ``LCMScheduler.original_inference_steps``); a student samples on a subset of them."""
LCM_TIMESTEP_SCALING = 10.0
"""How sharply the boundary condition switches from x_t to the prediction (LCM's default, diffusers' too)."""
SKIP = NUM_TIMESTEPS // LCM_ORIGINAL_STEPS
"""k: training timesteps per teacher step (20)."""


def lcm_scheduler(prediction: str) -> LCMScheduler:
    """diffusers' consistency sampler over PixArt-α's training schedule, for a model predicting ε or v."""
    return LCMScheduler(
        **diffusers_schedule(prediction),
        original_inference_steps=LCM_ORIGINAL_STEPS,
        timestep_scaling=LCM_TIMESTEP_SCALING,
    )


def skipping_timesteps() -> Tensor:
    """The 50 timesteps the teacher steps between, ascending: k·i − 1 for i = 1..50 (19, 39, …, 999), the
    ``lcm_origin_timesteps`` that ``LCMScheduler.set_timesteps`` picks a student's steps from."""
    return torch.arange(1, LCM_ORIGINAL_STEPS + 1, dtype=torch.long) * SKIP - 1


def pseudo_huber(prediction: Tensor, target: Tensor, c: float) -> Tensor:
    """Per-sample loss: the mean over elements of sqrt(d² + c²) − c (d = prediction − target), LCM's and
    PixArt-LCM's pseudo-Huber; with c = 0, the mean squared error."""
    diff = prediction.float() - target.float()
    if c == 0:
        return mean_flat(diff**2)
    return mean_flat(torch.sqrt(diff**2 + c * c) - c)


class LatentConsistency:
    """The arithmetic of a distillation step for a model whose mean channels predict ε or v, in fp32, with ᾱ and
    the boundary scalings read from :func:`lcm_scheduler`'s scheduler."""

    def __init__(self, prediction: str):
        self.prediction = check_prediction(prediction)
        self.scheduler = lcm_scheduler(prediction)
        self._alphas_cumprod = self.scheduler.alphas_cumprod.float()
        self._timesteps = skipping_timesteps()

    def _alpha_bar(self, t: Tensor, like: Tensor) -> Tensor:
        """ᾱ_t per sample, shaped to broadcast against ``like``."""
        return self._alphas_cumprod.to(t.device)[t].reshape(-1, *([1] * (like.ndim - 1)))

    def timesteps(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """(t_{n+k}, t_n) for skipping-schedule indices in [0, 50): the student's timestep and the one the teacher
        steps to, k = 20 below (0 below the first: x_0's neighbour, where the boundary condition holds)."""
        start = self._timesteps.to(index.device)[index]
        return start, (start - SKIP).clamp(min=0)

    def noised(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε."""
        a = self._alpha_bar(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def x0_and_eps(self, output: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """x̂_0 and ε̂ implied by the mean channels' prediction (``output``: ε or v, without variance channels)."""
        a = self._alpha_bar(t, x_t)
        output = output.float()
        if self.prediction == "v":  # v = √ᾱ·ε − √(1 − ᾱ)·x_0
            return a.sqrt() * x_t - (1 - a).sqrt() * output, a.sqrt() * output + (1 - a).sqrt() * x_t
        return (x_t - (1 - a).sqrt() * output) / a.sqrt(), output

    def boundary_scalings(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """(c_skip(t), c_out(t)) per sample, from ``LCMScheduler.get_scalings_for_boundary_condition_discrete``."""
        c_skip, c_out = self.scheduler.get_scalings_for_boundary_condition_discrete(t.float())
        shape = (-1, *([1] * (like.ndim - 1)))
        return c_skip.reshape(shape), c_out.reshape(shape)

    def consistency(self, output: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The consistency function f(x_t, t) = c_skip(t)·x_t + c_out(t)·x̂_0, what the student (and its target)
        output; the identity at t = 0."""
        c_skip, c_out = self.boundary_scalings(t, x_t)
        return c_skip * x_t + c_out * self.x0_and_eps(output, x_t, t)[0]

    def teacher_step(self, guided: Tensor, x_t: Tensor, t: Tensor, t_prev: Tensor) -> Tensor:
        """One deterministic DDIM step of the teacher's ODE from t to t_prev, from its guided prediction:
        x_{t_prev} = √ᾱ_prev·x̂_0 + √(1 − ᾱ_prev)·ε̂."""
        x0, eps = self.x0_and_eps(guided, x_t, t)
        a_prev = self._alpha_bar(t_prev, x_t)
        return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
