"""Fault injection on checkpoints: SIGKILL at random steps resumes exactly; a damaged newest checkpoint falls back
to the one before with a warning; only the newest K are kept; untrusted pickles are refused."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from callbacks.checkpoints import latest_good, read_index
from pixart_lightning.runner import run
from tests.test_stages import DEMO, Recorder, small

ROOT = Path(__file__).resolve().parents[2]


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


def test_checkpoint_index_records_sizes_and_hashes(tmp_path: Path) -> None:
    run(DEMO, [1], stage1(tmp_path, 4))
    entries = read_index(tmp_path / "stage1" / "checkpoints")
    assert [e["step"] for e in entries] == [2, 3, 4]
    record = next(iter(entries[-1]["files"].values()))
    assert record["bytes"] > 0 and len(record["sha256"]) == 64
    json.dumps(entries)  # plain JSON


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
