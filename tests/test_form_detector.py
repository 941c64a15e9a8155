"""The form detector (shapes/form.py) on the world's renders, and the per-attribute alignment it scores."""

import dataclasses
import itertools

import numpy as np
import pytest
import torch

from pixart_lightning.data.buckets import bucket_table
from pixart_lightning.evaluation import alignment as alignment_module
from pixart_lightning.evaluation.alignment import ATTRIBUTES, alignment, attribute_accuracies, attribute_line
from pixart_lightning.shapes import form, world
from pixart_lightning.shapes.world import Scene, Shape

# The demo's sizes: stage 2 at 24 px; stage 3 at 32 px in buckets 0.5-2.0 (PixArt-tiny/4 in pixel space steps by
# 4 px), whose square one is where its alignment is scored.
DEMO_SIZES = [(24, 24)] + [size for ratio, size in bucket_table(32, 4).items() if 0.5 <= ratio <= 2.0]
FORMS = list(itertools.product(world.SHAPES, world.SIZES, world.POSITIONS))


def _random_colours(rng: np.random.Generator) -> tuple[str, str]:
    background, color = rng.choice(list(world.COLORS), size=2, replace=False)
    return str(background), str(color)


@pytest.mark.parametrize("size", DEMO_SIZES, ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_reads_every_form_at_demo_sizes(size):
    """≥ 99 % per attribute over every kind x size x position, twice with random colours, at each demo size."""
    rng = np.random.default_rng(sum(size))
    right = dict.fromkeys(("kind", "size", "position"), 0)
    for (kind, size_name, position), _ in itertools.product(FORMS, range(2)):
        background, color = _random_colours(rng)
        shape = Shape(kind, color, size_name, position)
        found = form.read_form(world.render(Scene(background, (shape,)), *size))
        for name in right:
            right[name] += found is not None and getattr(found, name) == getattr(shape, name)
    assert {name: count / (2 * len(FORMS)) for name, count in right.items()} == pytest.approx(
        dict.fromkeys(right, 1.0), abs=0.01)


def test_reads_form_through_noise_and_specks():
    """Generated images are noisy: pixel noise and a few stray far pixels leave the form as drawn (≥ 95 %)."""
    rng = np.random.default_rng(0)
    right = total = 0
    for _ in range(150):
        scene = world.sample_scene(rng)
        image = world.render(scene, 32, 32).astype(np.float32) + rng.normal(0, 15, (32, 32, 3))
        image[rng.integers(0, 32, 3), rng.integers(0, 32, 3)] = rng.integers(0, 256, (3, 3))
        found = form.read_form(np.clip(image, 0, 255).astype(np.uint8))
        shape = scene.shapes[0]
        right += found == form.Form(shape.kind, shape.size, shape.position)
        total += 1
    assert right >= 0.95 * total


def test_plain_background_has_no_form():
    assert form.read_form(np.full((24, 24, 3), world.COLORS["blue"], dtype=np.uint8)) is None


def test_specks_whose_median_is_the_background_have_no_form():
    """Far pixels of opposite colours can have the background as their median colour: no shape colour to measure
    coverage against, so no form (this crashed an alignment eval of an early, speckled model)."""
    image = np.full((24, 24, 3), world.COLORS["blue"], dtype=np.uint8)
    for x, colour in enumerate([(255, 0, 255), (255, 0, 255), (0, 255, 255), (0, 255, 255), (0, 0, 0)]):
        image[5, 4 * x] = colour
    assert form.read_form(image) is None


@dataclasses.dataclass
class _Model:
    mode: str = "text"

    @property
    def cfg(self):
        return self


def _fake_generate(monkeypatch, draw):
    """Make ``alignment``'s model draw, for each asked scene, ``draw(scene)`` with the world's renderer."""
    scenes = dict(world.held_out_prompts())

    def renders(model, vae, *, prompts=None, labels=None, height, width, **_):
        images = [world.render(draw(scenes[p]), height, width) for p in prompts]
        return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)

    monkeypatch.setattr(alignment_module, "generate", renders)


def _first_shape(scene: Scene, **changes) -> Scene:
    return Scene(scene.background, (dataclasses.replace(scene.shapes[0], **changes),))


OTHER_KIND = {"circle": "square", "square": "triangle", "triangle": "circle"}
OTHER_SIZE = {"small": "large", "large": "small"}
OTHER_POSITION = {"center": "upper left", "left": "right", "right": "left", "top": "bottom", "bottom": "top",
                  "upper left": "lower right", "upper right": "lower left", "lower left": "upper right",
                  "lower right": "upper left"}


@pytest.mark.parametrize(("wrong", "draw"), [
    (None, lambda scene: scene),
    ("shape", lambda scene: _first_shape(scene, kind=OTHER_KIND[scene.shapes[0].kind])),
    ("size", lambda scene: _first_shape(scene, size=OTHER_SIZE[scene.shapes[0].size])),
    ("position", lambda scene: _first_shape(scene, position=OTHER_POSITION[scene.shapes[0].position])),
])
def test_alignment_scores_each_attribute(monkeypatch, wrong, draw):
    """Drawn as asked, every attribute scores 1; with one attribute drawn otherwise (a circle where a square was
    asked...), that one and "all right" score 0 while the colour alignment stays 1."""
    _fake_generate(monkeypatch, draw)
    result = alignment(_Model(), None, None, num=24, batch_size=10, height=24, width=24)
    expected = {name: 0.0 if name in (wrong, "all right") and wrong else 1.0 for name in ATTRIBUTES}
    assert attribute_accuracies(result) == expected
    assert result["alignment"] == result["both_accuracy"] == 1.0


def test_attribute_line_names_what_a_class_label_asks():
    """A class model (stage 1) is asked a colour and a kind only; results from before the form was read show what
    they have."""
    text = {"mode": "text", **{key: 0.5 for key in ATTRIBUTES.values()}}
    assert attribute_line(text) == ("background 0.50  colour 0.50  shape 0.50  position 0.50  size 0.50  "
                                    "all right 0.50")
    assert attribute_line(text | {"mode": "class"}) == "colour 0.50  shape 0.50"
    old = {"mode": "text", "background_accuracy": 1.0, "shape_accuracy": 0.25, "both_accuracy": 0.25}
    assert attribute_accuracies(old) == {"background": 1.0, "colour": 0.25}
