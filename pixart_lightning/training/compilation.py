"""``torch.compile`` of the transformer blocks, with a fallback to eager where compiling cannot work."""

from __future__ import annotations

import logging
import shutil

import torch
from torch import nn

log = logging.getLogger(__name__)


def compile_unavailable(device: torch.device) -> str | None:
    """Why blocks cannot be compiled for ``device`` here, or None if they can."""
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile does not support this Python build"
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "Triton is not installed (GPU code generation needs it)"
    if device.type == "cpu" and not any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")):
        return "no C++ compiler on PATH (CPU code generation needs one)"
    return None


def compile_blocks(blocks: nn.ModuleList, device: torch.device) -> bool:
    """Compile each block in place; False, with a warning, where compilation is unavailable.

    Per block rather than the whole model (as torchtitan does): the identical blocks share one compiled
    graph, FSDP's per-block all-gathers and activation checkpointing stay outside the graphs, and shapes
    that vary per batch (caption length, aspect-ratio buckets) recompile one small graph. A block that
    fails to compile at its first call runs eagerly (``suppress_errors``) with torch's warning.
    """
    reason = compile_unavailable(device)
    if reason is not None:
        log.warning("model.compile=true, but %s: the blocks run eagerly", reason)
        return False
    torch._dynamo.config.suppress_errors = True
    for block in blocks:
        if getattr(block, "_compiled_call_impl", None) is None:
            block.compile()
    return True
