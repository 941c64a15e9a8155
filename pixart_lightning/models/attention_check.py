"""Every attention backend against the math kernel, forward and backward, at PixArt's caption and image lengths.

GPU kernels fail in ways a CPU cannot show (cuDNN with a padding mask has produced NaN gradients for some
lengths), so a GPU check calls :func:`check_attention_backends` and reads its rows; on CPU the same code runs
with small sizes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from pixart_lightning.models.attention import ATTENTION_BACKENDS, attention

_TOLERANCE = {torch.bfloat16: 5e-2, torch.float16: 1e-2, torch.float32: 1e-4}
"""Largest error relative to the reference's largest magnitude that still counts as equal, per dtype."""


def _inputs(batch: int, tokens: int, keys: int, heads: int, head_dim: int, masked: bool, seed: int) -> dict[str, Any]:
    """fp32 q, k, v, the output's upstream gradient and, for caption attention, a padding mask whose real lengths
    vary across the batch (the last sample uses every key)."""
    gen = torch.Generator().manual_seed(seed)
    q, grad_out = (torch.randn(batch, tokens, heads, head_dim, generator=gen) for _ in range(2))
    k, v = (torch.randn(batch, keys, heads, head_dim, generator=gen) for _ in range(2))
    mask = None
    if masked:
        lengths = torch.linspace(1, keys, batch).round().long()
        mask = (torch.arange(keys)[None] < lengths[:, None]).long()
    return {"q": q, "k": k, "v": v, "grad_out": grad_out.reshape(batch, tokens, heads * head_dim), "mask": mask}


def _run(backend: str, case: dict[str, Any], device: torch.device, dtype: torch.dtype) -> list[Tensor]:
    """The output and the gradients of q, k and v (in fp32) of one attention call."""
    q, k, v = (case[name].to(device, dtype).detach().requires_grad_() for name in ("q", "k", "v"))
    mask = None if case["mask"] is None else case["mask"].to(device)
    out = attention(q, k, v, mask, backend)
    out.backward(case["grad_out"].to(device, dtype))
    return [t.float() for t in (out.detach(), q.grad, k.grad, v.grad)]


def _relative_error(got: Sequence[Tensor], want: Sequence[Tensor]) -> float:
    """Worst of the outputs' max |got - want| / max |want|."""
    return max(float((g - w).abs().max() / w.abs().max().clamp(min=1e-12)) for g, w in zip(got, want))


def check_attention_backends(
    caption_lengths: Sequence[int] = (64, 77, 120),
    token_counts: Sequence[int] = (256, 1024, 4096),
    *,
    batch: int = 2,
    heads: int = 16,
    head_dim: int = 72,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cuda",
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One row per (backend, attention, tokens, keys): self-attention over each token count, and masked caption
    cross-attention of each token count over each caption length (the defaults are PixArt-XL's heads and
    caption lengths, 256-1024 px latents).

    Each backend runs in ``dtype`` forward and backward and is compared with the math kernel in fp32 on the same
    inputs. ``status`` is ``ok``, ``non-finite``, ``mismatch`` (error beyond the dtype's tolerance) or
    ``unavailable`` (the backend has no kernel for these inputs: not a failure by itself); ``error`` is the
    worst relative error of the output and the three gradients.
    """
    device = torch.device(device)
    cases = [("self", n, n) for n in token_counts] + [("cross", n, m) for n in token_counts for m in caption_lengths]
    rows = []
    for kind, tokens, keys in cases:
        case = _inputs(batch, tokens, keys, heads, head_dim, kind == "cross", seed)
        reference = _run("math", case, device, torch.float32)
        for backend in ATTENTION_BACKENDS:
            row = {"backend": backend, "attention": kind, "tokens": tokens, "keys": keys, "dtype": str(dtype)}
            try:
                got = _run(backend, case, device, dtype)
            except RuntimeError as err:  # SDPA has no kernel of this kind for these inputs on this device
                rows.append(row | {"status": "unavailable", "error": None, "reason": str(err).splitlines()[0]})
                continue
            error = _relative_error(got, reference)
            finite = all(bool(t.isfinite().all()) for t in got)
            status = "non-finite" if not finite else "mismatch" if error > _TOLERANCE[dtype] else "ok"
            rows.append(row | {"status": status, "error": error, "reason": None})
    return rows
