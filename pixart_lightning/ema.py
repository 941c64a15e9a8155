"""Exponential moving average of a model's weights, kept in fp32 and outside the optimizer."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """A frozen fp32 copy of ``model`` that trails it: p_ema ← rate·p_ema + (1 − rate)·p.

    Being a submodule of the LightningModule, it is saved in (and restored from) every checkpoint
    without the optimizer ever seeing it.
    """

    def __init__(self, model: nn.Module, rate: float):
        super().__init__()
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"EMA rate must be in [0, 1), got {rate}")
        self.rate = rate
        self.model = copy.deepcopy(model).float().requires_grad_(False).eval()

    def train(self, mode: bool = True) -> EMA:
        """Stay in eval mode (no dropout in the averaged model)."""
        return super().train(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step over the parameters (buffers are fixed tables and are not averaged)."""
        ema_params = list(self.model.parameters())
        params = [p.detach().float() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - self.rate)
