"""The three PixArt-α training stages, one LightningModule each on a shared base."""

from stages.base import DiffusionStage
from stages.stage1 import PixelDependency
from stages.stage2 import TextAlignment
from stages.stage3 import HighAesthetics

STAGE_MODULES: dict[int, type[DiffusionStage]] = {1: PixelDependency, 2: TextAlignment, 3: HighAesthetics}

__all__ = ["STAGE_MODULES", "DiffusionStage", "HighAesthetics", "PixelDependency", "TextAlignment"]
