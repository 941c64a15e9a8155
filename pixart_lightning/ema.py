"""Exponential moving average of a model's weights, kept in fp32 and outside the optimizer."""

from __future__ import annotations

import copy

import torch
from torch import nn

from .parallel import local


class EMA(nn.Module):
    """A frozen fp32 copy of ``model`` that trails it: p_ema ← r·p_ema + (1 − r)·p.

    r warms up as min(rate, (1 + n) / (10 + n)) over the n updates so far, so the average forgets the
    initial weights within a short run instead of after ~1/(1 − rate) steps (10,000 at 0.9999).
    Being a submodule of the LightningModule, it is saved in (and restored from) every checkpoint
    without the optimizer ever seeing it.
    """

    def __init__(self, model: nn.Module, rate: float):
        super().__init__()
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"EMA rate must be in [0, 1), got {rate}")
        self.rate = rate
        self.model = copy.deepcopy(model).float().requires_grad_(False).eval()
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    def train(self, mode: bool = True) -> EMA:
        """Stay in eval mode (no dropout in the averaged model)."""
        return super().train(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step over the parameters (buffers are fixed tables and are not averaged)."""
        n = int(self.updates)
        rate = min(self.rate, (1 + n) / (10 + n))
        # Under FSDP both are sharded alike: average this rank's shards.
        ema_params = [local(p) for p in self.model.parameters()]
        params = [local(p.detach()).float() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - rate)
        self.updates += 1
