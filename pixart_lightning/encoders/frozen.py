"""The frozen encoders a stage trains and generates with, held apart from the weights it trains."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pixart_lightning.encoders.text import LazyTextEncoder, PromptFeatures, T5TextEncoder
from pixart_lightning.encoders.vae import VAE, LazyVAE, PixelSpace

if TYPE_CHECKING:
    from lightning.pytorch.strategies import Strategy


class FrozenEncoders:
    """The VAE, the T5 (None in class mode) and the stored features of generation's prompts (when the data hold
    caption features, so that T5 is loaded only to encode those prompts).

    A plain object, not an ``nn.Module``: a LightningModule holding it registers none of them, so they land in no
    checkpoint and no optimizer, and move to the device only by :meth:`to`.
    """

    def __init__(
        self,
        vae: VAE | LazyVAE | PixelSpace,
        text_encoder: T5TextEncoder | LazyTextEncoder | None = None,
        prompt_features: PromptFeatures | None = None,
    ):
        self.vae = vae
        self.text_encoder = text_encoder
        self.prompt_features = prompt_features

    @property
    def prompt_encoder(self) -> PromptFeatures | T5TextEncoder | LazyTextEncoder | None:
        """What generation (samples, FID, alignment) encodes its prompts with: the stored features, else T5."""
        return self.prompt_features or self.text_encoder

    def to(self, device: torch.device) -> None:
        """Put the VAE and T5 on ``device`` (lazy ones: where they will load)."""
        for module in (self.vae, self.text_encoder):
            if module is not None:
                module.to(device)

    def prepare_prompts(self, prompts: list[str], strategy: Strategy) -> None:
        """Collective: rank 0 stores the features of the prompts not stored yet (loading T5 for them only, then
        freeing it) while the other ranks wait; after it, every rank reads them and none but rank 0 ever loads T5."""
        if self.prompt_features is None or not prompts:
            return
        if strategy.is_global_zero:
            self.prompt_features.fill(prompts)
        strategy.barrier("prompt features")
