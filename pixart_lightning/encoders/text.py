"""Frozen T5 encoder that turns captions into PixArt caption features and masks; loaded lazily, and the features of
generation's prompts stored once (:class:`PromptFeatures`)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor, nn
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase, T5EncoderModel
from transformers.utils import logging as transformers_logging

from pixart_lightning.encoders.lazy import Lazy
from pixart_lightning.files import atomic_write
from pixart_lightning.hub import load_pretrained, pipeline_subfolder
from pixart_lightning.models.config import CAPTION_TOKENS
from pixart_lightning.models.pixart import sincos_1d

DEFAULT_T5 = "DeepFloyd/t5-v1_1-xxl"
TINY_T5 = "tiny"
"""The text-encoder name that means the offline tiny T5 the runner builds once per run name (the embedded default)."""
FEATURE_OPTIONS = "pixart_lightning_features.json"
"""Beside a tiny offline encoder: ``{"position_code": true}`` adds a sinusoidal position code to its features."""


@contextmanager
def transformers_bars_off() -> Iterator[None]:
    """transformers' progress bars ("Loading weights", "Writing model shards") off for the block, in a log where the
    runner says what it loads or builds."""
    if not transformers_logging.is_progress_bar_enabled():
        yield
        return
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.enable_progress_bar()


@contextmanager
def _no_loading_bar(name_or_path: str | os.PathLike) -> Iterator[None]:
    """No "Loading weights" bar from a local folder. The switch is shared with the Hub's download bars, which a
    folder has no use for; a download keeps its bar."""
    if not Path(name_or_path).is_dir():
        yield
        return
    with transformers_bars_off():
        yield


class T5TextEncoder(nn.Module):
    """Tokenizer plus frozen ``T5EncoderModel``; always in eval mode."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, model: T5EncoderModel, max_length: int = CAPTION_TOKENS,
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
        max_length: int = CAPTION_TOKENS,
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
        with _no_loading_bar(name_or_path):
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


class LazyTextEncoder(Lazy[T5TextEncoder]):
    """A :class:`T5TextEncoder` loaded at its first ``encode`` and freed by :meth:`release`.

    With caption features in the training data, T5 (9.5 GB in bf16 for T5-XXL, per process) is only needed for the
    prompts that generation uses; this lets a process that never encodes never hold it. The feature width comes from
    the config file alone.
    """

    def __init__(self, name_or_path: str | os.PathLike, max_length: int = CAPTION_TOKENS, dtype: torch.dtype | None = None):
        super().__init__()
        self.name_or_path = str(name_or_path)
        self.max_length = max_length
        self.dtype = dtype

    @cached_property
    def dim(self) -> int:
        """Feature width (``d_model``), read from the config without loading weights."""
        subfolder = pipeline_subfolder(self.name_or_path, "text_encoder") or ""
        return load_pretrained(AutoConfig.from_pretrained, self.name_or_path, "T5 config", subfolder=subfolder).d_model

    def _build(self) -> T5TextEncoder:
        return T5TextEncoder.from_pretrained(self.name_or_path, max_length=self.max_length, dtype=self.dtype,
                                             device=self.device)

    def encode(self, captions: Sequence[str], trim: bool = False) -> tuple[Tensor, Tensor]:
        return self.load().encode(captions, trim=trim)


def prompt_digest(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:32]


class PromptFeatures:
    """T5 features of the prompts generation uses (sample grid, alignment, FID captions), stored once beside the run.

    Drop-in for the encoder in :func:`~pixart_lightning.evaluation.generate.generate`: ``encode`` reads stored features and
    encodes only prompts not stored yet. :meth:`fill` encodes ``chunk`` prompts at a time (30k FID captions never
    sit in memory at once), stores each chunk as one safetensors file (one (L, D) tensor of a prompt's real tokens,
    named by the prompt's sha256) and frees T5 after, so that T5 lives only while prompts are being encoded.
    Files are keyed by encoder, ``max_length`` and dtype, written atomically, and read lazily: a process reads only
    the prompts it generates from. Several processes may read while one writes.
    """

    def __init__(self, folder: str | os.PathLike, encoder: LazyTextEncoder, chunk: int = 128):
        self.encoder = encoder
        self.chunk = chunk
        key = {"encoder": encoder.name_or_path, "max_length": encoder.max_length, "dtype": str(encoder.dtype)}
        self.folder = Path(folder) / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        self._files: dict[str, Path] = {}  # prompt digest -> the file holding its features

    def missing(self, prompts: Sequence[str]) -> list[str]:
        """The distinct prompts with no stored features (in first-seen order)."""
        wanted = {prompt_digest(p): p for p in prompts}
        if not wanted.keys() <= self._files.keys():
            self._scan()
        return [p for d, p in wanted.items() if d not in self._files]

    def _scan(self) -> None:
        for path in sorted(self.folder.glob("part-*.safetensors")):
            with safe_open(str(path), "pt") as part:
                self._files.update(dict.fromkeys(part.keys(), path))

    def fill(self, prompts: Sequence[str]) -> int:
        """Encode and store the prompts not stored yet, then free T5; how many prompts that was."""
        todo = self.missing(prompts)
        try:
            for start in range(0, len(todo), self.chunk):
                self._store(todo[start : start + self.chunk])
        finally:
            self.encoder.release()
        return len(todo)

    def _store(self, prompts: list[str]) -> None:
        features, mask = self.encoder.encode(prompts, trim=True)
        tensors = {prompt_digest(p): features[i, :n].cpu().contiguous()
                   for i, (p, n) in enumerate(zip(prompts, mask.sum(dim=1).tolist()))}
        name = hashlib.sha256("".join(tensors).encode()).hexdigest()[:16]
        path = self.folder / f"part-{name}.safetensors"
        with atomic_write(path) as out:  # readers on other ranks see a whole part or none
            out.write(save(tensors))
        self._files.update(dict.fromkeys(tensors, path))

    def encode(self, captions: Sequence[str], trim: bool = False) -> tuple[Tensor, Tensor]:
        """Features (B, L, D), zero-padded, and 0/1 long mask (B, L), as :meth:`T5TextEncoder.encode` on the CPU."""
        if isinstance(captions, str):
            captions = [captions]
        self.fill(captions)
        digests = [prompt_digest(c) for c in captions]
        rows: dict[str, Tensor] = {}
        for path in {self._files[d] for d in digests}:
            with safe_open(str(path), "pt") as part:
                rows.update({d: part.get_tensor(d) for d in digests if self._files[d] == path})
        length = max(len(rows[d]) for d in digests) if trim else self.encoder.max_length
        first = rows[digests[0]]
        features = first.new_zeros(len(digests), length, first.shape[1])
        mask = torch.zeros(len(digests), length, dtype=torch.long)
        for i, d in enumerate(digests):
            features[i, : len(rows[d])] = rows[d]
            mask[i, : len(rows[d])] = 1
        return features, mask
