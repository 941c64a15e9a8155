"""Submit stages to Slurm: one batch job per stage, each waiting for the previous one to succeed.

Each stage's job runs ``srun python -m pixart_lightning.cli run CONFIG --stages N ...``: srun starts one
process per task (one per GPU) and Lightning reads ranks and the node list from Slurm. Jobs are chained with
``--dependency=afterok``, so stage N+1 starts only after stage N finished its weights; a stage that fails
cancels the rest of the chain (``--kill-on-invalid-dep``) instead of leaving it pending forever.

Time limits and preemption: Slurm sends SIGUSR1 90 s before the limit (``--signal``); callbacks/preemption.py
checkpoints and requeues the job (``--requeue``), which keeps its job id, so the dependent jobs keep waiting,
and the rerun resumes from ``last.ckpt``. ``--open-mode=append`` keeps every attempt in one log.

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

from .runner import RunnerError, plan

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
        return self.tasks_per_node or max(self.gpus_per_node, 1)

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
        "# runs this again and resumes from checkpoints/last.ckpt; a finished stage says \"done already\".",
        *(f"#SBATCH {shlex.quote(d)}" for d in directives),
        "export PYTHONUNBUFFERED=1  # log lines appear as they are printed",
        shlex.join(command),
        "",
    ])


def submit(
    config: str | Path, stages: list[int] | None, overrides: list[str], options: SlurmOptions, dry_run: bool = False,
) -> list[Submission]:
    """Write one batch script per stage and submit them as a chain; return what was submitted, in order.

    The whole config is validated first (``runner.plan``), so a bad key fails before anything is written.
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
    folder.mkdir(parents=True, exist_ok=True)
    parent = [u for u in units if u.stage == stages[0] - 1]
    if parent and not all(u.done for u in parent):
        print(f"note: stage {stages[0] - 1} is not done and not in --stages; stage {stages[0]}'s job fails "
              "unless it finishes first")
    submitted: list[Submission] = []
    for stage in stages:
        script = folder / f"stage{stage}.sbatch"
        script.write_text(sbatch_script(config, stage, overrides, options, run_dir))
        previous = submitted[-1] if submitted else None
        if dry_run:  # a shell snippet that submits the chain
            after = f" --dependency=afterok:$job{previous.stage} --kill-on-invalid-dep=yes" if previous else ""
            print(f"job{stage}=$(sbatch --parsable{after} {shlex.quote(str(script))})")
            submitted.append(Submission(stage, script, None))
            continue
        after = [f"--dependency=afterok:{previous.job_id}", "--kill-on-invalid-dep=yes"] if previous else []
        result = subprocess.run([sbatch, "--parsable", *after, str(script)], capture_output=True, text=True)
        if result.returncode:
            done = ", ".join(f"stage {s.stage}: job {s.job_id}" for s in submitted) or "nothing"
            raise RunnerError(f"sbatch failed for stage {stage}: {(result.stderr or result.stdout).strip()}\n"
                              f"submitted before it: {done}")
        submitted.append(Submission(stage, script, result.stdout.strip().split(";")[0]))
        print(f"stage {stage}: job {submitted[-1].job_id}"
              + (f", starts after job {previous.job_id} succeeds" if previous else "") + f"   {script}")
    if dry_run:
        print(f"dry run: wrote {len(submitted)} script(s) to {folder}; the lines above submit them as a chain")
    else:
        first = submitted[0]
        print(f"watch:  squeue -j {','.join(str(s.job_id) for s in submitted)}\n"
              f"        tail -f {folder / f'stage{first.stage}-{first.job_id}.out'}\n"
              f"        tensorboard --logdir {run_dir}")
    return submitted
