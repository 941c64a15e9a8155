"""Files and folders written whole or not at all (the one atomic writer); checkpoint files hashed as written."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHUNK = 1 << 22
"""4 MiB: the read and write buffer (checkpoints run to gigabytes)."""

FileRecord = dict[str, Any]
"""What a checkpoint index records of a file: ``{"bytes": int, "sha256": hex str}``."""

_written: dict[Path, FileRecord] = {}
"""Records of checkpoint files as their writers hashed them, by absolute path. Lightning's ``save_checkpoint``
returns nothing, so the writers leave here what the checkpoint index records (:func:`note_written`,
:func:`written_record`), and a checkpoint just written is never read back to hash it."""


class HashingWriter(io.BufferedWriter):
    """A new binary file that computes the sha256 of the bytes as they go out. It only appends: no seeking back."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(io.FileIO(path, "w"), buffer_size=CHUNK)
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        view = memoryview(data)
        self.digest.update(view)
        self.size += view.nbytes
        return super().write(view)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        raise io.UnsupportedOperation("a hashing writer only appends")

    def seekable(self) -> bool:
        return False

    @property
    def record(self) -> FileRecord:
        return {"bytes": self.size, "sha256": self.digest.hexdigest()}


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary name beside ``path`` to write to, renamed to ``path`` once the block completes: a reader sees
    the old file or the new one, never half of it. For writers that take a path (safetensors, tar writers)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[HashingWriter]:
    """:func:`atomic_path` through a :class:`HashingWriter`, whose ``record`` holds the file's bytes and sha256."""
    with atomic_path(path) as tmp, HashingWriter(tmp) as out:
        yield out


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """A new folder beside ``path`` to fill, renamed to ``path`` once the block completes: a reader sees the whole
    folder or none. An empty folder at ``path`` is taken over; a non-empty one (another process published it
    first) raises FileExistsError. What the block wrote is removed unless it was published."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A random name, as processes of one job may write the same folder at once; mkdir, not mkdtemp (0700), keeps
    # the umask.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    tmp.mkdir()
    try:
        yield tmp
        publish_folder(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_folder(folder: str | os.PathLike, path: str | os.PathLike, replace: bool = False) -> None:
    """Rename the complete ``folder`` to ``path``: a reader sees the old folder or the new one, never half of one.

    A missing or empty ``path`` is taken; an existing one is swapped out and removed with ``replace`` (a newer
    checkpoint of the same name), and raises FileExistsError without it.
    """
    folder, path = Path(folder), Path(path)
    if replace and path.exists():
        old = path.with_name(f".{path.name}.{os.getpid()}.old")
        os.replace(path, old)
        os.replace(folder, path)
        if old.is_dir():
            shutil.rmtree(old)
        else:
            old.unlink()
        return
    try:
        os.replace(folder, path)  # POSIX replaces an empty folder and refuses a non-empty one
    except OSError as err:
        if not path.exists():
            raise
        raise FileExistsError(f"{path} exists and is not an empty folder") from err


def note_written(path: str | os.PathLike, record: FileRecord) -> None:
    """Keep the record of a file just written (here, or by another rank) for :func:`written_record`."""
    _written[Path(path).absolute()] = record


def written_record(path: str | os.PathLike) -> FileRecord | None:
    """The bytes and sha256 of ``path`` as this process wrote it (once: the record is handed over), else None."""
    return _written.pop(Path(path).absolute(), None)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write text with :func:`atomic_write`: a reader sees the old file or the new one."""
    with atomic_write(path) as out:
        out.write(text.encode())


def write_json_atomic(path: str | os.PathLike, payload: Any) -> None:
    """Write JSON with :func:`atomic_write`: a reader sees the old file or the new one."""
    write_text_atomic(path, json.dumps(payload, indent=2, default=str) + "\n")


def sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()
