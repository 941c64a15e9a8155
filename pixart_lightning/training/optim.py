"""The optimizer every stage trains with: AdamW after a linear learning-rate warm-up, then constant or cosine."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from pixart_lightning.config import StageConfig


def build_optimizer(
    parameters: Iterable[nn.Parameter], cfg: StageConfig, global_batch: int | None = None
) -> dict[str, Any]:
    """AdamW at ``cfg.learning_rate(global_batch)`` over the ``parameters`` that train (under LoRA the adapters: no
    state for the frozen base), warmed up linearly over ``optim.warmup_steps`` then following ``optim.lr_schedule``,
    as Lightning's ``configure_optimizers`` returns it (the schedule stepped every optimizer step)."""
    o = cfg.optim
    parameters = [p for p in parameters if p.requires_grad]
    hyper = {"lr": cfg.learning_rate(global_batch), "betas": tuple(o.betas), "eps": o.eps, "weight_decay": o.weight_decay}
    try:  # one kernel for all parameters, and it can skip a non-finite step on the device
        optimizer = torch.optim.AdamW(parameters, fused=True, **hyper)
    except RuntimeError:  # fused needs float parameters on a device with the kernel
        optimizer = torch.optim.AdamW(parameters, foreach=True, **hyper)
    factor = functools.partial(lr_factor, warmup=max(1, o.warmup_steps), total=cfg.train.max_steps,
                               schedule=o.lr_schedule)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def lr_factor(step: int, *, warmup: int, total: int, schedule: str) -> float:
    """The learning rate of optimizer step ``step`` (from 0) over the peak: a linear warm-up over ``warmup`` steps,
    then 1 (``constant``) or a half cosine that reaches 0 after the stage's ``total`` steps (``cosine``)."""
    if step + 1 < warmup or schedule == "constant":
        return min(1.0, (step + 1) / warmup)
    progress = (step + 1 - warmup) / (total + 1 - warmup)  # the last step still moves
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
