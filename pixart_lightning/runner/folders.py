"""What a run folder, a stage folder or a weights file means to the commands that read a trained model.

A stage folder (``runs/demo/stage3``, see :mod:`pixart_lightning.runner.chain`) holds the final weights (and
their EMA), the ``manifest.json`` naming the text encoder, VAE, prediction and resolution the stage trained with, and
its resolved ``config.yaml``. A stage trained in phases holds one such folder per phase. Anything else (a weights
file, an official checkpoint, a diffusers folder) stands for itself; a weights file inside a stage folder still
takes its encoders from the folder's manifest.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from pixart_lightning.config import StageConfig, load_saved
from pixart_lightning.encoders.loading import load_text_encoder, load_vae
from pixart_lightning.encoders.text import DEFAULT_T5, T5TextEncoder
from pixart_lightning.encoders.vae import DEFAULT_VAE, VAE, PixelSpace
from pixart_lightning.interop import load_model, read_prediction
from pixart_lightning.interop.lora import merge_adapters, read_adapters
from pixart_lightning.models import PixArt
from pixart_lightning.runner.unit import FINAL, FINAL_EMA, SAVED_CONFIG, read_unit_manifest
from pixart_lightning.training.lora import adapter_path


def stage_weights(path: str | Path, ema: bool = False) -> Path:
    """The weights ``path`` names: a stage folder's final weights (their EMA with ``ema``), else ``path`` itself."""
    path = Path(path)
    if (path / FINAL).is_file():
        weights = path / (FINAL_EMA if ema else FINAL)
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} does not exist (was the stage trained with optim.ema_rate=0?)")
        return weights
    if ema:
        raise ValueError(f"--ema picks a stage folder's {FINAL_EMA}; give a stage folder, e.g. runs/demo/stage3")
    return path


def sampling_weights(path: str | Path) -> Path:
    """The weights to sample from: a stage folder's EMA weights where it kept them, else its final weights; any
    other checkpoint as given. A stage trained in phases is refused, naming the phase folders to choose from."""
    path = Path(path)
    if path.is_dir() and (path / FINAL).is_file():
        return path / (FINAL_EMA if (path / FINAL_EMA).is_file() else FINAL)
    phases = sorted(p.parent.name for p in path.glob(f"*/{FINAL}")) if path.is_dir() else []
    if phases and not (path / "config.json").is_file():  # config.json: a diffusers folder, which has no phases
        raise ValueError(f"{path} is a stage run in phases; pass one of its phase folders ({', '.join(phases)})")
    return path


def adapter_weights(path: str | Path) -> Path:
    """The LoRA adapters ``path`` names: a LoRA stage folder's, beside its sampling weights (the EMA's where it kept
    them, see :func:`sampling_weights`), else ``path`` itself (a ``final-lora.safetensors``)."""
    path = Path(path)
    if not path.is_dir():
        return path
    if not (path / FINAL).is_file():
        raise ValueError(f"{path} is not a stage folder; --lora takes a LoRA stage's folder or its adapters file")
    adapters = adapter_path(sampling_weights(path))
    if not adapters.is_file():
        raise FileNotFoundError(f"{path} holds no LoRA adapters ({adapters.name}): was it trained with model.lora?")
    return adapters


def with_adapters(model: PixArt, weights: str | Path, lora: str | Path | None) -> PixArt:
    """``model`` (read from ``weights``) with the adapters ``lora`` names (:func:`adapter_weights`) merged in; as it
    is without ``lora``. A LoRA stage's own final weights already hold its adapters merged: they are refused as the
    base, which is the weights that stage started from (its manifest's ``parent``)."""
    if lora is None:
        return model
    adapters = adapter_weights(lora)
    weights = Path(weights)
    if weights.name in (FINAL, FINAL_EMA) and adapter_path(weights.with_name(FINAL)).is_file():
        parent = (read_unit_manifest(weights).get("parent") or {}).get("path", "the weights that stage started from")
        raise ValueError(f"{weights} already holds its stage's adapters merged; give the base they were trained on "
                         f"({parent}) with --lora")
    return merge_adapters(model, read_adapters(adapters))


def resolve_prediction(weights: str | Path, chosen: str | None = None) -> str:
    """What the model predicts: ``chosen``, else what the weights record, else their stage's manifest, else epsilon
    (with a note on stderr: weights written before the prediction was recorded)."""
    prediction = chosen or read_prediction(weights) or read_unit_manifest(weights).get("prediction")
    if prediction is None:
        print(f"note: {weights} does not record what the model predicts; assuming epsilon "
              "(pass --prediction v for a model trained with diffusion.prediction=v)", file=sys.stderr)
        return "epsilon"
    return prediction


def saved_config(path: str | Path) -> StageConfig | None:
    """The resolved config of the stage folder ``path``; None for a weights file or a folder that is not a stage's."""
    config = Path(path) / SAVED_CONFIG
    return load_saved(config) if config.is_file() else None


@dataclass(frozen=True)
class RunArtifacts:
    """Everything that sampling a trained model needs, as its stage trained it."""

    model: PixArt
    vae: VAE | PixelSpace
    encoder: T5TextEncoder | None
    """The text encoder of a text-mode model; None for a class-mode (stage 1) one."""
    prediction: str
    resolution: int
    """Image side in pixels: the stage's ``data.resolution``, else the model's sample size times the VAE's factor."""


def load_run_artifacts(
    checkpoint: str | Path, *, text_encoder: str | None = None, vae: str | None = None, prediction: str | None = None,
    lora: str | Path | None = None,
) -> RunArtifacts:
    """Load the model ``checkpoint`` names (see :func:`sampling_weights`) with its encoders, prediction and resolution;
    with the adapters ``lora`` names merged into it (:func:`with_adapters`).

    ``text_encoder``, ``vae`` and ``prediction`` outrank what the stage's manifest records; outside a stage folder
    the encoders are PixArt-α's (:data:`DEFAULT_T5`, :data:`DEFAULT_VAE`), loaded with :func:`load_text_encoder`'s
    maximum length and dtype.
    """
    manifest = read_unit_manifest(checkpoint)
    weights = sampling_weights(checkpoint)
    model = with_adapters(load_model(weights), weights, lora)
    encoder = None
    if model.cfg.mode == "text":
        recorded = {option: manifest[key] for key, option in (("text_max_length", "max_length"),
                                                              ("text_dtype", "dtype")) if key in manifest}
        encoder = load_text_encoder(text_encoder or manifest.get("text_encoder") or DEFAULT_T5, **recorded)
    autoencoder = load_vae(vae or manifest.get("vae") or DEFAULT_VAE)
    return RunArtifacts(
        model=model, vae=autoencoder, encoder=encoder, prediction=resolve_prediction(weights, prediction),
        resolution=manifest.get("resolution") or model.cfg.sample_size * autoencoder.downsample_factor,
    )
