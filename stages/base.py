"""The training step every stage shares: hybrid diffusion loss on the backbone, AdamW, warm-up, EMA.

A stage subclass says only what differs: how its model is made from the previous stage's
(:meth:`DiffusionStage.initial_model`) and what the model is conditioned on (:meth:`DiffusionStage.conditioning`).
The step's parts live in ``training/`` (draws, non-finite guard, optimizer, parallelize) and ``data/accounting.py``;
the frozen encoders in ``encoders/frozen.py``; generation while training in ``evaluation/stage_samples.py``.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from torch import Tensor

from pixart_lightning.config import StageConfig
from pixart_lightning.data.accounting import SampleAccount
from pixart_lightning.diffusion import create_diffusion
from pixart_lightning.encoders.frozen import FrozenEncoders
from pixart_lightning.encoders.text import LazyTextEncoder, PromptFeatures, T5TextEncoder
from pixart_lightning.encoders.vae import VAE, LazyVAE, PixelSpace
from pixart_lightning.evaluation.stage_samples import generation_prompts
from pixart_lightning.models import PixArt
from pixart_lightning.training import lora, parallel
from pixart_lightning.training.draws import Slot, StepDraws
from pixart_lightning.training.ema import EMA
from pixart_lightning.training.nonfinite import NonFiniteGuard
from pixart_lightning.training.optim import build_optimizer
from stages.resume import check_world_size, record_world_size


class DiffusionStage(L.LightningModule):
    """Holds the backbone as ``self.model``, its average as ``self.ema`` and the frozen encoders, unregistered, as
    ``self.encoders``; the skipped samples are counted in ``self.account``, the skipped steps in ``self.nonfinite``."""

    def __init__(
        self,
        cfg: StageConfig,
        model: PixArt,
        vae: VAE | LazyVAE | PixelSpace,
        text_encoder: T5TextEncoder | LazyTextEncoder | None = None,
        prompt_features: PromptFeatures | None = None,
    ):
        """The encoders as :class:`FrozenEncoders` takes them."""
        super().__init__()
        self.cfg = cfg
        self.model = model
        self.model.attention_backend = cfg.model.attention_backend
        self.token_routing = cfg.token_routing(model.cfg.depth)  # a setting of the run, like the attention backend
        self.ema = self.make_average(model)
        self.diffusion = create_diffusion(
            learn_sigma=model.cfg.learn_sigma, prediction=cfg.diffusion.prediction,
            min_snr_gamma=cfg.diffusion.min_snr_gamma,
        )
        self.encoders = FrozenEncoders(vae, text_encoder, prompt_features)
        self.account = SampleAccount(cfg.data.max_bad_fraction)
        self.nonfinite = NonFiniteGuard(cfg.train.max_nonfinite_steps)
        self._params: list[Tensor] | None = None  # the backbone's parameters, listed once (after any sharding)
        self._micro_batch = 0  # which micro-batch of the optimizer step this is (gradient accumulation)

    # ------------------------------------------------------------------ stage hooks
    teacher_from_parent = False
    """Whether the stage distils its parent (stage 4): it starts from the parent's EMA weights, which must predict
    what this stage's ``diffusion.prediction`` says (the runner checks both)."""

    @classmethod
    def initial_model(cls, cfg: StageConfig, parent: PixArt | None, caption_channels: int | None) -> PixArt:
        """The model this stage starts from, given the previous stage's final weights (or None)."""
        raise NotImplementedError

    def conditioning(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """The model's keyword inputs (besides x and t) for a batch."""
        raise NotImplementedError

    # ------------------------------------------------------------------ weights
    def make_average(self, model: PixArt) -> EMA | None:
        """The EMA copy of the backbone the stage keeps: at ``optim.ema_rate``, none at 0."""
        o = self.cfg.optim
        return EMA(model, o.ema_rate, o.ema_warmup) if o.ema_rate > 0 else None

    @property
    def averaged(self) -> PixArt | None:
        """The EMA copy of the backbone, when the stage keeps one."""
        return self.ema.model if self.ema is not None else None

    def sampling_model(self, use_ema: bool = True) -> PixArt:
        """The weights to generate from: the EMA copy when kept and ``use_ema``, else the trained backbone."""
        return self.averaged if use_ema and self.ema is not None else self.model

    # ------------------------------------------------------------------ Lightning hooks around training
    def configure_model(self) -> None:
        """LoRA adapters, activation checkpointing, compilation and, under FSDP, sharding
        (:func:`parallel.parallelize`)."""
        sharded = isinstance(self.trainer.strategy, parallel.ShardedStrategy)
        mesh = self.device_mesh["data_parallel"] if sharded else None
        parallel.parallelize(self.model, self.cfg, self.device, mesh, average=self.averaged)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Under LoRA the checkpoint keeps only the adapters (and their average) of the weights: the frozen base is
        the stage's parent or init weights, which the runner loads again to resume."""
        record_world_size(checkpoint, self.trainer.world_size)
        if self.cfg.model.lora is not None:
            frozen = lora.frozen_base_keys(self)
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Under LoRA the frozen base comes from the model as built (what :meth:`on_save_checkpoint` left out), so
        the load stays strict for everything the checkpoint must hold. (Under FSDP the strategy has read the weights
        already, the same way: ``parallel.ShardedStrategy.load_checkpoint``.)"""
        check_world_size(checkpoint, self.trainer.world_size)
        if self.cfg.model.lora is not None and "state_dict" in checkpoint:
            state = self.state_dict()
            checkpoint["state_dict"] = {**{k: state[k] for k in lora.frozen_base_keys(self)}, **checkpoint["state_dict"]}

    def on_fit_start(self) -> None:
        self.encoders.to(self.device)
        if self.cfg.text_mode:
            self.encoders.prepare_prompts(generation_prompts(self.cfg), self.trainer.strategy)

    def transfer_batch_to_device(self, batch: dict[str, Any], device: torch.device, dataloader_idx: int) -> dict[str, Any]:
        """Move the batch's tensors, and only those (keys and counts stay on the host), without blocking: from
        pinned memory (the loader pins on GPUs) the host goes on queueing the step while the copy runs."""
        return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}

    # ------------------------------------------------------------------ training
    def _logging_step(self) -> bool:
        """Whether Lightning writes this step's logs. Logging only then spares the other steps the cost of each
        ``self.log`` call (about 1 ms on CPU, plus small device kernels)."""
        return self._trainer is None or self.trainer._logger_connector.should_update_logs

    def _draws(self) -> StepDraws:
        """The random draws of this micro-batch's slot in the step's global batch."""
        trainer = self._trainer
        slot = Slot(self._micro_batch, self.global_rank, trainer.world_size if trainer else 1,
                    trainer.accumulate_grad_batches if trainer else 1)
        return StepDraws(self.cfg.train.seed, self.global_step, slot, self.device)

    def latents(self, batch: dict[str, Any]) -> Tensor:
        """Scaled latents of the batch: the VAE posterior, from precomputed moments or encoded on the fly,
        sampled (``vae.sample_posterior``) or its mean. Both sources draw the same noise at the same step."""
        vae = self.encoders.vae
        if "latent_mean" in batch:
            mean, std = batch["latent_mean"].to(self.device).float(), batch["latent_std"].to(self.device).float()
        else:
            mean, std = (m.float() for m in vae.encode_posterior(batch["pixels"].to(self.device, vae.dtype)))
        # Pixel space has no posterior to sample (std 0): no draw on its hot path.
        sample = self.cfg.vae.sample_posterior and not isinstance(vae, PixelSpace)
        noise = self._draws().posterior_noise(tuple(mean.shape)) if sample else None
        return vae.latents_from_posterior(mean, std, noise)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        self.account.add(batch, self._trainer.datamodule if self._trainer is not None else None)
        x0 = self.latents(batch)
        B = x0.shape[0]
        losses = self.losses(x0, self.conditioning(batch))
        loss = losses["loss"].mean()
        self._micro_batch += 1
        if self._logging_step():
            self.log_dict({f"train/{k}": v.mean() for k, v in losses.items()}, on_step=True, batch_size=B)
            self.log("loss", loss, prog_bar=True, logger=False, batch_size=B)
        return loss

    def losses(self, x0: Tensor, kwargs: dict[str, Any]) -> dict[str, Tensor]:
        """Per-sample losses of a micro-batch of latents ``x0`` conditioned by ``kwargs`` (``loss`` and the parts
        logged as ``train/<name>``): the hybrid diffusion loss at this step's draws."""
        step_draws = self._draws()
        spread = self.cfg.diffusion.logit_normal
        draws = step_draws.diffusion(tuple(x0.shape), self.diffusion.num_timesteps, self.model.cfg.class_dropout_prob,
                                     None if spread is None else (spread.mean, spread.std))
        kwargs["force_drop_ids"] = draws["drop"].long()
        loss_mask = self._route(step_draws, x0, kwargs)
        return self.diffusion.training_losses(self.model, x0, draws["t"], kwargs, draws["noise"], loss_mask)

    def _route(self, step_draws: StepDraws, x0: Tensor, kwargs: dict[str, Any]) -> Tensor | None:
        """Under token routing or patch masking, this micro-batch's route into the model's ``kwargs`` (drawn for the
        global batch, like the other draws); returns the loss mask of patch masking, else None."""
        if self.token_routing is None:
            return None
        p = self.model.cfg.patch_size
        grid_h, grid_w = x0.shape[2] // p, x0.shape[3] // p
        route = self.token_routing.route(step_draws.token_scores(x0.shape[0], grid_h * grid_w))
        if route is None:
            return None
        kwargs["route"] = route
        return route.patch_mask(grid_h, grid_w, p) if self.token_routing.masked_loss else None

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip by global norm (our own call, so the norm can be logged; 0 = no clipping); a step whose gradient is
        not finite is skipped on the device (:class:`NonFiniteGuard`)."""
        if self._params is None:
            self._params = lora.trainable(self.model)
        norm = parallel.clip_grad_norm(self._params, self.cfg.optim.grad_clip or math.inf)
        if self._logging_step():
            self.log("train/grad_norm", norm, on_step=True, batch_size=1)
        self.nonfinite.skip_if_nonfinite(norm, optimizer)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimizer step, then the EMA step (here, not in a batch-end hook: checkpoint callbacks save
        before the module's batch-end hook runs, which would leave the saved EMA one update behind).
        After a non-finite gradient neither moves; the count of such steps is read on logging steps."""
        super().optimizer_step(*args, **kwargs)
        self._micro_batch = 0
        if self.ema is not None:
            self.ema.update(self.model, skip=self.nonfinite.bad)
        if self.nonfinite.count() and (self._logging_step() or self.global_step + 1 >= self.trainer.max_steps):
            self.nonfinite.check(self)

    def on_train_batch_end(self, outputs: Any, batch: dict[str, Any], batch_idx: int) -> None:
        if self._logging_step():
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, batch_size=1)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW; a scaled learning rate follows the global batch this Trainer runs (as the runner's does, the
        config's plan; a benchmark on one chosen device runs fewer processes)."""
        trainer = self._trainer
        running = self.cfg.batch_plan().micro * trainer.accumulate_grad_batches * trainer.world_size if trainer else None
        return build_optimizer(self.model.parameters(), self.cfg, running)
