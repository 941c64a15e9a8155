"""Files written whole or not at all, hashed as they are written."""

from __future__ import annotations

import hashlib
import io
import json
import os
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
def atomic_write(path: str | os.PathLike) -> Iterator[HashingWriter]:
    """A writer to a temporary name beside ``path``, renamed to ``path`` once the block completes: a reader sees
    the old file or the new one, never half of it. The writer's ``record`` holds the file's bytes and sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with HashingWriter(tmp) as out:
            yield out
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def note_written(path: str | os.PathLike, record: FileRecord) -> None:
    """Keep the record of a file just written (here, or by another rank) for :func:`written_record`."""
    _written[Path(path).absolute()] = record


def written_record(path: str | os.PathLike) -> FileRecord | None:
    """The bytes and sha256 of ``path`` as this process wrote it (once: the record is handed over), else None."""
    return _written.pop(Path(path).absolute(), None)


def write_json_atomic(path: str | os.PathLike, payload: Any) -> None:
    """Write JSON with :func:`atomic_write`: a reader sees the old file or the new one."""
    with atomic_write(path) as out:
        out.write((json.dumps(payload, indent=2, default=str) + "\n").encode())


def sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()
