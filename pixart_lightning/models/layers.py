"""The backbone's embedding layers: timesteps, micro-conditions, class labels, captions and latent patches.

Parameter names follow the official DiT and PixArt-α checkpoints (``mlp``, ``embedding_table``, ``y_proj``,
``y_embedding``, ``proj``), so their state dicts load by key.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0, freq_shift: float = 0.0) -> Tensor:
    """Sinusoidal features of scalar ``t`` (B,) -> (B, dim), cosines first."""
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    args = t.float()[:, None] * torch.exp(-math.log(max_period) * exponent)[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Scalar -> sinusoid -> MLP, for timesteps and (as ``SizeEmbedder``) micro-conditions."""

    def __init__(self, hidden_size: int, freq_dim: int = 256, freq_shift: float = 0.0):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.freq_dim = freq_dim
        self.freq_shift = freq_shift

    def forward(self, t: Tensor) -> Tensor:
        t_freq = timestep_embedding(t, self.freq_dim, freq_shift=self.freq_shift)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class SizeEmbedder(TimestepEmbedder):
    """Embeds each of k scalars (image h and w, or the aspect ratio) and concatenates them."""

    def forward(self, s: Tensor) -> Tensor:  # (B, k) -> (B, k * hidden)
        return super().forward(s.reshape(-1)).reshape(s.shape[0], -1)


def _drop_mask(batch: int, prob: float, training: bool, force_drop_ids: Tensor | None, device) -> Tensor | None:
    """Which samples get the null condition: forced ids win, else random drops while training."""
    if force_drop_ids is not None:
        return force_drop_ids.to(device=device).bool()
    if training and prob > 0:
        return torch.rand(batch, device=device) < prob
    return None


class LabelEmbedder(nn.Module):
    """Class labels -> vectors; row ``num_classes`` is the null class used for guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels: Tensor, force_drop_ids: Tensor | None = None) -> Tensor:
        drop = _drop_mask(labels.shape[0], self.dropout_prob, self.training, force_drop_ids, labels.device)
        if drop is not None:
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


class Mlp(nn.Module):
    """Linear -> tanh-GELU -> Linear, keyed ``fc1``/``fc2`` as in timm and the official code."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CaptionEmbedder(nn.Module):
    """Projects caption features to the model width; the null caption is ``y_embedding``.

    The official code keeps ``y_embedding`` as a fixed random buffer (never trained); with
    ``learned=True`` it is a parameter instead. Captions may be shorter than ``num_tokens``
    (features trimmed per batch): a dropped caption takes the first L null tokens and keeps its
    own mask, which is what the official trainer sees for a padded caption.
    """

    def __init__(self, in_channels: int, hidden_size: int, dropout_prob: float, num_tokens: int, learned: bool):
        super().__init__()
        self.y_proj = Mlp(in_channels, hidden_size, hidden_size)
        null = torch.randn(num_tokens, in_channels) / in_channels**0.5
        if learned:
            self.y_embedding = nn.Parameter(null)
        else:
            self.register_buffer("y_embedding", null)
        self.dropout_prob = dropout_prob

    def forward(self, caption: Tensor, force_drop_ids: Tensor | None = None) -> Tensor:
        batch, length, _ = caption.shape
        if length > self.y_embedding.shape[0]:
            raise ValueError(f"caption has {length} tokens; this model takes at most {self.y_embedding.shape[0]}")
        drop = _drop_mask(batch, self.dropout_prob, self.training, force_drop_ids, caption.device)
        if drop is not None:
            null = self.y_embedding[None, :length].to(caption.dtype)
            caption = torch.where(drop[:, None, None], null, caption)
        return self.y_proj(caption)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches of any H x W latent -> tokens, row-major."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, H*W/p^2, D)
        return self.proj(x).flatten(2).transpose(1, 2)
