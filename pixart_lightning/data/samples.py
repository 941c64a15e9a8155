"""Reading the parts of one webdataset sample, the same way everywhere, with bad parts raising ``ValueError``.

A raw sample is webdataset's dict of tar members (``__key__``, ``jpg``, ``txt``, ``json``, ...). Every
tool that reads samples (ingest, re-captioning, extraction, the training loader) goes through these
helpers, so a corrupt or odd sample is judged the same way by all of them, and each can skip and count
what raises here.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from pixart_lightning.data.buckets import nearest_bucket

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
"""Formats every reader takes as they are (training reads an image folder's files of these only)."""
PIL_EXTENSIONS = frozenset(ext.lstrip(".") for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)
"""Every file extension PIL opens (GIF, TIFF, BMP, ICO, ...): ingest takes all of them."""
SIDE_EXTENSIONS = ("txt", "json", "cls")
"""Caption, metadata and class label: files beside an image in a folder (``cat.jpg`` + ``cat.txt``), members of its
sample in a tar."""
WIDE_GRAY_MODES = frozenset({"I", "F", "I;16", "I;16B", "I;16L", "I;16N"})


def sample_name(raw: dict[str, Any]) -> str:
    """Where a raw sample came from, for skip counts: its image file when read from a folder (``cat.png`` and
    ``cat.jpg`` share a key), else ``url:key``."""
    return str(raw.get("__file__") or f"{raw.get('__url__', '')}:{raw.get('__key__', '?')}")


def image_member(raw: dict[str, Any]) -> str | None:
    """The extension of the sample's image member, if it has one."""
    return next((e for e in IMAGE_EXTENSIONS if e in raw), None)


def open_image(data: bytes) -> Image.Image:
    """Decode fully into upright RGB: EXIF orientation applied (phone photos), transparency over white.

    Raises (PIL's own errors) on a corrupt or truncated file.
    """
    image = Image.open(io.BytesIO(data))
    image.load()
    image = ImageOps.exif_transpose(image)
    if image.mode in WIDE_GRAY_MODES:
        image = _gray_to_8bit(image)
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image.convert("RGB")


def _gray_to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit grayscale (16-bit PNG and TIFF scans) as 8-bit: ``convert("RGB")`` clips them at 255,
    which turns almost every pixel white. Integers are read as 16-bit (65535 is white); floats by their range."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        low, high = float(values.min()), float(values.max())
        values = (values - low) * (255 / (high - low or 1))
    else:
        values = values / 257
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))


def sample_meta(raw: dict[str, Any]) -> dict[str, Any]:
    """The sample's json metadata ({} without one); ``ValueError`` when it is not a JSON object."""
    if "json" not in raw:
        return {}
    meta = json.loads(raw["json"])
    if not isinstance(meta, dict):
        raise ValueError(f"json metadata is a {type(meta).__name__}, not an object")
    return meta


def read_caption(raw: dict[str, Any], key: str, meta: dict[str, Any]) -> str:
    """The caption under ``key``: a tar member (``txt``, ``dense.txt``) or else a json string field.

    ``ValueError`` naming why there is none: ``no caption`` (absent), ``empty caption`` (blank),
    ``non-UTF-8 caption``, ``non-text caption`` (a json field that is no string).
    """
    if key in raw:
        try:
            text = raw[key].decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("non-UTF-8 caption") from None
    elif meta.get(key) is not None:
        text = meta[key]
        if not isinstance(text, str):
            raise ValueError("non-text caption")
    else:
        raise ValueError("no caption")
    if not text.strip():
        raise ValueError("empty caption")
    return text.strip()


def caption_text(raw: dict[str, Any], key: str, meta: dict[str, Any]) -> str | None:
    """:func:`read_caption`, or None when there is none (for tools that need not say why)."""
    try:
        return read_caption(raw, key, meta)
    except ValueError:
        return None


def original_size(meta: dict[str, Any], fallback: tuple[int, int]) -> tuple[int, int]:
    """(h, w) before any resize: json ``original_size``, or img2dataset's ``original_height``/``_width``."""
    size = meta.get("original_size") or (meta.get("original_height"), meta.get("original_width"))
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        return fallback
    return (h, w) if h > 0 and w > 0 else fallback


def fit_to_bucket(image: Image.Image, buckets: dict[float, tuple[int, int]]) -> tuple[float, Tensor]:
    """The image's nearest bucket, and the image scaled to cover it and centre-cropped: uint8 (3, h, w).

    Only the source region that lands in the bucket is resampled, so a 20000 x 2 banner costs no more
    than the bucket itself.
    """
    ratio, (h, w) = nearest_bucket(image.height, image.width, buckets)
    if (image.height, image.width) != (h, w):
        scale = max(h / image.height, w / image.width)
        box_w, box_h = w / scale, h / scale
        left, top = (image.width - box_w) / 2, (image.height - box_h) / 2
        image = image.resize((w, h), Image.BICUBIC, box=(left, top, left + box_w, top + box_h))
    return ratio, torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
