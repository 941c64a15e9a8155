"""Reading training samples from webdataset shards (or an image folder) into same-shape batches.

One reader serves every source: the synthetic world's shards, img2dataset-style tars
(``.jpg``/``.png``/``.webp`` + ``.txt`` + ``.json``) and plain image folders (captions in ``.txt``/``.json``
beside the images). The stream is an endless sequence of epochs that is a pure function of
(seed, rank, worker): each epoch permutes the shards with the seed, deals them to the
rank × worker slots, and shuffles samples in a seeded buffer. That makes the data position a single
number, the batches already consumed, so a resumed run skips exactly those and continues with the
batch an uninterrupted run would have seen next (:attr:`ShardStream.skip_batches`).

Multi-scale batches come from aspect-ratio buckets: the bucket of every batch index is drawn from a
seeded schedule weighted by the dataset's bucket counts, so at each step every rank and worker
trains the same bucket (same shapes, same cost) and no rank waits for another.
"""

from __future__ import annotations

import io
import json
import logging
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import braceexpand
import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import tarfile_samples

from ..config import DataSection
from .buckets import bucket_table, nearest_bucket

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
FEATURE_KEY = "t5.npy"  # precomputed caption features: a float16 or float32 (L, D) array trimmed to the caption
MANIFEST_NAMES = ("world.json", "manifest.json")


class DataError(ValueError):
    """A data source problem the user must fix (nothing to read, unreadable manifest)."""


def resolve_sources(spec: str) -> list[str]:
    """Shard urls from a folder, a brace pattern or a single tar; ``[folder]`` for an image folder."""
    path = Path(spec)
    if path.is_dir():
        tars = sorted(str(p) for p in path.glob("*.tar"))
        if tars:
            return tars
        if any(p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS for p in path.rglob("*")):
            return [str(path)]
        raise DataError(f"{spec}: the folder holds no .tar shards and no images")
    urls = list(braceexpand.braceexpand(spec))
    missing = [u for u in urls if "://" not in u and not Path(u).is_file()]
    if missing:
        raise DataError(f"{spec}: {len(missing)} of {len(urls)} shards do not exist (first: {missing[0]})")
    return urls


def read_manifest(spec: str) -> dict[str, Any]:
    """The dataset manifest (bucket counts etc.) beside the shards, or {} when there is none."""
    folder = Path(spec) if Path(spec).is_dir() else Path(next(iter(braceexpand.braceexpand(spec)))).parent
    for name in MANIFEST_NAMES:
        if (folder / name).is_file():
            return json.loads((folder / name).read_text())
    return {}


def folder_samples(folder: str, slot: int = 0, slots: int = 1) -> Iterator[dict[str, Any]]:
    """Raw samples of an image folder in sorted order (every ``slots``-th from ``slot``): image bytes plus
    any .txt/.json/.cls beside it."""
    root = Path(folder)
    images = sorted(p for p in root.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
    for image in images[slot::slots]:
        sample: dict[str, Any] = {"__key__": str(image.relative_to(root).with_suffix("")), "__url__": folder}
        sample[image.suffix.lower().lstrip(".")] = image.read_bytes()
        for ext in ("txt", "json", "cls"):
            side = image.with_suffix("." + ext)
            if side.is_file():
                sample[ext] = side.read_bytes()
        yield sample


@dataclass
class Skipped:
    """Why samples were dropped; sent along with each batch so the trainer can log and bound them."""

    counts: dict[str, int] = field(default_factory=dict)

    def add(self, reason: str, key: str = "?", warn: bool = True) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if warn:
            log.warning("skipped sample %s: %s", key, reason)

    def take(self) -> dict[str, int]:
        counts, self.counts = self.counts, {}
        return counts


class ShardStream(IterableDataset):
    """Endless, seeded stream of collated batches for one rank (worker-aware)."""

    def __init__(
        self, spec: DataSection, granularity: int = 8, rank: int = 0, world_size: int = 1, skip_batches: int = 0,
        captions: bool = True,
    ):
        """``granularity``: bucket sides are multiples of it (patch size x VAE factor); ``captions=False``
        (stage 1) accepts samples without a caption, e.g. ImageNet-style ``jpg`` + ``cls`` shards."""
        super().__init__()
        self.spec, self.granularity, self.rank, self.world_size = spec, granularity, rank, world_size
        self.captions = captions
        self.skip_batches = skip_batches
        self.sources = resolve_sources(spec.shards)
        self.buckets = self._buckets()
        self.schedule_weights = self._schedule_weights()

    # ----------------------------------------------------------------- setup
    def _buckets(self) -> dict[float, tuple[int, int]]:
        s = self.spec
        if not s.multi_scale:
            return {1.0: (s.resolution, s.resolution)}
        table = bucket_table(s.resolution, self.granularity)
        return {r: hw for r, hw in table.items() if s.min_ratio - 1e-6 <= r <= s.max_ratio + 1e-6}

    def _schedule_weights(self) -> np.ndarray | None:
        """Per-bucket probabilities for the shared schedule, from the manifest's counts (None: greedy)."""
        if len(self.buckets) == 1:
            return None
        counts = read_manifest(self.spec.shards).get("bucket_counts") or {}
        weights = np.zeros(len(self.buckets))
        for name, n in counts.items():
            h, w = (int(v) for v in name.split("x"))
            ratio, _ = nearest_bucket(h, w, self.buckets)
            weights[list(self.buckets).index(ratio)] += n
        if weights.sum() == 0:
            log.warning("no bucket counts in the dataset manifest: batches take the first bucket to fill, "
                        "so ranks may train different shapes at the same step")
            return None
        return weights / weights.sum()

    # ----------------------------------------------------------------- stream
    def _slot(self) -> tuple[int, int, int]:
        """(this worker's slot, number of slots, number of workers).

        A fresh DataLoader always asks worker 0 first, but after skipping B batches the next one
        belongs to worker B % workers of the unbroken run; so worker w plays that run's worker
        (w + B) % workers, shards, shuffle and schedule included.
        """
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        worker = (worker + self.skip_batches) % workers
        return self.rank * workers + worker, self.world_size * workers, workers

    def _raw_samples(self, epoch: int, slot: int, slots: int) -> Iterator[dict[str, Any]]:
        order = np.random.default_rng([self.spec.seed, epoch]).permutation(len(self.sources))
        urls = [self.sources[i] for i in order]
        by_shard = len(urls) >= slots
        mine = urls[slot::slots] if by_shard else urls
        for url in mine:
            if Path(url).is_dir():  # an image folder is one source split by sample
                yield from folder_samples(url, slot, slots)
                continue
            for i, sample in enumerate(self._tar_samples(url)):
                if by_shard or i % slots == slot:
                    yield sample

    def _tar_samples(self, url: str) -> Iterator[dict[str, Any]]:
        def handler(err: Exception) -> bool:
            log.warning("%s: %s", url, err)
            self.skipped.add(f"unreadable tar data ({type(err).__name__})", url)
            return True

        yield from tarfile_samples([{"url": url}], handler=handler)

    def _decoded(self, slot: int, slots: int) -> Iterator[dict[str, Any]]:
        """Decoded samples of endless epochs, shuffled in a seeded buffer."""
        rng = np.random.default_rng([self.spec.seed, 1, slot])
        buffer: list[dict[str, Any]] = []
        epoch = 0
        while True:
            produced = 0
            for raw in self._raw_samples(epoch, slot, slots):
                sample = self._decode(raw)
                if sample is None:
                    continue
                produced += 1
                buffer.append(sample)
                if len(buffer) >= self.spec.shuffle_buffer:
                    yield buffer.pop(int(rng.integers(len(buffer))))
            if produced == 0 and not buffer:
                raise DataError(f"{self.spec.shards}: no usable sample for slot {slot} of {slots} "
                                f"(skipped so far: {self.skipped.counts})")
            epoch += 1
            if produced == 0:  # a slot with no shard of its own drains its buffer instead of spinning
                while buffer:
                    yield buffer.pop(int(rng.integers(len(buffer))))

    def _decode(self, raw: dict[str, Any]) -> dict[str, Any] | None:
        """Image, caption and metadata of one raw sample; None (counted) when it cannot be used."""
        key = raw.get("__key__", "?")
        ext = next((e for e in IMAGE_EXTENSIONS if e in raw), None)
        if ext is None:
            self.skipped.add("no image", key)
            return None
        try:
            meta = json.loads(raw["json"]) if "json" in raw else {}
            image = Image.open(io.BytesIO(raw[ext]))
            image = image.convert("RGB")
        except Exception as err:  # noqa: BLE001 - any undecodable input is skipped, never fatal
            self.skipped.add(f"undecodable ({type(err).__name__})", key)
            return None
        caption = self._caption(raw, meta)
        if caption is None and self.captions:
            self.skipped.add("empty or non-UTF-8 caption", key)
            return None
        aesthetic = meta.get("aesthetic")
        if self.spec.min_aesthetic is not None and (aesthetic is None or aesthetic < self.spec.min_aesthetic):
            self.skipped.add("below min_aesthetic", key, warn=False)  # a filter, not bad data
            return None
        label = int(raw["cls"]) if "cls" in raw else int(meta.get("label", -1))
        h, w = meta.get("original_size") or (image.height, image.width)
        sample = {"key": key, "image": image, "caption": caption, "label": label, "original_size": (h, w)}
        if FEATURE_KEY in raw:
            sample["caption_features"] = np.load(io.BytesIO(raw[FEATURE_KEY]))
        return sample

    def _caption(self, raw: dict[str, Any], meta: dict[str, Any]) -> str | None:
        key = self.spec.caption_key
        try:
            text = raw[key].decode("utf-8") if key in raw else meta.get(key, "")
        except UnicodeDecodeError:
            return None
        text = (text or "").strip()
        return text or None

    def _to_bucket(self, sample: dict[str, Any]) -> tuple[float, Tensor]:
        """Resize to cover the sample's bucket and centre-crop; uint8 (3, h, w) until collated."""
        image: Image.Image = sample["image"]
        ratio, (h, w) = nearest_bucket(image.height, image.width, self.buckets)
        scale = max(h / image.height, w / image.width)
        if (image.height, image.width) != (h, w):
            size = (max(w, round(image.width * scale)), max(h, round(image.height * scale)))
            image = image.resize(size, Image.BICUBIC)
            top, left = (image.height - h) // 2, (image.width - w) // 2
            image = image.crop((left, top, left + w, top + h))
        return ratio, torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)

    def _schedule(self, batch_index: int) -> float | None:
        if self.schedule_weights is None:
            return None
        rng = np.random.default_rng([self.spec.seed, 2, batch_index])
        return list(self.buckets)[int(rng.choice(len(self.buckets), p=self.schedule_weights))]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.skipped = Skipped()
        slot, slots, workers = self._slot()
        worker = slot - self.rank * workers
        # Global batch b comes from worker b % workers (DataLoader round-robin): skip this worker's share.
        to_skip = max(0, (self.skip_batches - worker + workers - 1) // workers)
        pending: dict[float, deque] = {r: deque() for r in self.buckets}
        # Samples of buckets not scheduled now wait; past this many the oldest is dropped (counted, not warned:
        # the schedule follows the dataset's bucket frequencies, so this only trims random fluctuations).
        cap = 16 * self.spec.batch_size
        batch_index = worker + to_skip * workers
        target = self._schedule(batch_index)
        for sample in self._decoded(slot, slots):
            ratio, pixels = self._to_bucket(sample)
            sample["pixels"], sample["bucket"] = pixels, ratio
            queue = pending[ratio]
            queue.append(sample)
            if target is not None and ratio != target and len(queue) > cap:
                queue.popleft()
                self.skipped.add("bucket overflow", sample["key"], warn=False)
            ready = target if target is not None else ratio
            if len(pending[ready]) < self.spec.batch_size:
                continue
            batch = [pending[ready].popleft() for _ in range(self.spec.batch_size)]
            if to_skip > 0:
                to_skip -= 1
            else:
                yield collate(batch, ready, self.skipped.take())
            batch_index += workers
            target = self._schedule(batch_index)


def collate(samples: Sequence[dict[str, Any]], ratio: float, skipped: dict[str, int]) -> dict[str, Any]:
    """Stack one bucket's samples; precomputed caption features are padded to the batch's longest."""
    batch: dict[str, Any] = {
        "pixels": torch.stack([s["pixels"] for s in samples]).float() / 127.5 - 1.0,
        "caption": [s["caption"] or "" for s in samples],
        "key": [s["key"] for s in samples],
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
        "original_size": torch.tensor([s["original_size"] for s in samples], dtype=torch.float32),
        "aspect_ratio": torch.full((len(samples), 1), float(ratio)),
        "skipped": skipped,
    }
    if all("caption_features" in s for s in samples):
        feats = [torch.from_numpy(np.asarray(s["caption_features"], dtype=np.float32)) for s in samples]
        length = max(f.shape[0] for f in feats)
        batch["caption_features"] = torch.zeros(len(feats), length, feats[0].shape[1])
        batch["caption_mask"] = torch.zeros(len(feats), length, dtype=torch.long)
        for i, f in enumerate(feats):
            batch["caption_features"][i, : f.shape[0]] = f
            batch["caption_mask"][i, : f.shape[0]] = 1
    return batch

