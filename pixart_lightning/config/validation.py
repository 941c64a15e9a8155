"""Every check a loaded config must pass before any work starts, reported together."""

from __future__ import annotations

import math

from pixart_lightning.config.schema import (
    DISTILL_STAGE,
    MULTI_SCALE_STAGES,
    ConfigError,
    choice_problem,
    literal_fields,
)
from pixart_lightning.config.stage import StageConfig
from pixart_lightning.diffusion.consistency import LCM_ORIGINAL_STEPS
from pixart_lightning.diffusion.sampling import CONSISTENCY_SAMPLER, UNGUIDED
from pixart_lightning.models.config import MODEL_SIZES, PixArtConfig

FP16_PRECISIONS = ("16-mixed", "16")
FP16_REFUSED = ("train.precision='16-mixed' is not supported: its loss scaler hands scaled gradients to the "
                "clipping and the non-finite guard (fused AdamW unscales only inside its kernel), so the clip "
                "and the skip counts would be wrong; use bf16-mixed (A100, H100 and newer) or 32 (V100)")


def _choice_problems(cfg: StageConfig) -> list[str]:
    """Each Literal-typed field holding a value outside its choices; fp16 is told why it is refused."""
    found = []
    for key, value, choices in literal_fields(cfg):
        if value in choices or key.startswith("fid."):  # fid.problems() names its own (evaluation.fid uses it alone)
            continue
        refused = key == "train.precision" and value in FP16_PRECISIONS
        found.append(FP16_REFUSED if refused else choice_problem(key, value, choices))
    return found


def _range_problems(cfg: StageConfig) -> list[str]:
    """Values outside their valid range, each on its own."""
    found = []
    if not 0 <= cfg.data.max_bad_fraction <= 1:
        found.append(f"data.max_bad_fraction={cfg.data.max_bad_fraction}: must be in [0, 1]")
    if cfg.train.keep_checkpoints < 1:
        found.append(f"train.keep_checkpoints={cfg.train.keep_checkpoints}: must be at least 1")
    if cfg.train.max_nonfinite_steps < 1:
        found.append(f"train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}: must be at least 1")
    if cfg.train.devices < 1 or cfg.train.num_nodes < 1:
        found.append("train.devices and train.num_nodes must be at least 1")
    if not cfg.data.shards:
        found.append("data.shards is empty: give a shard folder, a brace pattern or an image folder")
    for key, value in [("data.batch_size", cfg.data.batch_size), ("train.max_steps", cfg.train.max_steps),
                       ("data.resolution", cfg.data.resolution), ("train.checkpoint_every", cfg.train.checkpoint_every)]:
        if value <= 0:
            found.append(f"{key}={value}: must be positive")
    for key, value in [("samples.every_n_steps", cfg.samples.every_n_steps),
                       ("eval.every_n_steps", cfg.eval.every_n_steps)]:
        if value < 0:
            found.append(f"{key}={value}: must be 0 (off) or positive")
    if cfg.optim.lr <= 0 or not math.isfinite(cfg.optim.lr):
        found.append(f"optim.lr={cfg.optim.lr}: must be a positive number")
    spread = cfg.diffusion.logit_normal
    if spread is not None and not (spread.std > 0 and math.isfinite(spread.std)):
        found.append(f"diffusion.logit_normal.std={spread.std}: must be a positive number")
    if spread is not None and not math.isfinite(spread.mean):
        found.append(f"diffusion.logit_normal.mean={spread.mean}: must be a finite number")
    gamma = cfg.diffusion.min_snr_gamma
    if gamma is not None and not (gamma > 0 and math.isfinite(gamma)):
        found.append(f"diffusion.min_snr_gamma={gamma}: must be a positive number (or null: unweighted)")
    if not 0 <= cfg.optim.ema_rate < 1:
        found.append(f"optim.ema_rate={cfg.optim.ema_rate}: must be in [0, 1)")
    if cfg.model.interpolation_scale is not None and cfg.model.interpolation_scale <= 0:
        found.append(f"model.interpolation_scale={cfg.model.interpolation_scale}: must be positive (or null)")
    bad_labels = [label for label in cfg.samples.labels if not 0 <= label < cfg.model.num_classes]
    if bad_labels:
        found.append(f"samples.labels {bad_labels} are outside [0, model.num_classes={cfg.model.num_classes})")
    return found


def _batch_problems(cfg: StageConfig) -> list[str]:
    """Whether the global batch splits over the devices (checked once the values it needs are valid)."""
    if cfg.data.global_batch_size is not None and cfg.data.global_batch_size <= 0:
        return [f"data.global_batch_size={cfg.data.global_batch_size}: must be positive (or null)"]
    if cfg.data.batch_size > 0 and cfg.train.devices > 0 and cfg.train.num_nodes > 0:
        try:
            cfg.batch_plan()
        except ConfigError as err:
            return [str(err)]
    return []


def _model_problems(cfg: StageConfig) -> list[str]:
    """Whether the resolution fits the patch and VAE grid, and the backbone config builds."""
    if cfg.model.size not in MODEL_SIZES:
        return []  # a choice problem already
    patch = cfg.model.patch_size or PixArtConfig.from_name(cfg.model.size).patch_size
    if cfg.data.resolution % (patch * cfg.latent_factor):
        # key=value pairs, so that the origins listed after the problem name where the patch size was set
        patch_text = (f"model.patch_size={patch}" if cfg.model.patch_size
                      else f"patch size {patch} (model.size={cfg.model.size})")
        return [f"data.resolution={cfg.data.resolution} is not divisible by {patch_text} x VAE factor "
                f"{cfg.latent_factor} (vae.name={cfg.vae.name})"]
    try:
        cfg.pixart_config()
    except ValueError as err:
        return [f"model: {err}"]
    return []


def _combination_problems(cfg: StageConfig) -> list[str]:
    """Settings that are valid alone but not together."""
    found = []
    if cfg.train.sharding == "hybrid" and cfg.train.strategy == "fsdp" and cfg.train.num_nodes < 2:
        found.append("train.sharding=hybrid replicates across nodes: it needs train.num_nodes >= 2")
    if cfg.data.min_ratio > cfg.data.max_ratio:
        found.append(f"data.min_ratio={cfg.data.min_ratio} is above data.max_ratio={cfg.data.max_ratio}")
    if cfg.data.multi_scale and cfg.stage not in MULTI_SCALE_STAGES:
        found.append(f"data.multi_scale is for stages {' and '.join(map(str, MULTI_SCALE_STAGES))} (aspect-ratio "
                     "buckets and micro-conditions)")
    for key, sampler, scales in (("samples", cfg.samples.sampler, cfg.samples.cfg_scales),
                                 ("fid", cfg.fid.sampler, [cfg.fid.cfg_scale])):
        if sampler in UNGUIDED and any(scale != 1 for scale in scales):
            found.append(f"{key}.sampler={sampler} samples a model with the guidance inside it: set {key}.cfg_scale"
                         f"{'s=[1.0]' if key == 'samples' else '=1.0'}")
    if cfg.eval.every_n_steps and not cfg.eval.alignment_prompts:
        found.append(f"eval.every_n_steps={cfg.eval.every_n_steps} scores eval.alignment_prompts, which is 0")
    for i, phase in enumerate(cfg.phases):
        if "name" not in phase:
            found.append(f"phases[{i}] needs a name (it names the sub-run folder)")
    return found


def _lora_problems(cfg: StageConfig) -> list[str]:
    """The adapters' ranges, and what they cannot be combined with (its target set is a choice problem)."""
    lora = cfg.model.lora
    if lora is None:
        return []
    found = []
    if lora.rank < 1:
        found.append(f"model.lora.rank={lora.rank}: must be at least 1")
    if lora.alpha <= 0:
        found.append(f"model.lora.alpha={lora.alpha}: must be positive")
    if not 0 <= lora.dropout < 1:
        found.append(f"model.lora.dropout={lora.dropout}: must be in [0, 1)")
    if lora.base_dtype == "bf16" and cfg.train.precision != "bf16-mixed":
        found.append(f"model.lora.base_dtype=bf16 needs train.precision=bf16-mixed (not {cfg.train.precision}): "
                     "bf16 weights are multiplied under its autocast")
    return found


def _routing_problems(cfg: StageConfig) -> list[str]:
    """Token routing's and patch masking's ranges and span, and what they cannot be combined with."""
    m = cfg.model
    if m.token_routing is None and m.patch_masking is None:
        return []
    found = []
    if m.token_routing is not None and m.patch_masking is not None:
        found.append("model.token_routing and model.patch_masking exclude each other: set one of them to null")
    if cfg.stage == DISTILL_STAGE:
        found.append("model.token_routing and model.patch_masking are for stages 1-3: set them to null in stage 4")
    for key, section in (("model.token_routing", m.token_routing), ("model.patch_masking", m.patch_masking)):
        if section is not None and not 0 <= section.ratio < 1:
            found.append(f"{key}.ratio={section.ratio}: must be in [0, 1) (0: every token goes through)")
    r = m.token_routing
    if r is not None and m.size in MODEL_SIZES:
        depth = m.depth or PixArtConfig.from_name(m.size).depth
        if not 0 <= r.start < (depth - 1 if r.end is None else r.end) <= depth:
            found.append(f"model.token_routing.start={r.start}, end={r.end}: need 0 <= start < end <= depth={depth} "
                         f"(end null: depth - 1), e.g. start={min(1, depth - 1)}, end={depth - 1 if depth > 2 else depth}")
    return found


def _distill_problems(cfg: StageConfig) -> list[str]:
    """Stage 4's distillation settings (the section is ignored by the other stages)."""
    if cfg.stage != DISTILL_STAGE:
        return []
    d, found = cfg.distill, []
    if not d.cfg_scale >= 1 or not math.isfinite(d.cfg_scale):
        found.append(f"distill.cfg_scale={d.cfg_scale}: must be at least 1 (1: the teacher unguided)")
    bad_steps = [s for s in d.steps if not 1 <= s <= LCM_ORIGINAL_STEPS]
    if not d.steps or bad_steps:
        found.append(f"distill.steps={list(d.steps)}: give step counts in [1, {LCM_ORIGINAL_STEPS}] (the skipping "
                     "schedule's length)")
    if not 0 <= d.target_ema < 1:
        found.append(f"distill.target_ema={d.target_ema}: must be in [0, 1) (0: the student is its own target)")
    if not d.huber_c >= 0:
        found.append(f"distill.huber_c={d.huber_c}: must be at least 0 (0: mean squared error)")
    if cfg.phases:
        found.append("stage 4 has no phases: it distils at its teacher's resolution in one run")
    for key, value in (("diffusion.logit_normal", cfg.diffusion.logit_normal),
                       ("diffusion.min_snr_gamma", cfg.diffusion.min_snr_gamma)):
        if value is not None:
            found.append(f"{key} shapes the diffusion loss, which stage 4 does not train with (it walks the teacher's "
                         f"skipping schedule): set stage4.{key}=null")
    for key, sampler, steps in (("samples", cfg.samples.sampler, cfg.samples.steps), ("fid", cfg.fid.sampler,
                                                                                     cfg.fid.steps)):
        if sampler != CONSISTENCY_SAMPLER or steps not in d.steps:
            found.append(f"{key}.sampler={sampler}, {key}.steps={steps}: stage 4's student samples with "
                         f"{CONSISTENCY_SAMPLER} at one of distill.steps {list(d.steps)} (and cfg_scale 1)")
    return found


def validate(cfg: StageConfig) -> StageConfig:
    """Collect every problem, then raise once (so a user fixes them in one go)."""
    problems = [*_choice_problems(cfg), *cfg.fid.problems(), *_range_problems(cfg), *_batch_problems(cfg),
                *_model_problems(cfg), *_combination_problems(cfg), *_lora_problems(cfg), *_routing_problems(cfg),
                *_distill_problems(cfg)]
    if problems:
        raise ConfigError(*problems)
    return cfg
