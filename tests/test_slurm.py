"""``pixart-lightning slurm``: the batch scripts, and a real one-node Slurm cluster running a chain of two stages.

The script and submission tests need no Slurm (a fake ``sbatch`` records its arguments). The cluster tests
start Slurm in a temporary folder (tests/slurm_cluster.sh; root, slurm-wlm installed, as ``make test``
arranges) and submit stages 1 and 2 of configs/demo, shrunk to seconds, as 2 DDP processes each. Stage 1
is sent SIGUSR1 while it trains, as Slurm does before a time limit: it must checkpoint, requeue itself under
the same job id, resume and finish, and only then may stage 2 start, from stage 1's final weights.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_stages import small

from pixart_lightning.cli import main
from pixart_lightning.runner import slurm
from pixart_lightning.runner.slurm import SlurmOptions, sbatch_script, submit
from pixart_lightning.runner.unit import RunnerError

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo"
CLUSTER = Path(__file__).with_name("slurm_cluster.sh")
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
STAGE1_STEPS = 200  # about 10 s of 2-process training: long enough to be interrupted at step ~10-20


def directives(script: str) -> list[str]:
    return [arg for line in script.splitlines() if line.startswith("#SBATCH ") for arg in shlex.split(line[8:])]


def srun_line(script: str) -> list[str]:
    return shlex.split(next(line for line in script.splitlines() if line.startswith("srun ")))


# ---------------------------------------------------------------------- scripts and submission, no Slurm
def test_gpu_script_has_directives_and_launch_keys(tmp_path: Path) -> None:
    """Two 8-GPU nodes: one task per GPU, SIGUSR1 before the limit, requeue, logs in the run folder, all quoted."""
    options = SlurmOptions(nodes=2, gpus_per_node=8, cpus_per_task=6, partition="gpu", time="1-00:00:00",
                           account="proj", qos="high", sbatch_args=["--constraint=a100"], python="/opt/py env/python")
    run_dir = tmp_path / "my run"
    script = sbatch_script(DEMO, 2, ["optim.lr=1e-4", "samples.prompts=[a red circle]"], options, run_dir)
    assert script.startswith("#!/bin/bash\n") and "export PYTHONUNBUFFERED=1" in script
    assert directives(script) == [
        "--job-name=pixart-my run-stage2", "--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8",
        "--cpus-per-task=6", "--signal=SIGUSR1@90", "--requeue", "--open-mode=append",
        f"--output={run_dir}/slurm/stage2-%j.out", f"--chdir={Path.cwd()}", "--partition=gpu",
        "--time=1-00:00:00", "--account=proj", "--qos=high", "--constraint=a100",
    ]
    assert srun_line(script) == [
        "srun", "--kill-on-bad-exit=1", "--cpus-per-task=6", "/opt/py env/python", "-m", "pixart_lightning.cli",
        "run", str(DEMO), "--stages", "2", "optim.lr=1e-4", "samples.prompts=[a red circle]",
        "train.devices=8", "train.num_nodes=2", "train.accelerator=gpu",
    ]


def test_cpu_script_runs_cpu_processes(tmp_path: Path) -> None:
    """Without GPUs: no GPU request, the CPU accelerator, one task per node unless asked for more."""
    one = sbatch_script("configs/demo", 1, [], SlurmOptions(), tmp_path)
    assert not [d for d in directives(one) if d.startswith(("--gpus", "--cpus", "--partition", "--time"))]
    assert srun_line(one)[-3:] == ["train.devices=1", "train.num_nodes=1", "train.accelerator=cpu"]
    assert srun_line(one)[1:3] == ["--kill-on-bad-exit=1", sys.executable]
    two = sbatch_script("configs/demo", 1, [], SlurmOptions(tasks_per_node=2), tmp_path)
    assert "--ntasks-per-node=2" in directives(two) and "train.devices=2" in srun_line(two)


@pytest.mark.parametrize("options, overrides, message", [
    (SlurmOptions(gpus_per_node=8, tasks_per_node=4), [], "one process per GPU"),
    (SlurmOptions(nodes=0), [], "at least 1"),
    (SlurmOptions(tasks_per_node=0), [], "at least 1"),
    (SlurmOptions(sbatch_args=["exclusive"]), [], "sbatch options"),
    (SlurmOptions(), ["stage2.train.devices=4"], "--tasks-per-node"),
])
def test_contradictory_options_fail_first(tmp_path: Path, options, overrides, message) -> None:
    with pytest.raises(ValueError, match=message):
        submit(DEMO, None, [f"out_dir={tmp_path / 'run'}", *overrides], options)
    assert not (tmp_path / "run").exists()


def test_dry_run_writes_scripts_and_submits_nothing(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(slurm.subprocess, "run", lambda *a, **k: pytest.fail(f"ran {a}"))
    out = tmp_path / "run"
    assert main(["slurm", str(DEMO), "--stages", "1,2", "--gpus-per-node", "4", "--dry-run", f"out_dir={out}",
                 "--sbatch-arg=--exclusive", "optim.lr=2e-4"]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in (out / "slurm").iterdir()) == ["stage1.sbatch", "stage2.sbatch"]
    assert f"job1=$(sbatch --parsable {out}/slurm/stage1.sbatch)" in printed
    assert f"--dependency=afterok:$job1 --kill-on-invalid-dep=yes {out}/slurm/stage2.sbatch" in printed
    script = (out / "slurm" / "stage2.sbatch").read_text()
    assert "--exclusive" in directives(script) and "optim.lr=2e-4" in srun_line(script)


def test_bad_key_fails_before_anything_is_written(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["slurm", str(DEMO), "--dry-run", f"out_dir={out}", "model.bogus=1"]) == 2
    assert "unknown key 'model.bogus'" in capsys.readouterr().err
    assert not out.exists()


def test_missing_sbatch_suggests_dry_run(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(["slurm", str(DEMO), f"out_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "sbatch not found" in err and "--dry-run" in err
    assert not (tmp_path / "run").exists()


@pytest.fixture
def fake_slurm(tmp_path: Path, monkeypatch) -> Path:
    """Stand-ins on PATH: sbatch records its arguments in ``calls`` and answers 101, 102, ...; squeue prints ``queue``."""
    (tmp_path / "bin").mkdir()
    commands = {"sbatch": f'echo "$*" >> {tmp_path}/calls\necho "$((100 + $(wc -l < {tmp_path}/calls)));c1"',
                "squeue": f"cat {tmp_path}/queue 2>/dev/null || true"}
    for name, body in commands.items():
        (tmp_path / "bin" / name).write_text(f"#!/bin/bash\n{body}\n")
        (tmp_path / "bin" / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    return tmp_path


def test_stages_are_chained_by_afterok(fake_slurm: Path) -> None:
    """Each job after the first waits for the previous one to succeed, and dies if it cannot."""
    out = fake_slurm / "run"
    jobs = submit(DEMO, [3, 1, 2], [f"out_dir={out}"], SlurmOptions())
    assert [(j.stage, j.job_id) for j in jobs] == [(1, "101"), (2, "102"), (3, "103")]
    assert (fake_slurm / "calls").read_text().splitlines() == [
        f"--parsable {out}/slurm/stage1.sbatch",
        f"--parsable --dependency=afterok:101 --kill-on-invalid-dep=yes {out}/slurm/stage2.sbatch",
        f"--parsable --dependency=afterok:102 --kill-on-invalid-dep=yes {out}/slurm/stage3.sbatch",
    ]


def test_queued_previous_stage_heads_the_chain(fake_slurm: Path) -> None:
    """`make stage1 stage2 LAUNCH=slurm` submits twice: stage 2 waits for the stage-1 job already queued."""
    out = fake_slurm / "run"
    (fake_slurm / "queue").write_text(f"77 {out}/slurm/stage1.sbatch\n78 /elsewhere/slurm/stage2.sbatch\n")
    submit(DEMO, [2], [f"out_dir={out}"], SlurmOptions())
    assert (fake_slurm / "calls").read_text().splitlines() == [
        f"--parsable --dependency=afterok:77 --kill-on-invalid-dep=yes {out}/slurm/stage2.sbatch"]
    with pytest.raises(RunnerError, match="queued or running already: stage 1 is job 77"):
        submit(DEMO, [1, 2], [f"out_dir={out}"], SlurmOptions())


# ---------------------------------------------------------------------- a real cluster
@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A running one-node cluster; SLURM_CONF points at it for this process and the jobs it submits."""
    missing = [b for b in ("sbatch", "srun", "squeue", "scontrol", "scancel") if not shutil.which(b)]
    missing += [d for d in ("munged", "slurmctld", "slurmd") if not Path("/usr/sbin", d).is_file()]
    if missing:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)} missing); as root, `make test` installs it "
                    "(bash tests/slurm_cluster.sh install)")
    if os.geteuid() != 0:
        pytest.skip("the test cluster's daemons run as root (SlurmUser=root): run the Slurm tests as root")
    folder = tmp_path_factory.mktemp("slurm")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLURM_CONF", str(folder / "slurm.conf"))
        try:
            started = subprocess.run(["bash", str(CLUSTER), "start", str(folder)], capture_output=True, text=True,
                                     timeout=120)
            assert started.returncode == 0, f"{started.stdout}{started.stderr}\n" + "".join(
                f"--- {log}\n{log.read_text()[-3000:]}" for log in folder.glob("log/*.log"))
            yield folder
        finally:
            subprocess.run(["bash", str(CLUSTER), "stop", str(folder)], timeout=120)


def show_job(job_id: str) -> dict[str, str]:
    line = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, check=True).stdout
    return dict(field.split("=", 1) for field in line.split() if "=" in field)


def logs(out: Path) -> str:
    return "".join(f"\n--- {log}\n{log.read_text()[-6000:]}" for log in sorted((out / "slurm").glob("*.out")))


def wait(condition, timeout: float, what: str, out: Path, jobs: list[str]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            states = {j: show_job(j).get("JobState") for j in jobs}
            pytest.fail(f"{what}: not after {timeout:.0f} s (jobs: {states}){logs(out)}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def preempted_chain(cluster, tmp_path_factory) -> dict:
    """Stages 1 and 2 as chained 2-process jobs; stage 1 gets SIGUSR1 once it has a checkpoint."""
    out = tmp_path_factory.mktemp("chain")
    overrides = small(out, f"stage1.train.max_steps={STAGE1_STEPS}", "stage1.data.batch_size=8",
                      "train.checkpoint_every=10", "train.threads=1", "train.strategy=ddp", "optim.warmup_steps=2")
    first, second = submit(DEMO, [1, 2], overrides, SlurmOptions(tasks_per_node=2))
    jobs = [first.job_id, second.job_id]
    index = out / "stage1" / "checkpoints" / "index.json"  # written once the first checkpoint is complete
    wait(lambda: index.exists() or show_job(first.job_id)["JobState"] in FINISHED, 240,
         "stage 1 training", out, jobs)
    assert show_job(first.job_id)["JobState"] == "RUNNING", f"stage 1 ended before it could be signalled{logs(out)}"
    subprocess.run(["scancel", "--signal=USR1", first.job_id], check=True)  # the job's steps, not the batch shell
    wait(lambda: all(show_job(j)["JobState"] in FINISHED for j in jobs), 360, "both stages finished", out, jobs)
    return {"out": out, "jobs": [show_job(j) for j in jobs],
            "logs": [(out / "slurm" / f"stage{s}-{j}.out").read_text() for s, j in ((1, jobs[0]), (2, jobs[1]))]}


def test_chained_stages_run_in_order_and_hand_weights_on(preempted_chain: dict) -> None:
    """Stage 2's job started after stage 1's ended, from stage 1's final weights, and both ran as 2 ranks."""
    out, (job1, job2) = preempted_chain["out"], preempted_chain["jobs"]
    assert (job1["JobState"], job2["JobState"]) == ("COMPLETED", "COMPLETED"), logs(out)
    assert job2["StartTime"] >= job1["EndTime"], (job1["EndTime"], job2["StartTime"])
    manifests = [json.loads((out / f"stage{s}" / "manifest.json").read_text()) for s in (1, 2)]
    assert [m["status"] for m in manifests] == ["done", "done"]
    assert manifests[1]["parent"]["sha256"] == manifests[0]["weights"]["final"]["sha256"]
    for log in preempted_chain["logs"]:
        assert "GLOBAL_RANK: 0, MEMBER: 1/2" in log and "GLOBAL_RANK: 1, MEMBER: 2/2" in log


def test_sigusr1_checkpoints_requeues_and_resumes(preempted_chain: dict) -> None:
    """The signalled job checkpointed mid-stage, was requeued under its id, resumed from there and finished.

    Slurm ends a job it requeues at once (SIGTERM, then SIGKILL), so the training processes may not live to
    print their own "requeued job" line; Slurm's "DUE TO JOB REQUEUE" line and Restarts=1 are the record.
    """
    out, job1, log = preempted_chain["out"], preempted_chain["jobs"][0], preempted_chain["logs"][0]
    assert job1["Restarts"] == "1", job1
    requeued = re.search(rf"JOB {job1['JobId']} ON \S+ CANCELLED AT \S+ DUE TO JOB REQUEUE", log)
    assert requeued, log
    resumed = re.search(r"stage 1: resuming from \S+/step-(\d+)\.ckpt", log[requeued.end():])
    assert resumed and 0 < int(resumed[1]) < STAGE1_STEPS, log
    index = json.loads((out / "stage1" / "checkpoints" / "index.json").read_text())
    assert max(entry["step"] for entry in index) == STAGE1_STEPS
    assert json.loads((out / "stage1" / "manifest.json").read_text())["status"] == "done"
