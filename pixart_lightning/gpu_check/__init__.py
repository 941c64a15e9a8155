"""One prepared GPU check (``make gpu-check``, docs/gpu.md): device, training step against diffusers, FSDP2,
numerics, sampling, attention backends, the stage chain, LoRA against full fine-tuning and stage 4's distillation,
each within a time budget, reported as JSON and Markdown. ``python -m pixart_lightning.gpu_check --device cpu`` runs
the same checks at tiny sizes."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

PROJECT = Path(__file__).resolve().parents[2]


def benchmark(name: str) -> ModuleType:
    """A script of ``benchmarks/`` (a folder of scripts, not an installed package), imported from the project root."""
    if str(PROJECT) not in sys.path:
        sys.path.insert(0, str(PROJECT))
    return importlib.import_module(f"benchmarks.{name}")
