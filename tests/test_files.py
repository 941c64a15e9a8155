"""The one atomic writer: whole files or none, hashed as the bytes go out (no second read to hash a checkpoint)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pixart_lightning.files import atomic_write, sha256


def test_hash_while_writing_equals_sha256_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "step.ckpt"
    state = {"weights": torch.randn(1100, 1000), "step": 7}  # several writes, more than one 4 MiB buffer
    with atomic_write(path) as out:
        torch.save(state, out)
    assert out.record == {"bytes": path.stat().st_size, "sha256": sha256(path)}
    assert torch.equal(torch.load(path)["weights"], state["weights"])
    assert [p.name for p in tmp_path.iterdir()] == ["step.ckpt"]  # the temporary name is gone


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "index.json"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_write(path) as out:
        out.write(b"half of the new")
        raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["index.json"]
