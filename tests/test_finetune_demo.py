"""`make finetune-demo`: the teal world (red painted teal, captions as before), the detector's teal and the report."""

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from pixart_lightning.config import load_stage
from pixart_lightning.evaluation import alignment as alignment_module
from pixart_lightning.evaluation.alignment import recolor_alignment
from pixart_lightning.shapes import world
from pixart_lightning.shapes.synth import synthesize

TEAL = world.DETECTOR_COLORS["teal"]
RECOLOR = {"red": TEAL}
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "finetune-demo"


def test_teal_is_the_detectors_only():
    """The scenes, captions and labels use COLORS as before; only the detector's palette adds teal."""
    assert TEAL == (0, 128, 128) and "teal" not in world.COLORS
    assert world.DETECTOR_COLORS == world.COLORS | {"teal": TEAL}
    assert world.NUM_CLASSES == 27 and world.SHAPES_VOCAB["colors"] == tuple(world.COLORS)
    rng = np.random.default_rng(0)
    assert all("teal" not in world.dense_caption(world.sample_scene(rng, 0.5)) for _ in range(500))


def test_detector_finds_teal_on_teal_renders():
    """≥ 99 % of red shapes rendered teal read as teal (and the background as itself); red ones never do."""
    rng = np.random.default_rng(4)
    teal = red = total = 0
    for h, w in [(32, 32), (24, 48), (48, 24), (16, 16)]:
        for _ in range(60):
            scene = world.sample_scene(rng)
            shape = dataclasses.replace(scene.shapes[0], color="red")
            scene = world.Scene("white" if scene.background == "red" else scene.background, (shape,))
            found = world.detect(world.render(scene, h, w, recolor=RECOLOR), world.DETECTOR_COLORS)
            teal += found.shape_color == "teal" and found.background == scene.background
            red += world.detect(world.render(scene, h, w), world.DETECTOR_COLORS).shape_color == "teal"
            total += 1
    assert teal >= 0.99 * total
    assert red == 0


def test_recolor_paints_only_the_named_colour():
    """A teal-for-red render differs from the plain one exactly where red was drawn; other scenes are untouched."""
    red_on_blue = world.Scene("blue", (world.Shape("circle", "red", "large", "center"),))
    plain, teal = world.render(red_on_blue, 32, 32), world.render(red_on_blue, 32, 32, recolor=RECOLOR)
    changed = (plain != teal).any(axis=-1)
    assert changed.any() and (plain[~changed] == (0, 0, 255)).all()
    red_pixels = (plain == (255, 0, 0)).all(axis=-1)
    assert red_pixels.any() and (teal[red_pixels] == TEAL).all()
    green_on_red = world.Scene("red", (world.Shape("square", "green", "small", "left"),))
    assert (world.render(green_on_red, 24, 24, recolor=RECOLOR)[0, 0] == TEAL).all()
    no_red = world.Scene("white", (world.Shape("square", "green", "small", "left"),))
    assert (world.render(no_red, 24, 24, recolor=RECOLOR) == world.render(no_red, 24, 24)).all()


def _samples(folder: Path, manifest: dict) -> dict[str, dict]:
    urls = [str(folder / name) for name in manifest["shards"]]
    return {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)}


def test_recolored_world_keeps_scenes_captions_and_labels(tmp_path):
    """Same seed: the same captions, labels and metadata; only red pixels turn teal. The manifest pins the swap."""
    params = {"count": 40, "seed": 5, "resolution": 24, "progress": False}
    plain_manifest = synthesize(tmp_path / "plain", **params)
    teal_manifest = synthesize(tmp_path / "teal", recolor=RECOLOR, **params)
    assert plain_manifest["recolor"] is None and teal_manifest["recolor"] == {"red": [0, 128, 128]}
    plain, teal = _samples(tmp_path / "plain", plain_manifest), _samples(tmp_path / "teal", teal_manifest)
    assert plain.keys() == teal.keys()
    for key, sample in plain.items():
        assert (sample["txt"], sample["cls"], sample["json"]) == (teal[key]["txt"], teal[key]["cls"], teal[key]["json"])
        scene = json.loads(sample["json"])["scene"]
        shows_red = "red" in {scene["background"], *(s["color"] for s in scene["shapes"])}
        assert (sample["png"] != teal[key]["png"]) == shows_red
        if shows_red:
            pixels = np.asarray(Image.open(io.BytesIO(teal[key]["png"])).convert("RGB"))
            assert not (pixels == (255, 0, 0)).all(axis=-1).any() and (pixels == TEAL).all(axis=-1).any()
    with pytest.raises(FileExistsError, match="recolor"):
        synthesize(tmp_path / "plain", recolor=RECOLOR, **params)
    with pytest.raises(ValueError, match="recolor"):
        synthesize(tmp_path / "other", recolor={"teal": (1, 2, 3)}, **params)


@dataclasses.dataclass
class _TextModel:
    cfg: object = dataclasses.field(default_factory=lambda: type("Cfg", (), {"mode": "text"})())


@pytest.mark.parametrize("painted", [True, False])
def test_recolor_alignment_on_clean_renders(monkeypatch, painted):
    """With the world's own renders as the "model": red prompts read teal only when painted teal, and the prompts
    without red align either way."""
    scenes = dict(world.held_out_prompts())
    recolor = RECOLOR if painted else None

    def renders(model, vae, *, prompts, height, width, **_):
        images = [world.render(scenes[p], height, width, recolor=recolor) for p in prompts]
        return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)

    monkeypatch.setattr(alignment_module, "generate", renders)
    scores = recolor_alignment(_TextModel(), None, None, {"red": "teal"}, num=24, batch_size=10)
    assert scores["num_recolored_prompts"] == scores["num_untouched_prompts"] == 24
    assert scores["untouched_alignment"] == 1.0
    assert scores["recolored"] == scores["recolored_alignment"] == (1.0 if painted else 0.0)


def test_recolor_alignment_refuses_unknown_colours():
    with pytest.raises(ValueError, match="DETECTOR_COLORS"):
        recolor_alignment(_TextModel(), None, None, {"red": "mauve"})


def test_config_fine_tunes_the_demo_with_lora():
    """The demo's own base (model, encoders, sampling), its stage-3 weights, LoRA on, and data written apart."""
    cfg = load_stage(CONFIG, 3)
    demo = load_stage(CONFIG.parent / "demo", 3)
    assert cfg.name == "finetune-demo" and cfg.model.init_from == "runs/demo/stage3/final-ema.safetensors"
    assert cfg.model.lora is not None and cfg.data.shards != demo.data.shards
    # The demo's stage-3 world, red painted teal: same seed, count and buckets.
    assert dataclasses.replace(cfg.data.synth, recolor={}) == demo.data.synth
    assert cfg.data.synth.recolor == {"red": "teal"}
    assert cfg.pixart_config(caption_channels=32) == demo.pixart_config(caption_channels=32)
    assert (cfg.data.resolution, cfg.data.multi_scale, cfg.data.min_aesthetic) == (
        demo.data.resolution, demo.data.multi_scale, demo.data.min_aesthetic)
    assert (CONFIG / "base.yaml").resolve() == (CONFIG.parent / "demo" / "base.yaml").resolve()


def test_config_recolor_writes_the_teal_world(tmp_path):
    """``data.synth.recolor`` names colours; the runner paints them as the detector reads them."""
    from pixart_lightning.config import ConfigError
    from pixart_lightning.runner.inputs import prepare_data

    cfg = load_stage(CONFIG, 3, [f"data.shards={tmp_path / 'teal'}", "data.synth.count=4", "data.multi_scale=false",
                                 "train.progress_bar=false"])
    prepare_data(cfg, granularity=4)
    manifest = json.loads((tmp_path / "teal" / "world.json").read_text())
    assert manifest["recolor"] == {"red": list(TEAL)}
    bad = load_stage(CONFIG, 3, [f"data.shards={tmp_path / 'bad'}", "data.synth.recolor.red=mauve"])
    with pytest.raises(ConfigError, match=r"data.synth.recolor.red=mauve: .*teal"):
        prepare_data(bad, granularity=4)
