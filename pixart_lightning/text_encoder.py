"""Frozen T5 encoder that turns captions into PixArt caption features and masks."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase, T5EncoderModel

from pixart_lightning.hub import load_pretrained, pipeline_subfolder
from pixart_lightning.models.pixart import sincos_1d

DEFAULT_T5 = "DeepFloyd/t5-v1_1-xxl"
FEATURE_OPTIONS = "pixart_lightning_features.json"
"""Beside a tiny offline encoder: ``{"position_code": true}`` adds a sinusoidal position code to its features."""


class T5TextEncoder(nn.Module):
    """Tokenizer plus frozen ``T5EncoderModel``; always in eval mode."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, model: T5EncoderModel, max_length: int = 120,
        position_code: bool = False,
    ):
        super().__init__()
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.max_length = max_length
        self.position_code = position_code

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike = DEFAULT_T5,
        max_length: int = 120,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        tokenizer_subfolder: str | None = None,
        text_encoder_subfolder: str | None = None,
    ) -> T5TextEncoder:
        """Load from a Hub id or folder; a local pipeline folder's ``tokenizer/`` and ``text_encoder/`` are found.

        ``dtype=None`` keeps the checkpoint's dtype. For a pipeline repo on the Hub, pass
        ``tokenizer_subfolder="tokenizer", text_encoder_subfolder="text_encoder"``.
        """
        tokenizer_subfolder = tokenizer_subfolder or pipeline_subfolder(name_or_path, "tokenizer")
        text_encoder_subfolder = text_encoder_subfolder or pipeline_subfolder(name_or_path, "text_encoder")
        tokenizer = load_pretrained(
            AutoTokenizer.from_pretrained, name_or_path, "T5 tokenizer", subfolder=tokenizer_subfolder or ""
        )
        model_kwargs = {"subfolder": text_encoder_subfolder or ""}
        if dtype is not None:
            model_kwargs["dtype"] = dtype
        model = load_pretrained(T5EncoderModel.from_pretrained, name_or_path, "T5 text encoder", **model_kwargs)
        options_file = Path(name_or_path) / FEATURE_OPTIONS
        options = json.loads(options_file.read_text()) if options_file.is_file() else {}
        return cls(tokenizer, model.to(device), max_length, position_code=bool(options.get("position_code")))

    @property
    def dim(self) -> int:
        """Feature width (``d_model``), PixArt's ``caption_channels``."""
        return self.model.config.d_model

    @property
    def device(self) -> torch.device:
        """Device of the encoder weights."""
        return next(self.model.parameters()).device

    def train(self, mode: bool = True) -> T5TextEncoder:
        """Stay in eval mode: a parent's ``.train()`` must not switch on T5's dropout."""
        return super().train(False)

    @torch.no_grad()
    def encode(self, captions: Sequence[str], trim: bool = False) -> tuple[Tensor, Tensor]:
        """Features (B, L, dim) and 0/1 long mask (B, L); L is ``max_length``, or the longest caption if ``trim``."""
        if isinstance(captions, str):
            captions = [captions]
        tokens = self.tokenizer(
            list(captions),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        ids = tokens.input_ids.to(self.device)
        mask = tokens.attention_mask.to(self.device, torch.long)
        if trim:
            # Padded keys are masked out, so running on the trimmed batch gives the same real-token features.
            length = int(mask.sum(dim=1).max())
            ids, mask = ids[:, :length], mask[:, :length]
        features = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        if self.position_code:
            positions = torch.arange(features.shape[1], dtype=torch.float64)
            features = features + sincos_1d(features.shape[2], positions).to(features.device, features.dtype)
        return features, mask
