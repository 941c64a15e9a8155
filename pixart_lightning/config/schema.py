"""What each YAML section holds: one dataclass per section, every field documented, fixed choices as Literals.

A field with a fixed set of values is typed by a ``Literal``, the one owner of its choices: validation and its
messages read them through :func:`literal_fields`, and tuples such as ``PRECISIONS`` are derived from it. Choices
another package owns (samplers, predictions, attention backends, model sizes) are built into the Literal from that
package's tuple, so they stay owned there.
"""

from __future__ import annotations

import functools
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field, is_dataclass
from typing import Any, Literal

from pixart_lightning.diffusion import PREDICTIONS, SAMPLERS
from pixart_lightning.encoders.loading import DTYPES
from pixart_lightning.encoders.text import DEFAULT_T5
from pixart_lightning.encoders.vae import DEFAULT_VAE, SD_VAE_SCALE
from pixart_lightning.models.attention import ATTENTION_BACKENDS
from pixart_lightning.models.config import CAPTION_TOKENS, MODEL_SIZES

Stage = Literal[1, 2, 3, 4]
Precision = Literal["32", "bf16-mixed"]
Strategy = Literal["auto", "ddp", "fsdp"]
Sharding = Literal["full", "grad_op", "hybrid"]
LoRATargets = Literal["attention", "attention+mlp", "all"]
LoRABaseDtype = Literal["fp32", "bf16"]
LRSchedule = Literal["constant", "cosine"]
# Built from the tuples of the packages that own these choices:
TextDtype = Literal[tuple(DTYPES)]  # pixart_lightning.encoders.loading
ModelSize = Literal[tuple(MODEL_SIZES)]  # pixart_lightning.models.config
AttentionBackend = Literal[ATTENTION_BACKENDS]  # pixart_lightning.models.attention
Prediction = Literal[PREDICTIONS]  # pixart_lightning.diffusion
Sampler = Literal[SAMPLERS]  # pixart_lightning.diffusion

STAGES: tuple[int, ...] = typing.get_args(Stage)
DISTILL_STAGE = 4
"""The stage that distils its parent into a few-step student (``distill``, the consistency sampler)."""
MULTI_SCALE_STAGES = (3, DISTILL_STAGE)
"""Stages that may train in aspect-ratio buckets with micro-conditions (``data.multi_scale``)."""
PRECISIONS: tuple[str, ...] = typing.get_args(Precision)
STRATEGIES: tuple[str, ...] = typing.get_args(Strategy)
SHARDINGS: tuple[str, ...] = typing.get_args(Sharding)
LORA_TARGETS: tuple[str, ...] = typing.get_args(LoRATargets)

type_hints = functools.cache(typing.get_type_hints)
"""The resolved annotations of a config dataclass (its fields' types), computed once per class."""


class ConfigError(ValueError):
    """Config problems found before training starts; each names the key (once loaded: and where its value is set).

    ``context`` (e.g. ``stage 2``) says which config they belong to.
    """

    def __init__(self, *problems: str, context: str = ""):
        self.problems = list(problems)
        body = problems[0] if len(problems) == 1 else "invalid config:\n  " + "\n  ".join(problems)
        super().__init__(f"{context}: {body}" if context else body)


def literal_fields(section: Any, prefix: str = "") -> Iterator[tuple[str, Any, tuple]]:
    """``(dotted key, value, choices)`` of each Literal-typed field of ``section`` and of the sections inside it."""
    for name, hint in type_hints(type(section)).items():
        key, value = f"{prefix}{name}", getattr(section, name)
        if typing.get_origin(hint) is Literal:
            yield key, value, typing.get_args(hint)
        elif is_dataclass(value):
            yield from literal_fields(value, f"{key}.")


def choice_problem(key: str, value: Any, choices: tuple) -> str:
    return f"{key}={value!r}: valid choices are {', '.join(map(str, choices))}"


@dataclass(kw_only=True)
class LoRASection:
    """Low-rank adapters (peft's LoRA) on the backbone's Linear layers: only they train (``training/lora.py``)."""

    rank: int = 16
    """Rank r of each adapter B·A (A: r x in, B: out x r), at least 1."""
    alpha: float = 16.0
    """The adapter's output is scaled by alpha / rank; positive."""
    dropout: float = 0.0
    """Dropout on the adapters' input while training, in [0, 1)."""
    targets: LoRATargets = "attention"
    """The layers adapted: ``attention`` (each block's self-attention ``attn.qkv``, ``attn.proj`` and
    cross-attention ``cross_attn.q_linear``, ``kv_linear``, ``proj``), ``attention+mlp`` (also each block's
    ``mlp.fc1``, ``mlp.fc2``), ``all`` (also the adaLN-single ``t_block.1``, the caption projection
    ``y_embedder.y_proj.fc1``, ``fc2`` and, in class mode, the ``adaLN_modulation.1`` of each block and of the
    final layer)."""
    base_dtype: LoRABaseDtype = "fp32"
    """Dtype of the frozen base's Linear weights: ``bf16`` halves their memory (needs ``train.precision=bf16-mixed``);
    the adapters stay fp32 master weights either way. The handoff is merged in fp32 (from the bf16-rounded base)."""


@dataclass(kw_only=True)
class TokenRoutingSection:
    """TREAD-style token routing while training (``models/routing.py``): a random share of each sample's image tokens
    skips a span of middle blocks unchanged and rejoins the others before block ``end``; every token goes through the
    other blocks and into the loss. Sampling never routes, so the weights are the plain model's."""

    ratio: float = 0.5
    """Share of each sample's image tokens that skips the span, in [0, 1); 0 routes none (the plain model)."""
    start: int = 1
    """First block of the span (0-based), at least 0: the blocks before it see every token."""
    end: int | None = None
    """The block before which the routed tokens rejoin (exclusive end), above ``start`` and at most the depth; None:
    the last block (depth - 1), which then sees every token."""


@dataclass(kw_only=True)
class PatchMaskingSection:
    """MDT/MicroDiT-style patch masking while training (``models/routing.py``): a random share of each sample's patch
    tokens is dropped at the input for the whole network, and the loss counts only the kept patches. Sampling never
    masks; finish unmasked with a later phase or stage that leaves ``model.patch_masking`` null."""

    ratio: float = 0.5
    """Share of each sample's patch tokens dropped, in [0, 1); 0 drops none (the plain model)."""


@dataclass(kw_only=True)
class ModelSection:
    size: ModelSize = "PixArt-XL/2"
    """A named size (``PixArt-XL/2``, ``PixArt-tiny/4``, …); the fields below override it when set."""
    depth: int | None = None
    """Transformer blocks (at least 1); None: the size's."""
    hidden_size: int | None = None
    """Token width, a multiple of 4 and of ``num_heads`` (and of 3 with stage 3's micro-conditions); None: the
    size's."""
    num_heads: int | None = None
    """Attention heads, dividing ``hidden_size``; None: the size's."""
    patch_size: int | None = None
    """Side of a square patch in latent pixels; ``data.resolution`` must be divisible by it x the VAE factor.
    None: the size's (the number after the slash)."""
    learn_sigma: bool = True
    """Also predict the variance interpolation (twice the output channels), as IDDPM, DiT and PixArt do."""
    num_classes: int = 1000
    """Stage 1's class count (ImageNet: 1000); ``samples.labels`` must lie in [0, num_classes)."""
    class_dropout_prob: float = 0.1
    """Probability of dropping the label (stage 1) or caption (stage 2) for classifier-free guidance; stage 3
    keeps stage 2's."""
    interpolation_scale: float | None = None
    """Position-embedding scale (PixArt's ``lewei_scale``: grid coordinates are divided by it), positive. None follows
    the official rule, max(latent side // 64, 1): 1 at 256 and 512 px, 2 at 1024 px (DiT's own table at 256 px).
    A stage started from ``init_from`` (stage 1, or stage 2 from a text checkpoint) keeps the checkpoint's own
    scale unless this is set."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in the backward pass: less memory, about a third more compute."""
    compile: bool = False
    """``torch.compile`` each transformer block (by ``parallelize``: after activation checkpointing, before FSDP sharding; eager if compilation is unavailable).
    Pays off on GPUs; on CPU it was measured slower (docs/performance.md)."""
    attention_backend: AttentionBackend = "auto"
    """Attention kernel: ``auto`` (matmuls on CPU for short sequences, else PyTorch's choice, without cuDNN when
    captions are masked), or one forced SDPA kernel: ``flash``, ``efficient``, ``cudnn``, ``math`` (an error
    where it has no kernel for the inputs, e.g. ``flash`` with padded captions on a GPU). A setting of this run,
    not saved with the weights."""
    init_from: str | None = None
    """A checkpoint to start this stage from instead of the previous stage's weights (which it then does not need):
    an official PixArt-α ``.pth`` (its EMA weights when it holds them) or DiT ``.pt``, our ``.safetensors``, a
    diffusers transformer or pipeline folder, or a hub id such as ``PixArt-alpha/PixArt-XL-2-512x512``. Stage 1
    takes a class-mode (DiT) checkpoint; stage 2 a class-mode one (through ``class_to_text``) or a text-mode one;
    stage 3 a text-mode one, moved to its resolution. Its shapes must fit the configured model."""
    micro_conditions: bool = True
    """Stages 3 and 4 with ``data.multi_scale``: condition on each image's original size and its bucket's aspect
    ratio (PixArt-α at 1024 px). False: no micro-conditions, as the released 512 px model (diffusers' pipeline feeds
    them to 1024 px models only). A starting checkpoint must match: one with micro-conditions is refused under
    False, one without under True, naming this key."""
    lora: LoRASection | None = None
    """Train low-rank adapters on the frozen backbone instead of all its weights; None: full fine-tuning. The
    stage's checkpoints then hold only the adapters, and its ``final.safetensors`` the merged weights."""
    token_routing: TokenRoutingSection | None = None
    """Route a share of the image tokens past the middle blocks while training (TREAD; stages 1-3); None: off, as the
    paper trains. A setting of this run, not saved with the weights."""
    patch_masking: PatchMaskingSection | None = None
    """Drop a share of the patch tokens for the whole network while training, loss on the kept ones (MDT/MicroDiT;
    stages 1-3; not with ``token_routing``); None: off, as the paper trains. A setting of this run."""


@dataclass(kw_only=True)
class LogitNormalSection:
    """Training timesteps drawn as t = sigmoid(z)·T with z ~ N(mean, std) (SD3's logit-normal) instead of uniformly:
    more of them where the image is decided, fewer at the nearly clean and the nearly pure-noise ends."""

    mean: float = 0.0
    """Above 0 leans towards high noise (layout and form), below 0 towards fine detail."""
    std: float = 1.0
    """Spread, positive: the larger, the closer to uniform in the middle and the more weight at both ends."""


@dataclass(kw_only=True)
class DiffusionSection:
    prediction: Prediction = "epsilon"
    """What the mean channels predict: ``epsilon`` (the paper) or ``v``."""
    logit_normal: LogitNormalSection | None = None
    """Draw training timesteps logit-normally (``{mean: 0.5, std: 1.0}``); None: uniformly (the paper's)."""
    min_snr_gamma: float | None = None
    """Weigh the MSE by Min-SNR-γ (positive; 5 is its paper's): the loss of an x0 prediction at min(SNR, γ). For ε
    it caps the weight of nearly clean timesteps; for v it also takes weight from high noise (about SNR there, an ε
    loss's weighting), which cost the v-prediction demo its colours (docs/stages.md). null: unweighted (the paper's)."""


@dataclass(kw_only=True)
class TextEncoderSection:
    name: str = DEFAULT_T5
    """Hub id or folder of a T5 encoder; ``tiny`` builds the offline demo encoder under the run folder."""
    max_length: int = CAPTION_TOKENS
    """Caption tokens kept (longer captions are cut, shorter ones padded): the paper's 120."""
    dtype: TextDtype = "bf16"
    """Weights dtype of the frozen encoder."""


@dataclass(kw_only=True)
class VAESection:
    name: str = DEFAULT_VAE
    """Hub id or folder of an AutoencoderKL; ``pixel`` trains in pixel space (the demo: no VAE to download)."""
    scale_factor: float = SD_VAE_SCALE
    """Latents are multiplied by it for roughly unit variance (the SD VAE's 0.18215)."""
    sample_posterior: bool = True
    """Train on a fresh draw from the VAE posterior (PixArt-α), not its mean; same for precomputed latents."""


@dataclass(kw_only=True)
class SynthSection:
    """The embedded shapes world, written to ``data.shards`` when that folder holds no dataset yet."""

    count: int = 20000
    """Images to draw (at least 1)."""
    seed: int = 0
    """Seeds the scenes: the same seed and count write the same dataset."""
    two_shape_fraction: float = 0.0
    """Share of scenes with a second shape, in [0, 1]."""
    templates: list[int] | None = None
    """Caption templates to draw from (indices into ``world.TEMPLATES``); None: all."""
    samples_per_shard: int = 2000
    """Samples per written ``.tar`` shard (at least 1)."""
    recolor: dict[str, str] = field(default_factory=dict)
    """Paint a colour the captions name in another (``{red: teal}``): the same scenes, captions and labels, other
    pixels (``make finetune-demo``). Keys: the world's colours; values: also ``teal`` (``shapes/world.py``)."""


@dataclass(kw_only=True)
class DataSection:
    shards: str = ""
    """A folder of ``.tar`` shards, a brace pattern (``data/{000000..000099}.tar``) or an image folder; required."""
    synth: SynthSection | None = None
    """Draw the shapes world into ``shards`` first when it holds no dataset; None: the data must exist."""
    resolution: int = 256
    """Image side in pixels, positive and divisible by patch size x VAE factor (the base size of the
    aspect-ratio buckets when ``multi_scale``)."""
    multi_scale: bool = False
    """Stage 3 only: aspect-ratio buckets (PixArt-α's 0.25-4.0 table scaled to ``resolution``), one bucket per
    batch."""
    min_ratio: float = 0.25
    """Smallest bucket aspect ratio (height / width) kept with ``multi_scale``; at most ``max_ratio``."""
    max_ratio: float = 4.0
    """Largest bucket aspect ratio (height / width) kept with ``multi_scale``."""
    min_aesthetic: float | None = None
    """Keep only samples whose ``aesthetic`` score (in their json) is at least this."""
    caption_key: str = "txt"
    """Which caption trains the text stages: ``txt`` (the dense caption) or a json field name."""
    batch_size: int = 64
    """Per-device micro-batch, positive: the most images one device processes in one forward/backward pass."""
    global_batch_size: int | None = None
    """Images per optimizer step over all devices (the paper states its batches this way). The runner splits it
    into per-device micro-batches of at most ``batch_size`` and gradient accumulation, from the world size, so
    8 GPUs and 64 GPUs train the same recipe. None: ``batch_size`` x world size, no accumulation."""
    num_workers: int = 2
    """DataLoader worker processes per device; 0 reads in the training process."""
    shuffle_buffer: int = 1000
    """Most samples a worker holds back for shuffling (an upper bound beside ``shuffle_buffer_mb``)."""
    shuffle_buffer_mb: float = 512.0
    """Most decoded data (MiB of tensors and images) a worker's shuffle buffer holds: each worker of each rank has
    one, so a node holds about workers x GPUs x this. At T5-XXL's 120 x 4096 bf16 features (about 1 MB a
    sample) 512 MiB is about 500 samples."""
    seed: int = 0
    """Seeds the shard order of each epoch, the shuffle buffers and the bucket schedule."""
    max_bad_fraction: float = 0.05
    """Stop with a report when more than this share (in [0, 1]) of the samples read is bad (undecodable, no
    caption, ...); filters (``min_aesthetic``) do not count."""


@dataclass(kw_only=True)
class OptimSection:
    lr: float = 2e-5
    """AdamW's peak learning rate, positive (reached after ``warmup_steps``); see ``scale_lr``."""
    scale_lr: bool = False
    """Multiply ``lr`` by sqrt(global batch / 256), as the official PixArt-α configs' ``auto_lr`` does (×6.7 at
    stage 2's 11,392); the paper states a plain 2e-5. ``StageConfig.learning_rate()`` is the result."""
    weight_decay: float = 0.03
    """AdamW's decoupled weight decay."""
    eps: float = 1e-10
    """AdamW's epsilon."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW's two moment decay rates."""
    warmup_steps: int = 1000
    """Optimizer steps of linear warm-up to ``lr`` (0 or 1: none), then ``lr_schedule``."""
    lr_schedule: LRSchedule = "constant"
    """After the warm-up: ``constant`` (the paper's), or ``cosine``, down to nearly 0 at the stage's last step."""
    grad_clip: float = 0.01
    """Max gradient norm; 0 turns clipping off."""
    ema_rate: float = 0.9999
    """EMA of the weights, kept in fp32 outside the optimizer, in [0, 1); 0 turns it off."""
    ema_warmup: bool = False
    """Warm the EMA rate up as min(ema_rate, (1 + n) / (10 + n)) over the stage's n updates, so a short run
    forgets its starting weights; False keeps the rate constant, as the official code does."""


@dataclass(kw_only=True)
class TrainSection:
    max_steps: int = 1000
    """Optimizer steps this stage (or phase) trains, positive."""
    precision: Precision = "bf16-mixed"
    """``bf16-mixed`` keeps fp32 master weights (with FSDP: sharded fp32 weights, bf16 all-gathers), or ``32``.
    ``16-mixed`` is refused: its loss scaling does not fit the clipping and the non-finite guard."""
    accelerator: str = "auto"
    """Lightning's accelerator (``auto``, ``cpu``, ``gpu``, ...)."""
    devices: int = 1
    """Processes (GPUs) per node, at least 1."""
    num_nodes: int = 1
    """Nodes, at least 1; the world size is ``devices`` x ``num_nodes``."""
    strategy: Strategy = "auto"
    """``auto`` (one device, else DDP), ``ddp``, or ``fsdp`` (FSDP2 ``fully_shard`` per transformer block)."""
    sharding: Sharding = "full"
    """FSDP: ``full`` (params, grads and optimizer state sharded; params re-gathered for backward),
    ``grad_op`` (params kept gathered between forward and backward), ``hybrid`` (full within a node,
    replicated across nodes; needs ``num_nodes`` >= 2)."""
    sharded_checkpoint: bool = True
    """FSDP: each rank writes its shard (a folder); False gathers one file on rank 0."""
    peak_tflops: float | None = None
    """The accelerator's dense bf16 peak for MFU (default: looked up from the GPU's name; none on CPU)."""
    max_nonfinite_steps: int = 10
    """A step with a non-finite gradient is skipped (no optimizer or EMA update); this many (at least 1) in a row
    stop the run and save a debug checkpoint."""
    seed: int = 0
    """``seed_everything`` at the start of the stage: the fresh parts of the model, then the training noise."""
    log_every: int = 50
    """Steps between logged metrics (and progress-bar refreshes)."""
    checkpoint_every: int = 1000
    """Steps between resumable checkpoints (``checkpoints/step-N.ckpt``, written atomically, sha256 recorded),
    positive."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints stay on disk, at least 1 (a damaged newest one falls back to the one
    before)."""
    threads: int | None = None
    """torch CPU threads (None leaves torch's default)."""
    progress_bar: bool = True
    """Show a progress bar on the console."""


@dataclass(kw_only=True)
class SamplesSection:
    """The fixed-prompt sample grid logged to TensorBoard and saved as PNG."""

    prompts: list[str] = field(default_factory=list)
    """Stage 2-3 prompts; stage 1 uses ``labels``."""
    labels: list[int] = field(default_factory=list)
    """Stage 1's class labels, each in [0, ``model.num_classes``)."""
    seed: int = 0
    """Seeds the starting noise: every grid of a run starts from the same noise."""
    every_n_steps: int = 0
    """0: only at the end of the stage."""
    cfg_scales: list[float] = field(default_factory=lambda: [4.5])
    """Classifier-free guidance scales, one grid row each (1.0: no guidance)."""
    sampler: Sampler = "dpm++"
    """The sampler drawing the grid."""
    steps: int = 20
    """Sampler steps."""
    use_ema: bool = True
    """Sample with the EMA weights (when ``optim.ema_rate`` keeps them); also for the alignment eval."""
    scale: int = 1
    """Enlarge the saved PNG grid (nearest neighbour) for tiny demo images."""
    decode_batch: int = 8
    """Images the VAE decodes at once (also for the alignment eval); 0: all of a batch. One full-size activation of
    the SD VAE's decoder (128 channels) takes 0.5 GB per 1024-px image in fp32."""


@dataclass(kw_only=True)
class EvalSection:
    alignment_prompts: int = 0
    """Shapes-world prompts (wording never seen in training) scored at the end of the stage; 0: off."""
    every_n_steps: int = 0
    """Also score them every N steps while the stage trains (``alignment-curve.json``: accuracy against the steps'
    own seconds, ``callbacks/alignment.py``; TensorBoard ``curve/*``), for time to quality; 0: only at the end."""
    seed: int = 0
    """Draws the alignment prompts and their starting noise."""
    cfg_scale: float = 4.5
    """Classifier-free guidance scale of the alignment samples."""
