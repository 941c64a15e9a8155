"""The on-disk form of precomputed features: one ``features.safetensors`` member per webdataset sample.

It holds any of:

- ``latent_mean``, ``latent_std``: the VAE posterior's moments (C, h, w), unscaled, at the sample's
  aspect-ratio bucket size. Both are kept, not one draw, so that training draws a fresh posterior
  sample every time it sees the image, as on-the-fly encoding does (and as PixArt-α's loader does
  with its stored mean and std); a single stored draw would freeze that noise for every epoch.
- ``t5``: the caption's T5 features (L, D) for its L real tokens only, in fp16 or bf16. The training
  loader pads them per batch to the batch's longest caption.

  Optionally packed losslessly (``compress_t5``): a 16-bit float's high byte is its sign and exponent,
  and features of one caption share few exponents, so that byte plane deflates to about 40 % (bf16);
  the low bytes (mantissa) are near random and stay as they are. bf16 features then take about 70 %
  of their raw size, i.e. 36 % of PixArt-α's fp32 (120, 4096) file even for a caption of the full 120
  tokens, for about 3 ms of decompression per sample in the loader (``benchmarks/data_loader.py``).

safetensors rather than ``.npy``: it keeps bf16 (numpy has no bf16) and, like ``.npy`` without pickle,
cannot run code when an untrusted shard is read.
"""

from __future__ import annotations

import sys
import zlib

import numpy as np
import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from torch import Tensor

FEATURES_KEY = "features.safetensors"
TENSOR_NAMES = ("latent_mean", "latent_std", "t5")
PACKED_DTYPES = (torch.float16, torch.bfloat16)  # index = the code stored in ``t5_packed_shape``
assert sys.byteorder == "little", "the packed T5 layout takes byte 1 of each 16-bit value as its high byte"


def pack_t5(features: Tensor) -> dict[str, Tensor]:
    """Lossless packing of 16-bit (L, D) features: deflated high bytes, raw low bytes, shape and dtype."""
    if features.dtype not in PACKED_DTYPES:
        raise ValueError(f"only fp16 and bf16 features are packed, not {features.dtype}")
    planes = features.detach().cpu().contiguous().view(torch.uint8).view(-1, 2)
    high = zlib.compress(planes[:, 1].numpy().tobytes(), 2)  # level 2: as small as 6 here, several times faster
    shape = [*features.shape, PACKED_DTYPES.index(features.dtype)]
    return {"t5_high_z": torch.frombuffer(bytearray(high), dtype=torch.uint8), "t5_low": planes[:, 0].clone(),
            "t5_packed_shape": torch.tensor(shape, dtype=torch.int64)}


def unpack_t5(tensors: dict[str, Tensor]) -> Tensor:
    length, dim, code = tensors["t5_packed_shape"].tolist()
    planes = np.empty((length * dim, 2), dtype=np.uint8)
    planes[:, 0] = tensors["t5_low"].numpy()
    planes[:, 1] = np.frombuffer(zlib.decompress(tensors["t5_high_z"].numpy().tobytes()), dtype=np.uint8)
    return torch.from_numpy(planes).view(PACKED_DTYPES[code]).view(length, dim)


def encode_features(compress_t5: bool = False, **tensors: Tensor | None) -> bytes:
    """Serialise the given feature tensors (``None`` ones are left out); ``t5`` packed if ``compress_t5``."""
    unknown = set(tensors) - set(TENSOR_NAMES)
    if unknown:
        raise ValueError(f"unknown feature tensors {sorted(unknown)}; valid: {TENSOR_NAMES}")
    out = {k: v.detach().cpu().contiguous() for k, v in tensors.items() if v is not None}
    if compress_t5 and "t5" in out:
        out |= pack_t5(out.pop("t5"))
    return save_bytes(out)


def decode_features(data: bytes) -> dict[str, Tensor]:
    """The feature tensors of one sample; a member that does not parse raises ``ValueError``."""
    try:
        tensors = load_bytes(data)
        if "t5_packed_shape" in tensors:
            tensors = {k: v for k, v in tensors.items() if not k.startswith("t5_")} | {"t5": unpack_t5(tensors)}
    except Exception as err:  # safetensors and zlib raise their own error types for bad bytes
        raise ValueError(f"unreadable {FEATURES_KEY}: {err}") from err
    if ("latent_mean" in tensors) != ("latent_std" in tensors):
        raise ValueError("latent_mean and latent_std come together")
    if "latent_mean" in tensors and not (
            tensors["latent_mean"].ndim == 3 and tensors["latent_std"].shape == tensors["latent_mean"].shape):
        raise ValueError(f"latent moments must both be (C, h, w), got {tuple(tensors['latent_mean'].shape)} "
                         f"and {tuple(tensors['latent_std'].shape)}")
    if "t5" in tensors and tensors["t5"].ndim != 2:
        raise ValueError(f"t5 features must be (tokens, dim), got {tuple(tensors['t5'].shape)}")
    return tensors
