"""Typed run configuration: YAML files merged onto dataclasses, validated before any work starts.

A config folder (``configs/demo/``, ``configs/pixart-xl2/``) holds ``base.yaml`` (what every stage
shares) and ``stage1.yaml`` … ``stage3.yaml`` (what each stage changes). A stage's config is
``StageConfig`` defaults ← base.yaml ← stageN.yaml ← command-line ``key=value`` overrides
(``stage2.optim.lr=1e-4`` targets one stage). Unknown keys, wrong types and impossible
combinations raise :class:`ConfigError` naming the key, where its value was set (command line, file:line
or default) and the valid choices.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from pixart_lightning.diffusion.gaussian_diffusion import PREDICTIONS
from pixart_lightning.diffusion.sampling import SAMPLERS
from pixart_lightning.models.config import MODEL_SIZES, PixArtConfig, official_interpolation_scale
from pixart_lightning.models.pixart import ATTENTION_BACKENDS

STAGES = (1, 2, 3)
PRECISIONS = ("32", "bf16-mixed")
STRATEGIES = ("auto", "ddp", "fsdp")
SHARDINGS = ("full", "grad_op", "hybrid")
EXTRACTORS = ("inception", "tiny")
INCEPTION_SIZE = 299
FP16_REFUSED = ("train.precision='16-mixed' is not supported: its loss scaler hands scaled gradients to the "
                 "clipping and the non-finite guard (fused AdamW unscales only inside its kernel), so the clip "
                 "and the skip counts would be wrong; use bf16-mixed (A100, H100 and newer) or 32 (V100)")
PIXEL_SPACE = "pixel"
TINY_T5 = "tiny"


class ConfigError(ValueError):
    """Config problems found before training starts; each names the key (once loaded: and where its value is set).

    ``context`` (e.g. ``stage 2``) says which config they belong to.
    """

    def __init__(self, *problems: str, context: str = ""):
        self.problems = list(problems)
        body = problems[0] if len(problems) == 1 else "invalid config:\n  " + "\n  ".join(problems)
        super().__init__(f"{context}: {body}" if context else body)


@dataclass(frozen=True)
class BatchPlan:
    """A global batch as ``world_size`` processes train it: micro-batches x accumulation steps per device."""

    micro: int
    accumulation: int
    world_size: int

    @property
    def global_batch(self) -> int:
        return self.micro * self.accumulation * self.world_size


@dataclass(kw_only=True)
class ModelSection:
    size: str = "PixArt-XL/2"
    """A named size (``PixArt-XL/2``, ``PixArt-tiny/4``, …); the fields below override it when set."""
    depth: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None
    patch_size: int | None = None
    learn_sigma: bool = True
    num_classes: int = 1000
    """Stage 1's class count (ImageNet: 1000)."""
    class_dropout_prob: float = 0.1
    """Probability of dropping the label (stage 1) or caption (stage 2) for classifier-free guidance; stage 3
    keeps stage 2's."""
    interpolation_scale: float | None = None
    """Position-embedding scale (PixArt's ``lewei_scale``: grid coordinates are divided by it). None follows the
    official rule, max(latent side // 64, 1): 1 at 256 and 512 px, 2 at 1024 px (DiT's own table at 256 px).
    Stage 1 started from ``init_from`` keeps the checkpoint's own scale unless this is set."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in the backward pass: less memory, about a third more compute."""
    compile: bool = False
    """``torch.compile`` each transformer block (after FSDP sharding; eager if compilation is unavailable).
    Pays off on GPUs; on CPU it was measured slower (docs/performance.md)."""
    attention_backend: str = "auto"
    """Attention kernel: ``auto`` (matmuls on CPU for short sequences, else PyTorch's choice, without cuDNN when
    captions are masked), or one forced SDPA kernel: ``flash``, ``efficient``, ``cudnn``, ``math`` (an error
    where it has no kernel for the inputs, e.g. ``flash`` with padded captions on a GPU). A setting of this run,
    not saved with the weights."""
    init_from: str | None = None
    """Stage 1 only: a DiT / PixArt checkpoint (file or diffusers folder) to start from."""


@dataclass(kw_only=True)
class DiffusionSection:
    prediction: str = "epsilon"
    """What the mean channels predict: ``epsilon`` (the paper) or ``v``."""


@dataclass(kw_only=True)
class TextEncoderSection:
    name: str = "DeepFloyd/t5-v1_1-xxl"
    """Hub id or folder of a T5 encoder; ``tiny`` builds the offline demo encoder under the run folder."""
    max_length: int = 120
    dtype: str = "bf16"
    """Weights dtype of the frozen encoder (``fp32``, ``bf16``, ``fp16``)."""


@dataclass(kw_only=True)
class VAESection:
    name: str = "stabilityai/sd-vae-ft-ema"
    """Hub id or folder of an AutoencoderKL; ``pixel`` trains in pixel space (the demo: no VAE to download)."""
    scale_factor: float = 0.18215
    sample_posterior: bool = True
    """Train on a fresh draw from the VAE posterior (PixArt-α), not its mean; same for precomputed latents."""


@dataclass(kw_only=True)
class SynthSection:
    """The embedded shapes world, written to ``data.shards`` when that folder holds no dataset yet."""

    count: int = 20000
    seed: int = 0
    two_shape_fraction: float = 0.0
    templates: list[int] | None = None
    """Caption templates to draw from (indices into ``world.TEMPLATES``); None: all."""
    samples_per_shard: int = 2000


@dataclass(kw_only=True)
class DataSection:
    shards: str = ""
    """A folder of ``.tar`` shards, a brace pattern (``data/{000000..000099}.tar``) or an image folder."""
    synth: SynthSection | None = None
    resolution: int = 256
    """Image side in pixels (the base size of the aspect-ratio buckets when ``multi_scale``)."""
    multi_scale: bool = False
    """Aspect-ratio buckets (PixArt-α's 0.25-4.0 table scaled to ``resolution``), one bucket per batch."""
    min_ratio: float = 0.25
    max_ratio: float = 4.0
    min_aesthetic: float | None = None
    """Keep only samples whose ``aesthetic`` score (in their json) is at least this."""
    caption_key: str = "txt"
    """Which caption trains the text stages: ``txt`` (the dense caption) or a json field name."""
    batch_size: int = 64
    """Per-device micro-batch: the most images one device processes in one forward/backward pass."""
    global_batch_size: int | None = None
    """Images per optimizer step over all devices (the paper states its batches this way). The runner splits it
    into per-device micro-batches of at most ``batch_size`` and gradient accumulation, from the world size, so
    8 GPUs and 64 GPUs train the same recipe. None: ``batch_size`` x world size, no accumulation."""
    num_workers: int = 2
    shuffle_buffer: int = 1000
    """Most samples a worker holds back for shuffling (an upper bound beside ``shuffle_buffer_mb``)."""
    shuffle_buffer_mb: float = 512.0
    """Most decoded data (MiB of tensors and images) a worker's shuffle buffer holds: each worker of each rank has
    one, so a node holds about workers x GPUs x this. At T5-XXL's 120 x 4096 bf16 features (about 1 MB a
    sample) 512 MiB is about 500 samples."""
    seed: int = 0
    max_bad_fraction: float = 0.05
    """Stop with a report when more than this share of the samples read is bad (undecodable, no caption, ...);
    filters (``min_aesthetic``) do not count."""


@dataclass(kw_only=True)
class OptimSection:
    lr: float = 2e-5
    scale_lr: bool = False
    """Multiply ``lr`` by sqrt(global batch / 256), as the official PixArt-α configs' ``auto_lr`` does (×6.7 at
    stage 2's 11,392); the paper states a plain 2e-5."""
    weight_decay: float = 0.03
    eps: float = 1e-10
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 1000
    grad_clip: float = 0.01
    """Max gradient norm; 0 turns clipping off."""
    ema_rate: float = 0.9999
    """EMA of the weights, kept in fp32 outside the optimizer; 0 turns it off."""
    ema_warmup: bool = False
    """Warm the EMA rate up as min(ema_rate, (1 + n) / (10 + n)) over the stage's n updates, so a short run
    forgets its starting weights; False keeps the rate constant, as the official code does."""


@dataclass(kw_only=True)
class TrainSection:
    max_steps: int = 1000
    precision: str = "bf16-mixed"
    """``bf16-mixed`` keeps fp32 master weights (with FSDP: sharded fp32 weights, bf16 all-gathers), or ``32``.
    ``16-mixed`` is refused: its loss scaling does not fit the clipping and the non-finite guard."""
    accelerator: str = "auto"
    devices: int = 1
    """Processes (GPUs) per node."""
    num_nodes: int = 1
    strategy: str = "auto"
    """``auto`` (one device, else DDP), ``ddp``, or ``fsdp`` (FSDP2 ``fully_shard`` per transformer block)."""
    sharding: str = "full"
    """FSDP: ``full`` (params, grads and optimizer state sharded; params re-gathered for backward),
    ``grad_op`` (params kept gathered between forward and backward), ``hybrid`` (full within a node,
    replicated across nodes)."""
    sharded_checkpoint: bool = True
    """FSDP: each rank writes its shard (a folder); False gathers one file on rank 0."""
    peak_tflops: float | None = None
    """The accelerator's dense bf16 peak for MFU (default: looked up from the GPU's name; none on CPU)."""
    max_nonfinite_steps: int = 10
    """A step with a non-finite gradient is skipped (no optimizer or EMA update); this many in a row stop the run
    and save a debug checkpoint."""
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 1000
    """Steps between resumable checkpoints (``checkpoints/step-N.ckpt``, written atomically, sha256 recorded)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints stay on disk (a damaged newest one falls back to the one before)."""
    threads: int | None = None
    """torch CPU threads (None leaves torch's default)."""
    progress_bar: bool = True


@dataclass(kw_only=True)
class SamplesSection:
    """The fixed-prompt sample grid logged to TensorBoard and saved as PNG."""

    prompts: list[str] = field(default_factory=list)
    """Stage 2-3 prompts; stage 1 uses ``labels``."""
    labels: list[int] = field(default_factory=list)
    seed: int = 0
    every_n_steps: int = 0
    """0: only at the end of the stage."""
    cfg_scales: list[float] = field(default_factory=lambda: [4.5])
    sampler: str = "dpm++"
    steps: int = 20
    use_ema: bool = True
    scale: int = 1
    """Enlarge the saved PNG grid (nearest neighbour) for tiny demo images."""
    decode_batch: int = 8
    """Images the VAE decodes at once (also for the alignment eval); 0: all of a batch. One full-size activation of
    the SD VAE's decoder (128 channels) takes 0.5 GB per 1024-px image in fp32."""


@dataclass(kw_only=True)
class EvalSection:
    alignment_prompts: int = 0
    """Shapes-world prompts (wording never seen in training) scored at the end of the stage; 0: off."""
    seed: int = 0
    cfg_scale: float = 4.5


@dataclass(kw_only=True)
class FIDSection:
    """What pins an FID measurement (``pixart_lightning/fid.py``, ``callbacks/fid.py``); FID is off without a
    ``reference``."""

    every_n_steps: int = 0
    """0: at the end of the stage only."""
    at_start: bool = False
    """Also measure before the first step, so a stage's starting FID is recorded."""
    num_images: int = 30000
    captions: str = ""
    """Caption file (JSON list of {"id", "caption"[, "label"]}, COCO captions JSON, or .txt one per line) or a
    shard/image folder; empty: the captions of the ``reference`` samples."""
    caption_key: str = "txt"
    """Caption of a shard sample: a tar member (``txt``) or a json field."""
    seed: int = 0
    """Draws the pinned subset when there are more captions than ``num_images``; chunk ``c`` samples with ``seed + c``."""
    reference: str = ""
    """Real images: a folder of shards, a shard pattern or an image folder; empty: FID off."""
    reference_count: int = 0
    """Use the first N reference images (in source order); 0: all."""
    extractor: str = "inception"
    """``inception`` (clean-fid's Inception-v3, from ``inception_weights``) or ``tiny`` (offline, hand-made)."""
    inception_weights: str = ""
    """``inception-2015-12-05.pt`` or its folder; empty: ~/.cache/pixart-lightning/ or clean-fid's /tmp copy."""
    resize: int = INCEPTION_SIZE
    batch_size: int = 32
    decode_batch: int = 8
    """Images the VAE decodes at once; 0: the whole ``batch_size``. One full-size activation of the SD VAE's decoder
    (128 channels) takes 0.5 GB per 1024-px image in fp32: 17 GB for a batch of 32 at once."""
    sampler: str = "dpm++"
    steps: int = 20
    cfg_scale: float = 4.5
    cache_dir: str = ""
    """Where reference statistics are cached; empty: ~/.cache/pixart-lightning/fid."""

    @property
    def enabled(self) -> bool:
        return bool(self.reference)

    def problems(self, prefix: str = "fid") -> list[str]:
        """Every invalid field, named ``<prefix>.<field>`` (for the config's one-go validation)."""
        found = []
        if self.extractor not in EXTRACTORS:
            found.append(f"{prefix}.extractor={self.extractor!r}: valid choices are {', '.join(EXTRACTORS)}")
        if self.sampler not in SAMPLERS:
            found.append(f"{prefix}.sampler={self.sampler!r}: valid choices are {', '.join(SAMPLERS)}")
        for name, least in (("num_images", 2), ("batch_size", 1), ("steps", 1), ("resize", 1)):
            if getattr(self, name) < least:
                found.append(f"{prefix}.{name}={getattr(self, name)}: must be at least {least}")
        if self.every_n_steps < 0:
            found.append(f"{prefix}.every_n_steps={self.every_n_steps}: must be 0 (end of stage only) or positive")
        if self.decode_batch < 0:
            found.append(f"{prefix}.decode_batch={self.decode_batch}: must be 0 (the whole batch) or positive")
        if self.reference_count == 1 or self.reference_count < 0:
            found.append(f"{prefix}.reference_count={self.reference_count}: must be 0 (all images) or at least 2")
        if self.extractor == "inception" and self.resize != INCEPTION_SIZE:
            found.append(f"{prefix}.resize={self.resize}: the Inception extractor takes {INCEPTION_SIZE} x {INCEPTION_SIZE}")
        return found


@dataclass(kw_only=True)
class StageConfig:
    name: str = "run"
    stage: int = 1
    out_dir: str = "runs/${name}"
    """Outputs go to ``<out_dir>/stage<N>/``; other paths may refer to it as ``${out_dir}``."""
    phases: list[dict[str, Any]] = field(default_factory=list)
    """Optional consecutive sub-runs of this stage (e.g. 512 px then 1024 px), each a dict of overrides
    plus a ``name``; each starts from the previous one's weights."""
    model: ModelSection = field(default_factory=ModelSection)
    diffusion: DiffusionSection = field(default_factory=DiffusionSection)
    text_encoder: TextEncoderSection = field(default_factory=TextEncoderSection)
    vae: VAESection = field(default_factory=VAESection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    samples: SamplesSection = field(default_factory=SamplesSection)
    eval: EvalSection = field(default_factory=EvalSection)
    fid: FIDSection = field(default_factory=FIDSection)
    overrides: list[str] = field(default_factory=list)
    """The command-line ``key=value`` overrides this config was loaded with (recorded, not set in YAML)."""

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir)

    @property
    def latent_factor(self) -> int:
        """Pixels per latent pixel: 1 in pixel space, 8 for the SD VAE (read from the VAE once loaded)."""
        return 1 if self.vae.name == PIXEL_SPACE else 8

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
            micro_conditions=self.stage == 3 and self.data.multi_scale,
        )
        if self.vae.name == PIXEL_SPACE:
            fields["in_channels"] = 3
        return PixArtConfig.from_name(m.size, **overrides, **{**fields, **extra})


def _choices_check(problems: list[str], key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        problems.append(f"{key}={value!r}: valid choices are {', '.join(map(str, choices))}")


def validate(cfg: StageConfig) -> StageConfig:
    """Collect every cross-field problem, then raise once (so a user fixes them in one go)."""
    problems: list[str] = []
    _choices_check(problems, "stage", cfg.stage, STAGES)
    _choices_check(problems, "model.size", cfg.model.size, tuple(MODEL_SIZES))
    _choices_check(problems, "diffusion.prediction", cfg.diffusion.prediction, PREDICTIONS)
    _choices_check(problems, "samples.sampler", cfg.samples.sampler, SAMPLERS)
    if cfg.train.precision in ("16-mixed", "16"):
        problems.append(FP16_REFUSED)
    else:
        _choices_check(problems, "train.precision", cfg.train.precision, PRECISIONS)
    _choices_check(problems, "train.strategy", cfg.train.strategy, STRATEGIES)
    _choices_check(problems, "train.sharding", cfg.train.sharding, SHARDINGS)
    _choices_check(problems, "model.attention_backend", cfg.model.attention_backend, ATTENTION_BACKENDS)
    problems += cfg.fid.problems()
    if not 0 <= cfg.data.max_bad_fraction <= 1:
        problems.append(f"data.max_bad_fraction={cfg.data.max_bad_fraction}: must be in [0, 1]")
    if cfg.train.keep_checkpoints < 1:
        problems.append(f"train.keep_checkpoints={cfg.train.keep_checkpoints}: must be at least 1")
    if cfg.train.max_nonfinite_steps < 1:
        problems.append(f"train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}: must be at least 1")
    if cfg.train.devices < 1 or cfg.train.num_nodes < 1:
        problems.append("train.devices and train.num_nodes must be at least 1")
    if cfg.train.sharding == "hybrid" and cfg.train.strategy == "fsdp" and cfg.train.num_nodes < 2:
        problems.append("train.sharding=hybrid replicates across nodes: it needs train.num_nodes >= 2")
    _choices_check(problems, "text_encoder.dtype", cfg.text_encoder.dtype, ("fp32", "bf16", "fp16"))
    if not cfg.data.shards:
        problems.append("data.shards is empty: give a shard folder, a brace pattern or an image folder")
    for key, value in [("data.batch_size", cfg.data.batch_size), ("train.max_steps", cfg.train.max_steps),
                       ("data.resolution", cfg.data.resolution), ("train.checkpoint_every", cfg.train.checkpoint_every)]:
        if value <= 0:
            problems.append(f"{key}={value}: must be positive")
    if cfg.optim.lr <= 0 or not math.isfinite(cfg.optim.lr):
        problems.append(f"optim.lr={cfg.optim.lr}: must be a positive number")
    if not 0 <= cfg.optim.ema_rate < 1:
        problems.append(f"optim.ema_rate={cfg.optim.ema_rate}: must be in [0, 1)")
    if cfg.model.init_from and cfg.stage != 1:
        problems.append("model.init_from is for stage 1; stages 2 and 3 start from the previous stage's weights")
    if cfg.data.global_batch_size is not None and cfg.data.global_batch_size <= 0:
        problems.append(f"data.global_batch_size={cfg.data.global_batch_size}: must be positive (or null)")
    elif cfg.data.batch_size > 0 and cfg.train.devices > 0 and cfg.train.num_nodes > 0:
        try:
            cfg.batch_plan()
        except ConfigError as err:
            problems.append(str(err))
    if cfg.model.interpolation_scale is not None and cfg.model.interpolation_scale <= 0:
        problems.append(f"model.interpolation_scale={cfg.model.interpolation_scale}: must be positive (or null)")
    if cfg.data.min_ratio > cfg.data.max_ratio:
        problems.append(f"data.min_ratio={cfg.data.min_ratio} is above data.max_ratio={cfg.data.max_ratio}")
    bad_labels = [label for label in cfg.samples.labels if not 0 <= label < cfg.model.num_classes]
    if bad_labels:
        problems.append(f"samples.labels {bad_labels} are outside [0, model.num_classes={cfg.model.num_classes})")
    if cfg.data.multi_scale and cfg.stage != 3:
        problems.append("data.multi_scale is stage 3's (aspect-ratio buckets and micro-conditions)")
    if cfg.model.size in MODEL_SIZES:
        patch = cfg.model.patch_size or PixArtConfig.from_name(cfg.model.size).patch_size
        granularity = patch * cfg.latent_factor
        if cfg.data.resolution % granularity:
            # key=value pairs, so that the origins listed after the problem name where the patch size was set
            patch_text = (f"model.patch_size={patch}" if cfg.model.patch_size
                          else f"patch size {patch} (model.size={cfg.model.size})")
            problems.append(f"data.resolution={cfg.data.resolution} is not divisible by {patch_text} x VAE factor "
                            f"{cfg.latent_factor} (vae.name={cfg.vae.name})")
        else:
            try:
                cfg.pixart_config()
            except ValueError as err:
                problems.append(f"model: {err}")
    for i, phase in enumerate(cfg.phases):
        if "name" not in phase:
            problems.append(f"phases[{i}] needs a name (it names the sub-run folder)")
    if problems:
        raise ConfigError(*problems)
    return cfg


def _section_fields(path: str) -> list[str]:
    """Valid keys at a dotted path of StageConfig ("" for the top level)."""
    cls: Any = StageConfig
    for part in [p for p in path.split(".") if p]:
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        if part not in types:
            return []
        hint = str(types[part]).split("|")[0].strip()
        cls = _SECTIONS.get(hint)
        if cls is None:
            return []
    return [f.name for f in dataclasses.fields(cls)]


_SECTIONS = {c.__name__: c for c in (ModelSection, DiffusionSection, TextEncoderSection, VAESection, SynthSection,
                                     DataSection, OptimSection, TrainSection, SamplesSection, EvalSection,
                                     FIDSection)}


def _merge(*layers: Any) -> StageConfig:
    """Merge layers onto the schema; omegaconf errors become one-line ConfigErrors naming the key."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(StageConfig), *layers)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except (ConfigKeyError, ConfigAttributeError) as err:
        key = err.full_key or str(err.key)
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        valid = _section_fields(parent)
        raise ConfigError(f"unknown key {key!r}" + (f"; valid keys there: {', '.join(valid)}" if valid else "")) from None
    except ValidationError as err:
        raise ConfigError(f"{err.full_key}: {str(err).splitlines()[0]}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(str(err).splitlines()[0]) from None


def _stage_dotlist(overrides: list[str], stage: int) -> list[str]:
    """The ``key=value`` pairs for this stage: plain keys apply to every stage, ``stageN.key`` to stage N only."""
    picked = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        head, _, rest = key.partition(".")
        if (rest if head.startswith("stage") and rest else key) in ("stage", "phases"):
            raise ConfigError(f"override {item!r}: 'stage' and 'phases' come from the config folder's files")
        if head in {f"stage{s}" for s in STAGES}:
            if head == f"stage{stage}":
                picked.append(f"{rest}={value}")
        else:
            picked.append(item)
    return picked


def stage_overrides(overrides: list[str], stage: int) -> DictConfig:
    """The command-line overrides that apply to this stage, as a config layer."""
    try:
        return OmegaConf.from_dotlist(_stage_dotlist(overrides, stage))
    except OmegaConfBaseException as err:
        raise ConfigError(f"bad override: {err}") from None


def _is_leaf_field(key: str) -> bool:
    """Whether a dotted key names a value of StageConfig (not a section)."""
    parent, _, name = key.rpartition(".")
    return name in _section_fields(parent) and not _section_fields(key)


KEY_PATTERN = r"[A-Za-z_]\w*(?:\.\w+)*"
"""A dotted key as problems name it (``data.resolution``)."""


def _yaml_line(path: Path, key: str) -> int | None:
    """The line of ``path`` that sets the dotted ``key`` (list items by index: ``phases.1.data.resolution``) to a
    value, not a section; None where the file does not set it."""
    node, line = yaml.compose(path.read_text()), None
    for part in key.split("."):
        if isinstance(node, yaml.MappingNode):
            found = [(k.start_mark.line, v) for k, v in node.value if k.value == part]
        elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            found = [(node.value[int(part)].start_mark.line, node.value[int(part)])]
        else:
            return None
        if not found:
            return None
        line, node = found[-1][0] + 1, found[-1][1]
    return None if isinstance(node, yaml.MappingNode) else line


@dataclass(frozen=True)
class ValueOrigins:
    """Where a stage's values are set, the first that sets a key winning: the command line, then (for a phase)
    its entry in the stage file, the stage file, base.yaml; a config field none of them sets has its default.

    omegaconf keeps no origin or line with a merged value, so a key is looked up in each source again.
    """

    overridden: tuple[str, ...]
    """The keys this stage's command-line overrides set."""
    files: tuple[Path, ...]
    """The stage file, then base.yaml; empty when the config folder is unknown."""

    @classmethod
    def of_stage(cls, folder: str | Path | None, stage: int, overrides: list[str]) -> ValueOrigins:
        files = (Path(folder) / f"stage{stage}.yaml", Path(folder) / "base.yaml") if folder else ()
        keys = tuple(item.split("=", 1)[0] for item in _stage_dotlist(overrides, stage))
        return cls(keys, tuple(f for f in files if f.is_file()))

    def origin(self, key: str, phase: int | None = None) -> str | None:
        """``command line``, ``FILE:LINE`` or ``default``; None for a key no source sets and no field has."""
        if any(key == k or key.startswith(f"{k}.") for k in self.overridden):
            return "command line"
        lookups = [(self.files[0], f"phases.{phase}.{key}")] if phase is not None and self.files else []
        for path, dotted in [*lookups, *((f, key) for f in self.files)]:
            if (line := _yaml_line(path, dotted)) is not None:
                return f"{path}:{line}"
        return "default" if self.files and _is_leaf_field(key) else None

    def blame(self, problem: str, phase: int | None = None) -> str:
        """The problem led by the origin of the first key it names; the origins of other values it shows
        (``key=value``) follow it."""
        first = next((key for key in re.findall(KEY_PATTERN, problem) if self.origin(key, phase)), None)
        if first is None:
            return problem
        shown = [key for key in dict.fromkeys(re.findall(f"({KEY_PATTERN})=", problem)) if key != first]
        others = [f"{key}: {origin}" for key in shown if (origin := self.origin(key, phase))]
        return f"{self.origin(first, phase)}: {problem}" + (f" [{', '.join(others)}]" if others else "")


def load_stage(folder: str | Path, stage: int, overrides: list[str] | None = None) -> StageConfig:
    """Load ``folder/base.yaml`` + ``folder/stage<N>.yaml`` + overrides as a validated StageConfig."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"config folder {folder} does not exist (try configs/demo)")
    stage_file = folder / f"stage{stage}.yaml"
    if not stage_file.is_file():
        found = sorted(p.stem for p in folder.glob("stage*.yaml"))
        raise ConfigError(f"{stage_file} does not exist; this config has {', '.join(found) or 'no stages'}")
    layers = [OmegaConf.load(p) for p in (folder / "base.yaml", stage_file) if p.is_file()]
    layers.append(OmegaConf.create({"stage": stage}))
    layers.append(stage_overrides(overrides or [], stage))
    try:
        cfg = validate(_merge(*layers))
    except ConfigError as err:
        origins = ValueOrigins.of_stage(folder, stage, overrides or [])
        raise ConfigError(*(origins.blame(p) for p in err.problems), context=f"stage {stage}") from None
    cfg.overrides = list(overrides or [])
    return cfg


def phase_configs(cfg: StageConfig, folder: str | Path | None = None) -> list[tuple[str | None, StageConfig]]:
    """The stage's sub-runs: ``[(None, cfg)]``, or one validated config per entry of ``phases``.

    Command-line overrides are applied again on top of each phase, so they win over the phase's values.
    ``folder`` (the config folder) lets errors name the file and line that set a value.
    """
    if not cfg.phases:
        return [(None, cfg)]
    base = OmegaConf.structured(dataclasses.replace(cfg, phases=[]))
    again = stage_overrides(cfg.overrides, cfg.stage)
    out = []
    for index, phase in enumerate(cfg.phases):
        changes = OmegaConf.create({k: v for k, v in phase.items() if k != "name"})
        try:
            phase_cfg = validate(_merge(base, changes, again))
        except ConfigError as err:
            origins = ValueOrigins.of_stage(folder, cfg.stage, cfg.overrides)
            raise ConfigError(*(origins.blame(p, index) for p in err.problems),
                              context=f"stage {cfg.stage} ({phase.get('name', index)})") from None
        phase_cfg.overrides = cfg.overrides
        out.append((str(phase["name"]), phase_cfg))
    return out


def to_yaml(cfg: StageConfig) -> str:
    """The resolved config as YAML (saved in every run folder)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
