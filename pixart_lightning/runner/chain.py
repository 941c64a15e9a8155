"""The stage-chaining runner: stage 1 -> 2 -> 3, each starting from the previous one's final weights.

Every stage (or phase of a stage) is a *unit* with its own folder ``runs/<name>/stage<N>[/<phase>]/``:

- ``config.yaml``: the resolved config; ``tensorboard/``: the logs; ``samples/``: PNG grids;
- ``checkpoints/step-N.ckpt`` + ``index.json``: the newest resumable checkpoints (atomic, sha256 recorded);
- ``final.safetensors`` (+ ``final-ema.safetensors``): the weights handed to the next unit;
- ``manifest.json``: status, the parent checkpoint and its sha256, hashes of the outputs, timings.

A unit whose manifest says ``done`` is skipped; an interrupted one resumes from its newest good checkpoint with
the same data order; a unit whose parent is missing says which stage to run first.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning.pytorch.plugins.io import TorchCheckpointIO

from callbacks.checkpoints import Checkpoints, latest_good, read_index
from callbacks.fid import RECORDS as FID_RECORDS
from callbacks.fid import FIDCallback
from callbacks.preemption import Preempted, Preemption, requeue
from callbacks.samples import SampleGrid
from callbacks.throughput import Throughput
from pixart_lightning.config import (
    PIXEL_SPACE,
    STAGES,
    TINY_T5,
    ConfigError,
    StageConfig,
    load_stage,
    phase_configs,
    to_yaml,
)
from pixart_lightning.data.module import ShardDataModule
from pixart_lightning.data.shards import DataError, data_buckets, read_manifest, resolve_sources
from pixart_lightning.encoders.text import LazyTextEncoder, PromptFeatures, T5TextEncoder
from pixart_lightning.encoders.vae import VAE, LazyVAE, PixelSpace
from pixart_lightning.evaluation.alignment import alignment
from pixart_lightning.files import atomic_write, note_written, sha256, write_json_atomic
from pixart_lightning.interop import load_weights, save_weights
from pixart_lightning.models import PixArt
from pixart_lightning.shapes.synth import MANIFEST as SHAPES_MANIFEST
from pixart_lightning.shapes.synth import synthesize
from pixart_lightning.shapes.tiny_models import build_tiny_t5
from pixart_lightning.training.parallel import make_strategy, rank_zero_result
from stages import STAGE_MODULES

FINAL, FINAL_EMA, MANIFEST = "final.safetensors", "final-ema.safetensors", "manifest.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHAPES_WORLD = "the shapes world"


class RunnerError(RuntimeError):
    """A run cannot proceed as asked (missing parent stage, changed parent); the message says what to do."""


@dataclass
class Unit:
    """One training run: a stage, or one phase of a multi-phase stage."""

    stage: int
    phase: str | None
    cfg: StageConfig

    @property
    def dir(self) -> Path:
        base = self.cfg.run_dir / f"stage{self.stage}"
        return base / self.phase if self.phase else base

    @property
    def label(self) -> str:
        return f"stage {self.stage}" + (f" ({self.phase})" if self.phase else "")

    def manifest(self) -> dict[str, Any]:
        path = self.dir / MANIFEST
        return json.loads(path.read_text()) if path.is_file() else {}

    @property
    def done(self) -> bool:
        return self.manifest().get("status") == "done" and (self.dir / FINAL).is_file()


def plan(folder: str | Path, overrides: list[str] | None = None) -> list[Unit]:
    """Every unit of the config folder, in order; all configs are validated before anything runs."""
    if not Path(folder).is_dir():
        raise ConfigError(f"config folder {folder} does not exist (the embedded default is configs/demo)")
    stage_numbers = [s for s in STAGES if (Path(folder) / f"stage{s}.yaml").is_file()]
    if not stage_numbers:
        raise ConfigError(f"{folder} holds no stage1.yaml, stage2.yaml or stage3.yaml")
    units = []
    for stage in stage_numbers:
        cfg = load_stage(folder, stage, overrides)
        units += [Unit(stage, phase, phase_cfg) for phase, phase_cfg in phase_configs(cfg, folder)]
    return units


def run(
    folder: str | Path, stages: list[int] | None = None, overrides: list[str] | None = None,
    callbacks: list[L.Callback] | None = None,
) -> list[Unit]:
    """Run the selected stages of a config folder (all by default), chaining their weights.

    ``callbacks`` are added to every unit's Trainer (e.g. extra monitoring).
    """
    units = plan(folder, overrides)
    present = sorted({u.stage for u in units})
    stages = stages or present
    unknown = sorted(set(stages) - set(present))
    if unknown:
        raise ConfigError(f"--stages {unknown}: this config has stages {present}")
    selected = [u for u in units if u.stage in stages]
    check_paths([u for u in selected if not u.done])
    for unit in selected:
        parent = units[units.index(unit) - 1] if units.index(unit) > 0 else None
        run_unit(unit, parent, folder, callbacks)
    print_summary(selected)
    return selected


def check_paths(units: list[Unit]) -> None:
    """Every local path the selected units read must exist before any of them starts (hub ids are not checked);
    a folder that a unit's ``data.synth`` will write counts as there."""
    synthesized = {u.cfg.data.shards for u in units
                   if u.cfg.data.synth is not None and _held_dataset(u.cfg.data.shards) in (None, SHAPES_WORLD)}
    problems = []
    for unit in units:
        cfg = unit.cfg
        reads = {"data.shards": cfg.data.shards} | ({"fid.reference": cfg.fid.reference} if cfg.fid.enabled else {})
        for key, spec in reads.items():
            if spec in synthesized:
                continue
            try:
                resolve_sources(spec)
            except DataError as err:
                problems.append(f"{unit.label}: {key}: {err}")
        if cfg.model.init_from and not Path(cfg.model.init_from).exists() and _looks_local(cfg.model.init_from):
            problems.append(f"{unit.label}: model.init_from: {cfg.model.init_from} does not exist")
        for key, name in (("vae.name", cfg.vae.name), ("text_encoder.name", cfg.text_encoder.name)):
            if _looks_local(name) and not Path(name).exists():
                problems.append(f"{unit.label}: {key}: the folder {name} does not exist")
    if problems:
        raise ConfigError("missing inputs (nothing was started):\n  " + "\n  ".join(problems))


def _looks_local(name: str) -> bool:
    """A path rather than a hub id ("org/name"): absolute, relative with ./ or ../, or a file name with a suffix."""
    return name.startswith(("/", "./", "../", "~")) or Path(name).suffix in (".pt", ".pth", ".safetensors", ".bin")


def print_summary(units: list[Unit]) -> None:
    """One line per unit: wall time, alignment (embedded world) and where to look (rank 0 prints)."""
    if rank_zero_only.rank != 0:
        return
    print("\nsummary:")
    for unit in units:
        m = unit.manifest()
        score = m.get("alignment", {}).get("alignment")
        fids = " -> ".join(f"{r['fid']:.1f}" for r in m.get("fid", []))
        print(f"  {unit.label:16s} {m.get('wall_time_s', 0):7.0f} s   "
              + (f"alignment {score:.2f}   " if score is not None else "")
              + (f"FID {fids}   " if fids else "")
              + f"samples: {unit.dir / 'samples' / 'final.png'}")
    if units:
        print(f"  TensorBoard: tensorboard --logdir {units[0].cfg.run_dir}   (or: make tensorboard)")


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON atomically; in a multi-process run only rank 0 writes."""
    if rank_zero_only.rank == 0:
        write_json_atomic(path, payload)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written whole or not at all, straight to the file (not through a copy in memory) and
    hashed as the bytes go out: the checkpoint index records the hash without reading the file again."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        with atomic_write(path) as out:
            torch.save(checkpoint, out)
        note_written(path, out.record)


# ---------------------------------------------------------------------- building blocks
def text_encoder_path(cfg: StageConfig) -> str:
    """Hub id or folder of the T5; ``tiny`` means the offline encoder built once per run name."""
    if cfg.text_encoder.name != TINY_T5:
        return cfg.text_encoder.name
    folder = (cfg.run_dir / "models" / "t5").resolve()
    if (folder / "config.json").is_file():
        return str(folder)
    # Rank 0 builds it (transformers saves weights from the main process only once torch.distributed is up);
    # the others wait for the folder, which appears whole (built beside it, then renamed).
    if rank_zero_only.rank == 0:
        tmp = folder.with_name(f"t5.{os.getpid()}.tmp")
        build_tiny_t5(tmp, d_model=64, d_ff=128)
        try:
            os.replace(tmp, folder)
        except OSError:  # published meanwhile by a run of the same name (same seed, same files)
            shutil.rmtree(tmp, ignore_errors=True)
    deadline = time.time() + 600
    while not (folder / "config.json").is_file():
        if time.time() > deadline:
            raise RunnerError(f"waited 10 minutes for rank 0 to build the tiny text encoder in {folder}")
        time.sleep(0.2)
    return str(folder)


def load_text_encoder(
    name: str, max_length: int = 120, dtype: str = "fp32", lazy: bool = False
) -> T5TextEncoder | LazyTextEncoder:
    """The T5, or with ``lazy`` a handle that loads it at its first use."""
    if lazy:
        return LazyTextEncoder(name, max_length, DTYPES[dtype])
    return T5TextEncoder.from_pretrained(name, max_length=max_length, dtype=DTYPES[dtype])


def load_vae(
    name: str, scale_factor: float = 0.18215, dtype: str = "fp32", lazy: bool = False
) -> VAE | LazyVAE | PixelSpace:
    """The VAE (nothing to load in pixel space), or with ``lazy`` a handle that loads it at its first use."""
    if name == PIXEL_SPACE:
        return PixelSpace()
    if lazy:
        return LazyVAE(name, scale_factor, DTYPES[dtype])
    return VAE.from_pretrained(name, scale_factor=scale_factor, dtype=DTYPES[dtype])


def _held_dataset(spec: str) -> str | None:
    """What ``data.shards`` holds already: ``SHAPES_WORLD``, a description of another dataset, or None (nothing
    readable: a new or empty folder)."""
    if (Path(spec) / SHAPES_MANIFEST).is_file():
        return SHAPES_WORLD
    try:
        sources = resolve_sources(spec)
    except DataError:
        return None
    if Path(sources[0]).is_dir():
        return "an image folder"
    kind = read_manifest(spec).get("kind")
    return f"a dataset of {len(sources)} .tar shard(s)" + (f" ({kind})" if kind else "")


def prepare_data(cfg: StageConfig, granularity: int) -> None:
    """Write the embedded world's shards if the config asks for them and ``data.shards`` holds no dataset yet;
    one that holds another dataset (the user's own shards or features) is trained on as it is."""
    d, synth = cfg.data, cfg.data.synth
    if synth is None:
        return
    held = _held_dataset(d.shards)
    if held not in (None, SHAPES_WORLD):
        print(f"data.shards={d.shards} holds {held}: training on it as it is (data.synth writes the shapes world "
              "only into a new or empty folder)", flush=True)
        return
    try:
        synthesize(
            d.shards, count=synth.count, seed=synth.seed, resolution=d.resolution,
            buckets=list(data_buckets(d.resolution, granularity, True, d.min_ratio, d.max_ratio).values())
            if d.multi_scale else None,
            two_shape_fraction=synth.two_shape_fraction, templates=synth.templates,
            samples_per_shard=synth.samples_per_shard, progress=cfg.train.progress_bar,
        )
    except FileExistsError as err:
        fix = "set data.synth=null to train on it as it is, or set data.shards" if held else "set data.shards"
        raise ConfigError(f"data.shards: {err}; {fix} to a new or empty folder") from None


def _same_model(a: str, b: str) -> bool:
    """Equal hub ids, or local paths to the same folder."""
    return a == b or (Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve())


def check_features(cfg: StageConfig, text_path: str | None, patch_size: int) -> None:
    """Precomputed features (``data extract``) must come from this stage's encoders, sizes and caption."""
    m = read_manifest(cfg.data.shards)
    if m.get("kind") != "features":
        return
    d = cfg.data
    wanted = ({"caption_key": d.caption_key, "max_length": cfg.text_encoder.max_length}
              if cfg.text_mode and m.get("text_encoder") else {})
    if m.get("vae"):
        wanted |= {"resolution": d.resolution, "multi_scale": d.multi_scale, "patch_size": patch_size}
        if d.multi_scale:
            wanted |= {"min_ratio": d.min_ratio, "max_ratio": d.max_ratio}
    problems = [f"{k}: features have {m.get(k)!r}, config has {v!r}" for k, v in wanted.items() if m.get(k) != v]
    if m.get("vae") and not _same_model(m["vae"], cfg.vae.name):
        problems.append(f"vae: features from {m['vae']!r}, config has vae.name={cfg.vae.name!r}")
    if m.get("text_encoder") and text_path and not _same_model(m["text_encoder"], text_path):
        problems.append(f"text encoder: features from {m['text_encoder']!r}, this stage uses {text_path!r}")
    if problems:
        raise ConfigError(f"{d.shards} holds features extracted for another setup:\n" + "\n".join(problems)
                          + "\nextract again with matching options, or point data.shards at the images")


# ---------------------------------------------------------------------- one unit
def run_unit(
    unit: Unit, parent: Unit | None, folder: str | Path = "", callbacks: list[L.Callback] | None = None
) -> None:
    """Train one unit to ``max_steps`` (resuming if interrupted) and hand its weights forward."""
    cfg = unit.cfg
    if unit.done:
        print(f"{unit.label}: done already ({unit.dir / FINAL}); delete {unit.dir} to train it again")
        return
    parent_weights = _parent_weights(unit, parent, folder)
    previous = unit.manifest()
    # Rank 0 reads the (multi-GB) parent once; the other ranks leave the check to it (parallel.rank_zero_result).
    parent_sha = rank_zero_result(lambda: sha256(parent_weights)) if parent_weights else None
    if previous and parent_sha and previous.get("parent", {}).get("sha256") != parent_sha:
        raise RunnerError(f"{unit.label} was started from a different {parent.label} checkpoint than "
                          f"{parent_weights} holds now; delete {unit.dir} to start it again from the new one")
    unit.dir.mkdir(parents=True, exist_ok=True)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if rank_zero_only.rank == 0:
        (unit.dir / "config.yaml").write_text(to_yaml(cfg))
    started = time.time()

    # Both encoders load where they are first used: T5 not at all with caption features in the data (the prompts'
    # features are then stored once beside the run), the VAE only to decode with latents in the data.
    text_path = text_encoder_path(cfg) if cfg.text_mode else None
    encoder = load_text_encoder(text_path, cfg.text_encoder.max_length, cfg.text_encoder.dtype, lazy=True) \
        if text_path else None
    vae = load_vae(cfg.vae.name, cfg.vae.scale_factor, lazy=True)
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)  # the fresh parts of the model
    parent_model = load_weights(parent_weights) if parent_weights else None
    stage_cls = STAGE_MODULES[unit.stage]
    model = stage_cls.initial_model(cfg, parent_model, encoder.dim if encoder else None)
    batches = cfg.batch_plan()
    granularity = model.cfg.patch_size * vae.downsample_factor
    prepare_data(cfg, granularity)
    check_features(cfg, text_path, model.cfg.patch_size)
    data = read_manifest(cfg.data.shards)
    captions_precomputed = encoder is not None and data.get("kind") == "features" and bool(data.get("text_encoder"))
    prompt_features = PromptFeatures(cfg.run_dir / "prompt-features", encoder) if captions_precomputed else None
    module = stage_cls(cfg, model, vae, encoder, prompt_features)

    manifest = {
        "stage": unit.stage, "phase": unit.phase, "status": "running", "config": str(unit.dir / "config.yaml"),
        "parent": {"path": str(parent_weights), "sha256": parent_sha} if parent_weights else None,
        "text_encoder": text_path, "text_max_length": cfg.text_encoder.max_length,
        "text_dtype": cfg.text_encoder.dtype, "vae": cfg.vae.name, "prediction": cfg.diffusion.prediction,
        "resolution": cfg.data.resolution, "max_steps": cfg.train.max_steps,
        "batch": dataclasses.asdict(batches) | {"global": batches.global_batch},
        "wall_time_s": previous.get("wall_time_s", 0.0),
    }
    write_json(unit.dir / MANIFEST, manifest)
    checkpoints = Checkpoints(unit.dir / "checkpoints", cfg.train.checkpoint_every, cfg.train.keep_checkpoints)
    resume = latest_good(checkpoints.folder)
    if resume is not None and resume.is_dir() and cfg.train.strategy != "fsdp":
        raise RunnerError(f"{resume} is a sharded FSDP checkpoint: resume with train.strategy=fsdp and the same number "
                          f"of processes, or delete {checkpoints.folder} to restart {unit.label}")
    trainer = make_trainer(cfg, unit.dir, checkpoints, callbacks)
    if trainer.is_global_zero:
        print(f"{unit.label}: {f'resuming from {resume}' if resume else 'training'} -> {unit.dir}\n"
              f"  global batch {batches.global_batch} = micro-batch {batches.micro} x {batches.accumulation} "
              f"accumulation step(s) x {batches.world_size} process(es)", flush=True)
    try:
        micro_batches = dataclasses.replace(cfg.data, batch_size=batches.micro)
        datamodule = ShardDataModule(micro_batches, granularity, captions=cfg.text_mode, latent_factor=vae.downsample_factor)
        trainer.fit(module, datamodule=datamodule,
                    ckpt_path=str(resume) if resume else None)
    except Preempted as stop:
        done = requeue() if trainer.is_global_zero else "rank 0 requeues"
        raise Preempted(f"{unit.label}: {stop} ({done}); the same command resumes from it") from None
    except BaseException:
        if read_index(checkpoints.folder) and trainer.is_global_zero:
            print(f"{unit.label}: stopped at step {trainer.global_step}; once the cause is fixed, the same command "
                  f"resumes from the newest good checkpoint in {checkpoints.folder}", flush=True)
        raise
    finally:
        manifest["wall_time_s"] += time.time() - started
        write_json(unit.dir / MANIFEST, manifest)
    manifest["skipped_samples"] = module.skipped
    if (unit.dir / FID_RECORDS).is_file():
        manifest["fid"] = [{"step": r["step"], "fid": r["fid"]} for r in json.loads((unit.dir / FID_RECORDS).read_text())]
    if trainer.global_step < cfg.train.max_steps:
        raise RunnerError(f"{unit.label} stopped at step {trainer.global_step} of {cfg.train.max_steps}; "
                          "run the same command again to resume it")
    model, ema = module.consolidated()  # collective under FSDP: every rank takes part, rank 0 gets the weights
    if trainer.is_global_zero:
        _finish(unit, trainer, model, ema, manifest, vae, module.prompt_encoder)
    trainer.strategy.barrier("stage finished")  # no rank starts the next stage before its parent is written


def make_trainer(
    cfg: StageConfig, folder: Path, checkpoints: Checkpoints, callbacks: list[L.Callback] | None = None,
    evaluation: bool = True, devices: list[int] | None = None,
) -> L.Trainer:
    """The stage's Trainer: strategy, precision and the per-step callbacks (checkpoints, preemption,
    throughput), plus samples and FID when ``evaluation`` (off in benchmarks, which time the step alone).
    ``devices`` picks device indices (a benchmark on one chosen GPU); default: ``train.devices`` of them."""
    # Our own SIGUSR1 handling (callbacks/preemption.py) replaces Lightning's, which saves inside the signal handler.
    # torchrun inside a Slurm allocation: every child sees the same SLURM_PROCID, so the ranks come from torchrun's
    # variables (Lightning's own detection order, which a forced SLURMEnvironment would override).
    slurm = SLURMEnvironment.detect() and not TorchElasticEnvironment.detect()
    environment = [SLURMEnvironment(auto_requeue=False)] if slurm else []
    samples = [SampleGrid(cfg.samples, folder / "samples", cfg.text_mode)] if evaluation else []
    fid = [FIDCallback(cfg.fid, folder, progress=cfg.train.progress_bar)] if evaluation and cfg.fid.enabled else []
    # The bar reads the logged loss on the host: refresh it when there is a new one, not every step.
    progress = [TQDMProgressBar(refresh_rate=cfg.train.log_every)] if cfg.train.progress_bar else []
    return L.Trainer(
        accelerator=cfg.train.accelerator, devices=devices or cfg.train.devices, num_nodes=cfg.train.num_nodes,
        strategy=make_strategy(cfg.train), precision=cfg.train.precision,
        max_steps=cfg.train.max_steps, log_every_n_steps=cfg.train.log_every,
        accumulate_grad_batches=cfg.batch_plan().accumulation,
        logger=TensorBoardLogger(save_dir=str(folder), name="", version="tensorboard"),
        callbacks=[
            checkpoints, *samples, Preemption(checkpoints),
            Throughput(every_n_steps=cfg.train.log_every, peak_tflops=cfg.train.peak_tflops),
            *fid, *progress, *(callbacks or []),
        ],
        plugins=[AtomicCheckpointIO(), *environment], enable_progress_bar=cfg.train.progress_bar,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=folder, use_distributed_sampler=False,
        enable_checkpointing=False,  # ours (callbacks/checkpoints.py), not Lightning's default ModelCheckpoint
    )


def _parent_weights(unit: Unit, parent: Unit | None, folder: str | Path) -> Path | None:
    if parent is None:
        return None
    weights = parent.dir / FINAL
    if not parent.done:
        command = ["pixart-lightning", "run", str(folder or "CONFIG"), "--stages", str(parent.stage), *unit.cfg.overrides]
        raise RunnerError(f"{unit.label} starts from {parent.label}'s final weights, which do not exist yet ({weights}). "
                          f"Run {parent.label} first: {shlex.join(command)}")
    return weights


def _finish(
    unit: Unit, trainer: L.Trainer, model: PixArt, ema: PixArt | None, manifest: dict[str, Any], vae, encoder
) -> None:
    """Save the handoff weights (plain, unsharded models), score alignment if asked, mark the unit done."""
    cfg = unit.cfg
    outputs = {"final": save_weights(model, unit.dir / FINAL, cfg.diffusion.prediction)}
    if ema is not None:
        outputs["ema"] = save_weights(ema, unit.dir / FINAL_EMA, cfg.diffusion.prediction)
    manifest["weights"] = {name: {"path": str(p), "sha256": sha256(p)} for name, p in outputs.items()}
    if cfg.eval.alignment_prompts:
        result = alignment(
            ema if cfg.samples.use_ema and ema is not None else model, vae, encoder, num=cfg.eval.alignment_prompts, seed=cfg.eval.seed, height=cfg.data.resolution,
            width=cfg.data.resolution, sampler=cfg.samples.sampler, steps=cfg.samples.steps,
            cfg_scale=cfg.eval.cfg_scale, prediction=cfg.diffusion.prediction, precision=trainer.precision,
            decode_batch=cfg.samples.decode_batch,
        )
        manifest["alignment"] = result
        write_json(unit.dir / "alignment.json", result)
        for logger in trainer.loggers:
            logger.log_metrics({f"eval/{k}": v for k, v in result.items() if k.endswith("accuracy")}, trainer.global_step)
            logger.save()
        print(f"{unit.label}: alignment {result['alignment']:.2f} "
              f"(background {result['background_accuracy']:.2f}, shape colour {result['shape_accuracy']:.2f})")
    manifest["status"] = "done"
    manifest["steps"] = cfg.train.max_steps
    write_json(unit.dir / MANIFEST, manifest)
    print(f"{unit.label}: done in {manifest['wall_time_s']:.0f} s -> {unit.dir / FINAL}\n"
          f"  samples: {unit.dir / 'samples'}   TensorBoard: tensorboard --logdir {cfg.run_dir}", flush=True)
