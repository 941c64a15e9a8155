"""The reference side of ``benchmarks/train_step.py``: the training step a diffusers user writes.

diffusers' ``PixArtTransformer2DModel`` holding our model's weights, the same hybrid loss (our
``GaussianDiffusion.training_losses``: ε/v MSE + VLB), ``torch.optim.AdamW`` with the same hyper-parameters and
torch's default implementation, the same gradient clipping, and diffusers' ``EMAModel`` at the same rate, under the
same autocast. It draws timesteps, noise and caption drops every step, as ours does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from pixart_lightning.interop.formats import to_diffusers_model
from pixart_lightning.training.compilation import compile_blocks
from stages.base import DiffusionStage

if TYPE_CHECKING:
    from benchmarks.train_step import Variant


class DiffusersStep:
    """One training step of the reference: diffusers' model, our loss, torch's AdamW, diffusers' EMAModel."""

    def __init__(self, model: torch.nn.Module, module: DiffusionStage, device: torch.device, dtype):
        from diffusers.training_utils import EMAModel

        cfg = module.cfg
        o = cfg.optim
        self.model, self.device, self.dtype, self.cfg = model.to(device).train(), device, dtype, cfg
        self.diffusion = module.diffusion
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                           weight_decay=o.weight_decay)
        self.ema = EMAModel(model.parameters(), decay=o.ema_rate) if o.ema_rate > 0 else None
        self.null = module.model.y_embedder.y_embedding.detach().to(device)
        self.vae = module.encoders.vae
        self.drop_prob = module.model.cfg.class_dropout_prob

    def __call__(self, batch: dict[str, Any]) -> None:
        dev = self.device
        y, mask = batch["caption_features"].to(dev).float(), batch["caption_mask"].to(dev)
        if "pixels" in batch:
            x0 = batch["pixels"].to(dev)
        else:
            mean, std = batch["latent_mean"].to(dev).float(), batch["latent_std"].to(dev).float()
            x0 = self.vae.latents_from_posterior(mean, std, torch.randn_like(mean))
        B = x0.shape[0]
        t = torch.randint(0, self.diffusion.num_timesteps, (B,), device=dev)
        drop = torch.rand(B, device=dev) < self.drop_prob
        y = torch.where(drop[:, None, None], self.null[None, : y.shape[1]], y)
        sizes = {"resolution": batch.get("original_size"), "aspect_ratio": batch.get("aspect_ratio")}
        sizes = {k: None if v is None else v.to(dev) for k, v in sizes.items()}

        def call(xt, timesteps):
            return self.model(xt, encoder_hidden_states=y, timestep=timesteps, encoder_attention_mask=mask,
                              added_cond_kwargs=sizes).sample

        with torch.autocast(dev.type, dtype=self.dtype, enabled=self.dtype is not None):
            loss = self.diffusion.training_losses(call, x0, t, {}, torch.randn_like(x0))["loss"].mean()
        loss.backward()
        if self.cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.model.parameters())


def reference_model(module: DiffusionStage, variant: Variant, device: torch.device) -> torch.nn.Module:
    """diffusers' PixArtTransformer2DModel with our model's current weights, run as the variant says."""
    with device:
        theirs = to_diffusers_model(module.model).to(device)
    if variant.checkpointing:
        theirs.enable_gradient_checkpointing()
    if variant.compiled:
        compile_blocks(theirs.transformer_blocks, device)
    return theirs
