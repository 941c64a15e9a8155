"""Stage 2, text-image alignment: the stage-1 trunk learns to follow dense captions."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from pixart_lightning.config import StageConfig
from pixart_lightning.interop.init_from import adopt, check_fits, starting_model
from pixart_lightning.models import PixArt, class_to_text
from pixart_lightning.models.pixart import trim_caption_padding
from stages.base import DiffusionStage


class TextAlignment(DiffusionStage):
    """Text mode: adaLN-single plus zero-initialised cross-attention over T5 features of the captions."""

    @classmethod
    def initial_model(cls, cfg: StageConfig, parent: PixArt | None, caption_channels: int | None) -> PixArt:
        """From stage 1's model or ``model.init_from``: a class-mode model is re-parameterised (at t = 500 the
        new model computes the old one with the label left out), a text-mode one continues as it is."""
        start, source = starting_model(cfg, parent)
        wanted = cfg.pixart_config(caption_channels=caption_channels)
        if start is None:
            return PixArt(wanted)
        if start.cfg.mode == "class":
            model = class_to_text(start, caption_channels=caption_channels, class_dropout_prob=wanted.class_dropout_prob)
        else:
            # As stage 1: the checkpoint's own position scale unless the config names one.
            scale = cfg.model.interpolation_scale or start.cfg.interpolation_scale
            model = adopt(start, start.cfg.replace(class_dropout_prob=wanted.class_dropout_prob, interpolation_scale=scale))
        check_fits(model.cfg, wanted, source)
        return model

    def on_before_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Cut or pad precomputed captions to the batch's longest caption rounded up to a multiple of
        ``CAPTION_LENGTH_MULTIPLE``, at most the model's caption length (few distinct lengths: few kernel plans
        and compilations), while the batch is
        on the host, where reading the mask costs no device sync; a batch of full-length captions loses its mask
        (attention's fastest kernel)."""
        if "caption_features" in batch:
            batch["caption_features"], batch["caption_mask"] = trim_caption_padding(
                batch["caption_features"], batch["caption_mask"], limit=self.model.cfg.max_caption_tokens)
        return batch

    def caption_features(self, batch: dict[str, Any]) -> dict[str, Tensor | None]:
        """Precomputed features from the shards when present, else T5 on the fly."""
        if "caption_features" in batch:
            mask = batch["caption_mask"]
            return {"y": batch["caption_features"].to(self.device).float(),
                    "mask": None if mask is None else mask.to(self.device)}
        features, mask = self.encoders.text_encoder.encode(batch["caption"], trim=True)
        return {"y": features.float(), "mask": mask}

    def conditioning(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        return self.caption_features(batch)
