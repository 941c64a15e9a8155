"""What FID reads from a data source (shard folder or pattern, or image folder), always in the same order.

The captions (:mod:`~pixart_lightning.evaluation.captions`) and the real images behind the reference statistics
(:mod:`~pixart_lightning.evaluation.feature_stats`) both come from here; unreadable data is skipped with a warning,
as in training.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from webdataset.tariterators import tarfile_samples

from pixart_lightning.data.samples import IMAGE_EXTENSIONS, image_member, open_image
from pixart_lightning.data.shards import folder_samples, resolve_sources

log = logging.getLogger(__name__)


def raw_samples(source: str) -> Iterator[dict[str, Any]]:
    """Raw webdataset samples of a shard folder/pattern or image folder, in a fixed order."""
    for url in resolve_sources(source):
        if Path(url).is_dir():
            yield from folder_samples(url)
        else:
            yield from tarfile_samples([{"url": url}], handler=_skip_bad_tar_data)


def _skip_bad_tar_data(err: Exception) -> bool:
    log.warning("FID: skipped unreadable tar data: %s", err)
    return True


def real_images(source: str, count: int) -> Iterator[Tensor]:
    """uint8 (3, H, W) real images in source order, the first ``count`` (0: all); undecodable ones skipped."""
    used = 0
    for raw in raw_samples(source):
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


def source_fingerprint(source: str) -> list[list[Any]]:
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
