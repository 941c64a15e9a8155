"""Re-captioning shards with a tiny random LLaVA: output layout, bad samples, resume, rank split, prompts."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from webdataset import TarWriter

from pixart_lightning.data import caption as caption_module
from pixart_lightning.data.caption import (
    DENSE_KEY,
    FALLBACK_MAX_NEW_TOKENS,
    PROMPT,
    Captioner,
    caption_prompt,
    recaption,
)
from pixart_lightning.data.shards import DataError, tar_shards
from pixart_lightning.hub import ModelNotAvailableError
from pixart_lightning.shapes.tiny_models import build_tiny_llava

SHARDS = ("shard-000000.tar", "shard-000001.tar")


def image_bytes(color: tuple[int, int, int], size=(32, 32), fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


# Per shard: samples with an image (bytes), an optional caption and metadata; "bad" holds no image at all.
INPUT = {
    SHARDS[0]: [
        {"__key__": "a0", "png": image_bytes((255, 0, 0)), "txt": b"a red square", "json": b'{"id": 0}'},
        {"__key__": "a1", "png": b"\x89PNG but not really", "txt": b"a broken image"},
        {"__key__": "a2", "jpg": image_bytes((0, 0, 255), (48, 32), "JPEG"), "txt": "un cercle bleu \u00e9".encode()},
    ],
    SHARDS[1]: [
        {"__key__": "b0", "png": image_bytes((0, 255, 0)), "txt": b"green"},
        {"__key__": "b1", "png": image_bytes((9, 9, 9), (24, 40))},  # no caption: the unseeded prompt
        {"__key__": "b2", "png": image_bytes((200, 100, 0)), "txt": b"orange", "json": b"{}"},
    ],
}


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    """{key: {extension: bytes}} of a shard."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tiny model gains nothing from more threads, and other jobs share the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory) -> Path:
    return build_tiny_llava(tmp_path_factory.mktemp("llava") / "tiny-llava")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("source")
    for name, samples in INPUT.items():
        with TarWriter(str(folder / name), encoder=False) as sink:
            for sample in samples:
                sink.write(sample)
    (folder / "manifest.json").write_text(json.dumps({"bucket_counts": {"32x32": 5}}))
    return folder


@pytest.fixture(scope="module")
def captioned(source: Path, tiny_llava: Path, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("captioned")
    summary = recaption(str(source), out, model=str(tiny_llava), batch_size=2, max_new_tokens=8, progress=False)
    return out, summary


def test_prompt_is_seeded_with_the_original_caption() -> None:
    assert caption_prompt(None) == caption_prompt("  ") == PROMPT
    assert caption_prompt(" a red cat ") == (
        'Given the caption of this image "a red cat", describe this image and its style in a very detailed manner.'
    )


def test_chat_template_puts_image_and_prompt_in_a_user_turn(tiny_llava: Path) -> None:
    chat = Captioner(str(tiny_llava), max_new_tokens=4).chat("a red cat")
    assert chat.startswith("USER: <image>\n") and chat.endswith("ASSISTANT:")
    assert caption_prompt("a red cat") in chat


def test_batched_captions_match_one_by_one(tiny_llava: Path) -> None:
    """Prompts of different lengths share a batch through left padding without changing what is generated."""
    captioner = Captioner(str(tiny_llava), max_new_tokens=8)
    images = [Image.effect_noise((32, 32), 40 + 20 * i).convert("RGB") for i in range(3)]
    captions = ["a red square on a blue background", None, "green"]
    batched = captioner(images, captions)
    assert batched == [captioner([image], [caption])[0] for image, caption in zip(images, captions)]
    assert all(batched)


def test_wide_image_edges_reach_the_model_when_padded_not_when_cropped(tiny_llava: Path) -> None:
    """A 96x32 image, red | green | blue: padded, LLaVA's input holds both ends between mean-colour bands (which
    normalise to zero); centre-cropped, the default processor keeps only the green middle."""
    wide = Image.new("RGB", (96, 32), (0, 255, 0))
    wide.paste((255, 0, 0), (0, 0, 32, 32))
    wide.paste((0, 0, 255), (64, 0, 96, 32))
    red, green, blue = torch.eye(3)
    views = {}
    for aspect in ("pad", "crop"):
        captioner = Captioner(str(tiny_llava), max_new_tokens=1, image_aspect=aspect)
        pixels = captioner.inputs([wide], [None])["pixel_values"][0]  # (3, 32, 32), normalised
        stats = captioner.processor.image_processor
        views[aspect] = (pixels * torch.tensor(stats.image_std)[:, None, None]
                         + torch.tensor(stats.image_mean)[:, None, None]).permute(1, 2, 0)  # RGB in [0, 1]
    padded, cropped = views["pad"], views["crop"]
    assert torch.allclose(padded[16, 1], red, atol=0.05) and torch.allclose(padded[16, 30], blue, atol=0.05)
    assert torch.allclose(padded[16, 16], green, atol=0.05)
    assert torch.allclose(padded[[0, 31]], torch.tensor(stats.image_mean).expand(2, 32, 3), atol=1 / 255)
    assert torch.allclose(cropped, green.expand(32, 32, 3), atol=0.05)


def test_samples_keep_their_members_and_gain_a_dense_caption(captioned: tuple[Path, dict]) -> None:
    out, summary = captioned
    assert sorted(p.name for p in out.glob("*.tar")) == list(SHARDS)
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]  # no temporary file left
    for name, samples in INPUT.items():
        written = read_tar(out / name)
        expected = {s["__key__"]: s for s in samples if s["__key__"] != "a1"}
        assert list(written) == list(expected)
        for key, members in written.items():
            original = {k: v for k, v in expected[key].items() if k != "__key__"}
            assert {k: v for k, v in members.items() if k != DENSE_KEY} == original
            assert members[DENSE_KEY].decode("utf-8").strip()

    assert summary["shards_done"] == 2 and summary["shards_already_done"] == 0
    assert summary["count"] == 5 and summary["skipped"] == {"undecodable (UnidentifiedImageError)": 1}
    assert [Path(n).name for n in summary["skipped_names"]["undecodable (UnidentifiedImageError)"]] == [f"{SHARDS[0]}:a1"]
    assert summary["image_aspect"] == "pad"  # the whole image by default
    manifest = json.loads((out / "caption-manifest.json").read_text())
    assert manifest == {k: v for k, v in summary.items() if k not in ("shards_done", "shards_already_done")}
    assert json.loads((out / "manifest.json").read_text()) == {"bucket_counts": {"32x32": 5}}


def test_rerun_skips_finished_shards_without_loading_the_model(source: Path, captioned: tuple[Path, dict],
                                                                tmp_path: Path, tiny_llava: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    shutil.copytree(captioned[0], out)
    before = {name: (out / name).read_bytes() for name in SHARDS}
    with monkeypatch.context() as patch:
        patch.setattr(caption_module, "Captioner", None)  # not called: nothing to caption
        summary = recaption(str(source), out, model=str(tiny_llava), max_new_tokens=8, progress=False)
    assert (summary["shards_done"], summary["shards_already_done"]) == (0, 2)
    assert {name: (out / name).read_bytes() for name in SHARDS} == before
    manifest = json.loads((out / "caption-manifest.json").read_text())  # the totals survive a rerun
    assert (manifest["count"], manifest["shards_finished"], manifest["skipped"]) == (5, 2, captioned[1]["skipped"])

    (out / SHARDS[1]).unlink()
    summary = recaption(str(source), out, model=str(tiny_llava), batch_size=2, max_new_tokens=8, progress=False)
    assert (summary["shards_done"], summary["shards_already_done"], summary["count"]) == (1, 1, 5)
    assert read_tar(out / SHARDS[1]) == read_tar(captioned[0] / SHARDS[1])  # greedy decoding is deterministic


def test_a_rerun_with_other_settings_is_refused_naming_each(source: Path, captioned: tuple[Path, dict],
                                                             tmp_path: Path, tiny_llava: Path) -> None:
    """Every shard records its settings (the effective token limit too); a rerun that differs names each
    difference and how to resume, and touches nothing."""
    out = tmp_path / "out"
    shutil.copytree(captioned[0], out)
    (out / SHARDS[1]).unlink()  # one shard left to do: the rerun would caption it with the other settings
    recorded = json.loads((out / "shard-000000.stats.json").read_text())["settings"]
    assert recorded == {"model": str(tiny_llava.resolve()), "max_new_tokens": 8, "seed_with_caption": True,
                        "image_aspect": "pad"}
    other = tmp_path / "other-llava"
    shutil.copytree(tiny_llava, other)
    with pytest.raises(FileExistsError) as caught:
        recaption(str(source), out, model=str(other), max_new_tokens=4, seed_with_caption=False, image_aspect="crop",
                  progress=False)
    assert str(caught.value) == (
        f"{out} holds captions made with other settings (model: {str(tiny_llava.resolve())!r} there, "
        f"{str(other.resolve())!r} asked; max_new_tokens: 8 there, 4 asked; seed_with_caption: True there, False "
        "asked; image_aspect: 'pad' there, 'crop' asked); run with its settings to resume it, or write the new "
        "captions to another folder")
    assert not (out / SHARDS[1]).exists()


def test_shards_finished_before_statistics_were_kept_are_counted_not_recaptioned(
        source: Path, captioned: tuple[Path, dict], tmp_path: Path, tiny_llava: Path, monkeypatch) -> None:
    """The previous version wrote a finished shard with no .stats.json beside it: a rerun counts its samples."""
    out = tmp_path / "out"
    shutil.copytree(captioned[0], out)
    for stats in out.glob("*.stats.json"):
        stats.unlink()
    before = {name: (out / name).read_bytes() for name in SHARDS}
    monkeypatch.setattr(caption_module, "Captioner", None)  # not called: nothing to caption
    summary = recaption(str(source), out, model=str(tiny_llava), max_new_tokens=8, progress=False)
    assert (summary["shards_done"], summary["shards_already_done"], summary["count"]) == (0, 2, 5)
    assert {name: (out / name).read_bytes() for name in SHARDS} == before
    assert json.loads((out / "shard-000000.stats.json").read_text())["samples"] == 2


def test_ranks_split_shards_by_index(source: Path, captioned: tuple[Path, dict], tmp_path: Path,
                                     tiny_llava: Path) -> None:
    summary = recaption(f"{source}/shard-{{000000..000001}}.tar", tmp_path, model=str(tiny_llava), batch_size=2,
                        max_new_tokens=8, rank=0, world_size=2, progress=False)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == [SHARDS[0]]
    assert (summary["shards_done"], summary["count"], summary["shards_finished"], summary["shards"]) == (1, 2, 1, 2)
    assert read_tar(tmp_path / SHARDS[0]) == read_tar(captioned[0] / SHARDS[0])


def test_truncated_shard_keeps_its_complete_samples(tmp_path: Path, tiny_llava: Path) -> None:
    """The tar breaks inside s3's image: s3 is lost, every sample before it is captioned (as ingest and extract
    keep them), and the cut is counted once."""
    noise = Image.effect_noise((32, 32), 64).convert("RGB")  # incompressible enough to span several tar blocks
    whole = tmp_path / "whole.tar"
    with TarWriter(str(whole), encoder=False) as sink:
        for i in range(4):
            buffer = io.BytesIO()
            noise.rotate(90 * i).save(buffer, format="PNG")
            sink.write({"__key__": f"s{i}", "png": buffer.getvalue(), "txt": b"noise"})
    data = whole.read_bytes()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "cut.tar").write_bytes(data[: data.index(b"s3.png") + 1024])
    summary = recaption(str(tmp_path / "src"), tmp_path / "out", model=str(tiny_llava), max_new_tokens=4,
                        progress=False)
    assert list(read_tar(tmp_path / "out" / "cut.tar")) == ["s0", "s1", "s2"]
    assert summary["skipped"] == {"unreadable tar data (ReadError)": 1} and summary["count"] == 3


def test_sources_without_shards_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no .tar shards"):
        tar_shards(tmp_path)
    with pytest.raises(DataError, match="2 of 2 shards do not exist"):
        tar_shards(f"{tmp_path}/shard-{{0..1}}.tar")
    with pytest.raises(ValueError, match="must not be the source"):
        (tmp_path / "a.tar").write_bytes(b"")
        recaption(str(tmp_path), tmp_path, model="unused", progress=False)


def test_unreachable_hub_model_fails_clearly(source: Path, tmp_path: Path, monkeypatch) -> None:
    """A Hub id that is neither cached nor downloadable names the model and how to supply it as a folder."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError, match="LLaVA generation config 'pixart-lightning-tests/no-such-llava'"):
        recaption(str(source), tmp_path / "out", model="pixart-lightning-tests/no-such-llava", progress=False)


def test_new_tokens_follow_the_model_and_each_shard_reports_its_speed(source: Path, tiny_llava: Path,
                                                                      tmp_path: Path, capsys) -> None:
    """The random tiny LLaVA never stops: without --max-new-tokens its generation config's limit holds, the option
    overrides it, and every finished shard prints its tokens/s and the ETA of the rest."""
    model = tmp_path / "llava-3-tokens"
    shutil.copytree(tiny_llava, model)
    config = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps(config | {"max_new_tokens": 3}))
    assert Captioner(str(tiny_llava)).max_new_tokens == FALLBACK_MAX_NEW_TOKENS
    assert Captioner(str(model), max_new_tokens=5).max_new_tokens == 5
    captioner = Captioner(str(model))
    captions, tokens = captioner.caption([Image.new("RGB", (32, 32), (200, 0, 0))] * 2, [None, "red"])
    assert captioner.max_new_tokens == 3 and tokens == 6 and all(captions)

    summary = recaption(str(source), tmp_path / "out", model=str(model), batch_size=2, progress=False)
    reports = [line for line in capsys.readouterr().out.splitlines() if line.startswith("caption: ")]
    assert [line.split()[1] for line in reports] == [f"{name}:" for name in SHARDS]
    assert all("tokens/s" in line and "ETA" in line for line in reports)
    assert summary["new_tokens"] == 3 * summary["count"] and summary["max_new_tokens"] == 3  # the limit used
