"""Every input file the data tools are given is either in their output or named in a count."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pixart_lightning.data.extract import ExtractSettings, extract
from pixart_lightning.data.ingest import ingest
from pixart_lightning.data.samples import open_image
from pixart_lightning.data.shards import DataError, resolve_sources, tar_shards
from pixart_lightning.data.sources import ImageFolder, complete_samples
from tests.test_ingest_extract import all_samples, jpeg, write_tar


def png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_symlinked_folders_broken_links_and_upper_case_captions_are_kept_or_counted(tmp_path: Path) -> None:
    linked = tmp_path / "elsewhere"
    linked.mkdir()
    (linked / "linked.jpg").write_bytes(jpeg((8, 8)))
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "cat.jpg").write_bytes(jpeg((8, 8)))
    (photos / "cat.TXT").write_text("a cat")
    (photos / "linkdir").symlink_to(linked, target_is_directory=True)
    (photos / "loop").symlink_to(photos, target_is_directory=True)  # followed once, never in circles
    (photos / "broken.jpg").symlink_to(tmp_path / "gone.jpg")
    manifest = ingest([str(photos)], tmp_path / "out", progress=False)
    assert manifest["count"] == 2
    assert manifest["ignored"] == {"broken link": 1}
    captions = {json.loads(s["json"])["source"].rsplit(":", 1)[1]: s.get("txt") for s in all_samples(tmp_path / "out")}
    assert captions == {"cat": b"a cat", "linkdir/linked": None}
    training = ImageFolder.list(str(photos))  # the training loader reads the same files and captions
    assert training.read([0]).__next__()[1]["txt"] == b"a cat"


def cut_inside_header_of(path: Path, member: str) -> Path:
    """A copy of the tar cut 100 bytes into the header of ``member``."""
    with tarfile.open(path) as tar:
        offset = tar.getmember(member).offset
    cut = path.with_name("cut.tar")
    cut.write_bytes(path.read_bytes()[: offset + 100])
    return cut


def read_tar(url: Path) -> tuple[list[str], list[str]]:
    errors: list[str] = []
    keys = [s["__key__"] for s in complete_samples(str(url), lambda err: errors.append(type(err).__name__))]
    return keys, errors


def test_a_tar_cut_inside_a_header_or_at_a_member_boundary_is_counted(tmp_path: Path) -> None:
    whole = write_tar(tmp_path / "whole.tar", [(f"{k}.{e}", jpeg((8, 8)) if e == "jpg" else b"x")
                                               for k in ("a", "b", "c") for e in ("jpg", "txt")])
    assert read_tar(whole) == (["a", "b", "c"], [])
    # b is open at the cut (its caption may be missing): dropped, the cut counted once
    assert read_tar(cut_inside_header_of(whole, "b.txt")) == (["a"], ["ReadError"])
    with tarfile.open(whole) as tar:
        boundary = tar.getmember("c.jpg").offset
    (tmp_path / "boundary.tar").write_bytes(whole.read_bytes()[:boundary])
    assert read_tar(tmp_path / "boundary.tar") == (["a"], ["ReadError"])


def test_tar_members_webdataset_leaves_out_are_counted(tmp_path: Path) -> None:
    shard = write_tar(tmp_path / "in.tar", [("a.jpg", jpeg((8, 8))), ("README", b"notes")])
    manifest = ingest([str(shard)], tmp_path / "out", progress=False)
    assert manifest["count"] == 1
    assert manifest["ignored_names"] == {"tar member with no sample key": [f"{shard}:README"]}


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grayscale_keeps_its_tones(fmt: str) -> None:
    gradient = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    decoded = np.asarray(open_image(png(Image.fromarray(gradient), fmt)))
    assert decoded.shape == (64, 64, 3)
    assert abs(int(decoded[32, 0, 0]) - 128) <= 2  # mid-gray, not clipped to white
    assert decoded.min() == 0 and decoded.max() == 255


def test_photos_given_directly_are_ingested_with_their_captions(tmp_path: Path) -> None:
    (tmp_path / "cat.jpg").write_bytes(jpeg((8, 8)))
    (tmp_path / "cat.txt").write_text("a cat")
    (tmp_path / "dog.JPG").write_bytes(jpeg((8, 8)))
    manifest = ingest([str(tmp_path / "cat.jpg"), str(tmp_path / "dog.JPG")], tmp_path / "out", progress=False)
    assert manifest["count"] == 2
    assert sorted(s.get("txt", b"") for s in all_samples(tmp_path / "out")) == [b"", b"a cat"]


def test_a_folder_of_gifs_is_an_image_folder_to_ingest_first(tmp_path: Path) -> None:
    (tmp_path / "a.gif").write_bytes(png(Image.new("P", (8, 8)), "GIF"))
    assert resolve_sources(str(tmp_path)) == [str(tmp_path)]
    with pytest.raises(DataError, match="is an image folder: run `pixart-lightning data ingest`"):
        tar_shards(str(tmp_path))


def test_skip_names_say_which_file_or_shard(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "cat.jpg").write_bytes(jpeg((8, 8)))
    (photos / "cat.png").write_bytes(png(Image.new("RGB", (8, 8))))
    manifest = ingest([str(photos)], tmp_path / "ingested", progress=False)
    assert manifest["skipped_names"] == {"duplicate key": [str(photos / "cat.png")]}
    shard = write_tar(tmp_path / "in.tar", [("a.jpg", jpeg((8, 8))), ("bad.jpg", b"not a jpeg")])
    stats = extract(str(shard), tmp_path / "features", ExtractSettings(vae="pixel", text_encoder=None,
                                                                       resolution=16), progress=False)
    assert stats["skipped_names"] == {"undecodable (UnidentifiedImageError)": [f"{shard}:bad"]}


def test_files_beside_an_image_that_repeat_a_side_extension_are_counted(tmp_path: Path) -> None:
    (tmp_path / "cat.jpg").write_bytes(jpeg((8, 8)))
    (tmp_path / "cat.TXT").write_text("upper")
    (tmp_path / "cat.txt").write_text("lower")
    manifest = ingest([str(tmp_path)], tmp_path.with_name(tmp_path.name + "-out"), progress=False)
    assert manifest["count"] == 1
    assert list(manifest["ignored"]) == ["second side file of one image (extensions differ in case)"]
