"""Multi-head attention for the backbone: the kernel choice, and the self- and cross-attention layers.

One function, :func:`attention`, computes every attention in the model. On GPUs it takes PyTorch's fused SDPA
kernels, restricted to the one ``backend`` names; on CPU, short sequences take two batched matmuls instead.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

CPU_MATMUL_ATTENTION = 256 * 256
"""On CPU, attention over at most this many (query, key) pairs per head takes two batched matmuls instead of
torch's fused kernel, which is built for long sequences: 1.5x faster at the demo's 36 tokens, about even at 256,
slower from about 576 on (docs/performance.md)."""

ATTENTION_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")
"""``auto``: matmuls on CPU for short sequences, else PyTorch's own choice among its fused kernels, except cuDNN
when there is a mask; the others force that one SDPA kernel (an error where it has none for the inputs)."""

_FORCED_SDPA = {
    "flash": [SDPBackend.FLASH_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
    "math": [SDPBackend.MATH],
}
# cuDNN attention with a padding mask has open bugs (NaN in grad_q at some sequence lengths, pytorch issue
# 196678), and it builds a new graph for every new key length, which masked (caption) attention varies per batch.
# Without a mask auto leaves PyTorch's choice alone, cuDNN included.
_MASKED_AUTO_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _sdpa_kernels(backend: str, masked: bool) -> AbstractContextManager:
    """The context that restricts SDPA to the kernels ``backend`` allows."""
    if backend == "auto":
        return sdpa_kernel(_MASKED_AUTO_SDPA) if masked else nullcontext()
    if backend not in _FORCED_SDPA:
        raise ValueError(f"attention backend {backend!r}: valid choices are {', '.join(ATTENTION_BACKENDS)}")
    return sdpa_kernel(_FORCED_SDPA[backend])


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, backend: str = "auto") -> Tensor:
    """softmax(q kᵀ / √d) v for (B, tokens, heads, head_dim) inputs -> (B, N, heads * head_dim).

    ``mask`` (B, M) is 1 where a key may be attended to. ``backend`` is one of ``ATTENTION_BACKENDS``. GPUs take
    PyTorch's fused kernels (flash, memory-efficient, cuDNN), which read this layout as strided views without copies.
    """
    B, N, H, d = q.shape
    M = k.shape[1]
    if backend == "auto" and q.device.type == "cpu" and N * M <= CPU_MATMUL_ATTENTION:
        return _matmul_attention(q, k, v, mask)
    attn_mask = None if mask is None else mask.bool()[:, None, None, :]  # (B, 1, 1, M); True = attend
    with _sdpa_kernels(backend, masked=mask is not None):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask)
    return out.transpose(1, 2).reshape(B, N, H * d)


def _matmul_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """:func:`attention` as two batched matmuls (CPU, short sequences)."""
    B, N, H, d = q.shape
    q, k, v = (t.transpose(1, 2).reshape(B * H, -1, d) for t in (q, k, v))  # heads into the batch
    if mask is None:
        scores = torch.bmm(q, k.transpose(1, 2)).mul_(d**-0.5)
    else:  # the padding's additive bias, broadcast over the queries by baddbmm
        bias = (mask.bool().logical_not() * torch.finfo(q.dtype).min).to(q.dtype).repeat_interleave(H, dim=0)
        scores = torch.baddbmm(bias[:, None], q, k.transpose(1, 2), alpha=d**-0.5)
    out = torch.bmm(scores.softmax(dim=-1), v)  # (B * H, N, d)
    return out.view(B, H, N, d).transpose(1, 2).reshape(B, N, H * d)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection (rows ordered q, k, v)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, backend: str = "auto") -> Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, D // self.num_heads).unbind(2)
        return self.proj(attention(q, k, v, backend=backend))


class CrossAttention(nn.Module):
    """Image tokens attend to caption tokens; ``kv_linear`` rows are ordered k, v."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, y: Tensor, mask: Tensor | None, backend: str = "auto") -> Tensor:
        B, N, D = x.shape
        head_dim = D // self.num_heads
        q = self.q_linear(x).view(B, N, self.num_heads, head_dim)
        k, v = self.kv_linear(y).view(B, y.shape[1], 2, self.num_heads, head_dim).unbind(2)
        return self.proj(attention(q, k, v, mask, backend))
