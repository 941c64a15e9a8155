"""Exponential moving average of a model's weights, kept in fp32 and outside the optimizer."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

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
        self._pairs: tuple[list[Tensor], list[Tensor]] | None = None

    def train(self, mode: bool = True) -> EMA:
        """Stay in eval mode (no dropout in the averaged model)."""
        return super().train(False)

    @torch.no_grad()
    def update(self, model: nn.Module, skip: Tensor | None = None) -> None:
        """One EMA step over the parameters (buffers are fixed tables and are not averaged).

        Computed on the device without reading any value on the host: ``skip`` (a bool tensor, True after a
        non-finite gradient) zeroes the step's weight and leaves the update count alone.
        """
        if self._pairs is None:  # the same parameter objects for the whole run (FSDP shards them once, first)
            # Under FSDP both are sharded alike: average this rank's shards.
            self._pairs = ([local(p) for p in self.model.parameters()], [local(p) for p in model.parameters()])
        ema_params, params = self._pairs
        n = self.updates.float()
        # 1 - min(rate, (1 + n) / (10 + n)), written so that 1 - rate is not lost to float32 rounding
        weight = torch.clamp(9.0 / (10.0 + n), min=1.0 - self.rate)
        if skip is None:
            self.updates += 1
        else:
            keep = (~skip).to(weight.dtype)
            weight = weight * keep
            self.updates += keep.long()
        # One weight tensor per parameter: a lone tensor weight would be read on the host to pick the
        # scalar overload (a device sync); the list overload keeps it on the device.
        torch._foreach_lerp_(ema_params, [p.detach().float() for p in params], [weight] * len(params))
