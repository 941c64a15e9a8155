"""TensorBoard serves a run's scalars and sample images over HTTP, as ``make tensorboard`` does."""

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

from callbacks.throughput import Throughput
from pixart_lightning.runner.chain import run
from tests.test_stages import DEMO, small

ROOT = Path(__file__).resolve().parents[1]
RUN = "stage1/tensorboard"  # the TensorBoard run name of stage 1's logs under the run folder
SCALARS = {"train/loss", "train/lr", "train/images_per_s_per_device", "train/data_wait_fraction", "train/mfu"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """Stage 1 of the demo for 4 steps, sample grids at step 2 and at the end, throughput every 2 steps."""
    out = tmp_path_factory.mktemp("tensorboard")
    overrides = small(out, "stage1.train.max_steps=4", "samples.every_n_steps=2", "eval.alignment_prompts=0")
    run(DEMO, [1], overrides, callbacks=[Throughput(every_n_steps=2, peak_tflops=1.0)])  # a peak, so MFU is logged
    return out


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
        assert "samples" in images[RUN]
        steps = get_json(opener, f"{base}/images/images?" + urllib.parse.urlencode({"run": RUN, "tag": "samples"}))
        assert [entry["step"] for entry in steps] == [2, 4]  # mid-run grid and the final one
        mfu = get_json(opener, f"{base}/scalars/scalars?" + urllib.parse.urlencode({"run": RUN, "tag": "train/mfu"}))
        assert [step for _, step, _ in mfu] == [2, 4]  # (wall time, step, value) per window
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
