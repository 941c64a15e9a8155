"""Checkpoint interop: official PixArt-α and DiT files, diffusers folders, our own format."""

from pixart_lightning.interop.formats import (
    export_diffusers,
    load_diffusers,
    load_model,
    load_weights,
    model_from_official,
    read_prediction,
    save_weights,
    to_official,
)
from pixart_lightning.interop.state_dicts import IncompatibleCheckpointError, infer_config, read_state_dict

__all__ = [
    "IncompatibleCheckpointError",
    "export_diffusers",
    "infer_config",
    "load_diffusers",
    "load_model",
    "load_weights",
    "model_from_official",
    "read_prediction",
    "read_state_dict",
    "save_weights",
    "to_official",
]
