"""Submit stages to Slurm: one batch job per stage, each waiting for the previous one to succeed.

Each stage's job runs ``srun python -m pixart_lightning.cli run CONFIG --stages N ...``: srun starts one
process per task (one per GPU) and Lightning reads ranks and the node list from Slurm. Jobs are chained with
``--dependency=afterok``, so stage N+1 starts only after stage N finished its weights; a stage that fails
cancels the rest of the chain (``--kill-on-invalid-dep``) instead of leaving it pending forever.

Time limits and preemption: Slurm sends SIGUSR1 90 s before the limit (``--signal``); callbacks/preemption.py
checkpoints and the runner's rank 0 requeues the job (``--requeue``), which keeps its job id, so the dependent jobs keep waiting,
and the rerun resumes from the newest checkpoint. ``--open-mode=append`` keeps every attempt in one log.

The scripts are written to ``<run folder>/slurm/stage<N>.sbatch`` (resubmit one with ``sbatch``), the logs to
``<run folder>/slurm/stage<N>-<job id>.out``.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pixart_lightning.runner.chain import plan
from pixart_lightning.runner.unit import RunnerError

SIGNAL_LEAD_S = 90
"""Seconds between SIGUSR1 and the time limit: a checkpoint of a large model must fit in it."""
LAUNCH_KEYS = ("train.devices", "train.num_nodes", "train.accelerator")
"""Set from the Slurm options; an override of them would contradict the allocation."""


@dataclass
class SlurmOptions:
    """The allocation of each stage's job; one task (process) per GPU."""

    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None
    """Processes per node; default: one per GPU, or 1 without GPUs (more CPU processes: DDP over gloo)."""
    cpus_per_task: int | None = None
    """Default: the cluster's. Data loader workers and torch threads run on these."""
    partition: str | None = None
    time: str | None = None
    """Time limit per job, e.g. ``2-00:00:00``; a stage that needs longer is checkpointed and requeued."""
    account: str | None = None
    qos: str | None = None
    sbatch_args: list[str] = field(default_factory=list)
    """More ``#SBATCH`` options, e.g. ``--constraint=a100`` or ``--exclusive``."""
    python: str = sys.executable
    """The interpreter on the compute nodes (default: this one, so a shared venv works unchanged)."""

    @property
    def tasks(self) -> int:
        return self.tasks_per_node if self.tasks_per_node is not None else max(self.gpus_per_node, 1)

    def check(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 0 or self.tasks < 1 or (self.cpus_per_task or 1) < 1:
            raise ValueError("--nodes, --tasks-per-node and --cpus-per-task must be at least 1, --gpus-per-node at least 0")
        if self.gpus_per_node and self.tasks != self.gpus_per_node:
            raise ValueError(f"--tasks-per-node {self.tasks} with --gpus-per-node {self.gpus_per_node}: "
                             "Lightning runs one process per GPU")
        if bad := [a for a in self.sbatch_args if not a.startswith("-")]:
            raise ValueError(f"--sbatch-arg takes sbatch options such as --constraint=a100, not {bad}")


@dataclass
class Submission:
    """One stage's batch job."""

    stage: int
    script: Path
    job_id: str | None
    """None in a dry run."""


def launch_overrides(options: SlurmOptions) -> list[str]:
    """The config keys that make Lightning use exactly the allocation."""
    return [f"train.devices={options.tasks}", f"train.num_nodes={options.nodes}",
            f"train.accelerator={'gpu' if options.gpus_per_node else 'cpu'}"]


def sbatch_script(config: str | Path, stage: int, overrides: list[str], options: SlurmOptions, run_dir: Path) -> str:
    """The batch script of one stage. Its job is named after the run folder (``runs/<name>`` by default)."""
    logs = Path(run_dir).resolve() / "slurm"
    directives = [
        f"--job-name=pixart-{Path(run_dir).resolve().name}-stage{stage}",
        f"--nodes={options.nodes}",
        f"--ntasks-per-node={options.tasks}",
        *([f"--gpus-per-node={options.gpus_per_node}"] if options.gpus_per_node else []),
        *([f"--cpus-per-task={options.cpus_per_task}"] if options.cpus_per_task else []),
        f"--signal=SIGUSR1@{SIGNAL_LEAD_S}",
        "--requeue",
        "--open-mode=append",
        f"--output={logs / f'stage{stage}-%j.out'}",
        f"--chdir={Path.cwd()}",
        *(f"--{key}={value}" for key, value in (("partition", options.partition), ("time", options.time),
                                                 ("account", options.account), ("qos", options.qos)) if value),
        *options.sbatch_args,
    ]
    # Slurm 22.05's srun does not inherit --cpus-per-task from the batch job: pass it on explicitly.
    srun = ["srun", "--kill-on-bad-exit=1", *([f"--cpus-per-task={options.cpus_per_task}"] if options.cpus_per_task else [])]
    command = [*srun, options.python, "-m", "pixart_lightning.cli", "run", str(config), "--stages", str(stage),
               *overrides, *launch_overrides(options)]
    return "\n".join([
        "#!/bin/bash",
        f"# pixart-lightning stage {stage}, written by `pixart-lightning slurm`. A requeued job (after SIGUSR1)",
        "# runs this again and resumes from its newest checkpoint; a finished stage says \"done already\".",
        *(f"#SBATCH {shlex.quote(d)}" for d in directives),
        "export PYTHONUNBUFFERED=1  # log lines appear as they are printed",
        "# The rendezvous port, free now on this (the first) node; Lightning's default, 15000 + the job id's last",
        "# digits, collides with any process still holding it, e.g. a previous attempt of a requeued job.",
        f"export MASTER_PORT=$({shlex.quote(options.python)} -c " + shlex.quote(
            "import socket; s = socket.socket(); s.bind((\"\", 0)); print(s.getsockname()[1])") + ")",
        shlex.join(command),
        "",
    ])


def submit(
    config: str | Path, stages: list[int] | None, overrides: list[str], options: SlurmOptions, dry_run: bool = False,
) -> list[Submission]:
    """Write one batch script per stage and submit them as a chain; return what was submitted, in order.

    The whole config is validated first (``runner.plan``), so a bad key fails before anything is written. A job
    of the previous stage that is still queued or running (a separate ``make stage1``, say) heads the chain;
    a stage that already has one is refused, as two jobs would train in the same folder.
    """
    options.check()
    if clash := [o for o in overrides if re.sub(r"^stage\d+\.", "", o.split("=", 1)[0]) in LAUNCH_KEYS]:
        raise ValueError(f"{clash}: under Slurm, processes come from --nodes, --gpus-per-node and --tasks-per-node")
    units = plan(config, [*overrides, *launch_overrides(options)])
    present = sorted({u.stage for u in units})
    stages = sorted(stages or present)
    if unknown := sorted(set(stages) - set(present)):
        raise ValueError(f"--stages {unknown}: this config has stages {present}")
    run_dir = units[0].cfg.run_dir
    folder = run_dir.resolve() / "slurm"
    sbatch = shutil.which("sbatch")
    if not dry_run and sbatch is None:
        raise RunnerError("sbatch not found: run this on a Slurm login node, or add --dry-run to write the scripts only")
    queued = {} if dry_run else queued_stages(folder)
    if twice := [f"stage {s} is job {queued[s]}" for s in stages if s in queued]:
        raise RunnerError(f"queued or running already: {', '.join(twice)}; wait for it, or scancel it first")
    after = queued.get(stages[0] - 1)
    if not after and not all(u.done for u in units if u.stage == stages[0] - 1):
        print(f"note: stage {stages[0] - 1} is not done yet; stage {stages[0]}'s job fails unless it finishes first")
    folder.mkdir(parents=True, exist_ok=True)
    submitted: list[Submission] = []
    for stage in stages:
        script = folder / f"stage{stage}.sbatch"
        script.write_text(sbatch_script(config, stage, overrides, options, run_dir))
        if dry_run:  # a shell snippet that submits the chain
            chain = f" --dependency=afterok:$job{submitted[-1].stage} --kill-on-invalid-dep=yes" if submitted else ""
            print(f"job{stage}=$(sbatch --parsable{chain} {shlex.quote(str(script))})")
            submitted.append(Submission(stage, script, None))
            continue
        chain = [f"--dependency=afterok:{after}", "--kill-on-invalid-dep=yes"] if after else []
        result = subprocess.run([sbatch, "--parsable", *chain, str(script)], capture_output=True, text=True)
        if result.returncode:
            done = ", ".join(f"stage {s.stage}: job {s.job_id}" for s in submitted) or "nothing"
            raise RunnerError(f"sbatch failed for stage {stage}: {(result.stderr or result.stdout).strip()}\n"
                              f"submitted before it: {done}")
        submitted.append(Submission(stage, script, result.stdout.strip().split(";")[0]))
        print(f"stage {stage}: job {submitted[-1].job_id}" + (f", starts after job {after} succeeds" if after else "")
              + f"   {script}")
        after = submitted[-1].job_id
    if dry_run:
        print(f"dry run: wrote {len(submitted)} script(s) to {folder}; the lines above submit them as a chain")
    else:
        first = submitted[0]
        print(f"watch:  squeue -j {','.join(str(s.job_id) for s in submitted)}\n"
              f"        tail -f {folder / f'stage{first.stage}-{first.job_id}.out'}\n"
              f"        tensorboard --logdir {run_dir}")
    return submitted


def queued_stages(folder: Path) -> dict[int, str]:
    """Stage -> id of this user's pending or running job of a script in ``folder`` (squeue names the script)."""
    listing = subprocess.run(["squeue", "--me", "--noheader", "--format=%i %o"], capture_output=True, text=True)
    if listing.returncode:
        raise RunnerError(f"squeue failed: {(listing.stderr or listing.stdout).strip()}")
    jobs = {}
    for line in listing.stdout.splitlines():
        job, _, command = line.strip().partition(" ")
        if Path(command).parent == folder and (match := re.fullmatch(r"stage(\d+)\.sbatch", Path(command).name)):
            jobs[int(match[1])] = job
    return jobs
