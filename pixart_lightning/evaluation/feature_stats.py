"""Feature statistics for FID: moments summable over batches and ranks, the Fréchet distance, and the cached
statistics of the real (reference) images.

The reference's statistics are computed once per (source files, extractor, resize, count) and cached as ``.npz``.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from cleanfid.fid import frechet_distance as _cleanfid_frechet
from scipy import linalg
from torch import Tensor
from tqdm.auto import tqdm

from pixart_lightning.config import FIDSection
from pixart_lightning.evaluation.data_source import real_images, source_fingerprint
from pixart_lightning.evaluation.errors import FIDError
from pixart_lightning.evaluation.extractors import FeatureExtractor, protocol_resize
from pixart_lightning.files import atomic_path

DEFAULT_CACHE = Path("~/.cache/pixart-lightning/fid")
CACHE_VERSION = 1  # bump when the resize path or the stored fields change


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


def reference_stats(
    source: str, extractor: FeatureExtractor, cache_dir: str | os.PathLike = "", *, count: int = 0,
    batch_size: int = 32, progress: bool = False,
) -> Stats:
    """Mean and covariance of the real images' features, computed once and cached.

    The cache file is named by a hash of the source's files (paths, sizes, mtimes), the extractor's
    identity, the resize and ``count``, and written atomically (a crash or a concurrent run never leaves
    half a file).
    """
    key = json.dumps({"version": CACHE_VERSION, "files": source_fingerprint(source), "extractor": extractor.identity,
                      "resize": extractor.resize, "count": count}, sort_keys=True)
    folder = Path(cache_dir or DEFAULT_CACHE).expanduser()
    path = folder / f"reference-{hashlib.sha256(key.encode()).hexdigest()[:24]}.npz"
    if path.is_file():
        with np.load(path) as cached:
            return Stats(cached["mu"], cached["sigma"], int(cached["count"]), path)
    moments = Moments(extractor.dim)
    batch: list[Tensor] = []
    # Real images differ in size: each is resized alone, then they share a batch through the network.
    for image in tqdm(real_images(source, count), disable=not progress, desc="FID reference", total=count or None,
                      leave=False):
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
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma, count=moments.count, key=np.array(key))
    return Stats(mu, sigma, moments.count, path)


def settings_reference(settings: FIDSection, extractor: FeatureExtractor, progress: bool = False) -> Stats:
    """The reference statistics the settings name (e.g. to compute them before a multi-process run starts)."""
    if not settings.reference:
        raise FIDError("FID needs real images to compare with: "
                       "set fid.reference to a shard folder, pattern or image folder")
    return reference_stats(settings.reference, extractor, settings.cache_dir, count=settings.reference_count,
                           batch_size=settings.batch_size, progress=progress)
