"""The three PixArt-α training stages and the few-step distillation of the last, one LightningModule each on a
shared base."""

from stages.base import DiffusionStage
from stages.stage1 import PixelDependency
from stages.stage2 import TextAlignment
from stages.stage3 import HighAesthetics
from stages.stage4 import ConsistencyDistillation

STAGE_MODULES: dict[int, type[DiffusionStage]] = {
    1: PixelDependency, 2: TextAlignment, 3: HighAesthetics, 4: ConsistencyDistillation,
}

__all__ = [
    "STAGE_MODULES", "ConsistencyDistillation", "DiffusionStage", "HighAesthetics", "PixelDependency", "TextAlignment",
]
