"""The synthetic shapes world: scenes, captions, detector, held-out wording, and the shard writer."""

import dataclasses
import io
import json

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from pixart_lightning.shapes import world
from pixart_lightning.shapes.synth import MANIFEST, synthesize
from pixart_lightning.shapes.tiny_models import word_level_t5_tokenizer
from pixart_lightning.shapes.world import COLORS, NUM_CLASSES, Scene, Shape, shapes_corpus

PARAMS = dict(
    count=60,
    seed=0,
    resolution=32,
    buckets=[(32, 32), (24, 48), (48, 24)],
    two_shape_fraction=0.3,
    min_aesthetic=5.0,
    progress=False,
)
PAIR = Scene("white", (Shape("circle", "red", "large", "upper left"), Shape("square", "blue", "small", "lower right")))


def _read(folder, manifest) -> dict[str, dict]:
    urls = [str(folder / name) for name in manifest["shards"]]
    return {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    folder = tmp_path_factory.mktemp("world") / "shapes"
    manifest = synthesize(folder, samples_per_shard=25, **PARAMS)
    return folder, manifest, _read(folder, manifest)


# Scenes, captions, labels


def test_captions_read_naturally():
    """Both templates, one and two shapes, and the short caption."""
    single = Scene("white", PAIR.shapes[:1])
    assert world.dense_caption(single) == "a large red circle in the upper left on a white background"
    assert world.dense_caption(single, 1) == "a white background with a large red circle in the upper left"
    assert world.dense_caption(PAIR) == (
        "a large red circle in the upper left and a small blue square in the lower right on a white background"
    )
    assert world.short_caption(PAIR) == "red circle and blue square"
    assert "at the top" in world.dense_caption(Scene("red", (Shape("square", "blue", "small", "top"),)))


def test_class_labels_round_trip():
    """27 labels, each naming its first shape."""
    labels = {
        world.class_label(Scene("white" if c != "white" else "black", (Shape(k, c, "small", "center"),)))
        for k in world.SHAPES
        for c in COLORS
    }
    assert labels == set(range(NUM_CLASSES)) and NUM_CLASSES == 27
    assert world.class_name(world.class_label(PAIR)) == "red circle"


def test_sampled_scenes_are_valid():
    """Shape colors differ from the background; two shapes sit at different positions."""
    rng = np.random.default_rng(0)
    scenes = [world.sample_scene(rng, two_shape_fraction=0.5) for _ in range(300)]
    assert all(s.background != shape.color for s in scenes for shape in s.shapes)
    pairs = [s for s in scenes if len(s.shapes) == 2]
    assert 100 < len(pairs) < 200
    assert all(s.shapes[0].position != s.shapes[1].position for s in pairs)


def test_aesthetic_prefers_contrast_size_and_simplicity():
    """Scores lie in [1, 10]; higher for contrast, large shapes and single shapes."""
    rng = np.random.default_rng(3)
    scores = [world.aesthetic_score(world.sample_scene(rng, two_shape_fraction=0.5)) for _ in range(2000)]
    assert 1 <= min(scores) and max(scores) <= 10
    black_on_white = world.aesthetic_score(Scene("white", (Shape("circle", "black", "large", "center"),)))
    yellow_on_white = world.aesthetic_score(Scene("white", (Shape("circle", "yellow", "large", "center"),)))
    small = world.aesthetic_score(Scene("white", (Shape("circle", "black", "small", "center"),)))
    assert black_on_white > yellow_on_white and black_on_white > small
    assert world.aesthetic_score(Scene("white", PAIR.shapes[:1])) > world.aesthetic_score(PAIR)


def test_every_caption_word_is_a_whole_token():
    """All templates, positions and two-shape wording tokenize to one known piece per word."""
    tokenizer = word_level_t5_tokenizer(shapes_corpus())
    rng = np.random.default_rng(1)
    scenes = [PAIR] + [world.sample_scene(rng, two_shape_fraction=0.5) for _ in range(50)]
    for scene in scenes:
        for template in range(len(world.TEMPLATES)):
            caption = world.dense_caption(scene, template)
            pieces = tokenizer.convert_ids_to_tokens(tokenizer(caption).input_ids)
            assert pieces == ["▁" + w for w in caption.split()] + ["</s>"], caption


# Rendering and the detector


@pytest.mark.parametrize("size", [(16, 16), (24, 96), (64, 32)])
def test_render_any_size_keeps_shapes_inside(size):
    """Non-square sizes work; even large corner shapes leave the border ring plain background."""
    h, w = size
    for position in ("upper left", "lower right", "left", "top"):
        scene = Scene("black", (Shape("square", "white", "large", position),))
        image = world.render(scene, h, w)
        assert image.shape == (h, w, 3) and image.dtype == np.uint8
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        assert (border == 0).all() and image.max() == 255


def test_detector_reads_rendered_scenes():
    """≥ 99 % of single-shape scenes match at square and non-square sizes; swapped colors never do."""
    rng = np.random.default_rng(2)
    sizes = [(32, 32)] * 3 + [(24, 48), (48, 24), (16, 64), (16, 16)]
    right = swapped_right = total = 0
    for h, w in sizes:
        for _ in range(60):
            scene = world.sample_scene(rng)
            image = world.render(scene, h, w)
            shape = scene.shapes[0]
            swapped = Scene(shape.color, (dataclasses.replace(shape, color=scene.background),))
            right += world.matches(image, scene)
            swapped_right += world.matches(image, swapped)
            total += 1
    assert right >= 0.99 * total
    assert swapped_right == 0


@pytest.mark.parametrize("color", list(COLORS))
def test_plain_background_never_matches(color):
    """An image with no shape has no shape color, whatever is claimed."""
    image = np.full((32, 32, 3), COLORS[color], dtype=np.uint8)
    found = world.detect(image)
    assert found.background == color and found.shape_color is None and found.shape_fraction == 0
    other = "red" if color != "red" else "blue"
    assert not world.matches(image, Scene(color, (Shape("circle", other, "large", "center"),)))


# Held-out wording


def test_held_out_fraction_and_alignment_prompts():
    """About 10 % of captions are held out; alignment prompts are distinct held-out template-0 captions."""
    corpus = shapes_corpus()
    assert 0.08 < np.mean([world.is_held_out(c) for c in corpus]) < 0.12
    prompts = world.alignment_prompts(50, seed=0)
    assert prompts == world.alignment_prompts(50, seed=0) != world.alignment_prompts(50, seed=1)
    assert len({caption for caption, _ in prompts}) == 50
    for caption, scene in prompts:
        assert world.is_held_out(caption) and caption == world.dense_caption(scene, 0) and len(scene.shapes) == 1
    with pytest.raises(ValueError):
        world.alignment_prompts(10_000, seed=0)


# The shard writer


def test_shards_read_back_with_all_fields(written):
    """count samples, each with image, caption, label and metadata that agree with each other."""
    folder, manifest, samples = written
    assert sorted(samples) == [f"{i:08d}" for i in range(PARAMS["count"])]
    assert len(manifest["shards"]) == 3 and all((folder / name).is_file() for name in manifest["shards"])
    assert sum(manifest["bucket_counts"].values()) == PARAMS["count"]
    assert set(manifest["bucket_counts"]) == {"32x32", "24x48", "48x24"}
    for sample in samples.values():
        assert {"png", "txt", "cls", "json"} <= set(sample)
        meta = json.loads(sample["json"])
        scene = Scene(meta["scene"]["background"], tuple(Shape(**s) for s in meta["scene"]["shapes"]))
        image = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB"))
        assert image.shape == (meta["height"], meta["width"], 3) and meta["original_size"] == list(image.shape[:2])
        assert sample["txt"].decode() == meta["caption"] and int(sample["cls"]) == meta["label"]
        assert meta["label"] == world.class_label(scene) and meta["caption"] in {
            world.dense_caption(scene, t) for t in range(len(world.TEMPLATES))
        }
        if len(scene.shapes) == 1:
            assert world.matches(image, scene)


def test_filters_hold_in_written_data(written):
    """No held-out caption and no score under min_aesthetic is written; both filters did resample."""
    _, manifest, samples = written
    metas = [json.loads(s["json"]) for s in samples.values()]
    assert not any(world.is_held_out(m["caption"]) for m in metas)
    assert min(m["aesthetic"] for m in metas) >= PARAMS["min_aesthetic"]
    assert manifest["held_out_resamples"] > 0 and manifest["filtered_resamples"] > 0
    assert any(len(m["scene"]["shapes"]) == 2 for m in metas)


def test_samples_depend_only_on_seed_and_index(written, tmp_path):
    """Another sharding gives byte-identical samples; another seed gives other ones."""
    _, _, samples = written
    manifest = synthesize(tmp_path / "resharded", samples_per_shard=7, **PARAMS)
    resharded = _read(tmp_path / "resharded", manifest)
    fields = ("png", "txt", "cls", "json")
    assert all(resharded[k][f] == samples[k][f] for k in samples for f in fields)
    other = synthesize(tmp_path / "other", samples_per_shard=25, **{**PARAMS, "seed": 1, "count": 10})
    other_samples = _read(tmp_path / "other", other)
    assert sum(other_samples[k]["png"] != samples[k]["png"] for k in other_samples) >= 8


def test_complete_folder_is_reused(written, capsys):
    """Same parameters: the manifest comes back untouched; other parameters: an error, nothing overwritten."""
    folder, manifest, _ = written
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert synthesize(folder, samples_per_shard=25, **PARAMS) == manifest
    assert "Reusing" in capsys.readouterr().out
    with pytest.raises(FileExistsError):
        synthesize(folder, samples_per_shard=25, **{**PARAMS, "count": 61})
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps
    assert json.loads((folder / MANIFEST).read_text()) == manifest
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no partial folder left behind
