"""What a unit reads, checked or made before it trains: local paths, the tiny T5, the shapes world, features."""

from __future__ import annotations

import time
from pathlib import Path

from lightning.fabric.utilities.rank_zero import rank_zero_only

from pixart_lightning.config import ConfigError, StageConfig
from pixart_lightning.data.shards import DataError, data_buckets, read_manifest, resolve_sources
from pixart_lightning.encoders.text import TINY_T5
from pixart_lightning.files import atomic_folder
from pixart_lightning.interop import read_prediction
from pixart_lightning.runner.unit import RunnerError, Unit, read_unit_manifest
from pixart_lightning.shapes import world
from pixart_lightning.shapes.synth import MANIFEST as SHAPES_MANIFEST
from pixart_lightning.shapes.synth import synthesize
from pixart_lightning.shapes.tiny_models import build_tiny_t5

SHAPES_WORLD = "the shapes world"


def check_paths(units: list[Unit]) -> None:
    """Every local path the selected units read must exist before any of them starts (hub ids are not checked);
    a folder that a unit's ``data.synth`` will write counts as there."""
    synthesized = {u.cfg.data.shards for u in units
                   if u.cfg.data.synth is not None and _held_dataset(u.cfg.data.shards) in (None, SHAPES_WORLD)}
    problems = []
    for unit in units:
        cfg = unit.cfg
        if cfg.data.synth is not None:
            _recolor_rgb(cfg.data.synth.recolor)  # a colour name the world lacks stops here, before any stage
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


def check_teacher(cfg: StageConfig, weights: Path, parent: str) -> Path:
    """The EMA weights ``weights`` of the unit ``parent`` that a distilling stage (stage 4) takes as its teacher:
    present, and predicting what this stage's ``diffusion.prediction`` says."""
    if not weights.is_file():
        raise RunnerError(f"stage {cfg.stage} distils {parent}'s EMA weights and {weights.parent} has none "
                          f"({weights.name}; {parent} kept no EMA: optim.ema_rate=0): train {parent} again with "
                          "optim.ema_rate > 0, or set model.init_from to the weights to distil")
    check_teacher_prediction(cfg, weights)
    return weights


def check_teacher_prediction(cfg: StageConfig, weights: Path) -> None:
    """A teacher's outputs are read as ε or v as the stage's ``diffusion.prediction`` says: refuse a teacher that
    records (in its metadata, or its stage folder's manifest) that it was trained to predict the other."""
    recorded = read_prediction(weights) or (read_unit_manifest(weights).get("prediction") if weights.is_file() else None)
    if recorded is not None and recorded != cfg.diffusion.prediction:
        raise RunnerError(f"{weights} predicts {recorded} and stage {cfg.stage} has diffusion.prediction="
                          f"{cfg.diffusion.prediction}: a teacher is distilled with its own prediction type; set "
                          f"stage{cfg.stage}.diffusion.prediction={recorded}")


def _looks_local(name: str) -> bool:
    """A path rather than a hub id ("org/name"): absolute, relative with ./ or ../, or a file name with a suffix."""
    return name.startswith(("/", "./", "../", "~")) or Path(name).suffix in (".pt", ".pth", ".safetensors", ".bin")


def text_encoder_path(cfg: StageConfig) -> str:
    """Hub id or folder of the T5; ``tiny`` means the offline encoder built once per run name."""
    if cfg.text_encoder.name != TINY_T5:
        return cfg.text_encoder.name
    folder = (cfg.run_dir / "models" / "t5").resolve()
    if (folder / "config.json").is_file():
        return str(folder)
    # Rank 0 builds it (transformers saves weights from the main process only once torch.distributed is up);
    # the others wait for the folder, which appears whole.
    if rank_zero_only.rank == 0:
        try:
            with atomic_folder(folder) as partial:
                build_tiny_t5(partial, d_model=64, d_ff=128)
        except FileExistsError:  # published meanwhile by a run of the same name (same seed, same files)
            pass
    deadline = time.time() + 600
    while not (folder / "config.json").is_file():
        if time.time() > deadline:
            raise RunnerError(f"waited 10 minutes for rank 0 to build the tiny text encoder in {folder}")
        time.sleep(0.2)
    return str(folder)


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


def _recolor_rgb(recolor: dict[str, str]) -> dict[str, tuple[int, int, int]]:
    """``data.synth.recolor``'s colour names as the RGB values the world paints."""
    for name, new in recolor.items():
        if name not in world.COLORS or new not in world.DETECTOR_COLORS:
            raise ConfigError(f"data.synth.recolor.{name}={new}: keys are the world's colours "
                              f"({', '.join(world.COLORS)}); values those or {', '.join(world.DETECTOR_COLORS)}")
    return {name: world.DETECTOR_COLORS[new] for name, new in recolor.items()}


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
            samples_per_shard=synth.samples_per_shard, recolor=_recolor_rgb(synth.recolor),
            progress=cfg.train.progress_bar,
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
