"""What a run prints: per unit the line saying what it trains, one labelled progress bar, the evaluations, and the
summary; none of Lightning's or transformers' chatter (runner/console.py, callbacks/progress.py)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from pixart_lightning.runner.chain import run
from tests.test_stages import DEMO, Recorder, small

CHATTER = [
    "GPU available", "TPU available", "litlogger", "The `srun` command is available", "LeafSpec",
    "module(s) in eval mode", "You have overridden", "`Trainer.fit` stopped", "Loading weights", "v_num", "Epoch 0",
]


def printed(capfd, caplog: pytest.LogCaptureFixture, recwarn: pytest.WarningsRecorder) -> tuple[str, str]:
    """(stdout, everything a user would see): under pytest, warnings and log records are caught before they print."""
    out, err = capfd.readouterr()
    return out, "\n".join([out, err, *(r.getMessage() for r in caplog.records), *(str(w.message) for w in recwarn)])


def bar_frames(out: str, label: str) -> list[str]:
    """Every drawing of the unit's bar (tqdm redraws the line after a carriage return)."""
    return [frame for frame in re.split(r"[\r\n]", out) if frame.startswith(f"{label}: ")
            and re.match(rf"{label}: +\d+%\|", frame)]


def test_run_prints_one_labelled_bar_per_stage_and_no_chatter(tmp_path: Path, capfd, caplog, recwarn):
    """Stages 1 and 2 (text: T5 loaded from its folder; FID at stage 2's start and end), the bar on."""
    caplog.set_level(logging.INFO)
    overrides = small(tmp_path, "train.progress_bar=true", "stage1.train.max_steps=3", "stage2.train.max_steps=3",
                      "eval.alignment_prompts=0")
    run(DEMO, [1, 2], overrides)
    out, seen = printed(capfd, caplog, recwarn)
    for chatter in CHATTER:
        assert chatter not in seen, chatter
    for label in ("stage 1", "stage 2"):
        frames = bar_frames(out, label)
        assert frames, f"no {label} bar in:\n{out}"
        last = frames[-1]
        assert f"{label}: 100%" in last and "3/3" in last
        assert re.search(r"loss=[\d.]+, images/s=[\d.]+\]", last), last
        assert sum(f"{label}: 100%" in frame for frame in frames) == 1  # the last step is drawn once
    # The bar closes after the last step, before the stage's final FID prints.
    assert out.index("stage 2: 100%") < out.index("step 3: FID")
    assert out.index("step 0: FID") < out.index("stage 2:   0%")  # the FID at the start, before the bar opens
    assert "summary:" in out


def test_no_bar_when_switched_off(tmp_path: Path, capfd, caplog, recwarn):
    caplog.set_level(logging.INFO)
    run(DEMO, [1], small(tmp_path, "stage1.train.max_steps=2", "eval.alignment_prompts=0"))  # train.progress_bar=false
    out, seen = printed(capfd, caplog, recwarn)
    assert "stage 1: training" in out and not bar_frames(out, "stage 1") and "it/s" not in seen
    for chatter in CHATTER:
        assert chatter not in seen, chatter


def test_a_stop_is_reported_below_the_bar(tmp_path: Path, capfd):
    """An exception closes the bar: the runner's line about the stop starts a line of its own."""
    overrides = small(tmp_path, "train.progress_bar=true", "stage1.train.max_steps=5", "eval.alignment_prompts=0")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(DEMO, [1], overrides, callbacks=[Recorder(fail_at=4)])  # after the checkpoint of step 3
    out = capfd.readouterr().out
    assert "\nstage 1: stopped at step 4" in out, out
