"""The one atomic writer: whole files or none, hashed as the bytes go out (no second read to hash a checkpoint)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from pixart_lightning.files import atomic_folder, atomic_path, atomic_write, publish_folder, sha256


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


def test_a_path_writer_publishes_its_file_whole_or_not_at_all(tmp_path: Path) -> None:
    """Writers that take a path (safetensors) write to a temporary name: the old file stays until the new is whole."""
    path = tmp_path / "final.safetensors"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="killed"), atomic_path(path) as tmp:
        tmp.write_bytes(b"half")
        assert path.read_bytes() == b"old"
        raise RuntimeError("killed")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["final.safetensors"]
    with atomic_path(path) as tmp:
        tmp.write_bytes(b"new")
    assert path.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["final.safetensors"]


def test_a_folder_appears_whole_and_a_published_one_is_not_overwritten(tmp_path: Path) -> None:
    """A folder is filled beside its name and renamed at the end; an empty folder of that name is taken over, and
    one that another process published meanwhile is kept (FileExistsError), with no partial folder left behind."""
    target = tmp_path / "world"
    target.mkdir()
    with atomic_folder(target) as partial:
        (partial / "a.tar").write_bytes(b"a")
        assert not (target / "a.tar").exists()
    assert [p.name for p in target.iterdir()] == ["a.tar"]
    with pytest.raises(FileExistsError, match="not an empty folder"), atomic_folder(target) as partial:
        (partial / "b.tar").write_bytes(b"b")
    with pytest.raises(RuntimeError, match="killed"), atomic_folder(tmp_path / "other") as partial:
        raise RuntimeError("killed")
    assert [p.name for p in tmp_path.iterdir()] == ["world"] and [p.name for p in target.iterdir()] == ["a.tar"]


def test_publishing_a_folder_with_replace_swaps_out_the_old_one(tmp_path: Path) -> None:
    """A sharded checkpoint written again under its name replaces the old folder, which leaves nothing behind."""
    path, new = tmp_path / "step-2.ckpt", tmp_path / "step-2.ckpt.tmp"
    for folder, name in ((path, "old"), (new, "new")):
        folder.mkdir()
        (folder / name).write_text(name)
    publish_folder(new, path, replace=True)
    assert [p.name for p in path.iterdir()] == ["new"] and [p.name for p in tmp_path.iterdir()] == ["step-2.ckpt"]


def test_only_the_atomic_writer_renames_into_place() -> None:
    """Temporary-name-and-rename lives in files.py alone; every other module writes through its functions, so a
    crash leaves the same (no) traces everywhere and one fix reaches every writer."""
    root = Path(__file__).resolve().parents[1]
    renames = re.compile(r"\b(os\.(replace|rename)|shutil\.move)\(")
    found = [
        f"{path.relative_to(root)}:{number}"
        for package in ("pixart_lightning", "stages", "callbacks")
        for path in sorted((root / package).rglob("*.py"))
        if path != root / "pixart_lightning" / "files.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if renames.search(line)
    ]
    assert found == []
