"""Stage 4, latent consistency distillation: a student of stage 3's EMA model that samples in 1-8 steps.

The recipe is PixArt-LCM's (Luo et al. 2023, "Latent Consistency Models", as PixArt-α applied it): the stage-3 EMA
weights are the frozen teacher and the student's starting point; each step draws a point t_{n+k} of the 50-step
skipping schedule, takes one DDIM step of the guided teacher to t_n, and pulls the student's consistency output at
t_{n+k} towards the target network's at t_n (pseudo-Huber); ``diffusion/consistency.py`` holds the arithmetic,
``training/distill.py`` the teacher and the loss.

- **Guidance** is folded into the teacher at one fixed scale, ``distill.cfg_scale`` (as PixArt-LCM, which fixes
  w = 4.5 instead of LCM's w ~ U[3, 15] and conditioning the student on w): the student then samples without
  guidance, one forward pass per step, and reproduces the teacher at that scale. Captions are never dropped.
- **The target network** is the stage's EMA (``self.ema``) at ``distill.target_ema`` (0.95, a ~20-step horizon);
  ``optim.ema_rate`` is not used. It is saved in every checkpoint (exact resume) and handed on as
  ``final-ema.safetensors`` beside the student's own weights in ``final.safetensors``; with ``target_ema: 0`` the
  target is the student itself (no gradient) and only ``final.safetensors`` is written.
- **Variants**: with ``model.lora`` only adapters train on the frozen base, the teacher is that base (adapters off:
  no second copy), the target is the EMA of the adapters, and ``final-lora.safetensors`` holds the adapters;
  without it every weight trains and the teacher is a frozen copy, outside the checkpoint (reloaded from the
  parent).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from pixart_lightning.config import StageConfig
from pixart_lightning.diffusion.consistency import LCM_ORIGINAL_STEPS, LatentConsistency
from pixart_lightning.encoders.text import LazyTextEncoder, PromptFeatures, T5TextEncoder
from pixart_lightning.encoders.vae import VAE, LazyVAE, PixelSpace
from pixart_lightning.interop.init_from import check_fits, starting_model
from pixart_lightning.interop.state_dicts import IncompatibleCheckpointError
from pixart_lightning.models import PixArt
from pixart_lightning.training.compilation import compile_blocks
from pixart_lightning.training.distill import Teacher, distillation_losses
from pixart_lightning.training.ema import EMA
from stages.stage3 import HighAesthetics


class ConsistencyDistillation(HighAesthetics):
    """Stage 3's conditioning (captions, micro-conditions on multi-scale data) on the distillation step."""

    teacher_from_parent = True

    @classmethod
    def initial_model(cls, cfg: StageConfig, parent: PixArt | None, caption_channels: int | None) -> PixArt:
        """The teacher's weights as they are (stage 3's EMA, or ``model.init_from``): the student starts equal to it,
        at its resolution."""
        start, source = starting_model(cfg, parent)
        if start is None:
            raise IncompatibleCheckpointError("stage 4 distils a trained model: run stage 3 first, or set "
                                              "model.init_from to a text-conditional checkpoint")
        if start.cfg.mode != "text":
            raise IncompatibleCheckpointError(f"{source}: stage 4 distils a text-conditional model (stage 3's or a "
                                              "PixArt-α checkpoint)")
        wanted = cfg.pixart_config(caption_channels=caption_channels)
        check_fits(start.cfg, wanted, source)
        if start.cfg.sample_size != wanted.sample_size:
            side = start.cfg.sample_size * cfg.latent_factor
            raise IncompatibleCheckpointError(f"{source} was trained at {side} px and stage 4 distils at its teacher's "
                                              f"resolution: set data.resolution={side}")
        return start

    def __init__(
        self,
        cfg: StageConfig,
        model: PixArt,
        vae: VAE | LazyVAE | PixelSpace,
        text_encoder: T5TextEncoder | LazyTextEncoder | None = None,
        prompt_features: PromptFeatures | None = None,
    ):
        super().__init__(cfg, model, vae, text_encoder, prompt_features)
        self.consistency = LatentConsistency(cfg.diffusion.prediction)
        self.teacher = Teacher(model, shares_base=cfg.model.lora is not None)  # a plain object: not registered

    def make_average(self, model: PixArt) -> EMA | None:
        """The target network: the student's EMA at ``distill.target_ema`` (constant), none at 0."""
        rate = self.cfg.distill.target_ema
        return EMA(model, rate) if rate > 0 else None

    @property
    def target(self) -> PixArt:
        """The network that gives the consistency target: the EMA when kept, else the student."""
        return self.averaged if self.averaged is not None else self.model

    def configure_model(self) -> None:
        """As every stage; with ``model.compile`` the teacher copy's blocks too (two of a step's four passes)."""
        super().configure_model()
        if self.cfg.model.compile and self.teacher.copy is not None:
            compile_blocks(self.teacher.copy.blocks, self.device)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.teacher.to(self.device)

    def losses(self, x0: Tensor, kwargs: dict[str, Any]) -> dict[str, Tensor]:
        """The consistency-distillation loss at this step's draws: a skipping-schedule index and noise per sample."""
        draws = self._draws().diffusion(tuple(x0.shape), LCM_ORIGINAL_STEPS, 0.0)
        kwargs["force_drop_ids"] = torch.zeros_like(draws["t"])
        d = self.cfg.distill
        return distillation_losses(self.model, self.teacher, self.target, self.consistency, x0, draws["t"],
                                   draws["noise"], kwargs, d.cfg_scale, d.huber_c)
