"""What Lightning prints around our Trainer that says nothing to a user of this project, filtered in one place.

Each filter names the exact message and the module that emits it, and says why hiding it is safe. Warnings about
the user's data, config or numerics, errors and our own warnings are untouched; Lightning's own warnings other
than these still print.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import lightning as L

LIGHTNING_INFO = "lightning.pytorch.utilities.rank_zero"
"""Lightning's info logger: "GPU available: ...", "TPU available: ...", the litlogger tip and "`Trainer.fit`
stopped: `max_steps=N` reached." Our runner prints what a unit trains on and where; a run always ends at
``max_steps``. At WARNING, its warnings and errors still print."""

FILTERS = [
    # Lightning's SLURMEnvironment sees `srun` on the PATH of a login node: the runner picks the environment itself
    # (runner/trainer.py) and `pixart-lightning slurm` writes the `srun` line of a batch job.
    (r"The `srun` command is available on your system but is not used", "lightning.fabric.plugins.environments.slurm"),
    # Lightning's batch flattening calls a torch API that torch deprecated: nothing a user can change.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", "lightning.pytorch.utilities._pytree"),
    # The stage module moves its batches to the device itself (stages/base.py), which is what Lightning then does;
    # the data module defines no transfer hooks to be overridden.
    (r"You have overridden `(on_before_batch_transfer|transfer_batch_to_device)` in `LightningModule` but have "
     r"passed in a `LightningDataModule`", "lightning.pytorch.trainer.connectors.data_connector"),
]


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning without the messages above, for the duration of the block (filters and level restored after)."""
    info = logging.getLogger(LIGHTNING_INFO)
    level = info.level
    info.setLevel(max(level, logging.WARNING))
    try:
        with warnings.catch_warnings():
            for message, module in FILTERS:
                warnings.filterwarnings("ignore", message=message, module=module)
            yield
    finally:
        info.setLevel(level)


class QuietTrainer(L.Trainer):
    """A Trainer that is built and fits under :func:`quiet_lightning`."""

    def __init__(self, *args, **kwargs):
        with quiet_lightning():
            super().__init__(*args, **kwargs)

    def fit(self, *args, **kwargs) -> None:
        with quiet_lightning():
            super().fit(*args, **kwargs)
