"""FID's pinned caption set: every caption of a file or data source, and the seeded subset a measurement uses.

A caption source is a JSON list of ``{"id", "caption"}`` (optionally ``"label"``), MS-COCO's
``captions_val2014.json``, a ``.txt`` with one caption per line, or a data source whose samples carry
captions or class labels (by default the reference images themselves).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pixart_lightning.config import FIDSection
from pixart_lightning.data.samples import caption_text, sample_meta
from pixart_lightning.evaluation.data_source import raw_samples
from pixart_lightning.evaluation.errors import FIDError


@dataclass(frozen=True)
class Caption:
    id: int | str
    caption: str
    label: int | None = None
    """Class label, for a class-mode (stage 1) model."""

    def as_json(self) -> dict[str, Any]:
        """The caption as an entry of a caption JSON list, which :func:`load_captions` reads back."""
        return {"id": self.id, "caption": self.caption, **({"label": self.label} if self.label is not None else {})}


def _label(raw: dict[str, Any], meta: dict[str, Any]) -> int | None:
    """The sample's class label (``.cls`` member or json ``label``), if it has a readable one."""
    value = raw.get("cls", meta.get("label"))
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def load_captions(source: str, caption_key: str = "txt") -> list[Caption]:
    """Every caption of a caption file or of a data source's samples (id = sample key), in file order."""
    path = Path(source)
    if path.is_file() and path.suffix == ".txt":
        lines = path.read_text(encoding="utf-8").splitlines()
        return [Caption(i, line.strip()) for i, line in enumerate(lines) if line.strip()]
    if path.is_file() and path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and "annotations" in data:  # MS-COCO captions_*.json
            return [Caption(a["id"], a["caption"].strip()) for a in data["annotations"]]
        if not isinstance(data, list) or not all(isinstance(d, dict) and "id" in d and "caption" in d for d in data):
            raise FIDError(f"{source}: expected a JSON list of {{\"id\": ..., \"caption\": ...}} or COCO captions JSON")
        return [Caption(d["id"], d["caption"], d.get("label")) for d in data]
    captions = []
    for raw in raw_samples(source):
        try:
            meta = sample_meta(raw)
        except ValueError:
            continue
        text = caption_text(raw, caption_key, meta)
        label = _label(raw, meta)
        if text is not None or label is not None:
            captions.append(Caption(raw["__key__"], text or "", label))
    return captions


def pin_captions(captions: Sequence[Caption], num: int, seed: int) -> list[Caption]:
    """``num`` captions: all of them, or a subset drawn with ``seed`` (kept in source order)."""
    if len(captions) < num:
        raise FIDError(f"FID needs {num} captions and the caption source has {len(captions)}; "
                       "lower fid.num_images or give a longer list in fid.captions")
    if len(captions) == num:
        return list(captions)
    chosen = np.sort(np.random.default_rng(seed).choice(len(captions), num, replace=False))
    return [captions[i] for i in chosen]


def pinned_captions(settings: FIDSection) -> list[Caption]:
    """The caption list a measurement with these settings uses."""
    source = settings.captions or settings.reference
    if not source:
        raise FIDError("FID needs captions: set fid.captions, or fid.reference to real images with captions")
    return pin_captions(load_captions(source, settings.caption_key), settings.num_images, settings.seed)


def ids_digest(captions: Sequence[Caption]) -> str:
    """sha256 of the caption ids in order: two records with the same digest measured the same captions."""
    return hashlib.sha256(json.dumps([c.id for c in captions]).encode()).hexdigest()
