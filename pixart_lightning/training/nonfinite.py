"""Steps whose gradient is not finite: skipped on the device, counted there, read on the host only now and then."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from torch import Tensor

from pixart_lightning.data.accounting import TrainingStopped

log = logging.getLogger(__name__)


class NonFiniteGuard:
    """Skips the optimizer and EMA updates of a step whose gradient norm is not finite, without reading anything on
    the host, and stops training after ``max_in_a_row`` such steps in a row.

    A NaN or inf anywhere in any rank's gradients makes the global norm non-finite on every rank. Fused AdamW then
    skips the update on the device (``found_inf``: weights, moments and step count untouched) and the EMA update
    gets weight zero; an optimizer without ``found_inf`` pays one host sync to drop the gradients instead. The
    count of such steps stays on the device until :meth:`check` reads it.
    """

    def __init__(self, max_in_a_row: int):
        self.max_in_a_row = max_in_a_row
        self.bad: Tensor | None = None  # this step's gradient was not finite (a device bool)
        self._counts: Tensor | None = None  # (total, in a row, longest run since the last check), on the device
        self._reported = 0

    def skip_if_nonfinite(self, norm: Tensor, optimizer: torch.optim.Optimizer) -> None:
        """Mark this step bad when the gradient ``norm`` is not finite, and have ``optimizer`` skip it."""
        self.bad = ~torch.isfinite(norm)
        if optimizer.defaults.get("fused"):
            optimizer.found_inf = self.bad.float()
        elif self.bad.item():
            optimizer.zero_grad(set_to_none=True)

    def count(self) -> bool:
        """Add the step just taken to the counts, on the device; False when no step was marked (no gradient
        clipping hook ran: manual stepping)."""
        if self.bad is None:
            return False
        if self._counts is None:
            self._counts = torch.zeros(3, dtype=torch.long, device=self.bad.device)
        total, in_a_row, longest = self._counts.unbind()
        total.add_(self.bad.long())
        in_a_row.add_(1).mul_(self.bad.long())
        torch.maximum(longest, in_a_row, out=longest)
        return True

    @property
    def steps(self) -> dict[str, int]:
        """Steps skipped for a non-finite gradient: in all, and in a row up to now (reads the device)."""
        total, in_a_row, _ = self._counts.tolist() if self._counts is not None else (0, 0, 0)
        return {"total": total, "in_a_row": in_a_row}

    def check(self, module: L.LightningModule) -> None:
        """Report new non-finite steps (the ``train/nonfinite_steps`` metric and a warning); stop after
        ``max_in_a_row`` in a row, the state saved for debugging. One host sync."""
        total, in_a_row, longest = self._counts.tolist()
        self._counts[2] = in_a_row
        new, self._reported = total - self._reported, total
        if not new:
            return
        module.log("train/nonfinite_steps", float(total), on_step=True, batch_size=1)
        log.warning("up to step %d: %d more steps with a non-finite gradient, their updates skipped (%d in a row now)",
                    module.global_step, new, in_a_row)
        if longest >= self.max_in_a_row:
            trainer = module.trainer
            debug = Path(trainer.default_root_dir) / "checkpoints" / f"nonfinite-step{module.global_step}.ckpt"
            trainer.save_checkpoint(debug, weights_only=False)
            raise TrainingStopped(
                f"{longest} steps in a row had a non-finite gradient (train.max_nonfinite_steps="
                f"{self.max_in_a_row}); the state is saved in {debug} for debugging. Lower "
                "optim.lr, check the data, or resume from the last good checkpoint")
