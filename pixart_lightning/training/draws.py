"""The random draws of a training step (timesteps, noise, caption drops, routed tokens), as a function of (seed, step)
only."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Slot:
    """Where a micro-batch sits in its optimizer step: micro-batch ``micro`` of rank ``rank``, with ``world`` ranks
    running ``accumulation`` micro-batches each."""

    micro: int = 0
    rank: int = 0
    world: int = 1
    accumulation: int = 1


class StepDraws:
    """This rank's share of the step's random draws for the global batch: timesteps, noise, caption drops.

    They are a function of (seed, step) only, drawn for all micro-batches of all ranks and sliced (micro-batch
    m of rank r takes slot m x world + r), so a resumed run draws what an uninterrupted one would have (no RNG
    state to save), and the same global batch trains alike on any split into processes and accumulation
    steps. The posterior draw and the token scores are separate sequences that leave the main one unchanged.
    """

    def __init__(self, seed: int, step: int, slot: Slot, device: torch.device):
        self.seed, self.step, self.device = seed, step, device
        self.slots = slot.world * slot.accumulation
        self.index = slot.micro * slot.world + slot.rank

    def _generator(self, *stream: int) -> torch.Generator:
        # The 0 holds the place of the rank in earlier versions, which keeps single-process draws as they were.
        seed = hash((self.seed, self.step, 0, *stream)) % (2**63)
        return torch.Generator(device=self.device).manual_seed(seed)

    def _mine(self, B: int) -> slice:
        return slice(self.index * B, (self.index + 1) * B)

    def diffusion(
        self, shape: tuple[int, ...], num_timesteps: int, drop_prob: float,
        logit_normal: tuple[float, float] | None = None,
    ) -> dict[str, Tensor]:
        """Timesteps ``t`` (uniform, or sigmoid(N(mean, std)) of the range with ``logit_normal``), noise like ``shape``
        and caption drops (``drop``, True with ``drop_prob``)."""
        gen, B, n = self._generator(), shape[0], shape[0] * self.slots
        if logit_normal is None:
            t = torch.randint(0, num_timesteps, (n,), device=self.device, generator=gen)
        else:
            mean, std = logit_normal
            z = torch.randn(n, device=self.device, generator=gen) * std + mean
            t = (torch.sigmoid(z) * num_timesteps).long().clamp_(max=num_timesteps - 1)
        noise = torch.randn((n, *shape[1:]), device=self.device, generator=gen)
        drop = torch.rand(n, device=self.device, generator=gen) < drop_prob
        mine = self._mine(B)
        return {"t": t[mine], "noise": noise[mine], "drop": drop[mine]}

    def posterior_noise(self, shape: tuple[int, ...]) -> Tensor:
        """The noise that samples the VAE posterior (stream 1)."""
        B = shape[0]
        noise = torch.randn((B * self.slots, *shape[1:]), device=self.device, generator=self._generator(1))
        return noise[self._mine(B)]

    def token_scores(self, batch: int, tokens: int) -> Tensor:
        """Uniform (batch, tokens) scores that choose each sample's routed tokens (stream 2)."""
        scores = torch.rand((batch * self.slots, tokens), device=self.device, generator=self._generator(2))
        return scores[self._mine(batch)]
