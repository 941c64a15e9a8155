"""Offline tiny T5 and VAE, saved as ordinary model folders, for the demo and the tests."""

from __future__ import annotations

import itertools
import os
import re
import string
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from transformers import T5Config, T5EncoderModel, T5Tokenizer

SHAPES_VOCAB: dict[str, tuple[str, ...]] = {
    "sizes": ("small", "large"),
    "colors": ("red", "green", "blue", "yellow", "purple", "orange", "white", "black", "gray"),
    "shapes": ("circle", "square", "triangle"),
    "positions": ("center", "left", "right", "top", "bottom", "upper left", "upper right", "lower left", "lower right"),
    "templates": (
        "a {size} {color} {shape} in the {position} on a {background} background",
        "a {background} background with a {size} {color} {shape} in the {position}",
    ),
}
"""Words and caption templates of the synthetic "shapes" world (background is one of the colors)."""

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2, as T5 expects
# Any word is cheaper whole than spelled out, so known words never split; unknown ones fall back to characters.
WORD_SCORE, CHAR_SCORE = -1.0, -10.0
FALLBACK_CHARS = string.ascii_letters + string.digits + string.punctuation


def shapes_corpus() -> list[str]:
    """Every caption of the shapes world, each background being a color other than the shape's."""
    v = SHAPES_VOCAB
    return [
        template.format(size=size, color=color, shape=shape, position=position, background=background)
        for size, color, shape, position, background, template in itertools.product(
            v["sizes"], v["colors"], v["shapes"], v["positions"], v["colors"], v["templates"]
        )
        if background != color
    ]


def word_level_t5_tokenizer(corpus: Iterable[str]) -> T5Tokenizer:
    """A T5 (unigram) tokenizer whose pieces are the corpus's lower-cased words plus single characters."""
    words = sorted({w for caption in corpus for w in re.findall(r"[a-z0-9]+", caption.lower())})
    vocab = [(token, 0.0) for token in SPECIAL_TOKENS]
    vocab += [("▁" + w, WORD_SCORE) for w in words]
    vocab += [(c, CHAR_SCORE) for c in "▁" + FALLBACK_CHARS]
    # Never T5Tokenizer(vocab_file=...): in transformers 5 that silently yields a 4-token vocabulary.
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def build_tiny_t5(
    out_dir: str | os.PathLike,
    corpus: Sequence[str] | None = None,
    d_model: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    d_ff: int = 64,
    seed: int = 0,
) -> Path:
    """Save a word-level tokenizer and a randomly initialised ``T5EncoderModel`` (v1.1 style) to ``out_dir``."""
    out_dir = Path(out_dir)
    tokenizer = word_level_t5_tokenizer(shapes_corpus() if corpus is None else corpus)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_model // num_heads,
        d_ff=d_ff,
        num_layers=num_layers,
        num_heads=num_heads,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = T5EncoderModel(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_tiny_vae(
    out_dir: str | os.PathLike,
    block_out_channels: Sequence[int] = (8, 16, 16, 16),
    latent_channels: int = 4,
    norm_num_groups: int = 4,
    seed: int = 0,
) -> Path:
    """Save a randomly initialised ``AutoencoderKL`` (downsampling 2**(len(block_out_channels)-1)) to ``out_dir``."""
    out_dir = Path(out_dir)
    blocks = len(block_out_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * blocks,
            up_block_types=("UpDecoderBlock2D",) * blocks,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=norm_num_groups,
        )
    model.save_pretrained(out_dir)
    return out_dir


def build_tiny_models(out_dir: str | os.PathLike) -> dict[str, Path]:
    """Build the tiny T5 and VAE under ``out_dir/t5`` and ``out_dir/vae``."""
    out_dir = Path(out_dir)
    return {"t5": build_tiny_t5(out_dir / "t5"), "vae": build_tiny_vae(out_dir / "vae")}
