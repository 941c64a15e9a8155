"""Frozen models loaded on first use and freed on request: a process that never needs their weights never
holds them (T5-XXL is 9.5 GB in bf16 per process, and with precomputed features training never runs it)."""

from __future__ import annotations

import gc
from typing import Generic, TypeVar

import torch

Model = TypeVar("Model")


class Lazy(Generic[Model]):
    """Holds what building the model needs; :meth:`load` builds it once, on ``self.device``."""

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self._model: Model | None = None

    def _build(self) -> Model:
        raise NotImplementedError

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def to(self, device: torch.device | str):
        """Where the weights go when loaded (and move, if they are loaded already)."""
        self.device = torch.device(device)
        if self._model is not None:
            self._model.to(self.device)
        return self

    def load(self) -> Model:
        if self._model is None:
            self._model = self._build()
        return self._model

    def release(self) -> None:
        """Free the weights (host and device memory); the next use loads them again."""
        if self._model is None:
            return
        self._model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
