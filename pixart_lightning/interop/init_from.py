"""``model.init_from``: where a starting checkpoint lies, what identifies it, and whether it fits a stage's model.

Any format :func:`~pixart_lightning.interop.formats.load_model` reads can start any stage: an official
``PixArt-XL-2-*.pth`` or DiT ``.pt``, our ``.safetensors``, a diffusers transformer or pipeline folder, or a hub id
(``PixArt-alpha/PixArt-XL-2-512x512``) resolved through the Hugging Face cache. Each stage adapts the model it gets
(``class_to_text``, ``to_resolution``) and then checks it with :func:`check_fits`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from huggingface_hub import snapshot_download
from lightning.fabric.utilities.rank_zero import rank_zero_only

from pixart_lightning.config import StageConfig
from pixart_lightning.files import sha256
from pixart_lightning.hub import load_pretrained, pipeline_subfolder
from pixart_lightning.interop.formats import NULL_CAPTION_FILE, load_model
from pixart_lightning.interop.state_dicts import IncompatibleCheckpointError, check_compatible
from pixart_lightning.models.config import PixArtConfig
from pixart_lightning.models.pixart import PixArt

# What a hub download fetches: a transformer folder at the top or a pipeline's transformer/, never its T5 (~18 GB).
HUB_PATTERNS = ["config.json", "model_index.json", "diffusion_pytorch_model*", NULL_CAPTION_FILE, "transformer/*"]

# The stage-config keys that decide each shape-bearing backbone field, named when a checkpoint does not fit.
SET_BY = {
    "depth": "model.size / model.depth",
    "hidden_size": "model.size / model.hidden_size",
    "num_heads": "model.size / model.num_heads",
    "patch_size": "model.size / model.patch_size",
    "mlp_ratio": "model.size",
    "in_channels": "vae.name",
    "learn_sigma": "model.learn_sigma",
}
SET_BY_MODE = {
    "class": {"num_classes": "model.num_classes"},
    "text": {"caption_channels": "text_encoder.name", "max_caption_tokens": "the model's null caption length",
             "micro_conditions": "data.multi_scale, stage 3's, and model.micro_conditions"},
}


def resolve_checkpoint(source: str) -> Path:
    """A local file or folder as it is; a hub id as its snapshot in the Hugging Face cache.

    Online, only the transformer's files are downloaded (:data:`HUB_PATTERNS`); offline, a cache miss raises
    :class:`~pixart_lightning.hub.ModelNotAvailableError` saying how to bring the checkpoint as a folder.
    """
    path = Path(source).expanduser()
    if path.exists():
        return path
    return Path(load_pretrained(snapshot_download, source, "checkpoint (model.init_from)", allow_patterns=HUB_PATTERNS))


def weight_files(path: Path) -> list[Path]:
    """The files that hold a checkpoint: the file itself, or a transformer folder's config, weights (one file, or
    shards and their index) and null caption."""
    if path.is_file():
        return [path]
    folder = path / (pipeline_subfolder(path, "transformer") or "")
    return sorted(f for f in folder.iterdir() if f.is_file() and (
        f.name in ("config.json", NULL_CAPTION_FILE) or f.name.startswith("diffusion_pytorch_model")))


def checkpoint_record(source: str) -> dict:
    """The manifest's ``parent`` for a unit that starts from ``source``: where it resolved to and its sha256.

    A file's sha256 is that of its bytes. A folder's is the sha256 of its :func:`weight_files` listed as
    ``sha256sum`` prints them (``<hex>  <path relative to the folder>``, one line each, sorted by path), so
    ``sha256sum <files> | sha256sum`` run in the folder gives it again; the per-file hashes are kept under ``files``.
    """
    path = resolve_checkpoint(source)
    if path.is_file():
        record = {"path": str(path), "sha256": sha256(path)}
    else:
        files = {f.relative_to(path).as_posix(): sha256(f) for f in weight_files(path)}
        listing = "".join(f"{digest}  {name}\n" for name, digest in sorted(files.items()))
        record = {"path": str(path), "sha256": hashlib.sha256(listing.encode()).hexdigest(), "files": files}
    return record if str(path) == source else {"source": source, **record}


def starting_model(cfg: StageConfig, parent: PixArt | None) -> tuple[PixArt | None, str]:
    """What a stage starts from, and how to name it in errors: the previous unit's model, else the checkpoint
    ``model.init_from`` names, else nothing (a fresh model)."""
    if parent is not None:
        return parent, "the previous unit's weights"
    source = cfg.model.init_from
    if not source:
        return None, ""
    # Weights cannot tell the number of heads: an official file takes the configured one.
    model = load_model(resolve_checkpoint(source), num_heads=cfg.pixart_config().num_heads)
    if rank_zero_only.rank == 0:
        print(f"stage {cfg.stage}: starting from {source}", flush=True)
    return model, source


def check_fits(have: PixArtConfig, wanted: PixArtConfig, source: str) -> None:
    """Refuse a model whose shapes differ from the configured one, naming each field and the keys that set it."""
    fields = {**SET_BY, **SET_BY_MODE.get(wanted.mode, {})}
    differ = [f"{name}: checkpoint {getattr(have, name)!r}, config {getattr(wanted, name)!r} ({key})"
              for name, key in fields.items() if getattr(have, name) != getattr(wanted, name)]
    if differ:
        raise IncompatibleCheckpointError(
            f"{source} does not fit this stage's model:\n  " + "\n  ".join(differ))


def adopt(model: PixArt, cfg: PixArtConfig) -> PixArt:
    """``model``'s weights in a new model of config ``cfg``, which differs from ``model.cfg`` only in settings
    that leave the shapes alone (dropout, position scale, base grid)."""
    new = PixArt(cfg)
    state = model.state_dict()
    check_compatible(new, state)
    new.load_state_dict(state)
    return new
