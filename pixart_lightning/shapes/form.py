"""The form of a single-shape image (kind, size, position), read geometrically and calibrated on the world's renders.

``world.split_colors`` tells the shape from the background; its largest connected blob, grown by one pixel to take
in the antialiased rim, gives every pixel a coverage in [0, 1]: its colour projected on the background → shape
colour line (noise across that line counts for nothing, specks off the blob are dropped).

- kind: the nearest, in (fill, skew), of the world's own shapes drawn large. Fill is the covered area over the
  widest row times the tallest column (square 1, circle π/4, triangle about 1/2); skew is the vertical skewness of
  the coverage (an apex-up triangle holds its mass low, about -0.57; circle and square 0). Skew keeps small
  triangles apart, whose fill rises towards the circle's as their pointed ends fall between pixels.
- size: the box side (widest row or tallest column) over min(height, width), the nearest of ``SIZE_FRACTIONS``.
- position: the box centre's nearest of the places ``world.shape_box`` draws a shape of that size.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import numpy as np

from pixart_lightning.shapes import world

_NEIGHBOURS = [(dy, dx) for dy, dx in itertools.product((-1, 0, 1), repeat=2) if dy or dx]
_REFERENCE_SIDE = 128
"""Pixels of the reference renders: large enough that pixel edges barely move their (fill, skew)."""


@dataclass(frozen=True)
class Form:
    """What ``read_form`` read off an image."""

    kind: str
    size: str
    position: str


def read_form(image: np.ndarray) -> Form | None:
    """The kind, size and position of the image's shape, each named by the world's words; None without a shape."""
    alpha = _coverage(image)
    if alpha is None:
        return None
    rows, columns = alpha.sum(axis=1), alpha.sum(axis=0)
    kind = _nearest_kind(_kind_features(alpha))
    height, width = alpha.shape
    side = max(rows.max(), columns.max()) / min(height, width)
    size = min(world.SIZE_FRACTIONS, key=lambda name: abs(world.SIZE_FRACTIONS[name] - side))
    # The box of the clearly covered pixels; in pixel-edge coordinates like world.shape_box.
    ys, xs = np.nonzero(alpha >= 0.5 * alpha.max())
    centre = np.array([(xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2])

    def miss(position: str) -> float:
        x0, y0, x1, y1 = world.shape_box(size, position, height, width)
        return float(np.linalg.norm(centre - [(x0 + x1) / 2, (y0 + y1) / 2]))

    return Form(kind, size, min(world.POSITIONS, key=miss))


def _coverage(image: np.ndarray) -> np.ndarray | None:
    """(height, width) float: how much of each pixel the shape covers, 0 off its blob; None without a shape."""
    pixels = np.asarray(image, dtype=np.float32)[..., :3]
    split = world.split_colors(pixels)
    if split.shape is None:
        return None
    axis = split.shape - split.background
    if not axis.any():  # far pixels on opposite sides of the background, whose median is the background itself
        return None
    along = np.clip((pixels - split.background) @ axis / (axis @ axis), 0.0, 1.0)
    alpha = np.where(_grow(_largest_blob(split.far)), along, 0.0)
    return alpha if alpha.max() > 0 else None


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a bool mask (the first found of a tie)."""
    height, width = mask.shape
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        blob, stack = [], [start]
        while stack:
            y, x = stack.pop()
            blob.append((y, x))
            for dy, dx in _NEIGHBOURS:
                ny, nx = y + dy, x + dx
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        if len(blob) > len(best):
            best = blob
    largest = np.zeros_like(mask)
    largest[tuple(np.array(best).T)] = True
    return largest


def _grow(mask: np.ndarray) -> np.ndarray:
    """The mask and its 8 neighbours: a box-filtered render's rim is at most one pixel wide."""
    height, width = mask.shape
    padded = np.pad(mask, 1)
    return np.logical_or.reduce([padded[1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]
                                 for dy, dx in [(0, 0), *_NEIGHBOURS]])


def _kind_features(alpha: np.ndarray) -> np.ndarray:
    """(fill, vertical skewness) of a coverage map; see the module docstring."""
    rows, columns = alpha.sum(axis=1), alpha.sum(axis=0)
    area = rows.sum()
    fill = area / (rows.max() * columns.max())
    offset = np.arange(len(rows)) + 0.5 - (rows * (np.arange(len(rows)) + 0.5)).sum() / area
    variance = (rows * offset**2).sum() / area + 1 / 12  # + a pixel's own spread: each is an average over its area
    skew = (rows * offset**3).sum() / area / variance**1.5
    return np.array([fill, skew])


@functools.cache
def _reference_features() -> dict[str, np.ndarray]:
    """(fill, skew) of each of the world's kinds, drawn large in the centre at ``_REFERENCE_SIDE`` px."""
    references = {}
    for kind in world.SHAPES:
        scene = world.Scene("black", (world.Shape(kind, "white", "large", "center"),))
        alpha = _coverage(world.render(scene, _REFERENCE_SIDE, _REFERENCE_SIDE))
        assert alpha is not None, "a large white shape on black is always found"
        references[kind] = _kind_features(alpha)
    return references


def _nearest_kind(features: np.ndarray) -> str:
    """The kind whose reference (fill, skew) is nearest to ``features``."""
    references = _reference_features()
    return min(references, key=lambda kind: float(np.linalg.norm(references[kind] - features)))
