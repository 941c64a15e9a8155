"""The backbone, its configuration and the stage-1 -> stage-2 re-parameterisation."""

from .config import MODEL_SIZES, PixArtConfig
from .pixart import PixArt, PixArtBlock
from .reparam import class_to_text, to_resolution

__all__ = ["MODEL_SIZES", "PixArt", "PixArtBlock", "PixArtConfig", "class_to_text", "to_resolution"]
