"""Reading untrusted weight files, and inferring a backbone config from state-dict shapes.

Our parameter names are those of the official PixArt-α and DiT checkpoints, so "official layout"
below means both: a DiT checkpoint is a class-mode state dict, a ``PixArt-XL-2-*.pth`` a text-mode
one. Shapes tell depth, width, patch, channels, mode and micro-conditions; they cannot tell the
number of heads, which comes from a named size or an option.
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from safetensors.torch import load_file
from torch import Tensor

from pixart_lightning.models.config import MODEL_SIZES, PixArtConfig
from pixart_lightning.models.pixart import PixArt, sincos_2d

# Wrappers used by training scripts around the weights, in order of preference: PixArt-α's training checkpoints
# hold ``state_dict`` and ``state_dict_ema``, DiT's ``model`` and ``ema``; the EMA weights are the ones released.
_CONTAINER_KEYS = ("state_dict_ema", "state_dict", "ema", "model", "module")
_EMA_CONTAINERS = ("state_dict_ema", "ema")
_PREFIXES = ("module.", "model.", "_orig_mod.")


class IncompatibleCheckpointError(ValueError):
    """A state dict does not fit the backbone it was meant for."""


def read_state_dict(path: str | Path, container: str | None = None) -> dict[str, Tensor]:
    """Tensors of a ``.safetensors``/``.pt``/``.pth`` file, loaded without running pickled code.

    ``container`` picks a sub-dict (e.g. ``state_dict`` of an official training checkpoint, its raw weights);
    by default the first of ``state_dict_ema``, ``state_dict``, ``ema``, ``model``, ``module`` present is used,
    so the EMA weights when the file holds them (said on stdout).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    if path.suffix == ".safetensors":
        obj = load_file(path)
    else:
        try:
            # DiT training checkpoints carry their argparse Namespace: plain data, safe to allow.
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise IncompatibleCheckpointError(
                f"refusing to load {path}: it holds Python objects that would run code when unpickled "
                f"({str(err).splitlines()[0]}). Re-save only its tensors, e.g. as .safetensors."
            ) from None
    if container is not None:
        if container not in obj:
            raise IncompatibleCheckpointError(f"{path} has no {container!r}; top-level keys: {sorted(obj)[:10]}")
        obj = obj[container]
    else:
        while not any(isinstance(v, Tensor) for v in obj.values()):
            inner = next((k for k in _CONTAINER_KEYS if isinstance(obj.get(k), dict)), None)
            if inner is None:
                raise IncompatibleCheckpointError(f"{path} holds no tensors; top-level keys: {sorted(obj)[:10]}")
            if inner in _EMA_CONTAINERS and rank_zero_only.rank == 0:
                print(f"{path}: loading its EMA weights ({inner!r})", flush=True)
            obj = obj[inner]
    state = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def infer_config(
    state: dict[str, Tensor], *, size: str | None = None, num_heads: int | None = None, **overrides
) -> PixArtConfig:
    """The config of an official-layout state dict: shapes first, then ``size``/options for the rest."""
    if "x_embedder.proj.weight" not in state or "final_layer.linear.weight" not in state:
        missing = [k for k in ("x_embedder.proj.weight", "final_layer.linear.weight") if k not in state]
        raise IncompatibleCheckpointError(f"not a PixArt/DiT state dict: missing {missing}")
    hidden, in_channels, patch, _ = state["x_embedder.proj.weight"].shape
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    out_channels = state["final_layer.linear.weight"].shape[0] // patch**2
    fields: dict = dict(
        depth=depth,
        hidden_size=hidden,
        patch_size=patch,
        in_channels=in_channels,
        learn_sigma=out_channels == 2 * in_channels,
        mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
    )
    if "y_embedder.embedding_table.weight" in state:
        fields.update(mode="class", num_classes=state["y_embedder.embedding_table.weight"].shape[0] - 1)
    else:
        fields.update(
            mode="text",
            caption_channels=state["y_embedder.y_proj.fc1.weight"].shape[1],
            micro_conditions="csize_embedder.mlp.0.weight" in state,
        )
        if "y_embedder.y_embedding" in state:
            fields["max_caption_tokens"] = state["y_embedder.y_embedding"].shape[0]
    if "pos_embed" in state:
        fields.update(_grid_from_pos_embed(state["pos_embed"], hidden, patch))
    fields["num_heads"] = num_heads or _heads_for(size, depth, hidden)
    return PixArtConfig(**{**fields, **overrides})


def _heads_for(size: str | None, depth: int, hidden: int) -> int:
    if size is not None:
        if size not in MODEL_SIZES:
            raise ValueError(f"unknown model size {size!r}; valid choices: {', '.join(MODEL_SIZES)}")
        return MODEL_SIZES[size]["num_heads"]
    matches = {s["num_heads"] for s in MODEL_SIZES.values() if (s["depth"], s["hidden_size"]) == (depth, hidden)}
    if len(matches) == 1:
        return matches.pop()
    raise IncompatibleCheckpointError(
        f"cannot tell the number of heads of a depth-{depth}, width-{hidden} model from its weights: "
        f"pass num_heads or a size ({', '.join(MODEL_SIZES)})"
    )


def _grid_from_pos_embed(pos_embed: Tensor, hidden: int, patch: int) -> dict:
    """Native latent size and interpolation scale, read off a stored (1, T, D) position table."""
    grid = round(pos_embed.shape[1] ** 0.5)
    for scale in (1.0, 0.5, 2.0, 4.0):
        if torch.allclose(pos_embed[0].float(), sincos_2d(hidden, grid, grid, grid, scale), atol=1e-4):
            return dict(sample_size=grid * patch, interpolation_scale=scale)
    return dict(sample_size=grid * patch)


def check_compatible(model: PixArt, state: dict[str, Tensor], allow_missing: tuple[str, ...] = ()) -> None:
    """Raise naming every missing, unexpected or wrongly shaped key."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state) - set(allow_missing))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = [f"{name}: {_head(keys)}" for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)) if keys]
        raise IncompatibleCheckpointError(f"checkpoint does not fit a {model.cfg.mode}-mode model ({'; '.join(parts)})")


def _head(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")
