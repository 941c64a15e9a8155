"""Stage 4's frozen teacher and the consistency-distillation loss of one batch (``stages/stage4.py``).

The teacher is held apart from the weights that train: a plain object, so it lands in no checkpoint (the runner
loads it again from the stage's parent to resume) and no optimizer. In the full variant it is a frozen copy of the
starting weights; under LoRA it is the student itself with its adapters switched off (the frozen base is the
starting weights), which saves a copy of the backbone.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor

from pixart_lightning.diffusion.consistency import LatentConsistency, pseudo_huber
from pixart_lightning.diffusion.sampling import guided_model_fn
from pixart_lightning.models import PixArt
from pixart_lightning.training import lora


@contextmanager
def adapters_disabled(model: PixArt) -> Iterator[None]:
    """Run ``model`` as its frozen base: every LoRA layer computes its base layer alone (peft's
    ``enable_adapters``, which ``PeftModel.disable_adapter`` uses), and is switched back on (trainable) after."""
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


class Teacher:
    """The frozen model the student is distilled from: a frozen copy of ``student`` as it starts, or, with
    ``shares_base`` (LoRA), ``student`` with its adapters off. It sees the caption unless ``force_drop_ids`` says
    otherwise (the LoRA teacher runs in the student's training mode, where captions would be dropped at random)."""

    def __init__(self, student: PixArt, shares_base: bool):
        self.student = student
        self.copy = None if shares_base else copy.deepcopy(student).requires_grad_(False).eval()

    def to(self, device: torch.device) -> None:
        if self.copy is not None:
            self.copy.to(device)

    @torch.no_grad()
    def __call__(self, x: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
        kwargs.setdefault("force_drop_ids", torch.zeros(x.shape[0], dtype=torch.long, device=x.device))
        if self.copy is not None:
            return self.copy(x, t, **kwargs)
        if not lora.is_adapted(self.student):  # before configure_model, the student would be its own teacher
            raise RuntimeError("the LoRA teacher needs the student's adapters in place (configure_model adds them)")
        with adapters_disabled(self.student):
            return self.student(x, t, **kwargs)


def distillation_losses(
    student: PixArt, teacher: Teacher, target: PixArt, lcm: LatentConsistency, x0: Tensor, index: Tensor,
    noise: Tensor, kwargs: dict[str, Any], cfg_scale: float, huber_c: float,
) -> dict[str, Tensor]:
    """Per-sample losses of one batch: the student's consistency output at t_{n+k} against the target network's at
    t_n, where x_{t_n} is one DDIM step of the teacher guided at ``cfg_scale`` (only the mean channels count).

    ``index`` picks each sample's step on the skipping schedule; ``kwargs`` condition all three models (their
    ``force_drop_ids``, the student's and target's, keep every caption). ``target`` runs without gradient; it is
    the student itself where the stage keeps no EMA target.
    """
    channels = x0.shape[1]
    t, t_prev = lcm.timesteps(index)
    x_t = lcm.noised(x0, noise, t)
    online = lcm.consistency(student(x_t, t, **kwargs)[:, :channels], x_t, t)
    with torch.no_grad():
        x_prev = teacher_ode_step(teacher, lcm, x_t, t, t_prev, kwargs, cfg_scale)
        aimed = lcm.consistency(target(x_prev, t_prev, **kwargs)[:, :channels], x_prev, t_prev)
    return {"loss": pseudo_huber(online, aimed, huber_c)}


@torch.no_grad()
def teacher_ode_step(
    teacher: Teacher, lcm: LatentConsistency, x_t: Tensor, t: Tensor, t_prev: Tensor, kwargs: dict[str, Any],
    cfg_scale: float,
) -> Tensor:
    """x_{t_prev} from x_t: one DDIM step of the teacher guided at ``cfg_scale`` (its conditional and unconditional
    passes as one doubled batch; ``kwargs``' own caption drops are left out, guidance sets them)."""
    conditions = {k: v for k, v in kwargs.items() if k != "force_drop_ids"}
    guided = guided_model_fn(teacher, conditions, cfg_scale)(x_t, t)[:, : x_t.shape[1]]
    return lcm.teacher_step(guided, x_t, t, t_prev)
