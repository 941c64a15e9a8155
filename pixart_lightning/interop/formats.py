"""Import and export of backbone weights: ours, official PixArt-α / DiT, and diffusers folders."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from pixart_lightning.diffusion.gaussian_diffusion import check_prediction
from pixart_lightning.diffusion.schedule import DIFFUSERS_PREDICTION_TYPES
from pixart_lightning.files import atomic_path
from pixart_lightning.hub import pipeline_subfolder
from pixart_lightning.interop.diffusers_keys import dit_rules, pixart_rules, to_ours, to_theirs
from pixart_lightning.interop.state_dicts import (
    IncompatibleCheckpointError,
    check_compatible,
    infer_config,
    read_state_dict,
)
from pixart_lightning.models.config import PixArtConfig, official_interpolation_scale
from pixart_lightning.models.pixart import PixArt

NULL_CAPTION_FILE = "null_caption.safetensors"
_NATIVE_TAG = "pixart-lightning"

############################################################################
#          Native: one safetensors file whose metadata holds the config    #
############################################################################


def save_weights(model: PixArt, path: str | Path, prediction: str = "epsilon") -> Path:
    """Write the model's weights, config and prediction type to one ``.safetensors`` file, atomically.

    The prediction type is not part of the backbone but decides how to sample from it: recorded here, the file
    samples and exports correctly away from the run folder whose manifest also names it.
    """
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": _NATIVE_TAG, "config": json.dumps(model.cfg.to_dict()),
                "prediction": check_prediction(prediction)}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return Path(path)


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(path, framework="pt") as f:
        return f.metadata() or {}


def is_native(path: Path) -> bool:
    return path.suffix == ".safetensors" and path.is_file() and _metadata(path).get("format") == _NATIVE_TAG


def load_weights(path: str | Path) -> PixArt:
    """Load a file written by :func:`save_weights`."""
    path = Path(path)
    meta = _metadata(path)
    if meta.get("format") != _NATIVE_TAG:
        raise IncompatibleCheckpointError(f"{path} was not written by pixart-lightning (no config in its metadata)")
    model = PixArt(PixArtConfig(**json.loads(meta["config"])))
    state = load_file(path)
    check_compatible(model, state)
    model.load_state_dict(state)
    return model


############################################################################
#          Official layout: PixArt-XL-2-*.pth and DiT-XL-2-*.pt            #
############################################################################


def model_from_official(state: dict[str, Tensor], **config_options) -> PixArt:
    """A backbone holding an official-layout state dict; ``pos_embed`` is recomputed, not loaded."""
    model = PixArt(infer_config(state, **config_options))
    state = {k: v for k, v in state.items() if k != "pos_embed"}
    check_compatible(model, state)
    model.load_state_dict(state)
    return model


def to_official(model: PixArt) -> dict[str, Tensor]:
    """Our weights in the official layout, with the native-resolution ``pos_embed`` table added."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    grid = model.cfg.sample_size // model.cfg.patch_size
    state["pos_embed"] = model.position_embedding(grid, grid, torch.device("cpu"), torch.float32).clone()
    return state


############################################################################
#                        diffusers transformer folders                     #
############################################################################


def export_diffusers(model: PixArt, folder: str | Path) -> Path:
    """Save as a diffusers ``PixArtTransformer2DModel`` (text mode) or ``DiTTransformer2DModel`` folder.

    diffusers has no slot for PixArt's null caption embedding: it is saved beside the weights as
    ``null_caption.safetensors`` so that importing the folder again restores it.
    """
    folder = Path(folder)
    to_diffusers_model(model).save_pretrained(folder)
    if model.cfg.mode == "text":
        save_null_caption(model, folder)
    return folder


def save_null_caption(model: PixArt, folder: Path) -> None:
    null = model.state_dict()["y_embedder.y_embedding"].detach().cpu().contiguous()
    save_file({"y_embedding": null}, folder / NULL_CAPTION_FILE)


def to_diffusers_model(model: PixArt):
    """The same weights in diffusers' ``PixArtTransformer2DModel`` or ``DiTTransformer2DModel``."""
    from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel

    cfg = model.cfg
    common = dict(
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        num_layers=cfg.depth,
        patch_size=cfg.patch_size,
        sample_size=cfg.sample_size,
    )
    if cfg.mlp_ratio != 4:
        raise ValueError(f"diffusers' transformers have mlp_ratio 4; this model has {cfg.mlp_ratio}")
    state = model.state_dict()
    if cfg.mode == "text":
        if cfg.freq_shift != 0 or cfg.mlp_norm_eps != 1e-6:
            raise ValueError("PixArtTransformer2DModel needs freq_shift=0 and mlp_norm_eps=1e-6")
        target = PixArtTransformer2DModel(
            **common,
            cross_attention_dim=cfg.hidden_size,
            caption_channels=cfg.caption_channels,
            interpolation_scale=cfg.interpolation_scale,
            use_additional_conditions=cfg.micro_conditions,
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
        )
        theirs = to_theirs(state, pixart_rules(cfg.depth), skip=("y_embedder.y_embedding",))
    else:
        if cfg.interpolation_scale != 1:
            raise ValueError("DiTTransformer2DModel has no interpolation scale: export needs interpolation_scale=1")
        # diffusers' DiT always shifts its timestep frequencies by 1; a model with freq_shift=0
        # (every facebookresearch checkpoint) is exported as-is and will differ slightly there.
        target = DiTTransformer2DModel(**common, num_embeds_ada_norm=cfg.num_classes, norm_eps=cfg.mlp_norm_eps)
        theirs = to_theirs(state, dit_rules(cfg.depth))
    target.load_state_dict(theirs, strict=True)
    return target


def load_diffusers(folder: str | Path, subfolder: str | None = None) -> PixArt:
    """Import a diffusers ``PixArtTransformer2DModel`` folder (or a pipeline's ``transformer/``)."""
    folder = Path(folder)
    folder = folder / (subfolder or pipeline_subfolder(folder, "transformer") or "")
    config = json.loads((folder / "config.json").read_text())
    if config.get("norm_type") != "ada_norm_single":
        raise IncompatibleCheckpointError(
            f"{folder} holds a {config.get('_class_name')} with norm_type={config.get('norm_type')!r}; "
            "only PixArt (ada_norm_single) transformers can be imported"
        )
    if config.get("caption_channels") is None:
        raise IncompatibleCheckpointError(f"{folder}: a PixArt transformer without caption_channels cannot be imported")
    sample_size = config.get("sample_size", 128)
    micro = config.get("use_additional_conditions")
    scale = config.get("interpolation_scale")
    cfg = PixArtConfig(
        depth=config["num_layers"],
        hidden_size=config["num_attention_heads"] * config["attention_head_dim"],
        num_heads=config["num_attention_heads"],
        patch_size=config["patch_size"],
        in_channels=config["in_channels"],
        learn_sigma=config.get("out_channels") == 2 * config["in_channels"],
        mode="text",
        caption_channels=config["caption_channels"],
        micro_conditions=sample_size == 128 if micro is None else micro,
        sample_size=sample_size,
        interpolation_scale=official_interpolation_scale(sample_size) if scale is None else scale,
    )
    model = PixArt(cfg)
    state = to_ours(_read_diffusers_weights(folder), pixart_rules(cfg.depth))
    null_file = folder / NULL_CAPTION_FILE
    if null_file.is_file():
        state["y_embedder.y_embedding"] = load_file(null_file)["y_embedding"]
    check_compatible(model, state, allow_missing=("y_embedder.y_embedding",))
    model.load_state_dict(state, strict=False)
    return model


def _read_diffusers_weights(folder: Path) -> dict[str, Tensor]:
    single = folder / "diffusion_pytorch_model.safetensors"
    if single.is_file():
        return load_file(single)
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(folder / shard).items()}
    raise IncompatibleCheckpointError(f"{folder} has no diffusion_pytorch_model.safetensors (or sharded index)")


############################################################################
#                           One entry point                               #
############################################################################


def load_model(source: str | Path, **config_options) -> PixArt:
    """Load a backbone from any supported source, telling the format from the path.

    A folder is a diffusers transformer (or pipeline) folder; a ``.safetensors`` file written by
    pixart-lightning carries its own config; anything else is an official PixArt-α or DiT
    checkpoint, read with ``weights_only=True`` (from its EMA weights when it holds them: see
    :func:`~pixart_lightning.interop.state_dicts.read_state_dict`) and shaped by :func:`infer_config`
    (pass ``size=`` or ``num_heads=`` where the shapes cannot tell; other formats carry their own).
    Hub ids are resolved first by :func:`~pixart_lightning.interop.init_from.resolve_checkpoint`.
    """
    source = Path(source)
    if source.is_dir():
        return load_diffusers(source)
    if is_native(source):
        return load_weights(source)
    container = config_options.pop("container", None)
    return model_from_official(read_state_dict(source, container), **config_options)


def read_prediction(source: str | Path) -> str | None:
    """What the checkpoint's mean channels predict (``epsilon`` or ``v``) where it records it, else None.

    Our ``.safetensors`` record it in their metadata (those written before it was recorded do not), an exported
    pipeline folder in its scheduler config; official checkpoints and bare transformer folders have no place for it.
    """
    source = Path(source)
    if source.is_dir():
        return _scheduler_prediction(source / "scheduler" / "scheduler_config.json")
    if not is_native(source):
        return None
    prediction = _metadata(source).get("prediction")
    if prediction is not None and prediction not in DIFFUSERS_PREDICTION_TYPES:
        known = ", ".join(DIFFUSERS_PREDICTION_TYPES)
        raise IncompatibleCheckpointError(f"{source} records prediction {prediction!r}; known: {known}")
    return prediction


def _scheduler_prediction(config_file: Path) -> str | None:
    if not config_file.is_file():
        return None
    prediction_type = json.loads(config_file.read_text()).get("prediction_type", "epsilon")  # diffusers' default
    ours = {theirs: name for name, theirs in DIFFUSERS_PREDICTION_TYPES.items()}
    if prediction_type not in ours:
        raise IncompatibleCheckpointError(
            f"{config_file}: prediction_type {prediction_type!r} cannot be sampled here; "
            f"known: {', '.join(ours)}"
        )
    return ours[prediction_type]
