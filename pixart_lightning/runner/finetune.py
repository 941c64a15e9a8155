"""``pixart-lightning finetune``: your photos to a fine-tuned diffusers pipeline, in one resumable command.

The steps, each skipped when its output is complete (the same command resumes after an interruption):

1. **ingest** the image folders or tars into ``<out_dir>/data/shards`` (written whole or not at all);
2. **caption** into ``<out_dir>/data/captioned`` (``dense.txt``), resuming shard by shard. ``auto``: images with a
   caption of their own (a ``.txt``/``.json`` beside them, a tar's ``txt``) keep it and only the others are captioned
   by LLaVA; with none missing the step does nothing and training reads ``txt``. ``llava``: every image gets a dense
   LLaVA caption, seeded with its own where it has one (the paper's choice);
3. **extract** VAE latents (in the config's aspect-ratio buckets) and T5 features into the config's ``data.shards``,
   resuming shard by shard; no sample left stops here, before any training, with every step's counts;
4. **before**: a grid of the config's sample prompts from the starting weights (``model.init_from`` moved to the
   stage's resolution), ``<out_dir>/samples/before.png``: one row per ``samples.cfg_scales``, one column per prompt;
5. **train** the config's one stage through the runner (resuming from its checkpoints), LoRA with ``lora``;
6. **after**: the same grid, same seed, from the trained weights (the EMA where kept): ``samples/after.png``;
7. **export** a diffusers ``PixArtAlphaPipeline`` folder, ``<out_dir>/pipeline/`` (LoRA: the merged weights, and the
   adapters as a PEFT folder, ``<out_dir>/lora/``).

The grids and the exports are made again when the trained weights are newer than they are.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from pixart_lightning.config import StageConfig
from pixart_lightning.data.caption import CAPTION_MANIFEST, DEFAULT_LLAVA, DENSE_KEY, recaption
from pixart_lightning.data.counts import Counts
from pixart_lightning.data.extract import MANIFEST, ExtractSettings, extract
from pixart_lightning.data.ingest import ingest
from pixart_lightning.data.shards import DataError, read_manifest, tar_shards
from pixart_lightning.encoders.loading import load_text_encoder, load_vae
from pixart_lightning.evaluation.generate import generate, save_grid
from pixart_lightning.files import atomic_folder
from pixart_lightning.interop import load_model
from pixart_lightning.interop.lora import export_peft, read_adapters
from pixart_lightning.interop.pipeline import export_pipeline
from pixart_lightning.models import PixArt
from pixart_lightning.runner.chain import plan, run
from pixart_lightning.runner.folders import adapter_weights, sampling_weights
from pixart_lightning.runner.inputs import text_encoder_path
from pixart_lightning.runner.unit import Unit
from stages import STAGE_MODULES

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "finetune"
"""The recipe beside the package (configs/finetune), wherever the command runs from."""
CAPTION_MODES = ("auto", "llava")
FINETUNE_STAGES = (2, 3)
"""The stages finetune trains: the text stages. Stage 1 is class-conditional pretraining and stage 4 distils a
few-step student from a trained teacher; ``pixart-lightning run`` trains those."""
ANOTHER_RUN = "rerun with the options that wrote it, or give another run folder (--out)"
"""What to do when a run folder holds a step's output made with other settings: finetune never mixes them."""
STEPS = ("ingest", "caption", "extract", "before", "train", "after", "export")


@dataclass(frozen=True)
class FinetuneFolders:
    """Where each step writes, under the run folder (the features go where the config's ``data.shards`` says)."""

    out: Path

    @property
    def shards(self) -> Path:
        return self.out / "data" / "shards"

    @property
    def captioned(self) -> Path:
        return self.out / "data" / "captioned"

    @property
    def before(self) -> Path:
        return self.out / "samples" / "before.png"

    @property
    def after(self) -> Path:
        return self.out / "samples" / "after.png"

    @property
    def pipeline(self) -> Path:
        return self.out / "pipeline"

    @property
    def lora(self) -> Path:
        return self.out / "lora"


def finetune(
    sources: Sequence[str], config: str | Path = DEFAULT_CONFIG, *, caption: str = "auto", lora: int | None = None,
    overrides: Sequence[str] = (), caption_model: str = DEFAULT_LLAVA, caption_tokens: int | None = None,
    batch_size: int = 8,
) -> FinetuneFolders:
    """Run every step for the images ``sources`` with the one-stage config folder ``config``; see the module doc.

    ``lora``: the adapters' rank (``model.lora.rank``), else full fine-tuning. ``overrides``: ``key=value`` for the
    stage (``out_dir=...`` chooses the run folder). ``caption_model``, ``caption_tokens``: LLaVA and its new-token
    limit (None: the model's own). ``batch_size``: images per LLaVA and per extraction batch.
    """
    if caption not in CAPTION_MODES:
        raise ValueError(f"caption={caption!r}: valid choices are {', '.join(CAPTION_MODES)}")
    if lora is not None and lora < 1:
        raise ValueError(f"--lora {lora}: the adapters' rank must be at least 1")
    chosen = [*overrides, *([f"model.lora.rank={lora}"] if lora else [])]
    unit = _stage(config, chosen)  # every config mistake before any work
    folders = FinetuneFolders(unit.cfg.run_dir)
    training = f"LoRA rank {lora}" if lora else "full fine-tuning"
    _say(0, f"{', '.join(sources)} -> {folders.out}: {unit.label} from {unit.cfg.model.init_from}, {training}, "
            f"{unit.cfg.train.max_steps} steps at {unit.cfg.data.resolution} px")
    ingested = _ingest(sources, folders.shards)
    source, caption_key = _caption(folders, ingested, caption, caption_model, caption_tokens, batch_size)
    unit = _stage(config, [*chosen, f"data.caption_key={caption_key}"])
    features = _extract(unit.cfg, source, batch_size)
    if features["count"] == 0:
        raise DataError(f"no sample left after filtering, nothing was trained: ingest kept {ingested['count']} "
                        f"(skipped: {Counts.from_fields(ingested).summary()}), extract kept 0 (skipped: "
                        f"{Counts.from_fields(features).summary()})")
    if _png_done(folders.before):
        _say(4, f"skipped: {folders.before} exists")
    else:
        _grid(4, unit.cfg, STAGE_MODULES[unit.stage].initial_model, folders.before)
    if unit.done:
        _say(5, f"skipped: {unit.label} is done ({unit.dir})")
    else:
        _say(5, f"{unit.label} -> {unit.dir}")
        run(config, [unit.stage], [*chosen, f"data.caption_key={caption_key}"])
    weights = sampling_weights(unit.dir)
    if _fresh(folders.after, weights) and _png_done(folders.after):
        _say(6, f"skipped: {folders.after} is newer than {weights.name}")
    else:
        _grid(6, unit.cfg, lambda *_: load_model(weights), folders.after)
    _export(unit, weights, folders)
    return folders


def _say(step: int, text: str) -> None:
    """One progress line: the step's number and name, then what it does or why it is skipped."""
    head = f"[{step}/{len(STEPS)}] {STEPS[step - 1]}" if step else "plan"
    print(f"finetune {head}: {text}", flush=True)


def _stage(config: str | Path, overrides: list[str]) -> Unit:
    """The config folder's one unit, validated; a folder of several stages or phases is refused."""
    units = plan(config, overrides)
    if len(units) != 1:
        raise ValueError(f"{config}: finetune trains a config folder of one stage and no phases; this one has "
                         f"{', '.join(u.label for u in units)} (use `pixart-lightning run` for it)")
    unit = units[0]
    if unit.stage not in FINETUNE_STAGES:
        raise ValueError(f"{config}: finetune trains a text stage (2 or 3) on your images, this folder's is "
                         f"{unit.label} (use `pixart-lightning run` for it)")
    if not unit.cfg.model.init_from:
        raise ValueError(f"{config}: finetune starts from released weights; set model.init_from "
                         "(e.g. PixArt-alpha/PixArt-XL-2-512x512)")
    return unit


def _ingest(sources: Sequence[str], out: Path) -> dict[str, Any]:
    """The ingested photos' manifest; ingested now unless ``out`` holds these very sources' already."""
    wanted = [str(Path(s).resolve()) if Path(s).exists() else s for s in sources]
    if (out / "manifest.json").is_file():
        manifest = read_manifest(str(out))
        if manifest.get("sources") != wanted:
            raise FileExistsError(f"{out} holds images ingested from {', '.join(manifest.get('sources', []))}; "
                                  "give those, or another run folder (--out) for these")
        _say(1, f"skipped: {manifest['count']} images in {out} already")
        return manifest
    _say(1, f"{', '.join(wanted)} -> {out}")
    manifest = ingest(wanted, out, progress=False)
    _say(1, f"kept {manifest['count']} images; dropped: {Counts.from_fields(manifest, 'skipped').summary()}; "
            f"ignored: {Counts.from_fields(manifest, 'ignored').summary()}")
    return manifest


def uncaptioned(folder: Path) -> int:
    """Samples of the ingested shards with no ``txt`` caption (their names alone are read, not their bytes)."""
    keys: set[str] = set()
    captioned: set[str] = set()
    for shard in tar_shards(str(folder)):
        with tarfile.open(shard) as tar:
            for name in tar.getnames():
                key, _, ext = Path(name).name.partition(".")
                keys.add(key)
                if ext == "txt":
                    captioned.add(key)
    return len(keys - captioned)


def _caption(
    folders: FinetuneFolders, ingested: dict[str, Any], mode: str, model: str, tokens: int | None, batch_size: int,
) -> tuple[str, str]:
    """The folder extraction reads and the caption key it encodes, after captioning what ``mode`` asks for.

    ``recaption`` runs even when the captions are complete: it refuses a folder captioned with other settings (another
    mode, model or token limit), resumes shard by shard and loads LLaVA only when a shard is left to do."""
    missing = uncaptioned(folders.shards)
    if mode == "auto" and missing == 0:
        _say(2, f"skipped: every one of the {ingested['count']} images has its own caption")
        return str(folders.shards), "txt"
    done = folders.captioned / CAPTION_MANIFEST
    if not (done.is_file() and (m := json.loads(done.read_text()))["shards_finished"] == m["shards"]):
        asked = "every image" if mode == "llava" else f"the {missing} images without a caption"
        _say(2, f"LLaVA ({model}) captions {asked} -> {folders.captioned}")
    try:
        summary = recaption(str(folders.shards), folders.captioned, model=model, batch_size=batch_size,
                            max_new_tokens=tokens, missing_only=mode == "auto", progress=False)
    except FileExistsError as err:
        raise FileExistsError(f"{err} (finetune: {ANOTHER_RUN})") from None
    if summary["shards_done"] == 0:
        _say(2, f"skipped: {summary['count']} captions in {folders.captioned} already")
    else:
        _say(2, f"{summary['count']} captioned samples; dropped: {Counts.from_fields(summary).summary()}")
    return str(folders.captioned), DENSE_KEY


def _extract(cfg: StageConfig, source: str, batch_size: int) -> dict[str, Any]:
    """The features' manifest: latents at the stage's resolution and buckets, T5 features of its caption key.

    ``extract`` runs even when the features are complete: it refuses a folder extracted with other settings (another
    caption key, resolution or encoder), resumes shard by shard and loads the encoders only when a shard is left."""
    out = Path(cfg.data.shards)
    complete = (out / MANIFEST).is_file()
    d = cfg.data
    settings = ExtractSettings(
        vae=cfg.vae.name, text_encoder=text_encoder_path(cfg), resolution=d.resolution, multi_scale=d.multi_scale,
        min_ratio=d.min_ratio, max_ratio=d.max_ratio, patch_size=cfg.pixart_config().patch_size,
        caption_key=d.caption_key, max_length=cfg.text_encoder.max_length)
    if not complete:
        _say(3, f"VAE latents ({d.resolution} px{', aspect-ratio buckets' if d.multi_scale else ''}) and T5 features "
                f"of {d.caption_key} -> {out}")
    try:
        manifest = extract(source, out, settings, batch_size=batch_size, progress=False)
    except FileExistsError as err:
        raise FileExistsError(f"{err} (finetune: {ANOTHER_RUN})") from None
    if complete:
        _say(3, f"skipped: features of {manifest['count']} samples in {out} already")
    else:
        _say(3, f"kept {manifest['count']} samples; dropped: {Counts.from_fields(manifest).summary()}")
    return manifest


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _grid(step: int, cfg: StageConfig, make_model: Callable[..., PixArt], path: Path) -> None:
    """The sample prompts' grid from the model ``make_model(cfg, None, caption_channels)`` gives, at the stage's
    resolution, sampler, seed and precision: one row per cfg scale."""
    s = cfg.samples
    if not s.prompts:
        raise ValueError("samples.prompts is empty: the before/after grids need prompts")
    _say(step, f"{len(s.prompts)} prompts x cfg {s.cfg_scales} -> {path}")
    device = _device()
    encoder = load_text_encoder(text_encoder_path(cfg), cfg.text_encoder.max_length, cfg.text_encoder.dtype).to(device)
    vae = load_vae(cfg.vae.name, cfg.vae.scale_factor).to(device)
    model: PixArt = make_model(cfg, None, encoder.dim).to(device)
    rows = [generate(model, vae, prompts=s.prompts, encoder=encoder, height=cfg.data.resolution,
                     width=cfg.data.resolution, sampler=s.sampler, steps=s.steps, cfg_scale=scale, seed=s.seed,
                     prediction=cfg.diffusion.prediction, precision=cfg.train.precision, decode_batch=s.decode_batch)
            for scale in s.cfg_scales]
    save_grid(torch.cat(rows), path, columns=len(s.prompts), scale=s.scale)


def _png_done(path: Path) -> bool:
    """A grid written whole (an interrupted write leaves a PNG that does not verify)."""
    try:
        with Image.open(path) as image:
            image.verify()
    except (OSError, SyntaxError):
        return False
    return True


def _fresh(output: Path, source: Path) -> bool:
    """``output`` exists and was written after ``source`` (the trained weights)."""
    return output.exists() and output.stat().st_mtime >= source.stat().st_mtime


def _export(unit: Unit, weights: Path, folders: FinetuneFolders) -> None:
    """The diffusers pipeline of the trained weights (merged, with LoRA) and, with LoRA, the PEFT adapters."""
    cfg = unit.cfg
    outputs = {folders.pipeline: "model_index.json"} | ({folders.lora: "adapter_config.json"} if cfg.model.lora else {})
    if all(_fresh(folder / marker, weights) for folder, marker in outputs.items()):
        _say(7, f"skipped: {', '.join(map(str, outputs))} newer than {weights.name}")
        return
    for folder in outputs:
        shutil.rmtree(folder, ignore_errors=True)  # an export of older weights
    _say(7, f"{weights} -> {folders.pipeline}" + (f" (merged) and its adapters -> {folders.lora}" if cfg.model.lora
                                                  else ""))
    with atomic_folder(folders.pipeline) as partial:
        export_pipeline(load_model(weights), partial, text_encoder_path(cfg), cfg.vae.name, cfg.diffusion.prediction)
    if cfg.model.lora:
        with atomic_folder(folders.lora) as partial:
            export_peft(read_adapters(adapter_weights(unit.dir)), partial)
    _say(7, f"load it with diffusers.PixArtAlphaPipeline.from_pretrained({str(folders.pipeline)!r})")
