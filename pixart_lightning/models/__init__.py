"""The backbone, its configuration and the stage-1 -> stage-2 re-parameterisation.

``config`` holds the configuration and named sizes, ``layers`` the embedders, ``attention`` the attention kernel
choice and layers, ``pixart`` the blocks and the model, ``reparam`` the handoff; ``attention_check`` compares every
attention backend with the math kernel for the GPU check.
"""

from pixart_lightning.models.config import MODEL_SIZES, PixArtConfig
from pixart_lightning.models.pixart import PixArt, PixArtBlock
from pixart_lightning.models.reparam import class_to_text, to_resolution

__all__ = ["MODEL_SIZES", "PixArt", "PixArtBlock", "PixArtConfig", "class_to_text", "to_resolution"]
