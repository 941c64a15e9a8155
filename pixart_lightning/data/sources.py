"""A source's raw samples by ordinal: tar headers indexed once, image folders listed once, other tars streamed.

A webdataset sample is a run of consecutive tar members whose names agree up to the first dot of the file
name (``0001.jpg``, ``0001.txt``, ``0001.json``). :class:`TarIndex` walks a local, uncompressed tar's headers
only (each header is read, each member's data is seeked over) and keeps where every sample's run of members
starts and ends. A reader can then

- take every n-th sample of a shard and read only those samples' bytes: with fewer shards than rank x worker
  slots, each slot reads its own samples of every shard, not every byte of every shard;
- re-read a few given samples (those a saved data position names) without reading the ones before them.

Tars that cannot be indexed (remote urls, ``pipe:`` commands, compressed tars) are streamed by webdataset and
their samples counted as they pass. Every source yields the raw samples webdataset itself would (same
members, same grouping, same ``__key__`` and ``__url__``); read errors go to the caller's handler.

The data tools read a tar whole through :func:`complete_samples`, which keeps only samples read in full.
"""

from __future__ import annotations

import io
import logging
import os
import re
import tarfile
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander, tarfile_samples

from pixart_lightning.data.samples import IMAGE_EXTENSIONS, PIL_EXTENSIONS, SIDE_EXTENSIONS

Handler = Callable[[Exception], bool]
OnIgnored = Callable[[str, str], None]
"""Hears of an input left out on purpose: ``(reason, name)``."""
Ordinals = range | Sequence[int]
"""Sample ordinals in increasing order: a range (possibly open-ended: ``range(k, sys.maxsize, n)``) or a list."""

log = logging.getLogger(__name__)

SKIP_META = re.compile(r"__[^/]*__($|/)")  # member names webdataset's tar_file_iterator leaves out


def is_remote(url: str) -> bool:
    """A url webdataset opens itself (http(s), s3, ``pipe:`` commands): not checked, not globbed, not indexed."""
    return "://" in url or url.startswith("pipe:")


def extension(path: Path) -> str:
    return path.suffix.lower().lstrip(".")


def folder_files(root: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """Every file under ``root`` in sorted order, symlinked folders followed (each real folder once, so a link
    to an ancestor does not loop), and the broken links, which name no file."""
    files: list[Path] = []
    broken: list[Path] = []
    seen: set[str] = set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        seen.add(os.path.realpath(folder))
        subfolders[:] = [d for d in subfolders if os.path.realpath(os.path.join(folder, d)) not in seen]
        for name in names:
            path = Path(folder, name)
            (files if path.is_file() else broken).append(path)
    return sorted(files), sorted(broken)


def _member_key(member: tarfile.TarInfo) -> str | None:
    """The sample key webdataset groups this member under, or None for a member it leaves out."""
    if not member.isreg() or SKIP_META.match(member.name):
        return None
    return base_plus_ext(member.name)[0]


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The tar's members up to its end or to where its data is cut short (reading that sample reports it)."""
    while True:
        try:
            member = tar.next()
        except tarfile.ReadError:
            return
        if member is None:
            return
        tar.members.clear()  # TarFile keeps every member it has read; the index needs none of them
        yield member


def _ignored_member_reason(member: tarfile.TarInfo) -> str | None:
    """Why webdataset leaves out a member that holds data, or None for one it reads or one with nothing in it
    (a folder entry, webdataset's own ``__meta__`` members)."""
    if member.isdir() or SKIP_META.match(member.name):
        return None
    return "tar member that is not a regular file" if not member.isreg() else "tar member with no sample key"


def _ends_early(url: str, tar: tarfile.TarFile) -> bool:
    """Whether a local uncompressed tar stops before its end-of-archive blocks: ``tarfile`` takes a header cut
    short (or no header at all) for the archive's end, so a cut there or at a member boundary looks complete."""
    if is_remote(url) or getattr(tar.fileobj, "comptype", "tar") != "tar":
        return False
    return os.path.getsize(url) < tar.offset + 2 * tarfile.BLOCKSIZE


def complete_samples(
    url: str, on_error: Callable[[Exception], None], on_ignored: OnIgnored | None = None
) -> Iterator[dict[str, Any]]:
    """The samples of one tar (grouped as webdataset groups them) whose members were all read in full.

    Where the tar is cut short or cannot be read, ``on_error`` hears of it once and reading stops: every sample
    before the cut is kept, the one still open at the cut is not (it may lack members). A local uncompressed tar
    that ends without its end-of-archive blocks counts as cut too, wherever the cut falls. ``data ingest``,
    ``caption``, ``stats`` and ``extract`` all read tars here, so they agree on what a truncated tar holds.
    Members webdataset leaves out (no dot in the name, a link) go to ``on_ignored`` as ``(reason, url:name)``.
    """
    sample: dict[str, Any] | None = None
    try:
        with closing(gopen(url)) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                tar.members = []  # a streamed TarFile keeps every member it has read otherwise
                key = _member_key(member)
                if key is None:
                    reason = _ignored_member_reason(member)
                    if reason is not None and on_ignored is not None:
                        on_ignored(reason, f"{url}:{member.name}")
                    continue
                if sample is not None and sample["__key__"] != key:
                    yield sample  # complete: the next member belongs to another sample
                    sample = None
                sample = sample or {"__key__": key, "__url__": url}
                sample[base_plus_ext(member.name)[1].lower()] = tar.extractfile(member).read()
            if _ends_early(url, tar):
                raise tarfile.ReadError("the tar ends without its end-of-archive blocks (cut short)")
    except Exception as err:  # noqa: BLE001 - a cut or unreadable tar ends its samples, never the run
        on_error(err)
        return
    if sample is not None:
        yield sample


def _read_range(fd: int, start: int, end: int) -> bytes:
    chunks = []
    while start < end:
        chunk = os.pread(fd, end - start, start)
        if not chunk:
            break
        chunks.append(chunk)
        start += len(chunk)
    return b"".join(chunks)


@dataclass(frozen=True)
class TarIndex:
    """Byte range of every sample of a local uncompressed tar: from its first member's header to the end of its
    last member's data block (cut at the end of the file when the tar is truncated)."""

    url: str
    starts: np.ndarray
    ends: np.ndarray

    @classmethod
    def build(cls, url: str) -> TarIndex:
        """Raises ``OSError`` for a file that cannot be read, ``tarfile.ReadError`` for one that is not an
        uncompressed tar."""
        size = os.path.getsize(url)
        starts: list[int] = []
        ends: list[int] = []
        key = None
        with open(url, "rb", buffering=0) as file, tarfile.open(fileobj=file, mode="r:") as tar:
            for member in _members(tar):
                member_key = _member_key(member)
                if member_key is None:
                    continue
                if member_key != key:
                    starts.append(member.offset)
                    ends.append(0)
                    key = member_key
                padded = -(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE  # data fills whole blocks
                ends[-1] = min(member.offset_data + padded, size)
        return cls(url, np.array(starts, dtype=np.int64), np.array(ends, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.starts)

    def read(self, ordinals: Ordinals, handler: Handler) -> Iterator[tuple[int, dict[str, Any]]]:
        with open(self.url, "rb", buffering=0) as file:
            for i in ordinals:
                if i >= len(self):
                    return
                chunk = _read_range(file.fileno(), int(self.starts[i]), int(self.ends[i]))
                members = tar_file_expander([{"url": self.url, "stream": io.BytesIO(chunk)}], handler=handler)
                for raw in group_by_keys(members, handler=handler):
                    yield i, raw


@dataclass(frozen=True)
class StreamedTar:
    """A tar read from its start by webdataset, for sources that cannot be indexed or are read whole anyway."""

    url: str

    def read(self, ordinals: Ordinals, handler: Handler) -> Iterator[tuple[int, dict[str, Any]]]:
        if not len(ordinals):
            return
        wanted = ordinals if isinstance(ordinals, range) else set(ordinals)
        for i, raw in enumerate(tarfile_samples([{"url": self.url}], handler=handler)):
            if i in wanted:
                yield i, raw
            if i >= ordinals[-1]:
                return


@dataclass(frozen=True)
class ImageFolder:
    """An image folder's images in sorted order, each with any .txt/.json/.cls beside it (``cat.jpg`` with
    ``cat.txt`` or ``cat.TXT``: the extension's case does not matter, the name's does)."""

    url: str
    images: list[Path]
    sides: dict[Path, dict[str, Path]]
    """Image path without its extension -> side extension (lower case) -> side file."""

    @classmethod
    def of(cls, url: str, files: Sequence[Path], extensions: Collection[str]) -> ImageFolder:
        """The folder's files of ``extensions`` as its images, with the side files that go with them."""
        images = sorted(p for p in files if extension(p) in extensions)
        stems = {p.with_suffix("") for p in images}
        sides: dict[Path, dict[str, Path]] = {}
        for path in files:
            if extension(path) in SIDE_EXTENSIONS and path.with_suffix("") in stems:
                sides.setdefault(path.with_suffix(""), {}).setdefault(extension(path), path)
        return cls(url, images, sides)

    @classmethod
    def list(cls, url: str) -> ImageFolder:
        """The folder's JPEG, PNG and WebP images (what training reads); other image formats are logged."""
        files, _ = folder_files(url)
        unread = [p for p in files if extension(p) in PIL_EXTENSIONS - set(IMAGE_EXTENSIONS)]
        if unread:
            log.warning("%s: %d images in formats training does not read (first: %s); run `pixart-lightning data "
                        "ingest` on the folder to convert them", url, len(unread), unread[0])
        return cls.of(url, files, IMAGE_EXTENSIONS)

    def __len__(self) -> int:
        return len(self.images)

    def read(self, ordinals: Ordinals, handler: Handler | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
        for i in ordinals:
            if i >= len(self):
                return
            yield i, self._sample(self.images[i])

    def _sample(self, image: Path) -> dict[str, Any]:
        key = str(image.relative_to(self.url).with_suffix(""))
        sample: dict[str, Any] = {"__key__": key, "__url__": self.url, "__file__": str(image)}
        sample[extension(image)] = image.read_bytes()
        for ext, side in self.sides.get(image.with_suffix(""), {}).items():
            sample[ext] = side.read_bytes()
        return sample


Source = TarIndex | StreamedTar | ImageFolder
