"""Training throughput and MFU: images/s, image tokens/s, model TFLOP/s and the time spent waiting for data.

Timing is host wall-clock between the training-batch hooks. The device is synchronised only when a
logging window closes, so no step waits on the GPU because of this callback, and the window's
total is still exact: work queued on the device is waited for before the window's clock stops.
"""

from __future__ import annotations

from collections.abc import Callable
from time import perf_counter
from typing import Any

import lightning as L
import torch

from pixart_lightning.training import flops

FlopsFn = Callable[[L.LightningModule, dict[str, Any]], float]
"""(module, batch) -> model FLOPs of one training step per image of that batch."""


def batch_geometry(pl_module: L.LightningModule, batch: dict[str, Any]) -> tuple[int, int, int]:
    """(latent height, latent width, caption tokens) of a batch as the backbone sees it.

    Read from tensor shapes only, so no device sync: precomputed ``latent_mean`` (B, C, h, w), else
    ``pixels`` (B, 3, H, W) over the module's ``encoders.vae.downsample_factor``. The caption length is the
    batch's ``caption_features`` width (padded to its longest caption), else the model's maximum (captions
    encoded on the fly, an upper bound); 0 in class mode.
    """
    cfg = pl_module.model.cfg
    if "latent_mean" in batch:
        h, w = batch["latent_mean"].shape[-2:]
    else:
        factor = pl_module.encoders.vae.downsample_factor
        h, w = (side // factor for side in batch["pixels"].shape[-2:])
    if cfg.mode == "class":
        caption = 0
    elif "caption_features" in batch:
        caption = batch["caption_features"].shape[1]
    else:
        caption = cfg.max_caption_tokens
    return h, w, caption


class Throughput(L.Callback):
    """Every ``every_n_steps`` training batches, logs averages over those batches to the trainer's loggers.

    - ``train/images_per_s_per_device``, ``train/images_per_s`` (x world size);
    - ``train/tokens_per_s_per_device``, ``train/tokens_per_s``: image tokens (latent patches);
    - ``train/tflops_per_device``: model FLOPs per second, from ``flops_per_image`` (a number, or a
      function of module and batch; default: :func:`pixart_lightning.training.flops.train_flops_per_image` of
      the module's ``model.cfg`` at the batch's size, 3x forward, under the module's ``token_routing``);
    - ``train/mfu``: that over the device's peak (``peak_tflops``, else looked up in
      :data:`pixart_lightning.training.flops.PEAK_TFLOPS`); not logged when neither knows the device (CPU);
    - ``train/data_wait_fraction``: the share of the window between one batch's end and the next
      one's start, i.e. the dataloader fetch — plus whatever hooks run after this callback's
      batch-end (checkpoint saves), which a window that contains one reads as waiting.

    Per-device figures are rank 0's; totals assume every rank runs the same batch size. The first
    window starts at the first batch, so start-up and the first fetch are not counted.
    """

    def __init__(
        self, flops_per_image: float | FlopsFn | None = None, every_n_steps: int = 50, peak_tflops: float | None = None
    ):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be at least 1, got {every_n_steps}")
        self.flops_per_image = flops_per_image
        self.every_n_steps = every_n_steps
        self.peak_tflops = peak_tflops
        self._peak = peak_tflops
        self._reset(None)

    def _reset(self, now: float | None) -> None:
        """Open a new window at ``now`` (None: at the next batch's start)."""
        self._start = self._last_end = now
        self._wait = self._flops = 0.0
        self._steps = self._images = self._tokens = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset(None)
        if self.peak_tflops is None and pl_module.device.type == "cuda":
            self._peak = flops.peak_tflops(torch.cuda.get_device_name(pl_module.device))

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        now = perf_counter()
        if self._start is None:
            self._start = now
        else:
            self._wait += now - self._last_end

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        images = len(batch["key"])
        h, w, caption = batch_geometry(pl_module, batch)
        cfg = pl_module.model.cfg
        if self.flops_per_image is None:
            routing = getattr(pl_module, "token_routing", None)
            per_image = flops.train_flops_per_image(cfg, h, w, vae_factor=1, caption_tokens=caption, routing=routing)
        elif callable(self.flops_per_image):
            per_image = self.flops_per_image(pl_module, batch)
        else:
            per_image = float(self.flops_per_image)
        self._images += images
        self._tokens += images * (h // cfg.patch_size) * (w // cfg.patch_size)
        self._flops += images * per_image
        self._steps += 1
        self._last_end = perf_counter()
        if self._steps < self.every_n_steps:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        now = perf_counter()
        metrics = self._metrics(now - self._start, trainer.world_size)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        self._reset(now)

    def _metrics(self, elapsed: float, world_size: int) -> dict[str, float]:
        tflops = self._flops / elapsed / 1e12
        metrics = {
            "train/images_per_s_per_device": self._images / elapsed,
            "train/images_per_s": self._images / elapsed * world_size,
            "train/tokens_per_s_per_device": self._tokens / elapsed,
            "train/tokens_per_s": self._tokens / elapsed * world_size,
            "train/tflops_per_device": tflops,
            "train/data_wait_fraction": self._wait / elapsed,
        }
        if self._peak:
            metrics["train/mfu"] = tflops / self._peak
        return metrics
