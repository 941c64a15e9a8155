"""User-facing messages say what is true and what to do: the source of a bad value, why a sample was skipped,
which command failed, and never to delete the user's data."""

from __future__ import annotations

import io
import itertools
import json
import re
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from pixart_lightning.cli import main
from pixart_lightning.config import ConfigError, DataSection, load_stage, phase_configs
from pixart_lightning.data.samples import read_caption
from pixart_lightning.data.shards import FILTER_REASONS, ShardStream
from pixart_lightning.runner.chain import plan, run
from pixart_lightning.runner.inputs import prepare_data
from pixart_lightning.shapes.synth import synthesize
from tests.test_stages import small

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEMO = CONFIGS / "demo"


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def image_folder(folder: Path, sides: dict[str, dict[str, bytes]]) -> Path:
    """``name.png`` for every name, with the files beside it that ``sides`` gives (``{"txt": b"..."}``)."""
    folder.mkdir(parents=True)
    for name, members in sides.items():
        (folder / f"{name}.png").write_bytes(png())
        for ext, data in members.items():
            (folder / f"{name}.{ext}").write_bytes(data)
    return folder


def skip_reasons(folder: Path, **changes) -> dict[str, int]:
    """The skip counts that come with the first batch of a stream over ``folder`` (read in name order)."""
    spec = DataSection(**{"shards": str(folder), "batch_size": 2, "resolution": 16, "shuffle_buffer": 1} | changes)
    return next(iter(ShardStream(spec, granularity=4)))["skipped"]


def config_folder(folder: Path, stage_yaml: str) -> Path:
    """configs/demo's base.yaml with a stage-1 file of our own."""
    folder.mkdir()
    (folder / "base.yaml").write_text((DEMO / "base.yaml").read_text())
    (folder / "stage1.yaml").write_text(stage_yaml)
    return folder


# --------------------------------------------------------------------------- the demo's synth and the user's data
def test_demo_synth_leaves_the_users_features_as_they_are(tmp_path: Path, capsys) -> None:
    """Stage 2 of configs/demo pointed at a folder of features trains on them: one line says so, nothing is
    written into the folder and nothing suggests removing it."""
    features = tmp_path / "features"
    features.mkdir()
    with tarfile.open(features / "000000.tar", "w") as tar:
        info = tarfile.TarInfo("a.txt")
        tar.addfile(info, io.BytesIO(b""))
    (features / "manifest.json").write_text(json.dumps({"kind": "features"}))
    before = sorted(p.name for p in features.iterdir())
    cfg = load_stage(DEMO, 2, small(tmp_path, f"data.shards={features}"))
    prepare_data(cfg, granularity=4)
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [f"data.shards={features} holds a dataset of 1 .tar shard(s) (features): training on it as it is "
                   "(data.synth writes the shapes world only into a new or empty folder)"]
    assert sorted(p.name for p in features.iterdir()) == before


def test_demo_synth_says_which_key_to_change(tmp_path: Path) -> None:
    """A shapes world of other parameters: set data.synth=null or another folder; a folder of other files: another
    folder. Neither message tells the user to remove anything."""
    world = tmp_path / "world"
    synthesize(world, count=4, seed=2, resolution=16, samples_per_shard=4, progress=False)
    with pytest.raises(ConfigError, match=r"^data.shards: .* holds a shapes dataset with other parameters .*; set "
                                          r"data.synth=null to train on it as it is, or set data.shards to a new or "
                                          r"empty folder$") as caught:
        prepare_data(load_stage(DEMO, 2, small(tmp_path, f"data.shards={world}")), granularity=4)
    assert "remove" not in str(caught.value)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.md").write_text("my notes")
    with pytest.raises(ConfigError, match=r"^data.shards: .*notes holds other files and no shapes world \(world.json\); "
                                          r"the shapes world is written only into a new or empty folder; set "
                                          r"data.shards to a new or empty folder$") as caught:
        prepare_data(load_stage(DEMO, 2, small(tmp_path, f"data.shards={notes}")), granularity=4)
    assert "remove" not in str(caught.value) and (notes / "todo.md").read_text() == "my notes"


def test_the_demo_on_the_users_data_names_its_fid_reference_first(tmp_path: Path) -> None:
    """The demo's FID reference is its own shapes world: on the user's data it is missing, and the check before any
    stage starts names the key (not a bare path when FID starts)."""
    folder = image_folder(tmp_path / "images", {"a": {"txt": b"red"}})
    with pytest.raises(ConfigError, match=r"missing inputs \(nothing was started\):\n  stage 2: fid.reference: "
                                          r".*/data/stage2 does not exist"):
        run(DEMO, [2], small(tmp_path, f"data.shards={folder}"))


# --------------------------------------------------------------------------- where a bad value was set
def test_a_command_line_value_is_blamed_on_the_command_line() -> None:
    with pytest.raises(ConfigError) as caught:
        load_stage(DEMO, 3, ["data.resolution=50"])
    assert re.fullmatch(
        r"stage 3: command line: data.resolution=50 is not divisible by patch size 4 \(model.size=PixArt-tiny/4\) x VAE "
        rf"factor 1 \(vae.name=pixel\) \[model.size: {re.escape(str(DEMO))}/base.yaml:\d+, vae.name: .*base.yaml:\d+\]",
        str(caught.value))
    with pytest.raises(ConfigError, match=r"is not divisible by model.patch_size=3 x VAE factor 1 \(vae.name=pixel\) "
                                          r"\[model.patch_size: command line, "):
        load_stage(DEMO, 3, ["model.patch_size=3"])
    with pytest.raises(ConfigError, match=r"^stage 2: command line: fid.reference: Cannot convert"):
        load_stage(DEMO, 2, ["fid.reference=[a,b]"])
    with pytest.raises(ConfigError, match=r"^stage 2: command line: unknown key 'optim.lrr'"):
        load_stage(DEMO, 2, ["stage2.optim.lrr=1"])


def test_a_file_value_is_blamed_on_its_file_and_line(tmp_path: Path) -> None:
    """The stage file's line, a phase entry's line, base.yaml's line, or the default."""
    folder = config_folder(tmp_path / "config", "data:\n  shards: data\n  resolution: 50\n")
    with pytest.raises(ConfigError) as caught:
        load_stage(folder, 1)
    assert str(caught.value).startswith(f"stage 1: {folder / 'stage1.yaml'}:3: data.resolution=50 is not divisible")
    folder = config_folder(tmp_path / "phases", "data:\n  shards: data\nphases:\n  - name: small\n"
                                                "    data: {resolution: 48}\n  - name: odd\n    data: {resolution: 50}\n")
    with pytest.raises(ConfigError) as caught:
        plan(folder)
    assert str(caught.value).startswith(f"stage 1 (odd): {folder / 'stage1.yaml'}:7: data.resolution=50 is not")
    base_line = next(i for i, line in enumerate((DEMO / "base.yaml").read_text().splitlines(), 1)
                     if line.strip().startswith("labels:"))
    with pytest.raises(ConfigError) as caught:
        load_stage(DEMO, 1, ["model.num_classes=5"])
    assert str(caught.value).startswith(f"stage 1: {DEMO / 'base.yaml'}:{base_line}: samples.labels [10, 20, 15, 26] "
                                        "are outside [0, model.num_classes=5) [model.num_classes: command line]")
    with pytest.raises(ConfigError, match=r"^stage 1: default: data.shards is empty"):
        load_stage(config_folder(tmp_path / "empty", "train:\n  max_steps: 3\n"), 1)


def test_every_value_a_problem_shows_is_traced(tmp_path: Path) -> None:
    """A global batch the processes do not divide: the batch from the stage file, the nodes from the command line."""
    xl2 = CONFIGS / "pixart-xl2"
    lines = {key: next(i for i, line in enumerate((xl2 / name).read_text().splitlines(), 1)
                       if line.strip().startswith(f"{key}:"))
             for key, name in (("global_batch_size", "stage2.yaml"), ("devices", "base.yaml"))}
    with pytest.raises(ConfigError) as caught:
        load_stage(xl2, 2, ["train.num_nodes=3"])
    assert str(caught.value) == (
        f"stage 2: {xl2 / 'stage2.yaml'}:{lines['global_batch_size']}: data.global_batch_size=11392 is not divisible by "
        "the 24 processes (train.devices=8 x train.num_nodes=3); use a multiple of 24, e.g. 11376 or 11400 "
        f"[train.devices: {xl2 / 'base.yaml'}:{lines['devices']}, train.num_nodes: command line]")
    with pytest.raises(ConfigError, match=r"^stage 3 \(256px\): .*stage3.yaml:12: data.global_batch_size=11392 .*"
                                          r"train.num_nodes: command line\]$"):
        phase_configs(load_stage(xl2, 3, ["train.num_nodes=5"]), xl2)


def test_cli_names_the_command_line_in_one_line(capsys) -> None:
    assert main(["run", str(DEMO), "--stages", "3", "stage3.data.resolution=50"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("pixart-lightning run: error: stage 3: command line: data.resolution=50 is not divisible by "
                           "patch size 4 (model.size=PixArt-tiny/4) x VAE factor 1 (vae.name=pixel) [model.size: ")


# --------------------------------------------------------------------------- skip reasons
def test_no_aesthetic_score_is_its_own_filter(tmp_path: Path) -> None:
    """Without a score a sample is not 'below min_aesthetic'; both are filters, not bad data."""
    folder = image_folder(tmp_path / "images", {
        "a0": {"txt": b"red"}, "a1": {"txt": b"red", "json": b"{}"},
        "b0": {"txt": b"red", "json": b'{"aesthetic": 3.0}'},
        "z0": {"txt": b"red", "json": b'{"aesthetic": 6.0}'}, "z1": {"txt": b"red", "json": b'{"aesthetic": 7.0}'},
    })
    assert skip_reasons(folder, min_aesthetic=5.0) == {"no aesthetic score": 2, "below min_aesthetic": 1}
    assert {"no aesthetic score", "below min_aesthetic"} <= FILTER_REASONS


def test_absent_empty_and_non_utf8_captions_are_told_apart(tmp_path: Path) -> None:
    folder = image_folder(tmp_path / "images", {
        "a": {}, "b": {"txt": b"  \n"}, "c": {"txt": b"\xff\xfe red"}, "d": {"json": b'{"txt": 3}'},
        "y": {"txt": b"a red square"}, "z": {"txt": b"a red circle"},
    })
    assert skip_reasons(folder) == {"no caption": 1, "empty caption": 1, "non-UTF-8 caption": 1,
                                    "non-text caption": 1}
    assert read_caption({"dense.txt": b" two\n"}, "dense.txt", {}) == "two"
    assert read_caption({}, "caption", {"caption": "from json"}) == "from json"
    with pytest.raises(ValueError, match="^no caption$"):
        read_caption({"txt": b"x"}, "dense.txt", {"caption": "x"})


def test_extract_tells_absent_captions_from_bad_ones(tmp_path: Path) -> None:
    """`data extract` counts captions as the loader does (it said "empty or non-UTF-8 txt" for an absent one)."""
    from pixart_lightning.data.extract import ExtractSettings, extract
    from pixart_lightning.shapes.tiny_models import build_tiny_t5

    source = tmp_path / "shards"
    source.mkdir()
    members = [("a.png", png()), ("b.png", png()), ("b.txt", b" "), ("c.png", png()), ("c.txt", b"\xff red"),
               ("d.png", png()), ("d.txt", b"a red square")]
    with tarfile.open(source / "000000.tar", "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    settings = ExtractSettings(vae=None, text_encoder=str(build_tiny_t5(tmp_path / "t5")), resolution=16)
    manifest = extract(str(source), tmp_path / "features", settings, progress=False)
    assert manifest["count"] == 1
    assert manifest["skipped"] == {"no caption": 1, "empty caption": 1, "non-UTF-8 caption": 1}


# --------------------------------------------------------------------------- errors at the command line
def test_a_data_error_in_a_loader_worker_reads_as_in_the_main_process(tmp_path: Path, capsys) -> None:
    """A stage whose data has no usable sample: with a loader worker the same one line as without, no traceback."""
    folder = image_folder(tmp_path / "images", {name: {"txt": b"red"} for name in ("a", "b", "c")})
    errors = []
    for workers in (0, 1):
        overrides = small(tmp_path / f"run{workers}", "data.synth=null", f"data.shards={folder}", "data.min_aesthetic=5",
                          f"data.num_workers={workers}")
        assert main(["run", str(DEMO), "--stages", "1", *overrides]) == 2
        errors.append([line for line in capsys.readouterr().err.splitlines() if line.startswith("pixart-lightning")])
    assert errors[0] == errors[1] == [f"pixart-lightning run: error: {folder}: no usable sample for slot 0 of 1 "
                                      "(skipped so far: {'no aesthetic score': 3})"]


def test_data_errors_name_the_subcommand(tmp_path: Path, capsys) -> None:
    assert main(["data", "stats", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith(f"pixart-lightning data stats: error: {tmp_path / 'missing'} does not exist")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.md").write_text("mine")
    assert main(["data", "synth", str(tmp_path / "taken"), "--count", "2"]) == 2
    assert capsys.readouterr().err.startswith("pixart-lightning data synth: error: ")


def test_loader_worker_unwrapping_keeps_a_multi_line_message() -> None:
    """The worker's own error, all its lines, whatever came before it in the worker."""
    from torch.utils.data import DataLoader, IterableDataset

    from pixart_lightning.cli import _own_message
    from pixart_lightning.data.shards import DataError

    class Failing(IterableDataset):
        def __iter__(self):
            try:
                raise KeyError("first")
            except KeyError:
                raise DataError("shards: nothing to read\nsee the manifest")  # noqa: B904 - a chained traceback

    with pytest.raises(DataError) as caught:
        next(itertools.islice(DataLoader(Failing(), batch_size=None, num_workers=1), 1))
    assert "DataLoader worker" in str(caught.value)
    assert _own_message(caught.value) == "shards: nothing to read\nsee the manifest"


def test_an_unknown_option_names_the_subcommand_and_its_usage(capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["data", "ingest", "SRC", "--out", "O", "--bogus"])
    assert exited.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("usage: pixart-lightning data ingest ")
    assert err[-1] == "pixart-lightning data ingest: error: unrecognized arguments: --bogus"
