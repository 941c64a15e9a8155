"""Ingestion: image folders or existing tar shards in, clean webdataset shards with a stable key per sample out.

Accepted inputs, mixed freely:

- an image folder (searched recursively), with an optional ``.txt`` caption and ``.json`` metadata beside
  each image (``cat.jpg`` + ``cat.txt``);
- webdataset or img2dataset tar shards (a folder of ``*.tar``, a brace or glob pattern, or one tar).

Every format PIL opens is taken. Every written sample has its image (JPEG, PNG and WebP as the original bytes;
any other format, e.g. GIF's first frame, TIFF or BMP, as the lossless PNG of what every data tool decodes from it),
``txt`` (the original caption, when there is one) and ``json`` with ``key``, ``source``, ``original_size`` [h, w]
and ``aspect_ratio`` h / w. img2dataset's ``original_height``/``original_width`` win over the decoded size, since
img2dataset may have resized the image.

Nothing in the input goes unaccounted for: ``manifest.json`` counts, by reason and with the first names, the
samples skipped (an image that does not decode fully, a tar cut short) and the files or tar members ignored (an
unsupported extension, a caption with no image beside it). It also holds the aspect-ratio bucket counts that
the training loader weights its bucket schedule with.

Keys are stable: the source-relative name made safe (no dots, which webdataset would split on) plus
8 hex digits of its sha1, so re-ingesting the same inputs gives the same keys and two names that
sanitise alike never collide.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from pixart_lightning.data.buckets import bucket_table, nearest_bucket
from pixart_lightning.data.counts import Counts
from pixart_lightning.data.samples import (
    IMAGE_EXTENSIONS,
    PIL_EXTENSIONS,
    SIDE_EXTENSIONS,
    caption_text,
    open_image,
    original_size,
    sample_meta,
    sample_name,
)
from pixart_lightning.data.shards import DataError, resolve_sources
from pixart_lightning.data.sources import ImageFolder, complete_samples, extension, folder_files
from pixart_lightning.files import atomic_folder

MANIFEST = "manifest.json"
CAPTION_FIELDS = ("caption", "text", "prompt")  # where img2dataset-style json keeps a caption
IMAGE_MEMBERS = (*IMAGE_EXTENSIONS, *sorted(PIL_EXTENSIONS - set(IMAGE_EXTENSIONS)))
"""A sample's image member: a format every reader takes first, else any format PIL opens."""


def stable_key(source: str, name: str) -> str:
    """A webdataset-safe key, the same every time the same name of the same source (its folder or shard name,
    not its full path, so a moved dataset keeps its keys) is ingested."""
    digest = hashlib.sha1(f"{source}\0{name}".encode()).hexdigest()[:8]
    readable = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")[-80:]
    return f"{readable}-{digest}" if readable else digest


def _urls(spec: str, ignored: Counts) -> list[str]:
    """The urls of one source. A folder without tars is an image folder, read whole, and so is one photo; in a folder
    of tars, every other file is counted in ``ignored``."""
    path = Path(spec)
    if path.is_file() and extension(path) in PIL_EXTENSIONS:
        return [spec]
    if not path.is_dir():
        return resolve_sources(spec)
    if not any(path.glob("*.tar")):
        return [spec]
    urls = resolve_sources(spec)
    files, broken = folder_files(path)
    for other in sorted(set(files) - {Path(u) for u in urls}):
        ignored.add("not a tar shard (in a folder of shards)", str(other))
    for link in broken:
        ignored.add("broken link", str(link))
    return urls


def _ignored_reason(path: Path, source: ImageFolder) -> str | None:
    """Why a folder's file that is no image is not part of any sample, or None when it is."""
    if extension(path) not in SIDE_EXTENSIONS:
        return "unsupported extension"
    sides = source.sides.get(path.with_suffix(""))
    if sides is None:
        return "caption or metadata with no image"
    return None if sides[extension(path)] == path else "second side file of one image (extensions differ in case)"


def _folder_samples(folder: str, ignored: Counts) -> Iterator[dict[str, Any]]:
    """Raw samples of an image folder (symlinked folders followed): every file PIL opens, with its .txt/.json/.cls;
    every other file and every broken link is counted in ``ignored``."""
    files, broken = folder_files(folder)
    source = ImageFolder.of(folder, files, PIL_EXTENSIONS)
    images = set(source.images)
    for path in files:
        if path not in images and (reason := _ignored_reason(path, source)) is not None:
            ignored.add(reason, str(path))
    for link in broken:
        ignored.add("broken link", str(link))
    yield from (raw for _, raw in source.read(range(len(source))))


def _photo_samples(photo: str) -> Iterator[dict[str, Any]]:
    """The one raw sample of a photo given as a source, with its side files, keyed as in its folder."""
    path = Path(photo)
    files = [path, *(p for p in path.parent.iterdir() if p.with_suffix("") == path.with_suffix("") and p != path)]
    source = ImageFolder.of(str(path.parent), files, {extension(path)})
    yield from (raw for _, raw in source.read(range(len(source))))


def _raw_samples(urls: Sequence[str], skipped: Counts, ignored: Counts) -> Iterator[dict[str, Any]]:
    """Raw samples of every source in order; a tar cut short is counted once and keeps what precedes the cut."""
    for url in urls:
        if Path(url).is_dir():
            yield from _folder_samples(url, ignored)
        elif Path(url).is_file() and extension(Path(url)) in PIL_EXTENSIONS:
            yield from _photo_samples(url)
        else:
            yield from complete_samples(url, lambda err, url=url: skipped.tar_error(url, err), ignored.add)


def _caption(raw: dict[str, Any], meta: dict[str, Any]) -> str | None:
    """The original caption: ``.txt``, else the first json caption field."""
    if "txt" in raw:
        return caption_text(raw, "txt", meta)
    return next((text for f in CAPTION_FIELDS if (text := caption_text(raw, f, meta))), None)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def to_sample(raw: dict[str, Any], ignored: Counts) -> tuple[dict[str, bytes], tuple[int, int]] | str:
    """The clean webdataset sample of one raw sample and its decoded (h, w), or why it is skipped. Members that
    are neither its image nor a kept member are counted in ``ignored``."""
    source = f"{raw.get('__url__', '')}:{raw['__key__']}"
    ext = next((e for e in IMAGE_MEMBERS if e in raw), None)
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
    for member in sorted(set(raw) - {ext, *SIDE_EXTENSIONS}):
        if not member.startswith("__"):
            ignored.add("unsupported tar member", f"{source}.{member}")
    key = stable_key(Path(str(raw.get("__url__", ""))).name, raw["__key__"])
    h, w = original_size(meta, (image.height, image.width))
    meta = meta | {"key": key, "source": source, "original_size": [h, w], "aspect_ratio": h / w}
    if ext in IMAGE_EXTENSIONS:
        stored = {"jpg" if ext == "jpeg" else ext: raw[ext]}
    else:  # readers take JPEG, PNG and WebP: store the image every tool decodes, losslessly
        stored, meta["converted_from"] = {"png": _png(image)}, ext
    sample = {"__key__": key, **stored, "json": json.dumps(meta).encode()}
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
    skipped, ignored = Counts(), Counts()
    urls = [url for spec in sources for url in _urls(spec, ignored)]
    names = [Path(url).name for url in urls]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:  # keys hash the source's name: two sources of one name would collide
        raise DataError(f"two sources share the name {repeated[0]!r}: ingest them into separate folders")
    # Counts keyed by the paper's 1024-px bucket sizes; a table at any resolution matches them by ratio.
    # They come from the stored image's size, which decides its bucket in training (not the original size).
    table = bucket_table(1024, 64)
    buckets: dict[str, int] = {}
    seen: set[str] = set()
    count = 0
    with atomic_folder(out) as partial:
        with wds.ShardWriter(str(partial / "shard-%06d.tar"), maxcount=samples_per_shard, verbose=0,
                             encoder=False) as sink:
            for raw in tqdm(_raw_samples(urls, skipped, ignored), desc="ingest", unit="img", disable=not progress):
                result = to_sample(raw, ignored)
                if isinstance(result, str) or result[0]["__key__"] in seen:
                    reason = result if isinstance(result, str) else "duplicate key"
                    skipped.add(reason, sample_name(raw))
                    continue
                sample, (h, w) = result
                seen.add(sample["__key__"])
                sink.write(sample)
                bucket = table[nearest_bucket(h, w, table)[0]]
                name = f"{bucket[0]}x{bucket[1]}"
                buckets[name] = buckets.get(name, 0) + 1
                count += 1
        if count == 0:
            raise DataError(f"no readable sample in {', '.join(sources)} (skipped: {skipped.summary()}; "
                            f"ignored: {ignored.summary()})")
        manifest = {
            "kind": "ingested", "sources": list(sources), "count": count,
            "shards": sorted(p.name for p in partial.glob("shard-*.tar")), "samples_per_shard": samples_per_shard,
            "bucket_counts": dict(sorted(buckets.items())), **skipped.fields("skipped"), **ignored.fields("ignored"),
        }
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest

