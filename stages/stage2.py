"""Stage 2, text-image alignment: the stage-1 trunk learns to follow dense captions."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from pixart_lightning.config import StageConfig
from pixart_lightning.models import PixArt, class_to_text
from pixart_lightning.models.pixart import trim_caption_padding
from stages.base import DiffusionStage


class TextAlignment(DiffusionStage):
    """Text mode: adaLN-single plus zero-initialised cross-attention over T5 features of the captions."""

    @classmethod
    def initial_model(cls, cfg: StageConfig, parent: PixArt | None, caption_channels: int | None) -> PixArt:
        if parent is None:
            return PixArt(cfg.pixart_config(caption_channels=caption_channels))
        if parent.cfg.mode != "class":
            raise ValueError("stage 2 starts from stage 1's class-conditional model")
        # Re-parameterise: at t = 500 the new model computes the old one with the label left out.
        return class_to_text(parent, caption_channels=caption_channels, class_dropout_prob=cfg.model.class_dropout_prob)

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
