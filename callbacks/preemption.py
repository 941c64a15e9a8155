"""Preemption: on SIGUSR1, checkpoint at a step boundary and stop; the runner then requeues the Slurm job.

Slurm sends SIGUSR1 ``--signal=SIGUSR1@90`` seconds before a job's time limit (and on preemption, with
a grace period). The handler only sets a flag: saving inside a signal handler would interrupt the
training step anywhere, e.g. between the optimizer and the EMA update. At a step boundary (one process:
every step; several: about every ``CHECK_EVERY`` micro-batches) the ranks agree on the flag (one all-reduce
of a scalar), all save the checkpoint together, and training stops with :class:`Preempted`; the runner's
rank 0 then asks Slurm to requeue the job (:func:`requeue`). The requeued job runs the same command, which
resumes from that checkpoint: the data position is the step count, so it continues with the next batch.

What has to fit in the 90 s: up to ``CHECK_EVERY`` micro-batches until the ranks agree, then the save, which is
serialising and writing the checkpoint, each file hashed as its bytes go out (no pass that reads it back,
``callbacks/checkpoints.py``). The save grows with the bytes the busiest rank writes: at roughly 1 s per GiB
written and hashed (a one-off estimate on the CPU machine), PixArt-XL/2's ~10 GB (fp32 weights, EMA and AdamW
moments) takes ~10 s from DDP's rank 0 and ~10 GB / N per rank with N sharded FSDP ranks.
"""

from __future__ import annotations

import os
import signal
import subprocess

import lightning as L
import torch

from callbacks.checkpoints import Checkpoints
from callbacks.steps import step_ended

CHECK_EVERY = 10
"""Micro-batches between the ranks' agreement on the flag, rounded to whole steps: 10 steps without gradient
accumulation, every step from 6 micro-batches a step up (a paper-scale stage-2 step on 8 GPUs accumulates 8
micro-batches and takes several seconds), so agreeing stays well inside Slurm's 90 s warning."""


def agreement_interval(accumulation: int) -> int:
    """Optimizer steps between the ranks' agreements on the flag: about CHECK_EVERY micro-batches, at least one step."""
    return max(1, CHECK_EVERY // accumulation)


class Preempted(Exception):
    """Training stopped on a preemption signal after writing its checkpoint (not an error)."""


def requeue() -> str:
    """Ask Slurm to requeue this job (rank 0, after the checkpoint); what was done, for the message."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return "no Slurm job to requeue"
    subprocess.run(["scontrol", "requeue", job], check=True)
    return f"requeued job {job}"


class Preemption(L.Callback):
    """Sets a flag on the signal; at a step boundary the ranks agree, save together and stop (``Preempted``).

    Stopping by exception skips the end-of-stage samples and FID, which would eat into Slurm's warning
    time; the runner then requeues the job (rank 0) as its last act, since Slurm answers a requeue by
    terminating the job's processes at once.
    """

    def __init__(self, checkpoints: Checkpoints, signum: signal.Signals = signal.SIGUSR1):
        self.checkpoints = checkpoints
        self.signum = signum
        self.requested = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        signal.signal(self.signum, self._flag)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        signal.signal(self.signum, signal.SIG_DFL)

    def _flag(self, signum: int, frame) -> None:
        self.requested = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if not step_ended(trainer, batch_idx):  # save on step boundaries only
            return
        if trainer.world_size == 1:
            if not self.requested:
                return
        else:  # the signal may reach ranks at different steps: agree every ~CHECK_EVERY micro-batches (a host sync)
            if trainer.global_step % agreement_interval(trainer.accumulate_grad_batches):
                return
            flag = torch.tensor(float(self.requested), device=pl_module.device)
            if not trainer.strategy.reduce(flag, reduce_op="max").item():
                return
        self.checkpoints.save(trainer)
        raise Preempted(f"checkpointed at step {trainer.global_step} after SIGUSR1")
