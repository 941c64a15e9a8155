"""When a batch ends an optimizer step: step-based callbacks (checkpoints, samples, FID, preemption) act then."""

from __future__ import annotations

import lightning as L


def step_ended(trainer: L.Trainer, batch_idx: int) -> bool:
    """True for the batch that completed an optimizer step. With gradient accumulation only every
    ``accumulate_grad_batches``-th batch does; the others see the previous step's ``global_step``, and a
    checkpoint taken there would sit in the middle of a step. Checkpoints sit on step boundaries, so a
    resumed run's batch index is a multiple of the accumulation too."""
    return (batch_idx + 1) % trainer.accumulate_grad_batches == 0


def interim_step_ended(trainer: L.Trainer, batch_idx: int, every: int) -> bool:
    """True for the batch that completed a step that is a multiple of ``every`` (0: never) and not the last: the
    samples and FID of the last step come from their callbacks' ``on_train_end``, once."""
    return (bool(every) and step_ended(trainer, batch_idx) and trainer.global_step % every == 0
            and trainer.global_step < trainer.max_steps)
