"""Offline tiny T5 and VAE, saved as ordinary model folders, for the demo and the tests."""

from __future__ import annotations

import json
import os
import re
import string
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from pixart_lightning.encoders.text import FEATURE_OPTIONS, transformers_bars_off
from pixart_lightning.shapes.world import shapes_corpus

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2, as T5 expects
# Any word is cheaper whole than spelled out, so known words never split; unknown ones fall back to characters.
WORD_SCORE, CHAR_SCORE = -1.0, -10.0
FALLBACK_CHARS = string.ascii_letters + string.digits + string.punctuation


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
    order_aware: bool = True,
    position_code: bool = True,
) -> Path:
    """Save a word-level tokenizer and a random ``T5EncoderModel`` (v1.1 style) to ``out_dir``; order-aware by default.

    Why: a plainly random T5 is a bag of words. Its content attention is near uniform, so the feature at "circle"
    does not know which colour word precedes it, and a diffusion model trained on such features cannot bind the
    shape's colour (it only learns the background). With ``order_aware`` the first layer's relative-position bias,
    which T5 shares with every layer, gets ``ORDER_BIAS`` on one bucket per head and 0 elsewhere, so each head
    attends almost only to one fixed neighbour (``ORDER_OFFSETS``: -1 three times, +1); 32 buckets make every
    offset below 8 its own bucket. A token's feature is then its own embedding (the residual) plus its neighbours'
    (the heads, of about the same size at T5's init; measured, scaling the attention output 1.5-3x barely helped
    the neighbour's part and blurred the token's own, so it is left as is), and the second layer widens the window
    to +-2. Everything else is the plain random initialisation, and the folder is an ordinary ``from_pretrained``
    checkpoint whose features are ``last_hidden_state``. ``order_aware=False`` is the plain init: the tests' control.

    ``position_code`` also marks the folder so that :class:`~pixart_lightning.encoders.text.T5TextEncoder` adds a
    fixed sinusoidal code of each token's position to the features. Relative offsets alone do not tell the shape's
    colour word from the background's in minutes of training; in the demo calibration (docs/stages.md) absolute
    position was what made colour binding learnable. A real T5 learns this; its folders carry no such mark.
    """
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
        relative_attention_num_buckets=32,
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
    if order_aware:
        _attend_to_neighbours(model)
    with transformers_bars_off():
        model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if position_code:
        (out_dir / FEATURE_OPTIONS).write_text(json.dumps({"position_code": True}) + "\n")
    return out_dir


# Order-aware tiny T5 (see build_tiny_t5): the relative offset (key minus query position) each head attends to.
# The word before is the modifier (colour -> shape, colour -> "background", "upper" -> "left"), so three heads read
# it (three random value projections, 3 * d_kv dims of it); +1 tells a modifier its noun ("red circle" vs "red
# background"). Layer 2 composes them (-1 after -1 reaches the size over the colour), so -2 needs no head of its own:
# measured over 8 seeds, (-1, -1, -2, +1) recovered the colour before the shape worse (min 0.87, not 0.96).
ORDER_OFFSETS = (-1, -1, -1, 1)
# Attention logit added at the chosen offset, far above the random q.k (std about 1, a few in layer 2): measured,
# each head puts >= 0.9999 of its weight there in both layers (with 10, only >= 0.81 in layer 2).
ORDER_BIAS = 20.0


def _attend_to_neighbours(model: T5EncoderModel) -> None:
    """Point head ``h`` of every layer at the relative offset ``ORDER_OFFSETS[h % len(ORDER_OFFSETS)]``."""
    config = model.config
    attention = model.encoder.block[0].layer[0].SelfAttention  # its bias table serves all layers
    buckets = attention._relative_position_bucket(  # the bucketing T5 itself uses
        torch.tensor(ORDER_OFFSETS),
        bidirectional=True,
        num_buckets=config.relative_attention_num_buckets,
        max_distance=config.relative_attention_max_distance,
    )
    table = torch.zeros_like(attention.relative_attention_bias.weight)  # (num_buckets, num_heads)
    for head in range(config.num_heads):
        table[buckets[head % len(ORDER_OFFSETS)], head] = ORDER_BIAS
    with torch.no_grad():
        attention.relative_attention_bias.weight.copy_(table)


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




# Tiny LLaVA (build_tiny_llava): a word-level vocabulary big enough for the recaption prompt and some descriptive
# words, so the random model's captions are readable words rather than unknown-token runs.
LLAVA_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
LLAVA_WORDS = (
    "user assistant given the caption of this image describe and its style in a very detailed manner "
    "a an is are with on at by for from to under over near behind front left right top bottom center middle "
    "red green blue yellow orange purple pink brown black white gray bright dark light soft warm cool "
    "circle square triangle shape background foreground scene photo painting drawing sketch picture illustration "
    "small large big tiny round sharp smooth rough flat glossy matte shadow highlight texture color colors "
    "sky tree house person cat dog water grass road city street mountain flower table window light sun cloud "
    "realistic abstract minimal vintage modern cinematic watercolor oil digital composition lighting mood"
).split()
LLAVA_PUNCTUATION = tuple(".,:;!?\"'()-")
# Chat layout of llava-hf/llava-1.5-*: "USER: <image>\n{text} ASSISTANT:", images before the text of a turn.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'].upper() + ': ' }}"
    "{% for item in message['content'] if item['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for item in message['content'] if item['type'] == 'text' %}{{ item['text'] + ' ' }}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def word_level_llava_tokenizer() -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer with LLaVA's special tokens; unknown words become ``<unk>``."""
    vocab = {token: i for i, token in enumerate((*LLAVA_SPECIAL_TOKENS, *LLAVA_PUNCTUATION, *LLAVA_WORDS))}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces, no space before punctuation
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        padding_side="left", extra_special_tokens={"image_token": "<image>"},
    )
    return tokenizer


def build_tiny_llava(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Save a random ``LlavaForConditionalGeneration`` and its ``LlavaProcessor`` to ``out_dir``.

    The folder is laid out like llava-hf/llava-1.5-7b-hf (CLIP vision tower read at its second-to-last layer
    without the CLS token, a Llama decoder, the same chat layout), only tiny: 32x32 images in 8x8 patches, so
    each image becomes 16 ``<image>`` tokens. It loads with ``LlavaForConditionalGeneration.from_pretrained``
    and ``AutoProcessor.from_pretrained``; its captions are random words.
    """
    out_dir = Path(out_dir)
    tokenizer = word_level_llava_tokenizer()
    image_size, patch_size = 32, 8
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=image_size, patch_size=patch_size, projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(image_size // patch_size) ** 2, vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=LLAVA_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out_dir)
    return out_dir


def build_tiny_models(out_dir: str | os.PathLike) -> dict[str, Path]:
    """Build the tiny T5, VAE and LLaVA under ``out_dir/t5``, ``out_dir/vae`` and ``out_dir/llava``."""
    out_dir = Path(out_dir)
    return {"t5": build_tiny_t5(out_dir / "t5"), "vae": build_tiny_vae(out_dir / "vae"),
            "llava": build_tiny_llava(out_dir / "llava")}
