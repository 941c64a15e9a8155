"""Typed run configuration: YAML files merged onto dataclasses, validated before any work starts.

A config folder (``configs/demo/``, ``configs/pixart-xl2/``) holds ``base.yaml`` (what every stage
shares) and ``stage1.yaml`` … ``stage3.yaml`` (what each stage changes). A stage's config is
``StageConfig`` defaults ← base.yaml ← stageN.yaml ← command-line ``key=value`` overrides
(``stage2.optim.lr=1e-4`` targets one stage). Unknown keys, wrong types and impossible
combinations raise :class:`ConfigError` naming the key, where its value was set (command line, file:line
or default) and the valid choices.

- :mod:`.schema`: the sections, every field documented, fixed choices as Literals; :class:`ConfigError`
  (:mod:`.fid` and :mod:`.distill`: the FID and stage-4 sections).
- :mod:`.stage`: ``StageConfig`` and what follows from it (batch plan, learning rate, backbone config).
- :mod:`.validation`: :func:`validate`, every check at once.
- :mod:`.loading`: merging files and overrides, where values were set, saving and reading back a unit's config.
"""

from pixart_lightning.config.distill import DistillSection
from pixart_lightning.config.fid import EXTRACTORS, INCEPTION_SIZE, FIDSection
from pixart_lightning.config.loading import (
    ValueOrigins,
    load_saved,
    load_stage,
    phase_configs,
    stage_overrides,
    to_yaml,
)
from pixart_lightning.config.schema import (
    DISTILL_STAGE,
    MULTI_SCALE_STAGES,
    PRECISIONS,
    SHARDINGS,
    STAGES,
    STRATEGIES,
    ConfigError,
    DataSection,
    DiffusionSection,
    EvalSection,
    ModelSection,
    OptimSection,
    SamplesSection,
    SynthSection,
    TextEncoderSection,
    TrainSection,
    VAESection,
)
from pixart_lightning.config.stage import BatchPlan, StageConfig
from pixart_lightning.config.validation import FP16_REFUSED, validate

__all__ = [
    "DISTILL_STAGE", "EXTRACTORS", "FP16_REFUSED", "MULTI_SCALE_STAGES", "INCEPTION_SIZE", "PRECISIONS", "SHARDINGS", "STAGES", "STRATEGIES",
    "BatchPlan", "ConfigError", "DataSection", "DiffusionSection", "DistillSection", "EvalSection", "FIDSection",
    "ModelSection", "OptimSection", "SamplesSection", "StageConfig", "SynthSection", "TextEncoderSection",
    "TrainSection", "VAESection", "ValueOrigins", "load_saved", "load_stage", "phase_configs", "stage_overrides",
    "to_yaml", "validate",
]
