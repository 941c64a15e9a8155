"""Fault injection: non-finite steps are skipped without touching the weights or the EMA; K in a row stop the run."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from pixart_lightning.data.accounting import TrainingStopped
from tests.multiproc_train import GlobalBatches, small_stage2


class Poisoned(GlobalBatches):
    """The fixed global batches, with NaN latents at the chosen steps."""

    def __init__(self, steps: int, poisoned: set[int]):
        super().__init__(0, steps, 0, 1)
        self.poisoned = poisoned

    def __getitem__(self, i: int) -> dict:
        batch = super().__getitem__(i)
        if i in self.poisoned:
            batch["latent_mean"] = torch.full_like(batch["latent_mean"], float("nan"))
        return batch


class Snapshots(L.Callback):
    def __init__(self):
        self.weights: list[torch.Tensor] = []
        self.ema: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights.append(torch.cat([p.detach().flatten() for p in pl_module.model.parameters()]).clone())
        self.ema.append(torch.cat([p.detach().flatten() for p in pl_module.ema.model.parameters()]).clone())


def train(tmp_path: Path, steps: int, poisoned: set[int], max_in_a_row: int = 3, log_every: int = 1):
    module = small_stage2(steps, f"train.max_nonfinite_steps={max_in_a_row}")
    snapshots = Snapshots()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                        log_every_n_steps=log_every,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[snapshots],
                        default_root_dir=tmp_path)
    loader = DataLoader(Poisoned(steps, poisoned), batch_size=None)
    return trainer, module, snapshots, lambda: trainer.fit(module, train_dataloaders=loader)


def test_a_nan_step_changes_neither_weights_nor_ema(tmp_path: Path) -> None:
    trainer, module, snap, fit = train(tmp_path, 5, {2})
    fit()
    assert trainer.global_step == 5  # the skipped step still counts: the data position stays exact
    assert torch.equal(snap.weights[2], snap.weights[1]) and torch.equal(snap.ema[2], snap.ema[1])
    assert not torch.equal(snap.weights[3], snap.weights[2])  # training goes on afterwards
    assert all(torch.isfinite(w).all() for w in snap.weights + snap.ema)
    assert module.nonfinite.steps == {"total": 1, "in_a_row": 0}


def test_nonfinite_steps_in_a_row_stop_with_a_debug_checkpoint(tmp_path: Path) -> None:
    trainer, module, snap, fit = train(tmp_path, 8, {1, 2, 3}, max_in_a_row=3)
    with pytest.raises(TrainingStopped, match="3 steps in a row had a non-finite gradient"):
        fit()
    assert (tmp_path / "checkpoints" / "nonfinite-step3.ckpt").is_file()
    assert all(torch.isfinite(w).all() for w in snap.weights)
