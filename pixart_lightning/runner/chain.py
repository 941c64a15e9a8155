"""The stage-chaining runner: stage 1 -> 2 -> 3 (-> 4), each starting from the previous one's final weights (stage 4,
which distils stage 3, from its EMA weights).

Every stage (or phase of a stage) is a *unit* with its own folder ``runs/<name>/stage<N>[/<phase>]/``:

- ``config.yaml``: the resolved config (with the derived learning rate and batch plan); ``samples/``: PNG grids;
- ``checkpoints/step-N.ckpt`` + ``index.json``: the newest resumable checkpoints (atomic, sha256 recorded);
- ``final.safetensors`` (+ ``final-ema.safetensors``): the weights handed to the next unit;
- ``manifest.json``: status, the parent checkpoint and its sha256, hashes of the outputs, timings.

All units log into one TensorBoard run, ``runs/<name>/tensorboard/``, on one step axis (:mod:`.logs`).
A unit whose manifest says ``done`` is skipped; an interrupted one resumes from its newest good checkpoint with
the same data order; a unit whose parent is missing says which stage to run first. A stage whose config sets
``model.init_from`` starts from that checkpoint instead and needs no previous stage (its manifest's parent records
the checkpoint: :func:`~pixart_lightning.interop.init_from.checkpoint_record`).

The unit and its files are :mod:`.unit`; what it reads, :mod:`.inputs`; its Trainer, :mod:`.trainer`; what it
records, :mod:`.report`.
"""

from __future__ import annotations

import dataclasses
import shlex
import time
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only

from callbacks.checkpoints import Checkpoints, latest_good, read_index
from callbacks.preemption import Preempted, requeue
from pixart_lightning.config import STAGES, ConfigError, load_stage, phase_configs, to_yaml
from pixart_lightning.data.module import ShardDataModule
from pixart_lightning.data.shards import read_manifest
from pixart_lightning.encoders.loading import load_text_encoder, load_vae
from pixart_lightning.encoders.text import PromptFeatures
from pixart_lightning.files import sha256, write_text_atomic
from pixart_lightning.interop import load_weights
from pixart_lightning.interop.init_from import checkpoint_record
from pixart_lightning.runner.inputs import (
    check_features,
    check_paths,
    check_teacher,
    check_teacher_prediction,
    prepare_data,
    text_encoder_path,
)
from pixart_lightning.runner.logs import unit_log
from pixart_lightning.runner.report import finish, print_summary, record_training, start_manifest, write_json
from pixart_lightning.runner.trainer import make_trainer
from pixart_lightning.runner.unit import CHECKPOINTS, FINAL, FINAL_EMA, MANIFEST, SAVED_CONFIG, RunnerError, Unit
from pixart_lightning.training.parallel import consolidated, rank_zero_result
from stages import STAGE_MODULES
from stages.base import DiffusionStage


def plan(folder: str | Path, overrides: list[str] | None = None) -> list[Unit]:
    """Every unit of the config folder, in order; all configs are validated before anything runs."""
    if not Path(folder).is_dir():
        raise ConfigError(f"config folder {folder} does not exist (the embedded default is configs/demo)")
    stage_numbers = [s for s in STAGES if (Path(folder) / f"stage{s}.yaml").is_file()]
    if not stage_numbers:
        raise ConfigError(f"{folder} holds no stage config ({', '.join(f'stage{s}.yaml' for s in STAGES)})")
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
        run_unit(unit, units, folder, callbacks)
    print_summary(selected)
    return selected


def run_unit(
    unit: Unit, units: list[Unit], folder: str | Path = "", callbacks: list[L.Callback] | None = None
) -> None:
    """Train one unit of the plan ``units`` to ``max_steps`` (resuming if interrupted), starting from the final
    weights of the unit before it (or the stage's ``model.init_from``), and hand its own weights forward."""
    cfg = unit.cfg
    if unit.done:
        print(f"{unit.label}: done already ({unit.dir / FINAL}); delete {unit.dir} to train it again")
        return
    parent_weights, parent_record = _parent(unit, units, folder)
    previous = unit.manifest()
    parent_sha = parent_record and parent_record["sha256"]
    if previous and parent_sha and (previous.get("parent") or {}).get("sha256") != parent_sha:
        raise RunnerError(f"{unit.label} was started from a different checkpoint than {parent_record['path']} "
                          f"holds now; delete {unit.dir} to start it again from the new one")
    unit.dir.mkdir(parents=True, exist_ok=True)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if rank_zero_only.rank == 0:
        write_text_atomic(unit.dir / SAVED_CONFIG, to_yaml(cfg))
    started = time.time()
    module, datamodule, text_path = _build(unit, parent_weights)
    batches = cfg.batch_plan()
    manifest = start_manifest(unit, text_path, parent_record, batches, previous.get("wall_time_s", 0.0))
    checkpoints = Checkpoints(unit.dir / CHECKPOINTS, cfg.train.checkpoint_every, cfg.train.keep_checkpoints)
    resume = latest_good(checkpoints.folder)
    if resume is not None and resume.is_dir() and cfg.train.strategy != "fsdp":
        raise RunnerError(f"{resume} is a sharded FSDP checkpoint: resume with train.strategy=fsdp and the same number "
                          f"of processes, or delete {checkpoints.folder} to restart {unit.label}")
    # The TensorBoard step axis continues from the units before this one in the plan (runner/logs.py).
    trainer = make_trainer(cfg, unit.dir, checkpoints, callbacks, log=unit_log(units, unit))
    if trainer.is_global_zero:
        print(f"{unit.label}: {f'resuming from {resume}' if resume else 'training'} -> {unit.dir}\n"
              f"  global batch {batches.global_batch} = micro-batch {batches.micro} x {batches.accumulation} "
              f"accumulation step(s) x {batches.world_size} process(es)", flush=True)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None)
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
    record_training(unit, manifest, module.account.skipped)
    if trainer.global_step < cfg.train.max_steps:
        raise RunnerError(f"{unit.label} stopped at step {trainer.global_step} of {cfg.train.max_steps}; "
                          "run the same command again to resume it")
    # Collective under FSDP: every rank takes part, rank 0 gets the weights as plain modules.
    model, ema = consolidated(module.model, module.averaged, module.device)
    if trainer.is_global_zero:
        finish(unit, trainer, model, ema, manifest, module.encoders)
    trainer.strategy.barrier("stage finished")  # no rank starts the next stage before its parent is written


def _build(unit: Unit, parent_weights: Path | None) -> tuple[DiffusionStage, ShardDataModule, str | None]:
    """The unit's stage module, its data (written first if the config synthesises it) and its text encoder's path.

    Both encoders load where they are first used: T5 not at all with caption features in the data (the prompts'
    features are then stored once beside the run), the VAE only to decode with latents in the data.
    """
    cfg = unit.cfg
    text_path = text_encoder_path(cfg) if cfg.text_mode else None
    encoder = load_text_encoder(text_path, cfg.text_encoder.max_length, cfg.text_encoder.dtype, lazy=True) \
        if text_path else None
    vae = load_vae(cfg.vae.name, cfg.vae.scale_factor, lazy=True)
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)  # the fresh parts of the model
    parent_model = load_weights(parent_weights) if parent_weights else None
    stage_cls = STAGE_MODULES[unit.stage]
    model = stage_cls.initial_model(cfg, parent_model, encoder.dim if encoder else None)
    granularity = model.cfg.patch_size * vae.downsample_factor
    prepare_data(cfg, granularity)
    check_features(cfg, text_path, model.cfg.patch_size)
    data = read_manifest(cfg.data.shards)
    captions_precomputed = encoder is not None and data.get("kind") == "features" and bool(data.get("text_encoder"))
    prompt_features = PromptFeatures(cfg.run_dir / "prompt-features", encoder) if captions_precomputed else None
    micro_batches = dataclasses.replace(cfg.data, batch_size=cfg.batch_plan().micro)
    datamodule = ShardDataModule(micro_batches, granularity, captions=cfg.text_mode, latent_factor=vae.downsample_factor)
    return stage_cls(cfg, model, vae, encoder, prompt_features), datamodule, text_path


def _parent(unit: Unit, units: list[Unit], folder: str | Path) -> tuple[Path | None, dict | None]:
    """The previous unit's final weights that ``unit`` starts from (None: it starts fresh, or from
    ``model.init_from``, which its stage loads) and the manifest's record of where it starts from (path, sha256).

    ``model.init_from`` replaces the previous stage, not the previous phase of the same stage. A distilling stage
    (stage 4) starts from its parent's EMA weights, its teacher (:func:`~.inputs.check_teacher`).
    """
    place = units.index(unit)
    parent = units[place - 1] if place > 0 else None
    init_from = unit.cfg.model.init_from
    # Rank 0 reads the (multi-GB) weights once; the other ranks leave the checks to it (parallel.rank_zero_result).
    if init_from and (parent is None or parent.stage != unit.stage):
        if STAGE_MODULES[unit.stage].teacher_from_parent and Path(init_from).exists():
            check_teacher_prediction(unit.cfg, Path(init_from))
        return None, rank_zero_result(lambda: checkpoint_record(init_from))
    weights = _parent_weights(unit, parent, folder)
    if weights is None:
        return None, None
    return weights, rank_zero_result(lambda: {"path": str(weights), "sha256": sha256(weights)})


def _parent_weights(unit: Unit, parent: Unit | None, folder: str | Path) -> Path | None:
    if parent is None:
        return None
    weights = parent.dir / FINAL
    if not parent.done:
        command = ["pixart-lightning", "run", str(folder or "CONFIG"), "--stages", str(parent.stage), *unit.cfg.overrides]
        raise RunnerError(f"{unit.label} starts from {parent.label}'s final weights, which do not exist yet ({weights}). "
                          f"Run {parent.label} first: {shlex.join(command)}")
    if STAGE_MODULES[unit.stage].teacher_from_parent:
        return check_teacher(unit.cfg, parent.dir / FINAL_EMA, parent.label)
    return weights
