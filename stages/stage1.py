"""Stage 1, pixel dependency: a class-conditional DiT learns what images look like."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from pixart_lightning.config import StageConfig
from pixart_lightning.interop.init_from import adopt, check_fits, starting_model
from pixart_lightning.interop.state_dicts import IncompatibleCheckpointError
from pixart_lightning.models import PixArt
from stages.base import DiffusionStage


class PixelDependency(DiffusionStage):
    """Class mode (adaLN-Zero, label embedding); optionally initialised from a DiT checkpoint (``model.init_from``)."""

    @classmethod
    def initial_model(cls, cfg: StageConfig, parent: PixArt | None, caption_channels: int | None) -> PixArt:
        start, source = starting_model(cfg, parent)
        wanted = cfg.pixart_config()
        if start is None:
            return PixArt(wanted)
        if start.cfg.mode != "class":
            raise IncompatibleCheckpointError(f"{source}: stage 1 starts from a class-conditional (DiT) checkpoint")
        # The checkpoint's own position table (read off its pos_embed) unless the config names a scale.
        scale = cfg.model.interpolation_scale or start.cfg.interpolation_scale
        check_fits(start.cfg, wanted, source)
        return adopt(start, wanted.replace(interpolation_scale=scale))

    def on_before_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Check the labels while the batch is on the host, where reading them costs no device sync."""
        labels, num_classes = batch["label"], self.model.cfg.num_classes
        if bool((labels < 0).any()) or bool((labels >= num_classes).any()):
            raise ValueError(f"stage 1 needs class labels in [0, {num_classes}) in every sample (the shards' 'cls' "
                             f"or json 'label'); got {labels.tolist()}")
        return batch

    def conditioning(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        return {"y": batch["label"].to(self.device)}
