"""What a stage-4 (consistency-distilled) folder means: the commands sample it with the ``lcm`` sampler, at one of
the step counts it was distilled for and without guidance (its guidance is folded in), anything else as asked; its
end of stage compares it with its teacher (:mod:`pixart_lightning.evaluation.few_step`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L

from pixart_lightning.config import DISTILL_STAGE
from pixart_lightning.diffusion.sampling import CONSISTENCY_SAMPLER, DEFAULT_STEPS, UNGUIDED
from pixart_lightning.encoders.frozen import FrozenEncoders
from pixart_lightning.evaluation.few_step import compare_few_step
from pixart_lightning.interop import load_model
from pixart_lightning.models import PixArt
from pixart_lightning.runner.folders import saved_config
from pixart_lightning.runner.unit import Unit


@dataclass(frozen=True)
class SamplingChoice:
    """The sampler, steps and guidance scale to sample with; None leaves the callee's default (or the stage's FID
    settings, for ``eval fid``)."""

    sampler: str | None = None
    steps: int | None = None
    cfg_scale: float | None = None

    def given(self) -> dict[str, Any]:
        """The keyword arguments that were chosen, for ``generate``, ``alignment`` or an ``FIDSection``."""
        return {name: value for name, value in vars(self).items() if value is not None}


def distilled_steps(checkpoint: str | Path) -> list[int] | None:
    """The step counts the stage-4 folder ``checkpoint`` (or a weights file in one) was distilled for, from its
    saved config's ``distill.steps``; None for any other checkpoint."""
    path = Path(checkpoint)
    cfg = saved_config(path if path.is_dir() else path.parent)
    return list(cfg.distill.steps) if cfg is not None and cfg.stage == DISTILL_STAGE else None


def sampling_choice(
    checkpoint: str | Path, sampler: str | None = None, steps: int | None = None, cfg_scale: float | None = None
) -> SamplingChoice:
    """What to sample ``checkpoint`` with, given the command's ``--sampler``, ``--steps`` and ``--cfg`` (None: not
    given).

    A stage-4 folder samples with ``lcm`` at ``steps`` (default 4 where served, else the most), which must be one of
    its ``distill.steps``, and guidance 1; another sampler or guidance is refused. Elsewhere the options stand as
    given, except that ``lcm`` without ``--cfg`` samples unguided.
    """
    served = distilled_steps(checkpoint)
    if served is None:
        unguided = sampler in UNGUIDED and cfg_scale is None
        return SamplingChoice(sampler, steps, 1.0 if unguided else cfg_scale)
    where = f"{checkpoint} is a consistency-distilled (stage 4) model"
    if sampler not in (None, CONSISTENCY_SAMPLER):
        raise ValueError(f"{where}: it samples with --sampler {CONSISTENCY_SAMPLER} only (got {sampler})")
    if cfg_scale not in (None, 1.0):
        raise ValueError(f"{where} with its guidance folded in: drop --cfg {cfg_scale:g} (it samples unguided)")
    default = DEFAULT_STEPS[CONSISTENCY_SAMPLER]
    steps = steps or (default if default in served else max(served))
    if steps not in served:
        raise ValueError(f"--steps {steps}: {checkpoint} was distilled for {', '.join(map(str, served))} steps; "
                         "pass one of those")
    return SamplingChoice(CONSISTENCY_SAMPLER, steps, 1.0)


def teacher_weights(manifest: dict[str, Any]) -> Path | None:
    """The weights a stage-4 unit was distilled from, as its manifest's ``parent`` records them (the handoff records
    stage 3's EMA file); None where no local file is recorded."""
    parent = Path((manifest.get("parent") or {}).get("path") or "")
    return parent if parent.is_file() else None


def score_few_step(
    unit: Unit, trainer: L.Trainer, student: PixArt, encoders: FrozenEncoders, manifest: dict[str, Any]
) -> list[dict[str, Any]]:
    """The stage-4 comparison (:func:`compare_few_step`) of ``student`` with its teacher, read from the parent."""
    weights = teacher_weights(manifest)
    teacher = load_model(weights).to(next(student.parameters()).device).eval() if weights else None
    return compare_few_step(student, teacher, encoders.vae, encoders.prompt_encoder, unit.cfg, trainer.precision)
