"""What the runner records of a unit (its manifest), on a seconds-scale variant of configs/demo."""

from __future__ import annotations

import math
from pathlib import Path

from pixart_lightning.runner.chain import run
from tests.test_stages import DEMO, small


def test_the_manifest_records_the_learning_rate_the_optimizer_got(tmp_path: Path) -> None:
    """With ``optim.scale_lr`` the rate trained with is not ``optim.lr``: the manifest names the one used."""
    unit, = run(DEMO, [1], small(tmp_path, "stage1.train.max_steps=1", "eval.alignment_prompts=0",
                                 "optim.scale_lr=true"))
    cfg = unit.cfg
    assert unit.manifest()["learning_rate"] == cfg.learning_rate() == cfg.optim.lr * math.sqrt(32 / 256)
