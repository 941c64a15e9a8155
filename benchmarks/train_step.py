"""The full training step, ours vs diffusers' PixArtTransformer2DModel, like with like: images/s side by side in one run.

Ours is the real thing: the stage's module (stage 2 ``TextAlignment`` by default, stage 3 ``HighAesthetics`` with
``--stage 3``) in the Trainer the runner builds (same strategy, precision, logger and per-step callbacks; samples,
FID and checkpoint saves off), fed by a DataLoader. The reference is what a diffusers user writes
(``benchmarks/reference_step.py``): ``PixArtTransformer2DModel`` holding the same weights, with the same loss,
optimizer settings, gradient clipping and EMA rate, under the same autocast. Both see the same batches
(precomputed caption features, and latent moments or pixels; in stage 3 an aspect-ratio bucket and the
micro-conditions) and draw timesteps, noise and caption drops every step.

Like with like: each variant applies to both sides at once. ``eager`` and ``compiled`` (``torch.compile`` of each
transformer block: ours through ``model.compile``, diffusers' ``transformer_blocks`` the same way), each with or
without activation checkpointing (``model.gradient_checkpointing``; diffusers' ``enable_gradient_checkpointing()``).
A variant sets both keys whatever the config says (overriding them is refused: choose variants). A variant that runs
out of memory is reported as such and the next one runs.

The two alternate step by step: each reference step runs inside our step's batch-end hook and is timed on
its own, so machine noise hits both alike. Our step is the time from one batch start to the next minus that,
so it includes Lightning's loop, logging and the next batch's fetch. After warm-up, medians are reported. On a
GPU, each side's step peak is the most device memory the step adds to what was allocated when it began
(activations, gradients, temporaries), both models' weights and optimizer state being resident throughout.

    python benchmarks/train_step.py                      # CPU: the demo's stage-2 config (tiny, fp32), eager
    python benchmarks/train_step.py --variants eager,compiled,eager+ckpt,compiled+ckpt   # every pair
    python benchmarks/train_step.py --config configs/pixart-xl2 --batch 64 --resolution 256   # GPU: XL/2, bf16
    python benchmarks/train_step.py --config configs/pixart-xl2 --stage 3 --batch 32 --resolution 512 --no-reference
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.reference_step import DiffusersStep, reference_model  # noqa: E402
from callbacks.checkpoints import Checkpoints  # noqa: E402
from pixart_lightning.config import StageConfig, load_stage  # noqa: E402
from pixart_lightning.data.buckets import bucket_table, nearest_bucket  # noqa: E402
from pixart_lightning.encoders.text import TINY_T5  # noqa: E402
from pixart_lightning.encoders.vae import PIXEL_SPACE, VAE, PixelSpace  # noqa: E402
from pixart_lightning.gpu_check.memory import (  # noqa: E402
    is_out_of_memory,
    peak_gib,
    release_memory,
    start_peak_window,
)
from pixart_lightning.runner.trainer import make_trainer  # noqa: E402
from pixart_lightning.shapes.tiny_models import build_tiny_vae  # noqa: E402
from pixart_lightning.training import flops  # noqa: E402
from stages import STAGE_MODULES  # noqa: E402
from stages.base import DiffusionStage  # noqa: E402


@dataclass(frozen=True)
class Variant:
    """How both sides run their transformer blocks."""

    compiled: bool = False
    checkpointing: bool = False

    @property
    def name(self) -> str:
        return ("compiled" if self.compiled else "eager") + ("+ckpt" if self.checkpointing else "")

    def overrides(self) -> list[str]:
        return [f"model.compile={str(self.compiled).lower()}",
                f"model.gradient_checkpointing={str(self.checkpointing).lower()}"]


VARIANTS = {v.name: v for v in (Variant(), Variant(compiled=True), Variant(checkpointing=True), Variant(True, True))}


@dataclass(frozen=True)
class Setup:
    """What one measurement trains: a stage of a config folder on one device, at these sizes (None: the config's)."""

    config: str = "configs/demo"
    stage: int = 2
    device: str = "cpu"
    batch: int | None = None
    resolution: int | None = None
    aspect_ratio: float = 1.0
    """Height / width of the bucket trained on when the stage is multi-scale (its nearest bucket is taken)."""
    tokens: int | None = None
    """Caption tokens per sample; default: ``text_encoder.max_length``."""
    pad_fraction: float = 0.25
    caption_channels: int | None = None
    """Default: 4096 (T5-XXL), 32 for the tiny text encoder."""
    steps: int = 30
    warmup: int = 5
    precision: str | None = None
    """Default: bf16-mixed on a GPU, 32 on the CPU."""
    reference: bool = True
    """Also run and time diffusers' model."""
    overrides: tuple[str, ...] = ()

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)


def stage_config(setup: Setup, variant: Variant) -> StageConfig:
    """The stage's config for a benchmark run: one device, no accumulation, no evaluation or checkpoint saves."""
    device = setup.torch_device
    precision = setup.precision or ("bf16-mixed" if device.type == "cuda" else "32")
    total = setup.warmup + setup.steps + 1
    return load_stage(setup.config, setup.stage, [
        *setup.overrides, *variant.overrides(), f"train.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}",
        "train.devices=1", "train.strategy=auto", f"train.precision={precision}", f"train.max_steps={total}",
        f"train.checkpoint_every={10 * total}", "train.progress_bar=false", "data.num_workers=0",
        "data.global_batch_size=null",
        *([f"data.batch_size={setup.batch}"] if setup.batch else []),
        *([f"data.resolution={setup.resolution}"] if setup.resolution else []),
    ])


def bucket_size(cfg: StageConfig, granularity: int, aspect_ratio: float) -> tuple[int, int]:
    """(height, width) in pixels of the trained images: the square, or the multi-scale bucket nearest the ratio."""
    side = cfg.data.resolution
    if not cfg.data.multi_scale:
        return side, side
    return nearest_bucket(round(aspect_ratio * 1000), 1000, bucket_table(side, granularity))[1]


def make_batches(count: int, batch: int, latent: tuple[int, int], channels: int, tokens: int, caption_channels: int,
                 pixel_space: bool, pad_fraction: float, original_size: tuple[int, int] | None = None,
                 ) -> list[dict[str, Any]]:
    """Batches in the loader's format. Every other caption ends ``pad_fraction`` early (the collate pads to the
    longest caption of the batch, so the mask has padding but no all-padding column). ``original_size`` adds
    stage 3's micro-conditions: the images' size and the bucket's aspect ratio."""
    gen = torch.Generator().manual_seed(0)
    batches = []
    for i in range(count):
        mask = torch.ones(batch, tokens, dtype=torch.long)
        mask[::2, round(tokens * (1 - pad_fraction)):] = 0
        item: dict[str, Any] = {
            "key": [f"{i}-{j}" for j in range(batch)], "skipped": {},
            "caption_features": torch.randn(batch, tokens, caption_channels, generator=gen) * mask[..., None],
            "caption_mask": mask,
        }
        if pixel_space:
            item["pixels"] = torch.rand(batch, channels, *latent, generator=gen) * 2 - 1
        else:  # stored moments, as feature shards hold them
            item["latent_mean"] = torch.randn(batch, channels, *latent, generator=gen).half()
            item["latent_std"] = (torch.rand(batch, channels, *latent, generator=gen) * 0.1).half()
        if original_size is not None:
            item["original_size"] = torch.tensor([original_size] * batch, dtype=torch.float32)
            item["aspect_ratio"] = torch.full((batch, 1), original_size[0] / original_size[1])
        batches.append(item)
    return batches


class Batches(torch.utils.data.IterableDataset):
    def __init__(self, batches: list[dict[str, Any]]):
        self.batches = batches

    def __iter__(self):
        while True:
            yield from self.batches


class Alternate(L.Callback):
    """Times our steps (batch start to batch start) and runs and times one reference step after each."""

    def __init__(self, reference: DiffusersStep | None, batches: list[dict[str, Any]], warmup: int):
        self.reference, self.batches, self.warmup = reference, batches, warmup
        self.times: dict[str, list[float]] = {"ours": [], "diffusers": []}
        self.peaks: dict[str, list[float | None]] = {"ours": [], "diffusers": []}
        self._start: float | None = None
        self._mark = 0
        self._theirs_in_step = 0.0

    def _now(self, device: torch.device) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = self._now(pl_module.device)
        if self._start is not None and batch_idx > self.warmup:
            self.times["ours"].append(now - self._start - self._theirs_in_step)
        self._start = now
        self._mark = start_peak_window(pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        device = pl_module.device
        timed = batch_idx >= self.warmup
        if timed:
            self.peaks["ours"].append(peak_gib(device, self._mark))
        if self.reference is None:
            return
        start, mark = self._now(device), start_peak_window(device)
        self.reference(self.batches[batch_idx % len(self.batches)])
        self._theirs_in_step = self._now(device) - start
        if timed:
            self.times["diffusers"].append(self._theirs_in_step)
            self.peaks["diffusers"].append(peak_gib(device, mark))


@dataclass
class Bench:
    """A built measurement: the config, our module and its VAE, the batches, and their geometry."""

    cfg: StageConfig
    module: DiffusionStage
    batches: list[dict[str, Any]]
    height: int
    width: int
    tokens: int

    def flops_per_image(self) -> float:
        return flops.train_flops_per_image(self.module.model.cfg, self.height, self.width,
                                           self.module.encoders.vae.downsample_factor, caption_tokens=self.tokens,
                                           routing=self.module.token_routing)


def prepare(setup: Setup, variant: Variant, folder: Path) -> Bench:
    """Build the stage's module from fresh weights (seeded) and four batches for it; a tiny VAE stands in for the SD
    VAE in latent space (feature batches need it only for its latent scale)."""
    cfg = stage_config(setup, variant)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    pixel_space = cfg.vae.name == PIXEL_SPACE
    caption_channels = setup.caption_channels or (32 if cfg.text_encoder.name == TINY_T5 else 4096)
    tokens = setup.tokens or cfg.text_encoder.max_length
    stage_cls = STAGE_MODULES[setup.stage]
    L.seed_everything(0, verbose=False)
    with setup.torch_device:  # initialising an XL model on the device takes a fraction of the time it takes on the CPU
        model = stage_cls.initial_model(cfg, None, caption_channels)
    vae = PixelSpace() if pixel_space else VAE.from_pretrained(str(build_tiny_vae(folder / "vae")), cfg.vae.scale_factor)
    module = stage_cls(cfg, model, vae, None)
    height, width = bucket_size(cfg, model.cfg.patch_size * vae.downsample_factor, setup.aspect_ratio)
    latent = (height // vae.downsample_factor, width // vae.downsample_factor)
    batches = make_batches(4, cfg.data.batch_size, latent, model.cfg.in_channels, tokens, caption_channels,
                           pixel_space, setup.pad_fraction, (height, width) if model.cfg.micro_conditions else None)
    return Bench(cfg, module, batches, height, width, tokens)


def fit(bench: Bench, device: torch.device, callbacks: list[L.Callback], folder: Path) -> L.Trainer:
    """Train ``bench.module`` on its batches, round and round, for ``train.max_steps`` steps on ``device``."""
    total = bench.cfg.train.max_steps
    trainer = make_trainer(bench.cfg, folder, Checkpoints(folder / "checkpoints", 10 * total, 1), callbacks,
                           evaluation=False, devices=[device.index or 0] if device.type == "cuda" else None)
    loader = torch.utils.data.DataLoader(Batches(bench.batches), batch_size=None, pin_memory=device.type == "cuda")
    trainer.fit(bench.module, train_dataloaders=loader)
    return trainer


def side_figures(seconds: list[float], peaks: list[float | None], batch: int, per_image: float,
                 peak_tflops: float | None) -> dict[str, float | None]:
    """Median step time, images/s, model TFLOP/s, MFU against ``peak_tflops`` and the step's memory peak (GiB)."""
    step = statistics.median(seconds)
    tflops = per_image * batch / step / 1e12
    known = [p for p in peaks if p is not None]
    return {"step_ms": step * 1e3, "images_per_s": batch / step, "tflops": tflops,
            "mfu": tflops / peak_tflops if peak_tflops else None, "step_peak_gib": max(known) if known else None}


def device_peak_tflops(cfg: StageConfig, device: torch.device) -> float | None:
    """The datasheet bf16 peak MFU is taken against: ``train.peak_tflops``, else looked up by the GPU's name."""
    if cfg.train.peak_tflops:
        return cfg.train.peak_tflops
    return flops.peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def measure(setup: Setup, variant: Variant) -> dict[str, Any]:
    """One pair (or ours alone without ``setup.reference``) trained as ``variant``: a row of figures."""
    device = setup.torch_device
    with tempfile.TemporaryDirectory() as tmp:
        bench = prepare(setup, variant, Path(tmp))
        cfg = bench.cfg
        reference = None
        if setup.reference:
            dtype = {"bf16-mixed": torch.bfloat16}.get(cfg.train.precision)
            reference = DiffusersStep(reference_model(bench.module, variant, device), bench.module, device, dtype)
        alternate = Alternate(reference, bench.batches, setup.warmup)
        fit(bench, device, [alternate], Path(tmp) / "run")
    B, per_image, peak = cfg.data.batch_size, bench.flops_per_image(), device_peak_tflops(cfg, device)
    model = bench.module.model
    row: dict[str, Any] = {
        "variant": variant.name, "stage": setup.stage, "batch": B, "height": bench.height, "width": bench.width,
        "tokens": bench.tokens, "precision": cfg.train.precision, "depth": model.cfg.depth,
        "hidden_size": model.cfg.hidden_size, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "steps": len(alternate.times["ours"]), "peak_tflops": peak,
        "ours": side_figures(alternate.times["ours"], alternate.peaks["ours"], B, per_image, peak),
    }
    if reference is not None:
        row["diffusers"] = side_figures(alternate.times["diffusers"], alternate.peaks["diffusers"], B, per_image, peak)
        row["speedup"] = row["diffusers"]["step_ms"] / row["ours"]["step_ms"]
    return row


def measure_or_oom(setup: Setup, variant: Variant) -> dict[str, Any]:
    """``measure``, with running out of memory reported as the row's ``error`` rather than raised."""
    try:
        return measure(setup, variant)
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        return {"variant": variant.name, "stage": setup.stage, "batch": setup.batch,
                "error": f"out of memory: {str(error).splitlines()[0][:200]}"}
    finally:
        release_memory()


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The pairs as a table: per side step ms, images/s, TFLOP/s, MFU and step peak GiB; then the ratio."""
    lines = [f"  {'variant':16s} {'side':10s} {'step ms':>9s} {'img/s':>9s} {'TFLOP/s':>9s} {'MFU':>7s} {'peak GiB':>9s}"]
    for row in rows:
        if "error" in row:
            lines.append(f"  {row['variant']:16s} {row['error']}")
            continue
        for side in ("ours", "diffusers"):
            if side not in row:
                continue
            f = row[side]
            mfu = f"{f['mfu']:7.1%}" if f["mfu"] is not None else f"{'n/a':>7s}"
            peak = f"{f['step_peak_gib']:9.2f}" if f["step_peak_gib"] is not None else f"{'n/a':>9s}"
            lines.append(f"  {row['variant']:16s} {side:10s} {f['step_ms']:9.2f} {f['images_per_s']:9.1f} "
                         f"{f['tflops']:9.3f} {mfu} {peak}")
        if "speedup" in row:
            lines.append(f"  {row['variant']:16s} ours/diffusers images/s: {row['speedup']:.3f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo", help="a config folder")
    parser.add_argument("--stage", type=int, default=2, choices=(2, 3), help="3: multi-scale bucket, micro-conditions")
    parser.add_argument("--batch", type=int, default=None, help="default: the config's data.batch_size")
    parser.add_argument("--resolution", type=int, default=None, help="image side in pixels; default: the config's")
    parser.add_argument("--aspect-ratio", type=float, default=0.75, help="stage 3: height/width of the bucket")
    parser.add_argument("--tokens", type=int, default=None, help="caption tokens; default: text_encoder.max_length")
    parser.add_argument("--pad-fraction", type=float, default=0.25, help="padding at the end of every other caption")
    parser.add_argument("--caption-channels", type=int, default=None, help="default: 4096 (T5-XXL), 32 for tiny")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (the Trainer runs there too)")
    parser.add_argument("--precision", default=None, help="default: bf16-mixed on GPU, 32 on CPU")
    parser.add_argument("--variants", default=None, help=f"comma-separated, of {', '.join(VARIANTS)} (default: all "
                        "on a GPU; eager on the CPU, where compiling the blocks takes minutes)")
    parser.add_argument("--no-reference", action="store_true", help="time ours only")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args()
    args.variants = args.variants or (",".join(VARIANTS) if torch.device(args.device).type == "cuda" else "eager")
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants {','.join(unknown)}: valid choices are {', '.join(VARIANTS)}")
    fixed = [o for o in args.overrides if o.split("=")[0] in ("model.compile", "model.gradient_checkpointing")]
    if fixed:
        parser.error(f"{' '.join(fixed)}: each variant sets these on both sides; choose with --variants")
    stage_overrides = ["data.multi_scale=true"] if args.stage == 3 else []
    setup = Setup(config=args.config, stage=args.stage, device=args.device, batch=args.batch,
                  resolution=args.resolution, aspect_ratio=args.aspect_ratio, tokens=args.tokens,
                  pad_fraction=args.pad_fraction, caption_channels=args.caption_channels, steps=args.steps,
                  warmup=args.warmup, precision=args.precision, reference=not args.no_reference,
                  overrides=(*stage_overrides, *args.overrides))
    device = setup.torch_device
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    import diffusers

    print(f"stage-{args.stage} training step: {args.config}; {where}; torch {torch.__version__}, "
          f"lightning {L.__version__}, diffusers {diffusers.__version__}; median of {args.steps} steps after "
          f"{args.warmup} warm-up", flush=True)
    rows = []
    for name in args.variants.split(","):
        rows.append(measure_or_oom(setup, VARIANTS[name]))
        row = rows[-1]
        if "error" not in row:
            print(f"{name}: {row['depth']} blocks x {row['hidden_size']} ({row['params_m']:.2f}M params), "
                  f"{row['height']}x{row['width']} px, batch {row['batch']}, {row['tokens']} caption tokens, "
                  f"{row['precision']}", flush=True)
        print(format_rows([row]), flush=True)
    if len(rows) > 1:
        print(format_rows(rows))


if __name__ == "__main__":
    main()
