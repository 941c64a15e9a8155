"""One stage's whole config (``StageConfig``) and what follows from it: the batch plan, the learning rate, the
backbone config."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pixart_lightning.config.distill import DistillSection
from pixart_lightning.config.fid import FIDSection
from pixart_lightning.config.schema import (
    MULTI_SCALE_STAGES,
    ConfigError,
    DataSection,
    DiffusionSection,
    EvalSection,
    ModelSection,
    OptimSection,
    SamplesSection,
    Stage,
    TextEncoderSection,
    TrainSection,
    VAESection,
)
from pixart_lightning.encoders.vae import PIXEL_SPACE, SD_VAE_DOWNSAMPLE
from pixart_lightning.models.config import PixArtConfig, official_interpolation_scale
from pixart_lightning.models.routing import TokenRouting

LR_REFERENCE_BATCH = 256
"""The global batch at which ``optim.scale_lr`` leaves ``optim.lr`` as it is (the official configs' ``auto_lr``)."""


@dataclass(frozen=True)
class BatchPlan:
    """A global batch as ``world_size`` processes train it: micro-batches x accumulation steps per device."""

    micro: int
    """Images one device processes in one forward/backward pass."""
    accumulation: int
    """Micro-batches whose gradients are summed before each optimizer step."""
    world_size: int
    """Training processes (devices x nodes)."""

    @property
    def global_batch(self) -> int:
        return self.micro * self.accumulation * self.world_size


@dataclass(kw_only=True)
class StageConfig:
    name: str = "run"
    """The run's name: its outputs go to ``runs/<name>`` unless ``out_dir`` says otherwise. A config folder's runs are
    named after the folder (``configs/demo-long`` -> ``runs/demo-long``) unless its files set a name."""
    stage: Stage = 1
    """Which stage: the paper's 1 (class-conditional), 2 (text-image alignment), 3 (high aesthetics), or 4 (few-step
    consistency distillation of stage 3). Set by the config folder's file name, not by a key."""
    out_dir: str = "runs/${name}"
    """Outputs go to ``<out_dir>/stage<N>/``; other paths may refer to it as ``${out_dir}``."""
    phases: list[dict[str, Any]] = field(default_factory=list)
    """Optional consecutive sub-runs of this stage (e.g. 512 px then 1024 px), each a dict of overrides
    plus a ``name``; each starts from the previous one's weights."""
    model: ModelSection = field(default_factory=ModelSection)
    """The backbone."""
    diffusion: DiffusionSection = field(default_factory=DiffusionSection)
    """The diffusion objective."""
    text_encoder: TextEncoderSection = field(default_factory=TextEncoderSection)
    """The frozen T5 of stages 2 and 3."""
    vae: VAESection = field(default_factory=VAESection)
    """The frozen autoencoder, or pixel space."""
    data: DataSection = field(default_factory=DataSection)
    """What trains the stage and how it is batched."""
    optim: OptimSection = field(default_factory=OptimSection)
    """AdamW, its warm-up, clipping and the EMA."""
    train: TrainSection = field(default_factory=TrainSection)
    """Steps, devices, precision, parallelism and checkpoints."""
    samples: SamplesSection = field(default_factory=SamplesSection)
    """The sample grids logged while training."""
    eval: EvalSection = field(default_factory=EvalSection)
    """The end-of-stage alignment eval."""
    fid: FIDSection = field(default_factory=FIDSection)
    """FID measurements (off without ``fid.reference``)."""
    distill: DistillSection = field(default_factory=DistillSection)
    """Stage 4's consistency distillation (ignored by stages 1-3)."""
    overrides: list[str] = field(default_factory=list)
    """The command-line ``key=value`` overrides this config was loaded with (recorded, not set in YAML)."""

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir)

    @property
    def latent_factor(self) -> int:
        """Pixels per latent pixel: 1 in pixel space, else the SD VAE's downsampling (read from the VAE once
        loaded)."""
        return 1 if self.vae.name == PIXEL_SPACE else SD_VAE_DOWNSAMPLE

    @property
    def text_mode(self) -> bool:
        return self.stage >= 2

    @property
    def world_size(self) -> int:
        return self.train.devices * self.train.num_nodes

    def batch_plan(self) -> BatchPlan:
        """How the global batch is split over this config's devices; raises ConfigError when it cannot be."""
        d, world = self.data, self.world_size
        if d.global_batch_size is None:
            return BatchPlan(micro=d.batch_size, accumulation=1, world_size=world)
        if d.global_batch_size % world:
            lower, upper = d.global_batch_size // world * world, -(-d.global_batch_size // world) * world
            raise ConfigError(
                f"data.global_batch_size={d.global_batch_size} is not divisible by the {world} processes "
                f"(train.devices={self.train.devices} x train.num_nodes={self.train.num_nodes}); use a multiple of "
                f"{world}, e.g. {lower or upper} or {upper}")
        per_device = d.global_batch_size // world
        # The fewest accumulation steps whose micro-batch divides the per-device share and fits in batch_size.
        accumulation = next(a for a in range(1, per_device + 1) if per_device % a == 0 and per_device // a <= d.batch_size)
        micro = per_device // accumulation
        if 2 * micro < min(d.batch_size, per_device):  # e.g. 1424 = 16 x 89: batch_size 64 would run micro-batches of 16
            near = [m for m in range(1, per_device + 1) if per_device % m == 0 and m > micro][:2]
            raise ConfigError(
                f"data.batch_size={d.batch_size}: the per-device share of data.global_batch_size={d.global_batch_size} "
                f"over {world} processes is {per_device}, whose largest divisor up to {d.batch_size} is {micro} "
                f"({accumulation} accumulation steps of {micro}); use a divisor of {per_device} such as "
                + " or ".join(f"{m} ({per_device // m} steps)" for m in [micro, *near]))
        return BatchPlan(micro=micro, accumulation=accumulation, world_size=world)

    def learning_rate(self, global_batch: int | None = None) -> float:
        """The learning rate the optimizer is given: ``optim.lr``, times sqrt(global batch / 256) with
        ``optim.scale_lr``; the global batch as :meth:`batch_plan` plans it unless the running one is given."""
        if not self.optim.scale_lr:
            return self.optim.lr
        return self.optim.lr * math.sqrt((global_batch or self.batch_plan().global_batch) / LR_REFERENCE_BATCH)

    def pixart_config(self, **extra: Any) -> PixArtConfig:
        """The backbone config this stage trains (before any handoff changes)."""
        m = self.model
        overrides = {k: getattr(m, k) for k in ("depth", "hidden_size", "num_heads", "patch_size") if getattr(m, k)}
        sample_size = self.data.resolution // self.latent_factor
        scale = m.interpolation_scale or official_interpolation_scale(sample_size)
        fields: dict[str, Any] = dict(
            learn_sigma=m.learn_sigma,
            class_dropout_prob=m.class_dropout_prob,
            sample_size=sample_size,
            interpolation_scale=scale,
            mode="text" if self.text_mode else "class",
            num_classes=m.num_classes,
            micro_conditions=self.stage in MULTI_SCALE_STAGES and self.data.multi_scale and m.micro_conditions,
        )
        if self.vae.name == PIXEL_SPACE:
            fields["in_channels"] = 3
        return PixArtConfig.from_name(m.size, **overrides, **{**fields, **extra})

    def token_routing(self, depth: int) -> TokenRouting | None:
        """The route of ``model.token_routing`` (end None: depth - 1) or ``model.patch_masking`` (every block, the loss
        on the kept patches) for a backbone of ``depth`` blocks; None when both are off."""
        m = self.model
        if m.patch_masking is not None:
            return TokenRouting(m.patch_masking.ratio, 0, depth, masked_loss=True)
        if m.token_routing is not None:
            r = m.token_routing
            return TokenRouting(r.ratio, r.start, depth - 1 if r.end is None else r.end)
        return None
