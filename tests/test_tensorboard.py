"""TensorBoard serves a run's scalars and sample images over HTTP, as ``make tensorboard`` does: the whole chain as
one run on one step axis (runner/logs.py)."""

from __future__ import annotations

import json
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from callbacks.throughput import Throughput
from pixart_lightning.runner.chain import plan, run
from pixart_lightning.runner.logs import STAGE_STEP, unit_log
from pixart_lightning.runner.unit import FINAL, MANIFEST
from tests.test_stages import DEMO, Recorder, small

ROOT = Path(__file__).resolve().parents[1]
RUN = "tensorboard"  # the TensorBoard run name of the chain's logs under the run folder
SCALARS = {"train/loss", "train/lr", "train/images_per_s_per_device", "train/data_wait_fraction", "train/mfu",
           "eval/fid", STAGE_STEP}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """Stages 1 and 2 of the demo for 4 steps each, sample grids every 2 steps and at the end, throughput every 2
    steps, FID at stage 2's start and end."""
    out = tmp_path_factory.mktemp("tensorboard")
    overrides = small(out, "stage1.train.max_steps=4", "stage2.train.max_steps=4", "samples.every_n_steps=2",
                      "eval.alignment_prompts=0")
    run(DEMO, [1, 2], overrides, callbacks=[Throughput(every_n_steps=2, peak_tflops=1.0)])  # a peak: MFU is logged
    return out


def events(run_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(run_dir / RUN), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def test_the_chain_is_one_curve(run_dir: Path):
    """Stage 2's steps follow stage 1's on the axis, each beside the unit's own step; no ``epoch`` card."""
    logged = events(run_dir)
    assert {path.parent for path in run_dir.glob("**/events.out.tfevents.*")} == {run_dir / RUN}  # every unit's
    assert "epoch" not in logged.Tags()["scalars"]
    steps = [e.step for e in logged.Scalars("train/loss")]  # in the order written: stage 1's, then stage 2's
    stage1, stage2 = steps[:4], steps[4:]
    assert stage1 == [1, 2, 3, 4] and stage2 == [5, 6, 7, 8]  # the loss of step k at step k, as the callbacks'
    assert min(stage2) > max(stage1)
    own = {(e.step, e.value) for e in logged.Scalars(STAGE_STEP)}
    assert {(1, 1), (4, 4), (5, 1), (8, 4)} <= own
    assert [e.step for e in logged.Scalars("eval/fid")] == [4, 8]  # stage 2's steps 0 and 4
    assert [e.step for e in logged.Images("samples")] == [2, 4, 6, 8]


def test_resumed_unit_logs_each_step_once(tmp_path: Path):
    """An interrupted unit resumed from its checkpoint (step 3) logs steps 4 and 5 again, replacing the first run's."""
    overrides = small(tmp_path, "stage1.train.max_steps=6", "eval.alignment_prompts=0")  # a checkpoint every 3 steps
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(DEMO, [1], overrides, callbacks=[Recorder(fail_at=5)])
    run(DEMO, [1], overrides)
    logged = events(tmp_path)
    assert [e.step for e in logged.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in logged.Scalars("train/images_per_s")] == [1, 2, 3, 4, 5, 6]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(opener: urllib.request.OpenerDirector, url: str) -> dict:
    with opener.open(url, timeout=5) as response:
        return json.load(response)


def test_tensorboard_serves_scalars_and_images(run_dir: Path, tmp_path: Path):
    port = free_port()
    base = f"http://127.0.0.1:{port}/data/plugin"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
    log = tmp_path / "tensorboard.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--logdir", str(run_dir), "--host", "127.0.0.1",
             "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        scalars: dict = {}
        deadline = time.monotonic() + 30
        while not SCALARS <= set(scalars.get(RUN, {})):  # the server answers before its first load finishes
            assert server.poll() is None, f"tensorboard exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no scalars after 30 s: {scalars}\n{log.read_text()}"
            time.sleep(0.3)
            try:
                scalars = get_json(opener, f"{base}/scalars/tags")
            except (urllib.error.URLError, ConnectionError):
                continue
        images = get_json(opener, f"{base}/images/tags")
        assert "samples" in images[RUN] and "epoch" not in scalars[RUN]
        steps = get_json(opener, f"{base}/images/images?" + urllib.parse.urlencode({"run": RUN, "tag": "samples"}))
        assert [entry["step"] for entry in steps] == [2, 4, 6, 8]  # mid-run grids and the final ones, stages 1 and 2
        mfu = get_json(opener, f"{base}/scalars/scalars?" + urllib.parse.urlencode({"run": RUN, "tag": "train/mfu"}))
        assert [step for _, step, _ in mfu] == [2, 4, 6, 8]  # (wall time, step, value) per window
        loss = get_json(opener, f"{base}/scalars/scalars?" + urllib.parse.urlencode({"run": RUN, "tag": "train/loss"}))
        assert [step for _, step, _ in loss] == list(range(1, 9))  # one curve over both stages
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_make_tensorboard_serves_runs_on_loopback():
    out = subprocess.run(["make", "-n", "tensorboard"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    [command] = [shlex.split(line) for line in out.splitlines() if line.split(" ", 1)[0].endswith("/tensorboard")]
    assert command[command.index("--logdir") + 1] == "runs"
    assert command[command.index("--host") + 1] == "127.0.0.1"


def test_a_finished_stage_places_the_next_one_by_the_steps_it_trained(tmp_path: Path) -> None:
    """Stage 1 trained 300 steps on the command line, the config plans 150: stage 2 starts its axis at 300, not 150
    (which would lay it over stage 1's steps 151-300); an unfinished stage 1 counts what the config plans."""
    overrides = [f"out_dir={tmp_path}"]
    stage1, stage2 = plan(DEMO, overrides)[:2]
    assert unit_log(plan(DEMO, overrides), stage2).step_offset == stage1.cfg.train.max_steps == 150
    stage1.dir.mkdir(parents=True)
    (stage1.dir / FINAL).write_bytes(b"")
    (stage1.dir / MANIFEST).write_text(json.dumps({"status": "done", "steps": 300}))
    assert unit_log(plan(DEMO, overrides), stage2).step_offset == 300
