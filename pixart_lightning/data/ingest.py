"""Ingestion: image folders or existing tar shards in, clean webdataset shards with a stable key per sample out.

Accepted inputs, mixed freely:

- an image folder (searched recursively), with an optional ``.txt`` caption and ``.json`` metadata beside
  each image (``cat.jpg`` + ``cat.txt``);
- webdataset or img2dataset tar shards (a folder of ``*.tar``, a brace or glob pattern, or one tar).

Every written sample has the original image bytes (never re-encoded), ``txt`` (the original caption, when
there is one) and ``json`` with ``key``, ``source``, ``original_size`` [h, w] and ``aspect_ratio`` h / w.
img2dataset's ``original_height``/``original_width`` win over the decoded size, since img2dataset may
have resized the image. Images that do not decode fully and unreadable tar data are skipped and counted
in ``manifest.json`` (with the first keys), which also holds the aspect-ratio bucket counts that the
training loader weights its bucket schedule with.

Keys are stable: the source-relative name made safe (no dots, which webdataset would split on) plus
8 hex digits of its sha1, so re-ingesting the same inputs gives the same keys and two names that
sanitise alike never collide.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import webdataset as wds
from tqdm import tqdm
from webdataset.tariterators import tarfile_samples

from .buckets import bucket_table, nearest_bucket
from .samples import caption_text, image_member, open_image, original_size, sample_meta
from .shards import DataError, Skipped, folder_samples, resolve_sources

MANIFEST = "manifest.json"
CAPTION_FIELDS = ("caption", "text", "prompt")  # where img2dataset-style json keeps a caption


def stable_key(source: str, name: str) -> str:
    """A webdataset-safe key, the same every time the same name of the same source (its folder or shard name,
    not its full path, so a moved dataset keeps its keys) is ingested."""
    digest = hashlib.sha1(f"{source}\0{name}".encode()).hexdigest()[:8]
    readable = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")[-80:]
    return f"{readable}-{digest}" if readable else digest


def _raw_samples(sources: Sequence[str], skipped: Skipped) -> Iterator[dict[str, Any]]:
    """Raw samples of every source in order; unreadable tar data is counted once per shard, never fatal."""
    for source in sources:
        if Path(source).is_dir():
            yield from folder_samples(source)
            continue
        broken: list[Exception] = []

        def handler(err: Exception, source: str = source, broken: list[Exception] = broken) -> bool:
            if not broken:  # webdataset may report one truncation at several levels
                skipped.add(f"unreadable tar data ({type(err).__name__})", source)
            broken.append(err)
            return True

        yield from tarfile_samples([{"url": source}], handler=handler)


def _caption(raw: dict[str, Any], meta: dict[str, Any]) -> str | None:
    """The original caption: ``.txt``, else the first json caption field."""
    if "txt" in raw:
        return caption_text(raw, "txt", meta)
    return next((text for f in CAPTION_FIELDS if (text := caption_text(raw, f, meta))), None)


def to_sample(raw: dict[str, Any]) -> tuple[dict[str, bytes], tuple[int, int]] | str:
    """The clean webdataset sample of one raw sample and its decoded (h, w), or why it is skipped."""
    ext = image_member(raw)
    if ext is None:
        return "no image"
    try:
        image = open_image(raw[ext])  # a truncated or corrupt file fails here, not later in training
        meta = sample_meta(raw)
    except Exception as err:  # noqa: BLE001 - any undecodable input is skipped and counted
        return f"undecodable ({type(err).__name__})"
    caption = _caption(raw, meta)
    if caption is None and "txt" in raw:
        return "non-UTF-8 or blank caption"
    source = f"{raw.get('__url__', '')}:{raw['__key__']}"
    key = stable_key(Path(str(raw.get("__url__", ""))).name, raw["__key__"])
    h, w = original_size(meta, (image.height, image.width))
    meta = meta | {"key": key, "source": source, "original_size": [h, w], "aspect_ratio": h / w}
    sample = {"__key__": key, "jpg" if ext == "jpeg" else ext: raw[ext], "json": json.dumps(meta).encode()}
    if caption is not None:
        sample["txt"] = caption.encode("utf-8")
    if "cls" in raw:
        sample["cls"] = raw["cls"]
    return sample, (image.height, image.width)


def ingest(
    sources: Sequence[str], out_dir: str | os.PathLike, *, samples_per_shard: int = 1000, progress: bool = True
) -> dict[str, Any]:
    """Write every readable sample of ``sources`` into ``out_dir/shard-NNNNNN.tar`` plus ``manifest.json``.

    The folder is written beside its final name and renamed when complete, so an interrupted run
    leaves nothing that looks finished; an existing non-empty ``out_dir`` is refused.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new folder")
    urls = [url for spec in sources for url in resolve_sources(spec)]
    names = [Path(url).name for url in urls]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:  # keys hash the source's name: two sources of one name would collide
        raise DataError(f"two sources share the name {repeated[0]!r}: ingest them into separate folders")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    # Counts keyed by the paper's 1024-px bucket sizes; a table at any resolution matches them by ratio.
    # They come from the stored image's size, which decides its bucket in training (not the original size).
    table = bucket_table(1024, 64)
    buckets: dict[str, int] = {}
    skipped = Skipped()
    seen: set[str] = set()
    count = 0
    try:
        with wds.ShardWriter(str(partial / "shard-%06d.tar"), maxcount=samples_per_shard, verbose=0,
                             encoder=False) as sink:
            for raw in tqdm(_raw_samples(urls, skipped), desc="ingest", unit="img", disable=not progress):
                result = to_sample(raw)
                if isinstance(result, str):
                    skipped.add(result, f"{raw.get('__url__', '')}:{raw.get('__key__', '?')}")
                    continue
                sample, (h, w) = result
                if sample["__key__"] in seen:
                    skipped.add("duplicate key", sample["__key__"])
                    continue
                seen.add(sample["__key__"])
                sink.write(sample)
                bucket = table[nearest_bucket(h, w, table)[0]]
                name = f"{bucket[0]}x{bucket[1]}"
                buckets[name] = buckets.get(name, 0) + 1
                count += 1
        if count == 0:
            raise DataError(f"no readable sample in {', '.join(sources)} (skipped: {skipped.counts})")
        manifest = {
            "kind": "ingested", "sources": list(sources), "count": count,
            "shards": sorted(p.name for p in partial.glob("shard-*.tar")), "samples_per_shard": samples_per_shard,
            "bucket_counts": dict(sorted(buckets.items())),
            "skipped": skipped.counts, "skipped_keys": skipped.keys,
        }
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.is_dir():
            out.rmdir()
        os.rename(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return manifest

