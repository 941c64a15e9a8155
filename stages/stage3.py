"""Stage 3, high aesthetics: fine-tuning on curated data at higher resolution, in aspect-ratio buckets."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from pixart_lightning.config import StageConfig
from pixart_lightning.interop.init_from import check_fits, starting_model
from pixart_lightning.interop.state_dicts import IncompatibleCheckpointError
from pixart_lightning.models import PixArt, to_resolution
from stages.stage2 import TextAlignment


class HighAesthetics(TextAlignment):
    """Stage 2's model at the new resolution (the config's position scale); micro-conditions when multi-scale."""

    @classmethod
    def initial_model(cls, cfg: StageConfig, parent: PixArt | None, caption_channels: int | None) -> PixArt:
        """From stage 2's model or a text-mode ``model.init_from``, moved to this stage's resolution."""
        start, source = starting_model(cfg, parent)
        wanted = cfg.pixart_config(caption_channels=caption_channels)
        if start is None:
            return PixArt(wanted)
        if start.cfg.mode != "text":
            raise IncompatibleCheckpointError(f"{source}: stage 3 starts from a text-conditional model (stage 2's or "
                                              "a PixArt-α checkpoint)")
        # Micro-conditions can be added, not removed: a checkpoint that has them keeps them, for check_fits to name.
        model = to_resolution(start, wanted.sample_size, interpolation_scale=wanted.interpolation_scale,
                              micro_conditions=wanted.micro_conditions or start.cfg.micro_conditions)
        check_fits(model.cfg, wanted, source)
        return model

    def conditioning(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        kwargs = self.caption_features(batch)
        if self.model.cfg.micro_conditions:
            # PixArt-α: the original image size and the bucket's aspect ratio, raw values.
            kwargs["resolution"] = batch["original_size"].to(self.device)
            kwargs["aspect_ratio"] = batch["aspect_ratio"].to(self.device)
        return kwargs
