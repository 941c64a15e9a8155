"""FID of generated images against cached statistics of real ones, with clean-fid's resize and Fréchet distance.

The protocol, pinned so that two numbers are comparable:

- **captions**: a fixed list (``fid.captions``: a JSON list of ``{"id", "caption"}``, MS-COCO's
  ``captions_val2014.json``, a ``.txt`` with one per line, or by default the captions of the reference
  images themselves); when it holds more than ``num_images``, ``seed`` draws the subset (MS-COCO-30K) and
  the chosen ids are written beside the results;
- **generation**: the configured sampler, steps and guidance, under the training precision (recorded); captions
  are cut into chunks of ``batch_size``, chunk ``c`` is generated with seed ``seed + c`` by rank ``c % world_size``,
  so the images do not depend on the number of processes;
- **resize**: every image, real or generated, is centre-cropped to a square and resized to ``resize``
  (299) with clean-fid's "clean" resizer (PIL bicubic on float channels, no quantisation);
- **features**: clean-fid's Inception-v3 (TorchScript ``inception-2015-12-05.pt`` from a local file,
  never downloaded here), or the offline ``tiny`` extractor (:class:`TinyFeatures`) for the demo;
- **statistics**: mean and covariance accumulated as sums (:class:`Moments`), summed across ranks; the
  reference's are computed once per (source files, extractor, resize, count) and cached as ``.npz``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from cleanfid.downloads_helper import inception_url
from cleanfid.fid import frechet_distance as _cleanfid_frechet
from cleanfid.inception_torchscript import InceptionV3W
from cleanfid.resize import make_resizer
from scipy import linalg
from torch import Tensor, nn
from tqdm.auto import tqdm
from webdataset.tariterators import tarfile_samples

from pixart_lightning.config import FIDSection
from pixart_lightning.data.samples import IMAGE_EXTENSIONS, caption_text, image_member, open_image, sample_meta
from pixart_lightning.data.shards import folder_samples, resolve_sources
from pixart_lightning.encoders.vae import VAE, LazyVAE, PixelSpace
from pixart_lightning.evaluation.generate import Encoder, generate
from pixart_lightning.files import sha256, write_json_atomic
from pixart_lightning.models import PixArt
from pixart_lightning.training.parallel import is_sharded

log = logging.getLogger(__name__)

INCEPTION_FILE = "inception-2015-12-05.pt"
DEFAULT_INCEPTION = Path("~/.cache/pixart-lightning") / INCEPTION_FILE
DEFAULT_CACHE = Path("~/.cache/pixart-lightning/fid")
RESIZE_METHOD = "centre crop to a square, then clean-fid's clean resize (PIL bicubic on float32 channels)"
CACHE_VERSION = 1  # bump when the resize path or the stored fields change


class FIDError(ValueError):
    """An FID setup problem (bad setting, missing weights or captions); the message says what to do."""


def check_settings(settings: FIDSection) -> None:
    """Raise :class:`FIDError` listing every invalid field (the runner validates configs the same way)."""
    found = settings.problems()
    if found:
        raise FIDError("invalid FID settings:\n  " + "\n  ".join(found))


# ---------------------------------------------------------------------- captions
@dataclass(frozen=True)
class Caption:
    id: int | str
    caption: str
    label: int | None = None
    """Class label, for a class-mode (stage 1) model."""


def _raw_samples(source: str) -> Iterator[dict[str, Any]]:
    """Raw webdataset samples of a shard folder/pattern or image folder, in a fixed order."""
    for url in resolve_sources(source):
        if Path(url).is_dir():
            yield from folder_samples(url)
        else:
            yield from tarfile_samples([{"url": url}], handler=_skip_bad_tar_data)


def _skip_bad_tar_data(err: Exception) -> bool:
    log.warning("FID: skipped unreadable tar data: %s", err)
    return True


def _label(raw: dict[str, Any], meta: dict[str, Any]) -> int | None:
    """The sample's class label (``.cls`` member or json ``label``), if it has a readable one."""
    value = raw.get("cls", meta.get("label"))
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def load_captions(source: str, caption_key: str = "txt") -> list[Caption]:
    """Every caption of a caption file or of a data source's samples (id = sample key), in file order."""
    path = Path(source)
    if path.is_file() and path.suffix == ".txt":
        lines = path.read_text(encoding="utf-8").splitlines()
        return [Caption(i, line.strip()) for i, line in enumerate(lines) if line.strip()]
    if path.is_file() and path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and "annotations" in data:  # MS-COCO captions_*.json
            return [Caption(a["id"], a["caption"].strip()) for a in data["annotations"]]
        if not isinstance(data, list) or not all(isinstance(d, dict) and "id" in d and "caption" in d for d in data):
            raise FIDError(f"{source}: expected a JSON list of {{\"id\": ..., \"caption\": ...}} or COCO captions JSON")
        return [Caption(d["id"], d["caption"], d.get("label")) for d in data]
    captions = []
    for raw in _raw_samples(source):
        try:
            meta = sample_meta(raw)
        except ValueError:
            continue
        text = caption_text(raw, caption_key, meta)
        label = _label(raw, meta)
        if text is not None or label is not None:
            captions.append(Caption(raw["__key__"], text or "", label))
    return captions


def pin_captions(captions: Sequence[Caption], num: int, seed: int) -> list[Caption]:
    """``num`` captions: all of them, or a subset drawn with ``seed`` (kept in source order)."""
    if len(captions) < num:
        raise FIDError(f"FID needs {num} captions and the caption source has {len(captions)}; "
                       "lower fid.num_images or give a longer list in fid.captions")
    if len(captions) == num:
        return list(captions)
    chosen = np.sort(np.random.default_rng(seed).choice(len(captions), num, replace=False))
    return [captions[i] for i in chosen]


def pinned_captions(settings: FIDSection) -> list[Caption]:
    """The caption list a measurement with these settings uses."""
    source = settings.captions or settings.reference
    if not source:
        raise FIDError("FID needs captions: set fid.captions, or fid.reference to real images with captions")
    return pin_captions(load_captions(source, settings.caption_key), settings.num_images, settings.seed)


def ids_digest(captions: Sequence[Caption]) -> str:
    return hashlib.sha256(json.dumps([c.id for c in captions]).encode()).hexdigest()


# ---------------------------------------------------------------------- images and features
def protocol_resize(images: Tensor, size: int) -> Tensor:
    """uint8 (B, 3, H, W) -> float32 (B, 3, size, size) in 0..255: centre square, then clean-fid's clean resize."""
    resize = make_resizer("PIL", False, "bicubic", (size, size))
    out = []
    for image in images:
        h, w = image.shape[1:]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        square = image[:, top : top + side, left : left + side]
        out.append(torch.from_numpy(resize(square.permute(1, 2, 0).numpy())).permute(2, 0, 1))
    return torch.stack(out)


class TinyFeatures(nn.Module):
    """A hand-made, weight-free extractor for offline runs (83 features), meaningful on the shapes world.

    Inception needs a 95 MB download, and random conv features barely tell a clean shape from noise. These
    are classic image descriptors computed on the image pooled to 32 x 32 (so any resolution maps alike):

    - colour layout: the mean colour of a 4 x 4 grid (48) — where which colour is;
    - palette histogram: fraction of pixels in each cell of a 3 x 3 x 3 RGB grid (27) — clean flat
      colours versus the muddy mixtures of an undertrained model;
    - edge statistics at two scales: mean colour gradient and the fraction of gradients above 0.05, 0.2
      and 0.5 (8) — sharp shape outlines versus noise or blur.

    Features are scaled by 10 so FIDs read in tens to hundreds like Inception's; they are not comparable.
    """

    identity = "tiny-v1"  # part of the reference cache key: change it when the features change
    dim = 48 + 27 + 8
    scale = 10.0

    def forward(self, x: Tensor) -> Tensor:
        x = F.adaptive_avg_pool2d(x / 255.0, 32).clamp(0, 1)
        layout = F.adaptive_avg_pool2d(x, 4).flatten(1)
        cells = (x * 2).round().long()
        code = cells[:, 0] * 9 + cells[:, 1] * 3 + cells[:, 2]
        palette = F.one_hot(code.flatten(1), 27).float().mean(1)
        edges = []
        for level in (x, F.avg_pool2d(x, 2)):
            grads = torch.cat([(level[..., 1:] - level[..., :-1]).abs().amax(1).flatten(1),
                               (level[..., 1:, :] - level[..., :-1, :]).abs().amax(1).flatten(1)], 1)
            edges += [grads.mean(1)] + [(grads > t).float().mean(1) for t in (0.05, 0.2, 0.5)]
        return torch.cat([layout, palette, torch.stack(edges, 1)], 1) * self.scale


def inception_file(setting: str = "") -> Path:
    """The local Inception weights: the configured file (or its folder), else the default places."""
    if setting:
        path = Path(setting).expanduser()
        candidates = [path / INCEPTION_FILE if path.is_dir() else path]
    else:
        candidates = [DEFAULT_INCEPTION.expanduser(), Path(tempfile.gettempdir()) / INCEPTION_FILE]
    for path in candidates:
        if path.is_file():
            if path.name != INCEPTION_FILE:
                raise FIDError(f"{path}: clean-fid loads the Inception weights by name; rename it to {INCEPTION_FILE}")
            return path
    raise FIDError(
        f"FID's Inception-v3 weights are not at {' or '.join(map(str, candidates))}, and are never downloaded "
        f"during a run. On a machine with internet: curl -L -o {INCEPTION_FILE} {inception_url} (95 MB), copy "
        f"the file to {DEFAULT_INCEPTION} or set fid.inception_weights=/path/to/{INCEPTION_FILE}. "
        "Offline, fid.extractor=tiny uses a hand-made extractor instead (not comparable to published FIDs).")


@dataclass
class FeatureExtractor:
    """The protocol's resize plus a network: uint8 images of any size in, float64 features out."""

    module: nn.Module
    name: str
    identity: str
    """Names the exact features (weights hash included) in cache keys and records."""
    dim: int
    resize: int
    device: torch.device

    def __call__(self, images: Tensor) -> np.ndarray:
        """Features (B, dim) of uint8 images (B, 3, H, W)."""
        return self.resized_features(protocol_resize(images, self.resize))

    @torch.no_grad()
    def resized_features(self, resized: Tensor) -> np.ndarray:
        """Features of images already through :func:`protocol_resize` (float, 0..255)."""
        return self.module(resized.to(self.device)).double().cpu().numpy()


def load_extractor(settings: FIDSection, device: torch.device | str = "cpu") -> FeatureExtractor:
    device = torch.device(device)
    if settings.extractor == "tiny":
        return FeatureExtractor(TinyFeatures().eval(), "tiny", TinyFeatures.identity, TinyFeatures.dim,
                                settings.resize, device)
    path = inception_file(settings.inception_weights)
    module = InceptionV3W(str(path.parent), download=False).to(device).eval()
    return FeatureExtractor(module, "inception", f"inception-2015-12-05:{sha256(path)[:16]}", 2048,
                            settings.resize, device)


# ---------------------------------------------------------------------- statistics
class Moments:
    """Count, sum and sum of outer products of feature vectors.

    Enough for the mean and covariance, in O(dim²) memory whatever the number of images, and summable
    across batches and ranks (one all-reduce instead of gathering every feature vector).
    """

    def __init__(self, dim: int):
        self.count = 0
        self.total = np.zeros(dim)
        self.outer = np.zeros((dim, dim))

    def add(self, features: np.ndarray) -> None:
        features = np.asarray(features, dtype=np.float64)
        self.count += len(features)
        self.total += features.sum(0)
        self.outer += features.T @ features

    def merge(self, other: Moments) -> Moments:
        merged = Moments(len(self.total))
        merged.count = self.count + other.count
        merged.total = self.total + other.total
        merged.outer = self.outer + other.outer
        return merged

    def all_reduce(self, device: torch.device) -> None:
        """Sum over the ranks of the default process group (every rank must call it)."""
        packed = torch.from_numpy(np.concatenate([[self.count], self.total, self.outer.ravel()])).to(device)
        dist.all_reduce(packed)
        flat = packed.cpu().numpy()
        dim = len(self.total)
        self.count, self.total, self.outer = int(round(flat[0])), flat[1 : dim + 1], flat[dim + 1 :].reshape(dim, dim)

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        if self.count < 2:
            raise FIDError(f"FID needs at least 2 images, got {self.count}")
        mu = self.total / self.count
        sigma = (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)
        return mu, (sigma + sigma.T) / 2


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^½), by clean-fid.

    Fewer images than features make the covariances singular, which is normal for FID; scipy's warning
    about it is silenced (clean-fid falls back to a regularised square root if the result is not finite).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        return float(_cleanfid_frechet(mu1, sigma1, mu2, sigma2))


@dataclass
class Stats:
    mu: np.ndarray
    sigma: np.ndarray
    count: int
    cache: Path | None = None


def _source_fingerprint(source: str) -> list[list[Any]]:
    """(file, size, mtime) of every file the source reads: rewritten data gets new statistics."""
    entries = []
    for url in resolve_sources(source):
        root = Path(url)
        if root.is_dir():
            files = sorted(p for p in root.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
        elif root.is_file():
            files = [root]
        else:  # a remote shard: its url only
            entries.append([url])
            continue
        entries += [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    return entries


def _reference_images(source: str, count: int) -> Iterator[Tensor]:
    """uint8 (3, H, W) real images in source order, the first ``count`` (0: all); undecodable ones skipped."""
    used = 0
    for raw in _raw_samples(source):
        ext = image_member(raw)
        if ext is None:
            continue
        try:
            image = open_image(raw[ext])
        except Exception as err:  # noqa: BLE001 - a bad reference image is skipped, as in training
            log.warning("FID reference: skipped %s (%s)", raw.get("__key__"), type(err).__name__)
            continue
        yield torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        used += 1
        if used == count:
            return


def reference_stats(
    source: str, extractor: FeatureExtractor, cache_dir: str | os.PathLike = "", *, count: int = 0,
    batch_size: int = 32, progress: bool = False,
) -> Stats:
    """Mean and covariance of the real images' features, computed once and cached.

    The cache file is named by a hash of the source's files (paths, sizes, mtimes), the extractor's
    identity, the resize and ``count``, and written atomically (a crash or a concurrent run never leaves
    half a file).
    """
    key = json.dumps({"version": CACHE_VERSION, "files": _source_fingerprint(source), "extractor": extractor.identity,
                      "resize": extractor.resize, "count": count}, sort_keys=True)
    folder = Path(cache_dir or DEFAULT_CACHE).expanduser()
    path = folder / f"reference-{hashlib.sha256(key.encode()).hexdigest()[:24]}.npz"
    if path.is_file():
        with np.load(path) as cached:
            return Stats(cached["mu"], cached["sigma"], int(cached["count"]), path)
    moments = Moments(extractor.dim)
    batch: list[Tensor] = []
    # Real images differ in size: each is resized alone, then they share a batch through the network.
    for image in tqdm(_reference_images(source, count), disable=not progress, desc="FID reference", total=count or None):
        batch.append(protocol_resize(image[None], extractor.resize)[0])
        if len(batch) == batch_size:
            moments.add(extractor.resized_features(torch.stack(batch)))
            batch = []
    if batch:
        moments.add(extractor.resized_features(torch.stack(batch)))
    if moments.count < 2 or moments.count < count:
        raise FIDError(f"{source}: {moments.count} usable reference images"
                       + (f", fid.reference_count asks for {count}" if count else "; FID needs at least 2"))
    mu, sigma = moments.mean_cov()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma, count=moments.count, key=np.array(key))
    os.replace(tmp, path)
    return Stats(mu, sigma, moments.count, path)


def settings_reference(settings: FIDSection, extractor: FeatureExtractor, progress: bool = False) -> Stats:
    """The reference statistics the settings name (e.g. to compute them before a multi-process run starts)."""
    if not settings.reference:
        raise FIDError("FID needs real images to compare with: set fid.reference to a shard folder, pattern or image folder")
    return reference_stats(settings.reference, extractor, settings.cache_dir, count=settings.reference_count,
                           batch_size=settings.batch_size, progress=progress)


# ---------------------------------------------------------------------- generated images
def rank_chunks(num: int, batch_size: int, rank: int, world_size: int) -> list[range]:
    """This rank's chunks of the caption list: chunk ``c`` = captions [c·B, (c+1)·B) goes to rank c % world_size."""
    return [range(s, min(s + batch_size, num)) for s in range(rank * batch_size, num, world_size * batch_size)]


def generated_moments(
    model: PixArt, vae: VAE | LazyVAE | PixelSpace, encoder: Encoder | None, settings: FIDSection,
    captions: Sequence[Caption], extractor: FeatureExtractor, *, height: int, width: int, prediction: str = "epsilon",
    rank: int = 0, world_size: int = 1, precision: str = "32", progress: bool = False,
) -> Moments:
    """Feature moments of this rank's share of the images (sum them over ranks for the whole set).

    Under FSDP every rank must join every forward pass, so ranks with one chunk fewer generate a
    throw-away chunk to keep step with the others. ``precision``: the training precision, generated under
    (:func:`~pixart_lightning.evaluation.generate.generate`).
    """
    text = model.cfg.mode == "text"
    if text and not all(c.caption for c in captions):
        raise FIDError("a text-mode model needs a caption for every FID caption id (some are empty)")
    if not text and any(c.label is None for c in captions):
        raise FIDError("a class-mode model (stage 1) needs class labels for the FID captions "
                       "(shards with .cls or a json 'label', or a caption JSON with 'label')")
    chunks: list[range | None] = list(rank_chunks(len(captions), settings.batch_size, rank, world_size))
    if is_sharded(model):
        rounds = math.ceil(math.ceil(len(captions) / settings.batch_size) / world_size)
        chunks += [None] * (rounds - len(chunks))
    moments = Moments(extractor.dim)
    for chunk in tqdm(chunks, disable=not progress, desc="FID images"):
        part = [captions[i] for i in (chunk if chunk is not None else range(min(settings.batch_size, len(captions))))]
        inputs = ({"prompts": [c.caption for c in part], "encoder": encoder} if text
                  else {"labels": [int(c.label) for c in part]})
        images = generate(model, vae, **inputs, height=height, width=width, sampler=settings.sampler,
                          steps=settings.steps, cfg_scale=settings.cfg_scale, prediction=prediction,
                          seed=settings.seed + (chunk.start // settings.batch_size if chunk is not None else 0),
                          precision=precision, decode_batch=settings.decode_batch)
        if chunk is not None:
            moments.add(extractor(images))
    return moments


def _process_group(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def evaluate_fid(
    model: PixArt, vae: VAE | LazyVAE | PixelSpace, encoder: Encoder | None, settings: FIDSection, *,
    height: int, width: int, prediction: str = "epsilon", captions: Sequence[Caption] | None = None,
    extractor: FeatureExtractor | None = None, rank: int | None = None, world_size: int | None = None,
    device: torch.device | str | None = None, ids_file: str | os.PathLike | None = None, precision: str = "32",
    progress: bool = False,
) -> dict[str, Any] | None:
    """FID of ``model``'s images for the pinned captions: the record on rank 0, None on the others.

    Every rank generates its share; feature moments are summed over ``torch.distributed`` when it is
    initialised. ``captions`` and ``extractor`` may be passed in to skip reloading them;
    ``ids_file`` receives the pinned caption list (rank 0). The record holds everything that pins the
    protocol (caption ids' hash and file, sampler, steps, guidance, size, extractor, resize, reference and
    counts) and ``seconds``: setup (captions, extractor, reference statistics) and generation (images,
    features, distance).
    """
    check_settings(settings)
    started = time.time()
    rank, world_size = _process_group(rank, world_size)
    if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        raise FIDError(f"world_size={world_size} without torch.distributed: the ranks' images could not be combined")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    captions = list(captions) if captions is not None else pinned_captions(settings)
    extractor = extractor or load_extractor(settings, device)
    reference = settings_reference(settings, extractor, progress) if rank == 0 else None  # fails before generating
    setup_s = time.time() - started
    was_training = model.training
    moments = generated_moments(model, vae, encoder, settings, captions, extractor, height=height, width=width,
                                prediction=prediction, rank=rank, world_size=world_size, precision=precision,
                                progress=progress)
    model.train(was_training)
    if world_size > 1:
        moments.all_reduce(device)
    if reference is None:
        return None
    fid = frechet_distance(*moments.mean_cov(), reference.mu, reference.sigma)
    if ids_file:
        write_json_atomic(ids_file, [{"id": c.id, "caption": c.caption, **({"label": c.label} if c.label is not None else {})}
                                     for c in captions])
    return {
        "fid": fid,
        "num_images": moments.count,
        "captions": {"source": settings.captions or settings.reference, "caption_key": settings.caption_key,
                     "seed": settings.seed, "ids_sha256": ids_digest(captions),
                     "ids_file": str(ids_file) if ids_file else None},
        "sampler": settings.sampler, "steps": settings.steps, "cfg_scale": settings.cfg_scale,
        "height": height, "width": width, "prediction": prediction, "batch_size": settings.batch_size,
        "seed": settings.seed, "mode": model.cfg.mode, "precision": precision,
        "extractor": {"name": extractor.name, "identity": extractor.identity, "dim": extractor.dim},
        "resize": {"size": extractor.resize, "method": RESIZE_METHOD},
        "reference": {"source": settings.reference, "count": reference.count, "cache": str(reference.cache)},
        "world_size": world_size,
        "seconds": {"setup": round(setup_s, 2), "generation": round(time.time() - started - setup_s, 2)},
    }


def append_record(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Add a record to a JSON list file, written atomically."""
    path = Path(path)
    records = json.loads(path.read_text()) if path.is_file() else []
    write_json_atomic(path, [*records, record])
