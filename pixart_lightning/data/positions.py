"""Where a data worker stands in its stream, as a value small enough to travel with every batch and be saved.

A worker's stream is a pure function of (seed, rank, worker), so its state after any batch is: how far its
reading has come (:class:`Cursor`), the shuffle RNG's state, and which samples wait in the shuffle buffer and in
the bucket queues. Those samples are named by reference, (source index, sample ordinal), not stored: a resumed
worker re-reads and re-decodes just them, jumps to the cursor without reading anything before it, and goes on
with exactly the batches an uninterrupted run would have produced (:class:`WorkerPosition`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from torch import Tensor

Ref = tuple[int, int]
"""A sample by (index of its source in ``ShardStream.sources``, its ordinal within that source)."""


def ref_array(refs: list[Ref]) -> np.ndarray:
    """References as one (n, 2) int64 array, which pickles as a single buffer: a position with thousands of
    buffered samples then costs the training process microseconds, not milliseconds, to receive with each batch."""
    return np.array(refs, dtype=np.int64).reshape(-1, 2)


def ref_list(refs: np.ndarray) -> list[Ref]:
    return [(source, ordinal) for source, ordinal in refs.tolist()]


@dataclass
class Cursor:
    """How far a slot's reading has come: in ``epoch``, the ``source``-th of the slot's sources for that epoch,
    whose next sample to read is ``ordinal``; whether the epoch has given a usable sample yet (``produced``), and
    whether the buffer is being emptied after an epoch that gave none (``draining``)."""

    epoch: int = 0
    source: int = 0
    ordinal: int = 0
    produced: bool = False
    draining: bool = False


@dataclass
class WorkerPosition:
    """A worker's state right after it produced batch number ``batch`` of its rank's stream.

    ``worker`` is the worker of the original run that this one plays (``ShardStream._slot``), which keys the
    positions a data module keeps. An object, not a dict, so that the DataLoader's collation and pinning pass it
    through without walking its contents (not frozen: Lightning's default batch transfer rebuilds dataclasses).
    """

    worker: int
    batch: int
    cursor: Cursor
    rng: dict[str, Any]
    """The shuffle RNG's ``bit_generator.state``."""
    buffer: np.ndarray
    """The shuffle buffer's samples in buffer order (:func:`ref_array`)."""
    pending: dict[float, np.ndarray]
    """Per bucket (aspect ratio) with samples waiting, its queue in order."""

    def to_state(self) -> dict[str, Any]:
        """Plain containers only: checkpoints are loaded with ``weights_only=True``."""
        return {"worker": self.worker, "batch": self.batch, "cursor": dataclasses.asdict(self.cursor), "rng": self.rng,
                "buffer": ref_list(self.buffer), "pending": {r: ref_list(q) for r, q in self.pending.items()}}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> WorkerPosition:
        return cls(worker=state["worker"], batch=state["batch"], cursor=Cursor(**state["cursor"]), rng=state["rng"],
                   buffer=ref_array(state["buffer"]), pending={r: ref_array(q) for r, q in state["pending"].items()})


def decoded_bytes(sample: dict[str, Any]) -> int:
    """Memory a decoded sample holds in its tensors and image (its strings and numbers are left out)."""
    total = 0
    for value in sample.values():
        if isinstance(value, Tensor):
            total += value.nbytes
        elif isinstance(value, Image.Image):
            total += value.width * value.height * len(value.getbands())
    return total


class ShuffleBuffer:
    """Samples held back for shuffling, at most ``capacity`` of them and at most ``budget_bytes`` of decoded data.

    A sample is added, then random ones are taken out for as long as the buffer is over either bound, so it
    rests within both; the RNG is seeded, which keeps the order a pure function of the stream.
    """

    def __init__(self, capacity: int, budget_bytes: float, rng: np.random.Generator):
        self.capacity, self.budget_bytes, self.rng = capacity, budget_bytes, rng
        self.samples: list[dict[str, Any]] = []
        self.sizes: list[int] = []
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self.samples)

    def add(self, sample: dict[str, Any]) -> None:
        self.samples.append(sample)
        self.sizes.append(decoded_bytes(sample))
        self.nbytes += self.sizes[-1]

    def full(self) -> bool:
        return len(self.samples) >= self.capacity or self.nbytes > self.budget_bytes

    def pop(self) -> dict[str, Any]:
        """A random sample, taken out."""
        i = int(self.rng.integers(len(self.samples)))
        self.nbytes -= self.sizes.pop(i)
        return self.samples.pop(i)

    def refs(self) -> np.ndarray:
        return ref_array([sample["ref"] for sample in self.samples])
