"""Reading training samples from webdataset shards (or an image folder) into same-shape batches.

One reader serves every source: the synthetic world's shards, img2dataset-style tars
(``.jpg``/``.png``/``.webp`` + ``.txt`` + ``.json``) and plain image folders (captions in ``.txt``/``.json``
beside the images), and shards of precomputed features (:mod:`.features`: VAE latents at the bucket's size
and trimmed T5 features, so neither encoder runs in the training loop). The stream is an endless sequence of epochs that is a pure function of
(seed, rank, worker): each epoch permutes the shards with the seed, deals them to the
rank × worker slots (with fewer shards than slots, every slot takes every n-th sample of every shard and reads
only those: :mod:`.sources`), and shuffles samples in a seeded buffer bounded in samples and in bytes.

Every batch carries its worker's :class:`~.positions.WorkerPosition`, the state that stream is in right after
it. A stream resumed from the positions of the last consumed batches jumps there without reading what came
before, re-decodes only the samples its buffers held, and continues with the batches an uninterrupted run
would have produced; without positions (an older checkpoint) each worker replays, decoding and dropping its
share of the consumed batches (:attr:`ShardStream.skip_batches`).

Multi-scale batches come from aspect-ratio buckets: the bucket of every batch index is drawn from a
seeded schedule weighted by the dataset's bucket counts, so at each step every rank and worker
trains the same bucket (same shapes, same cost) and no rank waits for another.
"""

from __future__ import annotations

import dataclasses
import glob
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
from torch.utils.data import IterableDataset, get_worker_info

from pixart_lightning.config import DataSection
from pixart_lightning.data.buckets import bucket_table, nearest_bucket
from pixart_lightning.data.features import FEATURES_KEY, decode_features
from pixart_lightning.data.positions import Ref, ShuffleBuffer, WorkerPosition, ref_array, ref_list
from pixart_lightning.data.samples import (
    PIL_EXTENSIONS,
    fit_to_bucket,
    image_member,
    open_image,
    original_size,
    read_caption,
    sample_meta,
)
from pixart_lightning.data.slots import SlotReader
from pixart_lightning.data.sources import Handler, ImageFolder, extension, folder_files, is_remote
from pixart_lightning.encoders.vae import SD_VAE_DOWNSAMPLE

log = logging.getLogger(__name__)

MANIFEST_NAMES = ("world.json", "manifest.json")
FILTER_REASONS = frozenset({"below min_aesthetic", "no aesthetic score", "bucket overflow"})
"""Skip reasons that are selection, not bad data (they do not count towards ``data.max_bad_fraction``)."""
STARVED_LIMIT = 100  # overflow drops in a row, in queue capacities, before the schedule is declared impossible


class DataError(ValueError):
    """A data source problem the user must fix (nothing to read, unreadable manifest)."""


def data_buckets(
    resolution: int, granularity: int, multi_scale: bool, min_ratio: float = 0.25, max_ratio: float = 4.0
) -> dict[float, tuple[int, int]]:
    """Ratio -> (h, w) of the buckets a dataset is cut to: one square, or the paper's table within the ratio range."""
    if not multi_scale:
        return {1.0: (resolution, resolution)}
    table = bucket_table(resolution, granularity)
    return {r: hw for r, hw in table.items() if min_ratio - 1e-6 <= r <= max_ratio + 1e-6}


def resolve_sources(spec: str) -> list[str]:
    """Shard urls from a folder, a brace or glob pattern or a single tar; ``[folder]`` for an image folder."""
    if not spec:
        raise DataError("no data source given (data.shards is empty)")
    path = Path(spec)
    if path.is_dir():
        tars = sorted(str(p) for p in path.glob("*.tar"))
        if tars:
            return tars
        if any(extension(p) in PIL_EXTENSIONS for p in folder_files(path)[0]):
            return [str(path)]
        raise DataError(f"{spec}: the folder holds no .tar shards and no images")
    urls = list(braceexpand.braceexpand(spec))
    if any(c in spec for c in "*?[") and not is_remote(spec):
        urls = [f for url in urls for f in sorted(glob.glob(url)) if Path(f).is_file()]
        if not urls:
            raise DataError(f"{spec}: the pattern matches no file")
        return urls
    missing = [u for u in urls if not is_remote(u) and not Path(u).is_file()]
    if missing == [spec]:
        raise DataError(f"{spec} does not exist (give a folder of .tar shards, a tar, a pattern or an image folder)")
    if missing:
        raise DataError(f"{spec}: {len(missing)} of {len(urls)} shards do not exist (first: {missing[0]})")
    return urls


def tar_shards(spec: str) -> list[Path]:
    """The tar shards of a folder or pattern, for tools that rewrite shard by shard (an image folder is refused)."""
    urls = resolve_sources(spec)
    if any(Path(u).is_dir() for u in urls):
        raise DataError(f"{spec} is an image folder: run `pixart-lightning data ingest` on it first")
    shards = [Path(u) for u in urls]
    if len({s.name for s in shards}) != len(shards):
        raise DataError(f"{spec}: shard file names repeat; the output keeps one file per input name")
    return shards


def batched(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    """Lists of ``size`` items, the last one shorter (``itertools.batched`` needs Python 3.12)."""
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def read_manifest(spec: str) -> dict[str, Any]:
    """The dataset manifest (bucket counts etc.) beside the shards, or {} when there is none."""
    folder = Path(spec) if Path(spec).is_dir() else Path(resolve_sources(spec)[0]).parent
    for name in MANIFEST_NAMES:
        if (folder / name).is_file():
            return json.loads((folder / name).read_text())
    return {}


def folder_samples(folder: str) -> Iterator[dict[str, Any]]:
    """Raw samples of an image folder in sorted order: image bytes plus any .txt/.json/.cls beside it."""
    source = ImageFolder.list(folder)
    return (raw for _, raw in source.read(range(len(source))))


@dataclass
class Skipped:
    """Why samples were dropped; sent along with each batch so the trainer can log and bound them."""

    counts: dict[str, int] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)
    """The first ``KEPT_KEYS`` skipped samples as "key: reason", for reports."""

    KEPT_KEYS = 100

    def add(self, reason: str, key: str = "?", warn: bool = True) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if len(self.keys) < self.KEPT_KEYS:
            self.keys.append(f"{key}: {reason}")
        if warn:
            log.warning("skipped sample %s: %s", key, reason)

    def take(self) -> dict[str, int]:
        counts, self.counts = self.counts, {}
        return counts


class ShardStream(IterableDataset):
    """Endless, seeded stream of collated batches for one rank (worker-aware)."""

    def __init__(
        self, spec: DataSection, granularity: int = SD_VAE_DOWNSAMPLE, rank: int = 0, world_size: int = 1, skip_batches: int = 0,
        captions: bool = True, latent_factor: int = SD_VAE_DOWNSAMPLE, positions: dict[int, WorkerPosition] | None = None,
    ):
        """``granularity``: bucket sides are multiples of it (patch size x VAE factor); ``captions=False``
        (stage 1) accepts samples without a caption, e.g. ImageNet-style ``jpg`` + ``cls`` shards;
        ``latent_factor``: pixels per latent pixel, to check precomputed latents against the buckets.

        A resumed stream: ``skip_batches`` is the number of batches this rank has consumed, ``positions`` the
        position of each worker's last consumed batch, by the worker of the original run it was. A worker with a
        position continues from it; one without replays its share of the ``skip_batches`` batches."""
        super().__init__()
        self.spec, self.granularity, self.rank, self.world_size = spec, granularity, rank, world_size
        self.captions = captions
        self.skip_batches = skip_batches
        self.positions = positions or {}
        self.sources = resolve_sources(spec.shards)
        self.buckets = self._buckets()
        self.latent_buckets = {(h // latent_factor, w // latent_factor): r for r, (h, w) in self.buckets.items()}
        self.schedule_weights = self._schedule_weights()

    # ----------------------------------------------------------------- setup
    def _buckets(self) -> dict[float, tuple[int, int]]:
        s = self.spec
        return data_buckets(s.resolution, self.granularity, s.multi_scale, s.min_ratio, s.max_ratio)

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

    def _decode(self, raw: dict[str, Any], ref: Ref) -> dict[str, Any] | None:
        """Image, caption and metadata of one raw sample (``ref``: where it was read); None (counted) when it
        cannot be used."""
        key = raw.get("__key__", "?")
        try:
            meta = sample_meta(raw)
            features = decode_features(raw[FEATURES_KEY]) if FEATURES_KEY in raw else {}
        except Exception as err:  # noqa: BLE001 - any undecodable input is skipped, never fatal
            self.skipped.add(f"undecodable metadata or features ({type(err).__name__})", key)
            return None
        sample: dict[str, Any] = {}
        if "latent_mean" in features:
            latent_hw = tuple(features["latent_mean"].shape[1:])
            if latent_hw not in self.latent_buckets:
                self.skipped.add(f"latent of another size ({latent_hw[0]}x{latent_hw[1]})", key)
                return None
            sample.update(bucket=self.latent_buckets[latent_hw], latent_mean=features["latent_mean"],
                          latent_std=features["latent_std"])
            size = original_size(meta, self.buckets[sample["bucket"]])
        else:
            ext = image_member(raw)
            if ext is None:
                self.skipped.add("no image", key)
                return None
            try:
                image = open_image(raw[ext])
            except Exception as err:  # noqa: BLE001 - any undecodable input is skipped, never fatal
                self.skipped.add(f"undecodable ({type(err).__name__})", key)
                return None
            sample["image"] = image
            size = original_size(meta, (image.height, image.width))
        try:
            caption = read_caption(raw, self.spec.caption_key, meta)
        except ValueError as err:
            if self.captions:
                self.skipped.add(str(err), key)
                return None
            caption = None
        if (filtered := self._aesthetic_filter(meta)) is not None:
            self.skipped.add(filtered, key, warn=False)  # a filter, not bad data
            return None
        try:
            label = int(raw["cls"]) if "cls" in raw else int(meta.get("label", -1))
        except (TypeError, ValueError):
            self.skipped.add("unreadable class label", key)
            return None
        sample.update(key=key, caption=caption, label=label, original_size=size, ref=ref)
        if "t5" in features:
            sample["caption_features"] = features["t5"]
        return sample

    def _aesthetic_filter(self, meta: dict[str, Any]) -> str | None:
        """Why ``data.min_aesthetic`` drops a sample (a reason in ``FILTER_REASONS``); None when it keeps it."""
        if self.spec.min_aesthetic is None:
            return None
        score = meta.get("aesthetic")
        if not isinstance(score, int | float):
            return "no aesthetic score"
        return "below min_aesthetic" if score < self.spec.min_aesthetic else None

    def _schedule(self, batch_index: int) -> float | None:
        if self.schedule_weights is None:
            return None
        rng = np.random.default_rng([self.spec.seed, 2, batch_index])
        return list(self.buckets)[int(rng.choice(len(self.buckets), p=self.schedule_weights))]

    def _bucketed(self, sample: dict[str, Any]) -> dict[str, Any]:
        """The sample with its bucket; an image is cut to it (``pixels``)."""
        if "image" in sample:
            sample["bucket"], sample["pixels"] = fit_to_bucket(sample.pop("image"), self.buckets)
        return sample

    def _handler(self, url: str) -> Handler:
        """Read errors of a source: logged, counted, skipped."""
        def handler(err: Exception) -> bool:
            log.warning("%s: %s", url, err)
            self.skipped.add(f"unreadable tar data ({type(err).__name__})", url)
            return True

        return handler

    def _start(self, worker: int, workers: int, slot: int, slots: int) -> tuple[SlotReader, dict[float, deque], int, int]:
        """(slot reader, bucket queues, index of the next batch, batches to replay) of a worker: from its saved
        position, or from the start with its share of the consumed batches to replay."""
        rng = np.random.default_rng([self.spec.seed, 1, slot])
        buffer = ShuffleBuffer(self.spec.shuffle_buffer, self.spec.shuffle_buffer_mb * 2**20, rng)
        reader = SlotReader(self.sources, self.spec.seed, slot, slots, buffer, self._decode, self._handler)
        pending: dict[float, deque] = {r: deque() for r in self.buckets}
        position = self.positions.get(worker)
        if position is not None:
            queued = reader.restore(position)
            for ratio, refs in position.pending.items():
                pending[ratio].extend(self._bucketed(dict(queued[ref])) for ref in ref_list(refs) if ref in queued)
            return reader, pending, position.batch + workers, 0
        # Global batch b comes from worker b % workers (DataLoader round-robin): replay this worker's share.
        to_skip = max(0, (self.skip_batches - worker + workers - 1) // workers)
        return reader, pending, worker + to_skip * workers, to_skip

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.skipped = Skipped()
        slot, slots, workers = self._slot()
        worker = slot - self.rank * workers
        reader, pending, batch_index, to_skip = self._start(worker, workers, slot, slots)
        # Samples of buckets not scheduled now wait; past this many the oldest is dropped (counted, not warned:
        # the schedule follows the dataset's bucket frequencies, so this only trims random fluctuations).
        cap = 16 * self.spec.batch_size
        starved = 0  # samples dropped since the last batch
        target = self._schedule(batch_index)
        for sample in reader.samples():
            ratio = self._bucketed(sample)["bucket"]
            queue = pending[ratio]
            queue.append(sample)
            if target is not None and ratio != target and len(queue) > cap:
                queue.popleft()
                self.skipped.add("bucket overflow", sample["key"], warn=False)
                starved += 1
                if starved > STARVED_LIMIT * cap:
                    raise DataError(
                        f"{self.spec.shards}: the bucket schedule asks for aspect ratio {target} but {starved} samples "
                        "in a row fell in other buckets; the manifest's bucket_counts do not match the images "
                        "(re-run `data ingest`/`data extract` to rewrite it, or remove bucket_counts)")
            ready = target if target is not None else ratio
            if len(pending[ready]) < self.spec.batch_size:
                continue
            batch = [pending[ready].popleft() for _ in range(self.spec.batch_size)]
            starved = 0
            if to_skip > 0:
                to_skip -= 1
            else:
                position = self._position(worker, batch_index, reader, pending)
                yield collate(batch, ready, self.skipped.take()) | {"position": position}
            batch_index += workers
            target = self._schedule(batch_index)
        raise DataError(f"{self.spec.shards}: no usable sample for slot {slot} of {slots} "
                        f"(skipped so far: {self.skipped.counts})")

    @staticmethod
    def _position(worker: int, batch_index: int, reader: SlotReader, pending: dict[float, deque]) -> WorkerPosition:
        queues = {ratio: ref_array([s["ref"] for s in queue]) for ratio, queue in pending.items() if queue}
        return WorkerPosition(worker, batch_index, dataclasses.replace(reader.cursor),
                              reader.buffer.rng.bit_generator.state, reader.buffer.refs(), queues)


def collate(samples: Sequence[dict[str, Any]], ratio: float, skipped: dict[str, int]) -> dict[str, Any]:
    """Stack one bucket's samples (pixels in [-1, 1], or precomputed latent moments); precomputed caption
    features keep their stored dtype and are padded to the batch's longest caption."""
    batch: dict[str, Any] = {
        "caption": [s["caption"] or "" for s in samples],
        "key": [s["key"] for s in samples],
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.long),
        "original_size": torch.tensor([s["original_size"] for s in samples], dtype=torch.float32),
        "aspect_ratio": torch.full((len(samples), 1), float(ratio)),
        "skipped": skipped,
    }
    if all("latent_mean" in s for s in samples):
        batch["latent_mean"] = torch.stack([s["latent_mean"] for s in samples])
        batch["latent_std"] = torch.stack([s["latent_std"] for s in samples])
    else:
        batch["pixels"] = torch.stack([s["pixels"] for s in samples]).float() / 127.5 - 1.0
    if all("caption_features" in s for s in samples):
        feats = [s["caption_features"] for s in samples]
        length = max(f.shape[0] for f in feats)
        batch["caption_features"] = torch.zeros(len(feats), length, feats[0].shape[1], dtype=feats[0].dtype)
        batch["caption_mask"] = torch.zeros(len(feats), length, dtype=torch.long)
        for i, f in enumerate(feats):
            batch["caption_features"][i, : f.shape[0]] = f
            batch["caption_mask"][i, : f.shape[0]] = 1
    return batch

