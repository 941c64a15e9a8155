"""Exponential moving average of a model's weights, kept in fp32 and outside the optimizer."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from pixart_lightning.training.parallel import local

CHUNK_ELEMENTS = 1 << 26
"""Parameters are averaged in groups of about this many elements, which bounds the temporary copy an update
makes (256 MB in fp32) while keeping one fused kernel per group."""


class EMA(nn.Module):
    """A frozen fp32 copy of ``model`` that trails it: p_ema ← r·p_ema + (1 − r)·p.

    The rate r is constant (the official PixArt-α code: 0.9999, an averaging horizon of ~10k steps). With
    ``warmup``, r grows as min(rate, (1 + n) / (10 + n)) over the n updates so far, so the average forgets the
    initial weights within a short run instead of after ~1/(1 − rate) steps. Only the parameters that train are
    averaged: under LoRA the adapters, the copy's frozen base staying the model's (``training/lora.py``).
    Being a submodule of the LightningModule, it is saved in (and restored from) every checkpoint
    without the optimizer ever seeing it. Its train/eval mode follows the module's, as any submodule's: the mode
    matters only to a forward pass, and sampling (``evaluation.generate``) puts the model in eval mode itself.
    """

    def __init__(self, model: nn.Module, rate: float, warmup: bool = False):
        super().__init__()
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"EMA rate must be in [0, 1), got {rate}")
        self.rate = rate
        self.warmup = warmup
        self.model = copy.deepcopy(model).float().requires_grad_(False)
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self._groups: list[tuple[list[Tensor], list[Tensor]]] | None = None

    def _parameter_groups(self, model: nn.Module) -> list[tuple[list[Tensor], list[Tensor]]]:
        """(EMA tensors, model tensors) of the parameters that train, paired by name (under LoRA the adapters: the
        frozen base needs no average), in groups of about CHUNK_ELEMENTS; under FSDP both are sharded alike, so
        this rank's shards pair up. Listed once: the parameter objects stay the same for the whole run."""
        groups: list[tuple[list[Tensor], list[Tensor]]] = [([], [])]
        size = 0
        averaged = dict(self.model.named_parameters())
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            ema_p = averaged[name]
            if size >= CHUNK_ELEMENTS:
                groups.append(([], []))
                size = 0
            groups[-1][0].append(local(ema_p))
            groups[-1][1].append(local(p))
            size += local(p).numel()
        return groups

    @torch.no_grad()
    def update(self, model: nn.Module, skip: Tensor | None = None) -> None:
        """One EMA step over the parameters (buffers are fixed tables and are not averaged).

        Computed on the device without reading any value on the host: ``skip`` (a bool tensor, True after a
        non-finite gradient) zeroes the step's weight and leaves the update count alone.
        """
        if self._groups is None:
            self._groups = self._parameter_groups(model)
        weight: float | Tensor = 1.0 - self.rate
        if self.warmup:  # 1 - min(rate, (1 + n) / (10 + n)), written so that 1 - rate is not lost to rounding
            weight = torch.clamp(9.0 / (10.0 + self.updates.float()), min=1.0 - self.rate)
        if skip is None:
            self.updates += 1
        else:
            keep = (~skip).float()
            weight = weight * keep
            self.updates += keep.long()
        for ema_params, params in self._groups:
            params = [p.detach().float() for p in params]
            if isinstance(weight, float):  # a host scalar: CUDA's fused multi-tensor lerp
                torch._foreach_lerp_(ema_params, params, weight)
                continue
            # A device weight: lerp's tensor overloads take one weight per parameter and fall off the fused path,
            # while multiplying a list by one device scalar stays fused. p_ema += w·(p − p_ema); exact no-op at w=0.
            moved = torch._foreach_sub(params, ema_params)
            torch._foreach_mul_(moved, weight)
            torch._foreach_add_(ema_params, moved)
