"""`pixart-lightning finetune` (`make finetune`): real photos -> ingest -> caption -> extract -> train -> export, with
before/after grids, offline on tiny models and a tiny starting checkpoint; every step resumes."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import skimage
from PIL import Image

from pixart_lightning.cli import main
from pixart_lightning.config import load_saved
from pixart_lightning.interop import save_weights
from pixart_lightning.interop.formats import to_diffusers_model
from pixart_lightning.models import PixArt
from pixart_lightning.runner.chain import plan
from pixart_lightning.runner.finetune import STEPS
from pixart_lightning.shapes.tiny_models import build_tiny_models
from stages import STAGE_MODULES
from tests.conftest import randomize, tiny_config
from tests.test_data_robustness import encoded
from tests.test_ingest_extract import all_samples

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = Path(skimage.__file__).parent / "data"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """The tiny T5 (width 32), VAE (factor 8) and LLaVA, and a tiny text-mode checkpoint to start from."""
    folder = tmp_path_factory.mktemp("tiny")
    models = build_tiny_models(folder)
    start = randomize(PixArt(tiny_config(caption_channels=32, in_channels=4, sample_size=4)))
    return models | {"start": save_weights(start, folder / "start.safetensors")}


def photos(folder: Path, captions: dict[str, str]) -> Path:
    """Four of scikit-image's photos, small, in three aspect ratios; a .txt caption beside those in ``captions``."""
    folder.mkdir(parents=True)
    for name, size in (("astronaut.png", (40, 40)), ("coffee.png", (60, 40)), ("chelsea.png", (45, 30)),
                       ("rocket.jpg", (30, 50))):
        with Image.open(PHOTOS / name) as image:
            image.convert("RGB").resize(size).save(folder / f"{Path(name).stem}.png")
    for stem, text in captions.items():
        (folder / f"{stem}.txt").write_text(text)
    return folder


def command(data: Path, out: Path, tiny: dict[str, Path], *extra: str) -> list[str]:
    """The finetune command line, shrunk to the tiny models: 32 px buckets, a 2-block model, 3 steps on the CPU."""
    return ["finetune", str(data), "--out", str(out), "--caption-model", str(tiny["llava"]), "--caption-tokens", "4",
            "--batch-size", "4", *extra,
            f"model.init_from={tiny['start']}", f"text_encoder.name={tiny['t5']}", "text_encoder.max_length=16",
            "text_encoder.dtype=fp32", f"vae.name={tiny['vae']}", "model.depth=2", "model.hidden_size=48",
            "model.num_heads=4", "model.patch_size=2", "model.gradient_checkpointing=false", "model.compile=false",
            "data.resolution=32", "data.global_batch_size=null", "data.batch_size=2", "data.num_workers=0",
            "data.shuffle_buffer=4", "optim.lr=0.01", "optim.warmup_steps=0", "optim.grad_clip=1.0",
            "train.max_steps=3", "train.accelerator=cpu", "train.precision=32", "train.progress_bar=false",
            "train.log_every=1", "samples.steps=2", "samples.cfg_scales=[1.0,4.5]", "samples.every_n_steps=0",
            "samples.prompts=[a cat,a cup of coffee]"]


def step_lines(printed: str) -> dict[str, str]:
    """The progress lines of each step, joined."""
    lines: dict[str, list[str]] = {}
    for line in printed.splitlines():
        for number, step in enumerate(STEPS, 1):
            if line.startswith(f"finetune [{number}/{len(STEPS)}] {step}: "):
                lines.setdefault(step, []).append(line)
    return {step: "\n".join(found) for step, found in lines.items()}


def test_photos_to_pipeline_with_missing_captions_then_everything_skipped(tmp_path, tiny, capsys) -> None:
    data = photos(tmp_path / "photos", {"astronaut": "an astronaut in front of a flag", "coffee": "a cup of coffee"})
    out = tmp_path / "run"
    assert main(command(data, out, tiny)) == 0
    first = step_lines(capsys.readouterr().out)
    assert set(first) == set(STEPS) and not any("skipped" in line for line in first.values())
    assert "kept 4 images" in first["ingest"] and "the 2 images without a caption" in first["caption"]

    # caption auto: own captions kept as dense.txt, the two without one captioned by LLaVA
    dense = {json.loads(s["json"])["source"].rsplit(":", 1)[-1]: s for s in all_samples(out / "data" / "captioned")}
    assert dense["astronaut"]["dense.txt"] == b"an astronaut in front of a flag"
    assert dense["coffee"]["dense.txt"] == dense["coffee"]["txt"] == b"a cup of coffee"
    assert "txt" not in dense["chelsea"] and dense["chelsea"]["dense.txt"].strip()
    assert "txt" not in dense["rocket"] and dense["rocket"]["dense.txt"].strip()
    features = json.loads((out / "data" / "features" / "manifest.json").read_text())
    assert features["count"] == 4 and features["caption_key"] == "dense.txt" and features["multi_scale"]
    assert len(features["bucket_counts"]) == 3

    # trained, before/after of the same prompts (2 cfg rows x 2 prompts), different weights, different pictures
    manifest = json.loads((out / "stage3" / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["parent"]["path"] == str(tiny["start"])
    before = np.asarray(Image.open(out / "samples" / "before.png"))
    after = np.asarray(Image.open(out / "samples" / "after.png"))
    assert before.shape == after.shape == (64, 64, 3) and (before != after).any()

    # the pipeline folder loads in diffusers and generates
    from diffusers import PixArtAlphaPipeline

    pipe = PixArtAlphaPipeline.from_pretrained(out / "pipeline")
    image = pipe("a cat", height=32, width=32, num_inference_steps=2, use_resolution_binning=False,
                 clean_caption=False, output_type="np").images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
    assert not (out / "lora").exists()

    # the same command again: every step skipped, nothing rewritten
    stamps = {p: p.stat().st_mtime_ns for p in (out / "stage3" / "final.safetensors", out / "samples" / "after.png",
                                               out / "pipeline" / "model_index.json")}
    assert main(command(data, out, tiny)) == 0
    again = step_lines(capsys.readouterr().out)
    assert set(again) == set(STEPS) and all(line.count("\n") == 0 and ": skipped" in line for line in again.values())
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps

    # other caption settings are refused on a folder captioned with these, not answered with its old captions
    errors = []
    for extra in (["--caption", "llava"], ["--caption-tokens", "5"]):
        assert main(command(data, out, tiny, *extra)) == 2
        errors.append(capsys.readouterr().err)
    assert all("holds captions made with other settings" in e and "another run folder (--out)" in e for e in errors)
    assert "max_new_tokens: 4 there, 5 asked" in errors[1]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_lora_writes_adapters_and_a_merged_pipeline(tmp_path, tiny, capsys) -> None:
    """Every photo captioned: nothing to caption, training reads txt; LoRA adapters as a PEFT folder and merged."""
    captions = {"astronaut": "an astronaut", "coffee": "coffee", "chelsea": "a cat", "rocket": "a rocket"}
    out = tmp_path / "run"
    assert main(command(photos(tmp_path / "photos", captions), out, tiny, "--lora", "4")) == 0
    lines = step_lines(capsys.readouterr().out)
    assert "every one of the 4 images has its own caption" in lines["caption"] and not (out / "data/captioned").exists()
    assert load_saved(out / "stage3" / "config.yaml").data.caption_key == "txt"
    assert (out / "stage3" / "final-lora.safetensors").is_file()
    assert json.loads((out / "lora" / "adapter_config.json").read_text())["r"] == 4

    # the starting weights (at the stage's resolution) with the exported PEFT adapters merged are the exported pipeline
    from diffusers import PixArtTransformer2DModel
    from peft import PeftModel

    exported = PixArtTransformer2DModel.from_pretrained(out / "pipeline" / "transformer").state_dict()
    cfg = load_saved(out / "stage3" / "config.yaml")
    base = to_diffusers_model(STAGE_MODULES[3].initial_model(cfg, None, 32))
    merged = PeftModel.from_pretrained(base, out / "lora").merge_and_unload().state_dict()
    assert merged.keys() == exported.keys()
    assert max((merged[k] - exported[k]).abs().max().item() for k in merged) < 1e-5
    assert any((merged[k] - base_k).abs().max() > 0 for k, base_k in
               to_diffusers_model(STAGE_MODULES[3].initial_model(cfg, None, 32)).state_dict().items())

    # LLaVA captions asked for afterwards: the features of the images' own captions are refused, not trained on
    assert main(command(tmp_path / "photos", out, tiny, "--lora", "4", "--caption", "llava")) == 2
    err = capsys.readouterr().err
    assert "holds features extracted with other settings (caption_key: 'txt' there, 'dense.txt' asked)" in err
    assert "another run folder (--out)" in err


def test_images_that_yield_nothing_stop_before_training_with_the_counts(tmp_path, tiny, capsys) -> None:
    data = tmp_path / "broken"
    data.mkdir()
    (data / "truncated.jpg").write_bytes(encoded(Image.new("RGB", (40, 40), (9, 9, 9)), "JPEG")[:200])
    (data / "empty.png").write_bytes(b"")
    (data / "notes.png").write_text("not an image")
    assert main(command(data, tmp_path / "run", tiny)) == 2
    err = capsys.readouterr().err
    assert "pixart-lightning finetune: error: no readable sample" in err and "undecodable" in err
    assert not (tmp_path / "run" / "stage3").exists() and not (tmp_path / "run" / "data" / "features").exists()


def test_a_stage_4_config_is_refused(tmp_path, capsys) -> None:
    """Distilling a few-step student is `pixart-lightning run`'s, though stage 4 is a text stage from init_from too."""
    config = tmp_path / "config"
    config.mkdir()
    shutil.copy(ROOT / "configs" / "finetune" / "base.yaml", config)
    (config / "stage4.yaml").write_text("samples: {sampler: lcm, steps: 4, cfg_scales: [1.0]}\n"
                                        "fid: {sampler: lcm, steps: 4, cfg_scale: 1.0}\n")
    assert main(["finetune", str(tmp_path / "photos"), "--config", str(config), f"out_dir={tmp_path / 'run'}"]) == 2
    assert "finetune trains a text stage (2 or 3) on your images, this folder's is stage 4 (use `pixart-lightning " \
           "run` for it)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_make_finetune_maps_data_caption_and_lora() -> None:
    printed = subprocess.run(["make", "-n", "finetune", "DATA=/photos a", "CAPTION=llava", "LORA=16",
                              "RUN_ARGS=train.max_steps=10"], cwd=ROOT, capture_output=True, text=True, check=True)
    (line,) = [line for line in printed.stdout.splitlines() if "pixart-lightning finetune" in line]
    assert line.endswith("pixart-lightning finetune /photos a --caption llava --lora 16 train.max_steps=10")


def test_finetune_config_is_the_released_512_model_in_buckets() -> None:
    """configs/finetune: XL/2 at 512 px from the released weights, the paper's stage-3 AdamW, aspect-ratio buckets
    without micro-conditions (the released 512 px model has none; diffusers feeds them at 1024 px only)."""
    (unit,) = plan(ROOT / "configs" / "finetune")
    cfg = unit.cfg
    model = cfg.pixart_config(caption_channels=4096)
    assert (cfg.model.init_from, cfg.data.resolution, cfg.data.multi_scale) == (
        "PixArt-alpha/PixArt-XL-2-512x512", 512, True)
    assert (model.depth, model.hidden_size, model.sample_size, model.micro_conditions) == (28, 1152, 64, False)
    o = cfg.optim
    assert (o.lr, o.weight_decay, o.eps, o.warmup_steps, o.grad_clip) == (2e-5, 0.03, 1e-10, 1000, 0.01)
    assert cfg.data.shards == f"{cfg.out_dir}/data/features" and not cfg.fid.enabled
