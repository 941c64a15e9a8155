"""The synthetic "shapes" world: scenes, rendering, captions, labels, a score, held-out wording and a detector."""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 128, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "purple": (128, 0, 128),
    "orange": (255, 165, 0),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
DETECTOR_COLORS: dict[str, tuple[int, int, int]] = COLORS | {"teal": (0, 128, 128)}
"""The detector's palette for a recoloured world (``make finetune-demo``): ``COLORS`` plus colours no scene, caption
or class label uses, so reading them off an image changes nothing the demo samples or counts. Teal is 128 from green
and gray, as far as the closest named colours are from each other."""
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
# Relative anchor (x, y) of each position; y grows downwards as in images.
POSITIONS: dict[str, tuple[float, float]] = {
    "center": (0.5, 0.5),
    "left": (0.2, 0.5),
    "right": (0.8, 0.5),
    "top": (0.5, 0.2),
    "bottom": (0.5, 0.8),
    "upper left": (0.2, 0.2),
    "upper right": (0.8, 0.2),
    "lower left": (0.2, 0.8),
    "lower right": (0.8, 0.8),
}
PHRASES = {name: "in the " + name for name in POSITIONS} | {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
TEMPLATES = ("{objects} on a {background} background", "a {background} background with {objects}")
SIZE_FRACTIONS = {"small": 0.3, "large": 0.55}  # diameter / side as a fraction of min(height, width)
NUM_CLASSES = len(SHAPES) * len(COLORS)
SHAPES_VOCAB: dict[str, tuple[str, ...]] = {
    "sizes": SIZES,
    "colors": tuple(COLORS),
    "shapes": SHAPES,
    "positions": tuple(POSITIONS),
    "templates": TEMPLATES,
}
"""The world's words and caption templates in one place (background is one of the colors)."""

_COLOR_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[c] for c in _COLOR_NAMES], dtype=np.float32)
# Two shapes sit on opposite sides (anchors 0.6 apart on some axis), so even two large ones barely overlap.
_TWO_SHAPE_POSITIONS = [
    (a, b)
    for a, b in itertools.permutations(POSITIONS, 2)
    if max(abs(pa - pb) for pa, pb in zip(POSITIONS[a], POSITIONS[b])) > 0.5
]
# Detector: the closest two named colors are 128 apart in RGB, so half of that separates shape from background.
_FAR = 64.0
_MIN_SHAPE_FRACTION = 0.002


@dataclass(frozen=True)
class Shape:
    """One shape of a scene."""

    kind: str
    color: str
    size: str
    position: str


@dataclass(frozen=True)
class Scene:
    """A plain background with one or two shapes."""

    background: str
    shapes: tuple[Shape, ...]


@dataclass(frozen=True)
class Detection:
    """What ``detect`` read off an image."""

    background: str
    shape_color: str | None
    shape_fraction: float


def sample_scene(rng: np.random.Generator, two_shape_fraction: float = 0.0) -> Scene:
    """A random scene: uniform background, shapes uniform over kinds, sizes, positions and the other colors."""
    background = _COLOR_NAMES[rng.integers(len(_COLOR_NAMES))]
    others = [c for c in _COLOR_NAMES if c != background]
    if rng.random() < two_shape_fraction:
        positions = _TWO_SHAPE_POSITIONS[rng.integers(len(_TWO_SHAPE_POSITIONS))]
    else:
        positions = (tuple(POSITIONS)[rng.integers(len(POSITIONS))],)
    shapes = tuple(
        Shape(SHAPES[rng.integers(len(SHAPES))], others[rng.integers(len(others))], SIZES[rng.integers(2)], p)
        for p in positions
    )
    return Scene(background, shapes)


def shape_box(size: str, position: str, height: int, width: int) -> tuple[float, float, float, float]:
    """Where a shape of ``size`` at ``position`` is drawn: its bounding box (x0, y0, x1, y1) in pixels (pixel i spans
    [i, i + 1]), centred on the position's anchor but kept 1 px inside the image."""
    side = SIZE_FRACTIONS[size] * min(height, width)
    half = side / 2
    ax, ay = POSITIONS[position]
    cx = min(max(ax * width, half + 1), width - half - 1)
    cy = min(max(ay * height, half + 1), height - half - 1)
    return cx - half, cy - half, cx + half, cy + half


def render_image(
    scene: Scene, height: int, width: int, supersample: int = 4,
    recolor: Mapping[str, Sequence[int]] | None = None,
) -> Image.Image:
    """Draw the scene as an RGB PIL image, antialiased by drawing ``supersample``× larger and box-filtering.

    ``recolor`` paints named colours with other RGB values (``{"red": (0, 128, 128)}``: every red shape or
    background drawn teal), leaving the scene, and so its caption and label, as they are.
    """
    rgb = COLORS | {name: tuple(int(v) for v in value) for name, value in (recolor or {}).items()}
    s = supersample
    image = Image.new("RGB", (width * s, height * s), rgb[scene.background])
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        x0, y0, x1, y1 = (v * s for v in shape_box(shape.size, shape.position, height, width))
        fill = rgb[shape.color]
        if shape.kind == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)  # PIL boxes include their far edge
        elif shape.kind == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return image.resize((width, height), Image.Resampling.BOX) if s > 1 else image


def render(
    scene: Scene, height: int, width: int, supersample: int = 4, recolor: Mapping[str, Sequence[int]] | None = None
) -> np.ndarray:
    """Draw the scene as uint8 (height, width, 3); see ``render_image``."""
    return np.asarray(render_image(scene, height, width, supersample, recolor))


def short_caption(scene: Scene) -> str:
    """E.g. "red circle", or "red circle and blue square"."""
    return " and ".join(f"{s.color} {s.kind}" for s in scene.shapes)


def dense_caption(scene: Scene, template: int = 0) -> str:
    """The full description with template ``template`` of ``TEMPLATES``."""
    objects = " and ".join(f"a {s.size} {s.color} {s.kind} {PHRASES[s.position]}" for s in scene.shapes)
    return TEMPLATES[template].format(objects=objects, background=scene.background)


def caption_for(scene: Scene, rng: np.random.Generator, templates: Sequence[int] | None = None) -> str:
    """The dense caption with a template chosen uniformly by ``rng`` (among ``templates``, default all)."""
    choices = list(templates) if templates else list(range(len(TEMPLATES)))
    return dense_caption(scene, choices[int(rng.integers(len(choices)))])


def class_label(scene: Scene) -> int:
    """Class of the first shape: kind-major, then color, in ``range(NUM_CLASSES)``."""
    first = scene.shapes[0]
    return SHAPES.index(first.kind) * len(COLORS) + _COLOR_NAMES.index(first.color)


def class_name(label: int) -> str:
    """The short caption of a class label, e.g. "red circle"."""
    kind, color = divmod(label, len(COLORS))
    return f"{_COLOR_NAMES[color]} {SHAPES[kind]}"


def aesthetic_score(scene: Scene) -> float:
    """A made-up aesthetic score in [1, 10]: contrast and size, a little less for busy scenes.

    Per shape, ``contrast = (|rgb - rgb_bg| / (255·√3) + |Y - Y_bg| / 255) / 2`` with luma Y = .299R + .587G + .114B,
    and ``quality = 0.85·contrast + 0.15·[large]``; the score is ``1 + 9 · mean(quality) · (0.85 if two shapes)``.
    Measured on 20k sampled scenes, ≥ 5.0 keeps 50 % of single-shape ones (48 % with a quarter two-shape scenes).
    """
    # Plain Python: this runs once or more per written sample, and numpy's per-call overhead dominated.
    bg = COLORS[scene.background]
    qualities = []
    for shape in scene.shapes:
        diff = [a - b for a, b in zip(COLORS[shape.color], bg)]
        luma = 0.299 * diff[0] + 0.587 * diff[1] + 0.114 * diff[2]
        contrast = (math.hypot(*diff) / (255 * math.sqrt(3)) + abs(luma) / 255) / 2
        qualities.append(0.85 * contrast + 0.15 * (shape.size == "large"))
    busy = 0.85 if len(scene.shapes) > 1 else 1.0
    return 1 + 9 * sum(qualities) / len(qualities) * busy


def is_held_out(caption: str) -> bool:
    """Whether this exact wording is kept out of training (a fixed ~10 % of captions, by SHA-1)."""
    return int.from_bytes(hashlib.sha1(caption.encode("utf-8")).digest()[:8], "big") % 10 == 0


def _single_shape_scenes() -> Iterator[Scene]:
    """Every single-shape scene, in a fixed order."""
    for size, color, kind, position, background in itertools.product(
        SIZES, _COLOR_NAMES, SHAPES, POSITIONS, _COLOR_NAMES
    ):
        if background != color:
            yield Scene(background, (Shape(kind, color, size, position),))


def held_out_prompts() -> list[tuple[str, Scene]]:
    """Every single-shape scene whose template-0 caption is held out, with that caption, in a fixed order."""
    return [(caption, scene) for scene in _single_shape_scenes() if is_held_out(caption := dense_caption(scene))]


def alignment_prompts(n: int, seed: int) -> list[tuple[str, Scene]]:
    """``n`` distinct single-shape scenes whose template-0 caption is held out, with that caption."""
    pool = held_out_prompts()
    if n > len(pool):
        raise ValueError(f"only {len(pool)} held-out single-shape prompts exist, {n} were asked for")
    order = np.random.default_rng(seed).permutation(len(pool))[:n]
    return [pool[i] for i in order]


def shapes_corpus() -> list[str]:
    """Every single-shape caption with every template, plus two-shape ones so the joining wording is covered too."""
    corpus = [dense_caption(scene, t) for scene in _single_shape_scenes() for t in range(len(TEMPLATES))]
    pair = Scene("white", (Shape("circle", "red", "large", "upper left"), Shape("square", "blue", "small", "right")))
    return corpus + [dense_caption(pair, t) for t in range(len(TEMPLATES))]


def _nearest_color(rgb: np.ndarray, colors: Mapping[str, Sequence[int]] = COLORS) -> str:
    """The named color of ``colors`` nearest to ``rgb`` in Euclidean RGB distance."""
    palette = _PALETTE if colors is COLORS else np.array(list(colors.values()), dtype=np.float32)
    return list(colors)[int(np.argmin(np.linalg.norm(palette - rgb, axis=1)))]


@dataclass(frozen=True)
class ColorSplit:
    """An image told apart into background and shape, before any colour is named."""

    background: np.ndarray
    """RGB of the background: the median border pixel."""
    shape: np.ndarray | None
    """RGB of the shape: the median of its core pixels; None when too few pixels differ from the background."""
    far: np.ndarray
    """(height, width) bool: the pixels clearly not background colour."""


def split_colors(image: np.ndarray) -> ColorSplit:
    """The background colour, the shape colour and the clearly non-background pixels of an (H, W, 3+) image."""
    pixels = np.asarray(image, dtype=np.float32)[..., :3]
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    bg_rgb = np.median(border, axis=0)
    distance = np.linalg.norm(pixels - bg_rgb, axis=-1)
    far = distance > _FAR
    if far.sum() < max(2, _MIN_SHAPE_FRACTION * far.size):
        return ColorSplit(bg_rgb, None, far)
    # Antialiased edges are blends that can sit nearer a third color; keep the pixels at least half as far from the
    # background as the far end of the shape (90th percentile, robust to a few noisy pixels).
    far_distance = distance[far]
    core = pixels[far][far_distance >= 0.5 * np.percentile(far_distance, 90)]
    return ColorSplit(bg_rgb, np.median(core, axis=0), far)


def detect(image: np.ndarray, colors: Mapping[str, Sequence[int]] = COLORS) -> Detection:
    """Read the background and the shape color of ``split_colors``, each named by the nearest colour of ``colors``
    (``DETECTOR_COLORS`` reads teal too)."""
    split = split_colors(image)
    shape_color = None if split.shape is None else _nearest_color(split.shape, colors)
    return Detection(_nearest_color(split.background, colors), shape_color, float(split.far.mean()))


def matches(image: np.ndarray, scene: Scene) -> bool:
    """Whether the image shows the scene's background and its first shape's color."""
    found = detect(image)
    return found.background == scene.background and found.shape_color == scene.shapes[0].color
