"""Fault injection on checkpoints: SIGKILL at random steps resumes exactly; a damaged newest checkpoint falls back
to the one before with a warning; only the newest K are kept; untrusted pickles are refused. Hashing at scale: a
checkpoint is hashed while it is written, and at a start only rank 0 reads the parent and the checkpoint to hash
them."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from safetensors.torch import load_file

from callbacks.checkpoints import DamagedCheckpoints, latest_good, read_index
from pixart_lightning import files
from pixart_lightning.files import sha256
from pixart_lightning.runner import chain as runner
from pixart_lightning.runner.chain import plan, run
from tests.test_stages import DEMO, Recorder, small

ROOT = Path(__file__).resolve().parents[2]


def count_reads(monkeypatch) -> Counter:
    """Files opened through pixart_lightning.files, where every sha256 is computed, by path."""
    reads: Counter = Counter()

    def counting_open(path, *args, **kwargs):
        reads[Path(path)] += 1
        return open(path, *args, **kwargs)

    monkeypatch.setattr(files, "open", counting_open, raising=False)
    return reads


def stage1(out: Path, steps: int, *extra: str) -> list[str]:
    return [*small(out), f"stage1.train.max_steps={steps}", "train.checkpoint_every=1", "train.keep_checkpoints=3",
            "eval.alignment_prompts=0", *extra]


def test_sigkill_at_random_steps_resumes_exactly(tmp_path: Path) -> None:
    """Killed twice (SIGKILL, no chance to clean up) after random checkpoints, the stage ends with the weights and
    losses of a run that was never interrupted."""
    steps = 12
    run(DEMO, [1], stage1(tmp_path / "whole", steps))
    kills = sorted(random.Random(os.environ.get("PYTEST_SEED", 4)).sample(range(2, steps - 2), 2))
    command = [sys.executable, "-m", "pixart_lightning.cli", "run", str(DEMO), "--stages", "1",
               *stage1(tmp_path / "killed", steps)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    folder = tmp_path / "killed" / "stage1" / "checkpoints"
    for kill_after in kills:
        proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while not any(e["step"] >= kill_after for e in read_index(folder)):
            assert proc.poll() is None and time.time() < deadline, "the run ended before the kill point"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finished = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "resuming from" in finished.stdout
    whole = load_file(tmp_path / "whole" / "stage1" / "final.safetensors")
    killed = load_file(tmp_path / "killed" / "stage1" / "final.safetensors")
    assert max((whole[k] - killed[k]).abs().max().item() for k in whole) <= 1e-6


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path, capsys) -> None:
    crash = Recorder(fail_at=7)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(DEMO, [1], stage1(tmp_path, 10), callbacks=[crash])
    folder = tmp_path / "stage1" / "checkpoints"
    entries = read_index(folder)
    assert [e["step"] for e in entries] == [5, 6, 7]  # the newest 3 kept
    assert sorted(p.name for p in folder.glob("step-*.ckpt")) == ["step-0000005.ckpt", "step-0000006.ckpt",
                                                                    "step-0000007.ckpt"]
    newest = folder / "step-0000007.ckpt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, as by a full disk
    assert latest_good(folder) == folder / "step-0000006.ckpt"
    resumed = Recorder()
    run(DEMO, [1], stage1(tmp_path, 10), callbacks=[resumed])
    assert "damaged" in capsys.readouterr().out
    assert min(resumed.steps) == 7  # steps 7.. were trained again from step 6's state
    whole = Recorder()
    run(DEMO, [1], stage1(tmp_path / "whole", 10), callbacks=[whole])
    for step, (keys, loss) in resumed.steps.items():
        assert keys == whole.steps[step][0] and loss == pytest.approx(whole.steps[step][1], rel=1e-6)


def test_a_pickle_that_runs_code_is_refused(tmp_path: Path) -> None:
    """Checkpoints and imported weights load with weights_only=True: a pickle with a payload fails, nothing runs."""
    from pixart_lightning.cli import main

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": Payload()}, evil)
    assert main(["info", str(evil)]) == 2
    assert not marker.exists()


def test_checkpoint_index_records_sizes_and_hashes(tmp_path: Path, monkeypatch) -> None:
    """Each checkpoint's bytes and sha256 are those of the file on disk, computed while it was written: recording it
    reads nothing back (no extra pass in a preemption's save)."""
    reads = count_reads(monkeypatch)
    run(DEMO, [1], stage1(tmp_path, 4))
    assert not [path for path in reads if path.suffix == ".ckpt"]
    folder = tmp_path / "stage1" / "checkpoints"
    entries = read_index(folder)
    assert [e["step"] for e in entries] == [2, 3, 4]
    for entry in entries:
        for name, record in entry["files"].items():
            assert record == {"bytes": (folder / name).stat().st_size, "sha256": sha256(folder / name)}
    json.dumps(entries)  # plain JSON


class Started(Exception):
    """Raised where the Trainer would be built: the start-up's hashing is over."""


def test_a_start_with_four_ranks_reads_the_parent_and_the_checkpoint_once(tmp_path: Path, monkeypatch) -> None:
    """Stage 2 resumed by 4 simulated ranks (up to building the Trainer): rank 0 hashes the parent's weights and the
    checkpoint it resumes from, once each; the other ranks read neither (they check sizes and load rank 0's choice)."""
    overrides = stage1(tmp_path, 3)
    run(DEMO, [1], overrides)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(DEMO, [2], overrides, callbacks=[Recorder(fail_at=2)])
    units = plan(DEMO, overrides)
    parent, child = units[:2]
    reads = count_reads(monkeypatch)

    def started(*args, **kwargs):
        raise Started

    monkeypatch.setattr(runner, "make_trainer", started)
    for rank in range(4):
        monkeypatch.setattr(rank_zero_only, "rank", rank)
        with pytest.raises(Started):
            runner.run_unit(child, units, DEMO)
    assert reads == {parent.dir / "final.safetensors": 1, child.dir / "checkpoints" / "step-0000002.ckpt": 1}


def test_only_rank_zero_reads_checkpoints_to_verify_them(tmp_path: Path, monkeypatch) -> None:
    """A newest checkpoint with a flipped byte (same size): rank 0 reads it, finds it damaged and picks the one
    before; another rank checks sizes only (the strategy makes it load rank 0's choice). None intact: an error."""
    run(DEMO, [1], stage1(tmp_path, 3))
    folder = tmp_path / "stage1" / "checkpoints"
    newest = folder / "step-0000003.ckpt"
    damaged = bytearray(newest.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    newest.write_bytes(damaged)
    reads = count_reads(monkeypatch)
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    assert latest_good(folder) == newest and not reads
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    assert latest_good(folder) == folder / "step-0000002.ckpt"
    for checkpoint in folder.glob("step-*.ckpt"):
        checkpoint.write_bytes(b"")
    with pytest.raises(DamagedCheckpoints, match="delete"):
        latest_good(folder)


def test_sigusr1_checkpoints_and_stops_cleanly_outside_slurm(tmp_path: Path) -> None:
    """SIGUSR1 (Slurm's warning) mid-stage: a checkpoint at the next step boundary, exit 0, then an exact resume."""
    command = [sys.executable, "-m", "pixart_lightning.cli", "run", str(DEMO), "--stages", "1", *stage1(tmp_path, 40)]
    env = {key: value for key, value in os.environ.items() if not key.startswith("SLURM_")} | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    folder = tmp_path / "stage1" / "checkpoints"
    deadline = time.time() + 300
    while not any(e["step"] >= 3 for e in read_index(folder)):
        assert proc.poll() is None and time.time() < deadline, "the run ended before the signal"
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "after SIGUSR1 (no Slurm job to requeue)" in err
    assert json.loads((tmp_path / "stage1" / "manifest.json").read_text())["status"] == "running"
    finished = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0 and "resuming from" in finished.stdout, finished.stderr[-3000:]
    assert json.loads((tmp_path / "stage1" / "manifest.json").read_text())["status"] == "done"


def test_a_crash_while_pruning_leaves_an_index_of_existing_checkpoints(tmp_path: Path, monkeypatch) -> None:
    """The index is rewritten before the checkpoints it drops are deleted: a crash between the two (here: the third
    save's index write fails) leaves a resumable folder, not an index naming only deleted files."""
    from callbacks import checkpoints

    real_write, saves = checkpoints.write_json_atomic, []

    def crash_on_the_third(path, payload):
        saves.append(path)
        if len(saves) == 3:
            raise RuntimeError("crash while recording")
        real_write(path, payload)

    monkeypatch.setattr(checkpoints, "write_json_atomic", crash_on_the_third)
    with pytest.raises(RuntimeError, match="crash while recording"):
        run(DEMO, [1], stage1(tmp_path, 4, "train.keep_checkpoints=1"))
    folder = tmp_path / "stage1" / "checkpoints"
    assert latest_good(folder) == folder / "step-0000002.ckpt"
