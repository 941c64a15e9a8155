"""The training step every stage shares: hybrid diffusion loss on the backbone, AdamW, warm-up, EMA.

A stage subclass says only what differs: how its model is made from the previous stage's
(:meth:`DiffusionStage.initial_model`) and what the model is conditioned on
(:meth:`DiffusionStage.conditioning`).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from pixart_lightning.config import StageConfig
from pixart_lightning.data.shards import FILTER_REASONS
from pixart_lightning.diffusion import create_diffusion
from pixart_lightning.encoders.text import LazyTextEncoder, PromptFeatures, T5TextEncoder
from pixart_lightning.encoders.vae import VAE, LazyVAE, PixelSpace
from pixart_lightning.evaluation.generate import generate
from pixart_lightning.models import PixArt
from pixart_lightning.shapes import world
from pixart_lightning.training import parallel
from pixart_lightning.training.compilation import compile_blocks
from pixart_lightning.training.ema import EMA

log = logging.getLogger(__name__)


class ResumeError(ValueError):
    """A checkpoint that this run cannot continue from as it is configured."""


class TrainingStopped(ValueError):
    """Training cannot go on (too much bad data, non-finite steps in a row); the message is the report."""


class DiffusionStage(L.LightningModule):
    """Holds the backbone as ``self.model`` and its average as ``self.ema``; encoders stay unregistered."""

    def __init__(
        self,
        cfg: StageConfig,
        model: PixArt,
        vae: VAE | LazyVAE | PixelSpace,
        text_encoder: T5TextEncoder | LazyTextEncoder | None = None,
        prompt_features: PromptFeatures | None = None,
    ):
        """``prompt_features``: where generation reads its prompts' T5 features (when the data hold caption features,
        so that T5 is loaded only to encode those prompts); without it, generation encodes with ``text_encoder``."""
        super().__init__()
        self.cfg = cfg
        self.model = model
        self.model.gradient_checkpointing = cfg.model.gradient_checkpointing
        self.model.attention_backend = cfg.model.attention_backend
        self.ema = EMA(model, cfg.optim.ema_rate, cfg.optim.ema_warmup) if cfg.optim.ema_rate > 0 else None
        self.diffusion = create_diffusion(learn_sigma=model.cfg.learn_sigma, prediction=cfg.diffusion.prediction)
        # Frozen encoders are not submodules: they must not land in checkpoints or the optimizer.
        self.frozen = {"vae": vae, "text_encoder": text_encoder, "prompt_features": prompt_features}
        self.skipped: dict[str, int] = {}
        self.samples_read = 0
        self._bad_step: Tensor | None = None  # this step's gradient was not finite (a device bool)
        self._nonfinite: Tensor | None = None  # (total, in a row, longest run since the last check), on the device
        self._nonfinite_reported = 0
        self._params: list[Tensor] | None = None  # the backbone's parameters, listed once (after any sharding)
        self._micro_batch = 0  # which micro-batch of the optimizer step this is (gradient accumulation)

    # ------------------------------------------------------------------ stage hooks
    @classmethod
    def initial_model(cls, cfg: StageConfig, parent: PixArt | None, caption_channels: int | None) -> PixArt:
        """The model this stage starts from, given the previous stage's final weights (or None)."""
        raise NotImplementedError

    def conditioning(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """The model's keyword inputs (besides x and t) for a batch."""
        raise NotImplementedError

    # ------------------------------------------------------------------ training
    @property
    def global_batch(self) -> int:
        """Images per optimizer step over all processes, as this Trainer runs (micro x accumulation x world), or as
        the config plans it before there is a Trainer."""
        if self._trainer is None:
            return self.cfg.batch_plan().global_batch
        return self.cfg.batch_plan().micro * self.trainer.accumulate_grad_batches * self.trainer.world_size

    @property
    def vae(self) -> VAE | LazyVAE | PixelSpace:
        return self.frozen["vae"]

    @property
    def text_encoder(self) -> T5TextEncoder | LazyTextEncoder | None:
        return self.frozen["text_encoder"]

    @property
    def prompt_encoder(self) -> PromptFeatures | T5TextEncoder | LazyTextEncoder | None:
        """What generation (samples, FID, alignment) encodes its prompts with."""
        return self.frozen["prompt_features"] or self.text_encoder

    def prepare_prompts(self, prompts: list[str]) -> None:
        """Collective: rank 0 stores the features of the prompts not stored yet (loading T5 for them only, then
        freeing it) while the other ranks wait; after it, every rank reads them and none but rank 0 ever loads T5."""
        store = self.frozen["prompt_features"]
        if store is None or not prompts:
            return
        if self.global_rank == 0:
            store.fill(prompts)
        self.trainer.strategy.barrier("prompt features")

    def configure_model(self) -> None:
        """Under FSDP, shard the backbone and its EMA copy block by block (the same mesh, so their shards align);
        then compile the training model's blocks if ``model.compile`` (the EMA copy only samples: left eager)."""
        sharded = isinstance(self.trainer.strategy, parallel.ShardedStrategy)
        if sharded and not parallel.is_sharded(self.model):
            for model in (self.model, self.ema.model if self.ema is not None else None):
                if model is not None:
                    parallel.shard(model, self.cfg.train, self.device_mesh["data_parallel"], self.device.type)
        if self.cfg.model.compile:
            compile_blocks(self.model.blocks, self.device)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["world_size"] = self.trainer.world_size

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The data position and the per-rank data split depend on the number of processes: refuse another."""
        saved = checkpoint.get("world_size", 1)
        if saved != self.trainer.world_size:
            raise ResumeError(
                f"this stage's checkpoint was written by {saved} processes and this run has {self.trainer.world_size}; "
                f"resume with train.devices x train.num_nodes = {saved}, or delete the stage folder's checkpoints/ "
                "to restart the stage (its parent's weights are not affected)"
            )

    def on_fit_start(self) -> None:
        for module in (self.vae, self.text_encoder):
            if module is not None:
                module.to(self.device)
        if self.cfg.text_mode:  # the sample grid's and the alignment eval's prompts, in one T5 load at most
            scenes = world.alignment_prompts(self.cfg.eval.alignment_prompts, self.cfg.eval.seed)
            self.prepare_prompts([*self.cfg.samples.prompts, *(caption for caption, _ in scenes)])

    def transfer_batch_to_device(self, batch: dict[str, Any], device: torch.device, dataloader_idx: int) -> dict[str, Any]:
        """Move the batch's tensors, and only those (keys and counts stay on the host), without blocking: from
        pinned memory (the loader pins on GPUs) the host goes on queueing the step while the copy runs."""
        return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}

    def _logging_step(self) -> bool:
        """Whether Lightning writes this step's logs. Logging only then spares the other steps the cost of each
        ``self.log`` call (about 1 ms on CPU, plus small device kernels)."""
        return self._trainer is None or self.trainer._logger_connector.should_update_logs

    def _step_draws(self, shape: tuple[int, ...], *stream: int) -> dict[str, Tensor]:
        """This rank's share of the step's random draws for the global batch: timesteps, noise, caption drops.

        They are a function of (seed, step) only, drawn for all micro-batches of all ranks and sliced (micro-batch
        m of rank r takes slot m x world + r), so a resumed run draws what an uninterrupted one would have (no RNG
        state to save), and the same global batch trains alike on any split into processes and accumulation
        steps. ``stream`` keys a separate sequence (the posterior draw) that leaves the main one unchanged.
        """
        # The 0 holds the place of the rank in earlier versions, which keeps single-process draws as they were.
        seed = hash((self.cfg.train.seed, self.global_step, 0, *stream)) % (2**63)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        world = self.trainer.world_size if self._trainer else 1
        slots = world * (self.trainer.accumulate_grad_batches if self._trainer else 1)
        B, slot = shape[0], self._micro_batch * world + self.global_rank
        mine = slice(slot * B, (slot + 1) * B)
        if stream:
            return {"noise": torch.randn((B * slots, *shape[1:]), device=self.device, generator=gen)[mine]}
        t = torch.randint(0, self.diffusion.num_timesteps, (B * slots,), device=self.device, generator=gen)
        noise = torch.randn((B * slots, *shape[1:]), device=self.device, generator=gen)
        drop = torch.rand(B * slots, device=self.device, generator=gen) < self.model.cfg.class_dropout_prob
        return {"t": t[mine], "noise": noise[mine], "drop": drop[mine]}

    def latents(self, batch: dict[str, Any]) -> Tensor:
        """Scaled latents of the batch: the VAE posterior, from precomputed moments or encoded on the fly,
        sampled (``vae.sample_posterior``) or its mean. Both sources draw the same noise at the same step."""
        if "latent_mean" in batch:
            mean, std = batch["latent_mean"].to(self.device).float(), batch["latent_std"].to(self.device).float()
        else:
            mean, std = (m.float() for m in self.vae.encode_posterior(batch["pixels"].to(self.device, self.vae.dtype)))
        # Pixel space has no posterior to sample (std 0): no draw on its hot path.
        sample = self.cfg.vae.sample_posterior and not isinstance(self.vae, PixelSpace)
        noise = self._step_draws(tuple(mean.shape), 1)["noise"] if sample else None
        return self.vae.latents_from_posterior(mean, std, noise)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        self._count_samples(batch)
        x0 = self.latents(batch)
        kwargs = self.conditioning(batch)
        B = x0.shape[0]
        draws = self._step_draws(tuple(x0.shape))
        kwargs["force_drop_ids"] = draws["drop"].long()
        losses = self.diffusion.training_losses(self.model, x0, draws["t"], kwargs, draws["noise"])
        loss = losses["loss"].mean()
        self._micro_batch += 1
        if self._logging_step():
            self.log_dict({f"train/{k}": v.mean() for k, v in losses.items()}, on_step=True, batch_size=B)
            self.log("loss", loss, prog_bar=True, logger=False, batch_size=B)
        return loss

    def _count_samples(self, batch: dict[str, Any]) -> None:
        """Add up skipped samples; stop with a report when bad ones exceed ``data.max_bad_fraction``. Report the
        batch's data position to the data module, which saves those of the batches trained on in checkpoints."""
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        if "position" in batch and datamodule is not None:
            datamodule.record_position(batch["position"])
        for reason, n in batch.get("skipped", {}).items():
            self.skipped[reason] = self.skipped.get(reason, 0) + n
        self.samples_read += len(batch["key"])
        bad = sum(n for reason, n in self.skipped.items() if reason not in FILTER_REASONS)
        seen = bad + self.samples_read
        if seen >= 20 * len(batch["key"]) and bad > self.cfg.data.max_bad_fraction * seen:
            reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items(), key=lambda kv: -kv[1]))
            raise TrainingStopped(
                f"{bad} of {seen} samples read were bad ({bad / seen:.1%} > data.max_bad_fraction="
                f"{self.cfg.data.max_bad_fraction}): {reasons}. The log names each skipped sample's key; fix the "
                "data or raise data.max_bad_fraction, then run the same command to resume")

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip by global norm (our own call, so the norm can be logged; 0 = no clipping), and skip steps whose
        gradient is not finite without reading anything on the host.

        A NaN or inf anywhere in any rank's gradients makes the global norm non-finite on every rank. Fused
        AdamW then skips the update on the device (``found_inf``: weights, moments and step count untouched)
        and the EMA update gets weight zero; an optimizer without ``found_inf`` pays one host sync to drop the
        gradients instead. The count of such steps is read on logging steps (:meth:`_check_nonfinite`).
        """
        norm = parallel.clip_grad_norm(self._trainable_parameters(), self.cfg.optim.grad_clip or math.inf)
        if self._logging_step():
            self.log("train/grad_norm", norm, on_step=True, batch_size=1)
        self._bad_step = ~torch.isfinite(norm)
        if optimizer.defaults.get("fused"):
            optimizer.found_inf = self._bad_step.float()
        elif self._bad_step.item():
            optimizer.zero_grad(set_to_none=True)

    def _trainable_parameters(self) -> list[Tensor]:
        if self._params is None:
            self._params = list(self.model.parameters())
        return self._params

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimizer step, then the EMA step (here, not in a batch-end hook: checkpoint callbacks save
        before the module's batch-end hook runs, which would leave the saved EMA one update behind).
        After a non-finite gradient neither moves."""
        super().optimizer_step(*args, **kwargs)
        self._micro_batch = 0
        bad = self._bad_step
        if self.ema is not None:
            self.ema.update(self.model, skip=bad)
        if bad is None:  # no gradient clipping hook ran (manual stepping): nothing to count
            return
        if self._nonfinite is None:
            self._nonfinite = torch.zeros(3, dtype=torch.long, device=bad.device)
        total, in_a_row, longest = self._nonfinite.unbind()
        total.add_(bad.long())
        in_a_row.add_(1).mul_(bad.long())
        torch.maximum(longest, in_a_row, out=longest)
        if self._logging_step() or self.global_step + 1 >= self.trainer.max_steps:
            self._check_nonfinite()

    @property
    def nonfinite_steps(self) -> dict[str, int]:
        """Steps skipped for a non-finite gradient: in all, and in a row up to now (reads the device)."""
        total, in_a_row, _ = self._nonfinite.tolist() if self._nonfinite is not None else (0, 0, 0)
        return {"total": total, "in_a_row": in_a_row}

    def _check_nonfinite(self) -> None:
        """Report new non-finite steps; stop after ``train.max_nonfinite_steps`` in a row (one host sync)."""
        total, in_a_row, longest = self._nonfinite.tolist()
        self._nonfinite[2] = in_a_row
        new, self._nonfinite_reported = total - self._nonfinite_reported, total
        if not new:
            return
        self.log("train/nonfinite_steps", float(total), on_step=True, batch_size=1)
        log.warning("up to step %d: %d more steps with a non-finite gradient, their updates skipped (%d in a row now)",
                    self.global_step, new, in_a_row)
        if longest >= self.cfg.train.max_nonfinite_steps:
            debug = Path(self.trainer.default_root_dir) / "checkpoints" / f"nonfinite-step{self.global_step}.ckpt"
            self.trainer.save_checkpoint(debug)
            raise TrainingStopped(
                f"{longest} steps in a row had a non-finite gradient (train.max_nonfinite_steps="
                f"{self.cfg.train.max_nonfinite_steps}); the state is saved in {debug} for debugging. Lower "
                "optim.lr, check the data, or resume from the last good checkpoint")

    def on_train_batch_end(self, outputs: Any, batch: dict[str, Any], batch_idx: int) -> None:
        if self._logging_step():
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, batch_size=1)

    def configure_optimizers(self):
        o = self.cfg.optim
        lr = o.lr
        if o.scale_lr:  # the official configs' auto-LR: sqrt scaling with the global batch
            lr *= math.sqrt(self.global_batch / 256)
        hyper = {"lr": lr, "betas": tuple(o.betas), "eps": o.eps, "weight_decay": o.weight_decay}
        try:  # one kernel for all parameters, and it can skip a non-finite step on the device
            optimizer = torch.optim.AdamW(self.model.parameters(), fused=True, **hyper)
        except RuntimeError:  # fused needs float parameters on a device with the kernel
            optimizer = torch.optim.AdamW(self.model.parameters(), foreach=True, **hyper)
        warmup = max(1, o.warmup_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ sampling and export
    def sampling_model(self, use_ema: bool = True) -> PixArt:
        return self.ema.model if use_ema and self.ema is not None else self.model

    def consolidated(self) -> tuple[PixArt | None, PixArt | None]:
        """(model, EMA model) as plain, unsharded modules on rank 0, whatever the strategy.

        Collective under FSDP (every rank must call it; the others get ``(None, None)``).
        """
        if not parallel.is_sharded(self.model):
            return self.model, self.ema.model if self.ema is not None else None
        plain: list[PixArt | None] = []
        for model in (self.model, self.ema.model if self.ema is not None else None):
            state = parallel.full_state_dict(model) if model is not None else {}
            if model is None or self.global_rank != 0:
                plain.append(None)
                continue
            copy = PixArt(model.cfg)
            copy.load_state_dict(state)
            plain.append(copy.to(self.device).eval())
        return plain[0], plain[1]

    @torch.no_grad()
    def sample_images(
        self, *, prompts: list[str] | None = None, labels: list[int] | None = None, cfg_scale: float = 4.5,
        seed: int = 0, height: int | None = None, width: int | None = None, use_ema: bool = True,
    ) -> Tensor:
        """uint8 images (B, 3, H, W) for fixed prompts or labels, at the stage's resolution by default."""
        model = self.sampling_model(use_ema)
        was_training = model.training
        s = self.cfg.samples
        images = generate(
            model, self.vae, prompts=prompts, labels=labels, encoder=self.prompt_encoder,
            height=height or self.cfg.data.resolution, width=width or self.cfg.data.resolution,
            sampler=s.sampler, steps=s.steps, cfg_scale=cfg_scale, seed=seed, prediction=self.cfg.diffusion.prediction,
            precision=self.trainer.precision, decode_batch=s.decode_batch,
        )
        model.train(was_training)
        return images
