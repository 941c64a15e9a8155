"""What one rank x worker slot reads: its sources per epoch, their samples decoded, in a seeded shuffle buffer."""

from __future__ import annotations

import dataclasses
import logging
import sys
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pixart_lightning.data.positions import Cursor, Ref, ShuffleBuffer, WorkerPosition, ref_list
from pixart_lightning.data.sources import Handler, ImageFolder, Ordinals, Source, StreamedTar, TarIndex, is_remote

log = logging.getLogger(__name__)

Decode = Callable[[dict[str, Any], Ref], "dict[str, Any] | None"]


class SlotReader:
    """The decoded samples of one slot in shuffled order, over endless epochs; each epoch permutes the sources
    with the seed.

    With at least as many sources as slots, each slot reads whole sources of its own, streamed; with fewer, every
    slot reads every source but takes only its samples ``slot``, ``slot + slots``, ... of each, through the
    source's index, so that it reads only their bytes. :attr:`cursor` and :attr:`buffer` are kept current as
    samples are read and handed out: a copy of them taken whenever :meth:`samples` has just yielded is a
    position to resume from (:meth:`restore`).
    """

    def __init__(
        self, sources: list[str], seed: int, slot: int, slots: int, buffer: ShuffleBuffer, decode: Decode,
        handler_for: Callable[[str], Handler],
    ):
        """``decode(raw, ref)``: the decoded sample, or None when it is unusable; ``handler_for(url)``: the read
        error handler for a source."""
        self.sources, self.seed, self.slot, self.slots = sources, seed, slot, slots
        self.buffer, self.decode, self.handler_for = buffer, decode, handler_for
        self.shared = len(sources) < slots
        self.first, self.stride = (slot, slots) if self.shared else (0, 1)
        self.cursor = Cursor(ordinal=self.first)
        self._opened: dict[int, Source] = {}

    def epoch_sources(self, epoch: int) -> list[int]:
        """The indices of the sources this slot reads in an epoch, in reading order."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.sources))
        return order.tolist() if self.shared else order[self.slot::self.slots].tolist()

    def _source(self, index: int) -> Source:
        """A folder is read by its image list, a local tar shared by the slots through its index, any other tar
        streamed whole."""
        if index not in self._opened:
            self._opened[index] = self._open(self.sources[index])
        return self._opened[index]

    def _open(self, url: str) -> Source:
        if Path(url).is_dir():
            return ImageFolder.list(url)
        if self.shared and not is_remote(url):
            try:
                return TarIndex.build(url)
            except (OSError, tarfile.ReadError):
                pass  # not an uncompressed tar, or unreadable: streaming reports it
        return StreamedTar(url)

    def read(self, index: int, ordinals: Ordinals) -> Iterator[tuple[int, dict[str, Any]]]:
        """(ordinal, raw sample) of source ``index`` at the given ordinals; what cannot be read is reported."""
        return self._source(index).read(ordinals, self.handler_for(self.sources[index]))

    def samples(self) -> Iterator[dict[str, Any]]:
        """Decoded samples in the buffer's random order, from :attr:`cursor` on; they end only when an epoch has
        no usable sample for this slot and the buffer is empty."""
        cursor, buffer = self.cursor, self.buffer
        # A pause at a batch boundary can leave the buffer over its byte budget (one large sample can need several
        # pops): pop first, as the uninterrupted run would, so a restored buffer continues the same sequence.
        while not cursor.draining and buffer.full():
            yield buffer.pop()
        while True:
            while cursor.draining and len(buffer):
                yield buffer.pop()
            cursor.draining = False
            sources = self.epoch_sources(cursor.epoch)
            while cursor.source < len(sources):
                index = sources[cursor.source]
                for ordinal, raw in self.read(index, range(cursor.ordinal, sys.maxsize, self.stride)):
                    cursor.ordinal = ordinal + self.stride
                    sample = self.decode(raw, (index, ordinal))
                    if sample is None:
                        continue
                    cursor.produced = True
                    buffer.add(sample)
                    while buffer.full():
                        yield buffer.pop()
                cursor.source, cursor.ordinal = cursor.source + 1, self.first
            if not cursor.produced and not len(buffer):
                return
            # After an epoch with no usable sample of its own, the slot drains its buffer instead of spinning.
            cursor.epoch, cursor.source, cursor.draining, cursor.produced = cursor.epoch + 1, 0, not cursor.produced, False

    def restore(self, position: WorkerPosition) -> dict[Ref, dict[str, Any]]:
        """Take the position's cursor, RNG state and buffered samples (re-read and decoded); the decoded samples
        its bucket queues name, by reference (each a fresh copy: over epochs a sample can wait twice)."""
        buffered = ref_list(position.buffer)
        queued = [ref for refs in position.pending.values() for ref in ref_list(refs)]
        samples = self._reread(buffered + queued)
        missing = {*buffered, *queued} - samples.keys()
        if missing:
            log.warning("%d samples of the saved data position cannot be read again: the resumed data differs "
                        "from an uninterrupted run's", len(missing))
        for ref in buffered:
            if ref in samples:
                self.buffer.add(dict(samples[ref]))
        self.buffer.rng.bit_generator.state = position.rng
        self.cursor = dataclasses.replace(position.cursor)
        return samples

    def _reread(self, refs: list[Ref]) -> dict[Ref, dict[str, Any]]:
        """The decoded samples at these references, each source read once, in ordinal order."""
        by_source: dict[int, list[int]] = {}
        for index, ordinal in sorted(set(refs)):
            by_source.setdefault(index, []).append(ordinal)
        samples: dict[Ref, dict[str, Any]] = {}
        for index, ordinals in by_source.items():
            for ordinal, raw in self.read(index, ordinals):
                sample = self.decode(raw, (index, ordinal))
                if sample is not None:
                    samples[index, ordinal] = sample
        return samples
