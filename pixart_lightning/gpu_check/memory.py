"""Device memory: recognising out-of-memory errors, giving memory back, and the largest batch that fits."""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch

OUT_OF_MEMORY_TEXTS = ("out of memory", "can't allocate memory")
"""What CUDA libraries and the CPU allocator say when memory runs out."""


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error``, or an error it was raised from, is the device running out of memory.

    ``torch.OutOfMemoryError`` is what the caching allocator raises, but cuBLAS, cuDNN, NCCL and compiled code
    report the same condition as a plain RuntimeError whose text says so (as does the CPU allocator), and frameworks re-raise it wrapped
    (Lightning, dynamo): the whole cause/context chain is read.
    """
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, torch.OutOfMemoryError):
            return True
        if isinstance(error, RuntimeError) and any(text in str(error).lower() for text in OUT_OF_MEMORY_TEXTS):
            return True
        error = error.__cause__ or error.__context__
    return False


def release_memory() -> None:
    """Collect dropped models and optimizers and hand their cached blocks back, so the next measurement starts clean."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def start_peak_window(device: torch.device) -> int:
    """Reset the device's peak-memory counter; the bytes allocated now (0 off a GPU, which has no counter)."""
    if device.type != "cuda":
        return 0
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak_gib(device: torch.device, baseline: int = 0) -> float | None:
    """GiB allocated at the peak since the window started, above ``baseline`` bytes (None off a GPU)."""
    return (torch.cuda.max_memory_allocated(device) - baseline) / 2**30 if device.type == "cuda" else None


def largest_batch(fits: Callable[[int], None], start: int, limit: int, time_left: Callable[[], float]) -> dict:
    """Double the batch from ``start`` until ``fits(batch)`` runs out of memory, ``limit`` is passed, or time is up.

    ``fits`` trains at that batch and raises on failure; any error other than out-of-memory propagates. Returns
    ``largest`` (the largest batch that ran, 0 if none did), ``out_of_memory_at`` (None if no batch failed) and
    ``stopped_by``: ``out of memory``, ``limit`` or ``time``. A doubling search bounds the answer within a factor
    of two; that is what a few minutes of GPU time allow.
    """
    largest, batch = 0, start
    while batch <= limit:
        if time_left() <= 0:
            return {"largest": largest, "out_of_memory_at": None, "stopped_by": "time"}
        try:
            fits(batch)
            ran_out = False
        except Exception as error:  # only running out of memory is an answer; anything else is a failure
            if not is_out_of_memory(error):
                raise
            ran_out = True
        release_memory()  # outside the handler: the error's traceback no longer holds the trial's tensors
        if ran_out:
            return {"largest": largest, "out_of_memory_at": batch, "stopped_by": "out of memory"}
        largest, batch = batch, batch * 2
    return {"largest": largest, "out_of_memory_at": None, "stopped_by": "limit"}
