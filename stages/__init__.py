"""The three PixArt-α training stages, one LightningModule each on a shared base."""

from .base import DiffusionStage
from .stage1 import PixelDependency
from .stage2 import TextAlignment
from .stage3 import HighAesthetics

STAGE_MODULES: dict[int, type[DiffusionStage]] = {1: PixelDependency, 2: TextAlignment, 3: HighAesthetics}

__all__ = ["STAGE_MODULES", "DiffusionStage", "HighAesthetics", "PixelDependency", "TextAlignment"]
