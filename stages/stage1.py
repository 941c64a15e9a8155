"""Stage 1, pixel dependency: a class-conditional DiT learns what images look like."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from pixart_lightning.config import StageConfig
from pixart_lightning.interop import load_model
from pixart_lightning.interop.state_dicts import IncompatibleCheckpointError
from pixart_lightning.models import PixArt

from .base import DiffusionStage


class PixelDependency(DiffusionStage):
    """Class mode (adaLN-Zero, label embedding); optionally initialised from a DiT checkpoint."""

    @classmethod
    def initial_model(cls, cfg: StageConfig, parent: PixArt | None, caption_channels: int | None) -> PixArt:
        model = PixArt(cfg.pixart_config())
        source = cfg.model.init_from
        if source:
            pretrained = load_model(source)
            if pretrained.cfg.mode != "class":
                raise IncompatibleCheckpointError(f"{source}: stage 1 starts from a class-conditional (DiT) checkpoint")
            result = model.load_state_dict(pretrained.state_dict(), strict=False)
            if result.missing_keys or result.unexpected_keys:
                raise IncompatibleCheckpointError(
                    f"{source} does not fit model.size={cfg.model.size}: missing {result.missing_keys[:5]}, "
                    f"unexpected {result.unexpected_keys[:5]}"
                )
        return model

    def conditioning(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        labels = batch["label"].to(self.device)
        if (labels < 0).any() or (labels >= self.model.cfg.num_classes).any():
            raise ValueError(f"stage 1 needs class labels in [0, {self.model.cfg.num_classes}); got {labels.tolist()}")
        return {"y": labels}
