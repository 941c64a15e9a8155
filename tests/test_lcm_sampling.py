"""Few-step sampling of a stage-4 (consistency-distilled) model: the lcm sampler, how the commands pick it, the
exported LCM pipeline, and the end-of-stage comparison with the teacher."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_model
from PIL import Image
from test_fid import StubEncoder

from pixart_lightning.cli import main
from pixart_lightning.config import FIDSection, load_stage, to_yaml
from pixart_lightning.diffusion import sample
from pixart_lightning.diffusion.consistency import lcm_scheduler
from pixart_lightning.diffusion.gaussian_diffusion import randn
from pixart_lightning.diffusion.schedule import linear_betas
from pixart_lightning.encoders.vae import PixelSpace
from pixart_lightning.evaluation import few_step
from pixart_lightning.evaluation import generate as generate_module
from pixart_lightning.evaluation.few_step import compare_few_step, comparison_fid, comparison_lines
from pixart_lightning.interop import save_weights
from pixart_lightning.runner.distilled import sampling_choice, teacher_weights
from pixart_lightning.runner.report import print_summary
from pixart_lightning.runner.unit import Unit
from pixart_lightning.shapes.tiny_models import build_tiny_t5, build_tiny_vae

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo"
TEXT = {"y": torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1)), "mask": torch.ones(2, 5)}


@pytest.fixture(scope="module")
def plain_t5_and_vae(tmp_path_factory):
    """The tiny T5 without its position code (diffusers' pipeline cannot add one) and the tiny VAE."""
    folder = tmp_path_factory.mktemp("plain")
    return build_tiny_t5(folder / "t5", position_code=False), build_tiny_vae(folder / "vae")


def stage4_folder(folder: Path, t5: Path, vae: Path, prediction: str = "v") -> Path:
    """A finished stage-4 folder: a tiny text model's final weights, a saved config with stage 4 and its
    ``distill.steps`` (1, 2, 4, 8), and a manifest naming the encoders."""
    save_weights(tiny_model(caption_channels=32, sample_size=4), folder / "final.safetensors", prediction)
    cfg = load_stage(DEMO, 4)
    (folder / "config.yaml").write_text(to_yaml(cfg))
    manifest = {"text_encoder": str(t5), "vae": str(vae), "resolution": 32, "prediction": prediction}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_lcm_sampler_is_deterministic_per_seed_and_refuses_guidance():
    model = tiny_model()

    def draw(seed: int, steps: int = 4) -> torch.Tensor:
        return sample(model, (2, 4, 8, 8), TEXT, sampler="lcm", steps=steps, cfg_scale=1.0,
                      generator=torch.Generator().manual_seed(seed))

    first, again, other = draw(0), draw(0), draw(1)
    assert first.shape == (2, 4, 8, 8) and torch.isfinite(first).all()
    assert torch.equal(first, again) and not torch.allclose(first, other)
    assert not torch.allclose(first, draw(0, steps=2))
    with pytest.raises(ValueError, match="guidance is folded in: sample it with cfg_scale=1"):
        sample(model, (2, 4, 8, 8), TEXT, sampler="lcm", steps=4)  # the default guidance, 4.5


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_one_lcm_step_is_the_consistency_function_of_the_noise(prediction):
    """One step maps x_T to c_skip(T)·x_T + c_out(T)·x̂_0, with x̂_0 from our own schedule's ᾱ_T and the scalings
    from diffusers' LCMScheduler, at T = 999 (the top of the 50-step skipping schedule)."""
    model = tiny_model()
    x0 = sample(model, (2, 4, 8, 8), TEXT, sampler="lcm", steps=1, cfg_scale=1.0, prediction=prediction,
                generator=torch.Generator().manual_seed(5))
    noise = randn((2, 4, 8, 8), torch.Generator().manual_seed(5))
    t = 999
    alpha_bar = float(np.cumprod(1 - linear_betas())[t])
    with torch.no_grad():
        out = model(noise, torch.full((2,), t), **TEXT)[:, :4]
    if prediction == "epsilon":
        predicted = (noise - (1 - alpha_bar) ** 0.5 * out) / alpha_bar**0.5
    else:
        predicted = alpha_bar**0.5 * noise - (1 - alpha_bar) ** 0.5 * out
    scheduler = lcm_scheduler(prediction)
    scheduler.set_timesteps(1)
    assert scheduler.timesteps.tolist() == [t]
    c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(t)
    assert 0 < c_skip < 1e-5 < c_out  # at the top of the schedule the prediction is almost all of it
    torch.testing.assert_close(x0, c_skip * noise + c_out * predicted, rtol=1e-5, atol=1e-5)


def test_a_stage4_folder_samples_with_lcm_at_its_distilled_steps_only(tmp_path, plain_t5_and_vae):
    folder = stage4_folder(tmp_path / "stage4", *plain_t5_and_vae)
    chosen = sampling_choice(folder)
    assert (chosen.sampler, chosen.steps, chosen.cfg_scale) == ("lcm", 4, 1.0)
    assert sampling_choice(folder / "final.safetensors", steps=8).steps == 8  # a weights file in the folder
    with pytest.raises(ValueError, match=r"--steps 3: .* was distilled for 1, 2, 4, 8 steps; pass one of those"):
        sampling_choice(folder, steps=3)
    with pytest.raises(ValueError, match="drop --cfg 4.5"):
        sampling_choice(folder, cfg_scale=4.5)
    with pytest.raises(ValueError, match="samples with --sampler lcm only"):
        sampling_choice(folder, sampler="dpm++")
    elsewhere = tmp_path / "model.safetensors"
    save_weights(tiny_model(), elsewhere)
    assert sampling_choice(elsewhere).given() == {}  # dpm++ and guidance 4.5, the callee's defaults
    assert sampling_choice(elsewhere, sampler="lcm").given() == {"sampler": "lcm", "cfg_scale": 1.0}


def test_sample_command_picks_lcm_for_stage4_and_dpm_otherwise(tmp_path, plain_t5_and_vae, monkeypatch, capsys):
    """What `sample` hands to generation, and the one-line refusal of a step count the student was not trained for."""
    seen = []

    def recording_generate(model, vae, **kwargs):
        seen.append({k: kwargs.get(k) for k in ("sampler", "steps", "cfg_scale")})
        return torch.zeros(len(kwargs["prompts"]), 3, 32, 32, dtype=torch.uint8)

    monkeypatch.setattr(generate_module, "generate", recording_generate)
    t5, vae = plain_t5_and_vae
    stage4 = stage4_folder(tmp_path / "stage4", t5, vae)
    stage3 = tmp_path / "stage3"
    save_weights(tiny_model(caption_channels=32, sample_size=4), stage3 / "final.safetensors")
    (stage3 / "manifest.json").write_text(json.dumps({"text_encoder": str(t5), "vae": str(vae), "resolution": 32}))
    common = ["--prompt", "a red circle", "--num", "1", "--out", str(tmp_path / "out")]
    assert main(["sample", "--ckpt", str(stage4), *common]) == 0
    assert main(["sample", "--ckpt", str(stage4), "--steps", "2", *common]) == 0
    assert main(["sample", "--ckpt", str(stage3), *common]) == 0
    assert seen == [{"sampler": "lcm", "steps": 4, "cfg_scale": 1.0}, {"sampler": "lcm", "steps": 2, "cfg_scale": 1.0},
                    {"sampler": None, "steps": None, "cfg_scale": None}]  # generate's defaults: dpm++, 20, 4.5
    capsys.readouterr()
    assert main(["sample", "--ckpt", str(stage4), "--steps", "3", *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was distilled for 1, 2, 4, 8 steps" in err[0] and "Traceback" not in err[0]
    assert main(["eval", "alignment", "--ckpt", str(stage4), "--steps", "5"]) == 2


@pytest.mark.parametrize("steps", [1, 4])
def test_exported_lcm_pipeline_draws_what_sample_draws(tmp_path, plain_t5_and_vae, steps, capsys):
    """`export-pipeline` of a stage-4 folder carries LCMScheduler; PixArtAlphaPipeline with guidance_scale=1.0 (no
    classifier-free guidance) draws the image `sample` draws for the same seed, to one level of rounding: both draw
    the starting noise and each step's re-noising from the one generator in the same order, the transformer agrees to
    1e-5, and the PNG rounds to uint8 where the pipeline returns floats."""
    from diffusers import LCMScheduler, PixArtAlphaPipeline

    t5, vae = plain_t5_and_vae
    folder = stage4_folder(tmp_path / "stage4", t5, vae)
    prompt, seed = "a red circle", 3
    assert main(["export-pipeline", str(folder), str(tmp_path / "pipe"), "--text-encoder", str(t5), "--vae", str(vae)]) == 0
    assert "call it with guidance_scale=1.0" in capsys.readouterr().out
    pipe = PixArtAlphaPipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(pipe.scheduler, LCMScheduler) and pipe.scheduler.config.prediction_type == "v_prediction"
    theirs = pipe(prompt, height=32, width=32, num_inference_steps=steps, guidance_scale=1.0, output_type="pt",
                  use_resolution_binning=False, clean_caption=False, generator=torch.Generator().manual_seed(seed))
    assert main(["sample", "--ckpt", str(folder), "--prompt", prompt, "--num", "1", "--steps", str(steps),
                 "--seed", str(seed), "--out", str(tmp_path / "ours")]) == 0
    ours = torch.from_numpy(np.array(Image.open(tmp_path / "ours" / "000-00.png"))).float()
    assert (theirs.images[0].permute(1, 2, 0) * 255 - ours).abs().max() <= 1.0
    guided = pipe(prompt, height=32, width=32, num_inference_steps=steps, guidance_scale=4.5, output_type="pt",
                  use_resolution_binning=False, clean_caption=False, generator=torch.Generator().manual_seed(seed))
    assert (guided.images[0].permute(1, 2, 0) * 255 - ours).abs().max() > 1.0  # diffusers' default would guide again


def test_the_comparison_fid_is_capped_below_fid_30k() -> None:
    """At XL scale (fid.num_images 30000, five contenders) the rank-0 comparison would outlast the process group."""
    assert comparison_fid(FIDSection(num_images=30000)).num_images == few_step.COMPARISON_FID_IMAGES == 1000
    assert comparison_fid(FIDSection(num_images=300, steps=8)) == FIDSection(num_images=300, steps=8)


def test_stage4_summary_compares_every_step_count_with_the_teacher(tmp_path, world_shards, capsys, monkeypatch):
    """The comparison has the student at 1, 2, 4 and 8 steps and the teacher at 20, each with alignment, FID (on at
    most COMPARISON_FID_IMAGES images: 2 here, of fid.num_images 3) and time per image; the run summary prints them
    under the stage-4 line, with the FID's image count and the command for the full FID. The teacher is the parent
    stage's EMA."""
    monkeypatch.setattr(few_step, "COMPARISON_FID_IMAGES", 2)
    fid = {"reference": world_shards, "extractor": "tiny", "resize": 32, "num_images": 3, "batch_size": 2, "reference_count": 16,
           "cache_dir": tmp_path / "fid-cache"}
    cfg = load_stage(DEMO, 3, [f"out_dir={tmp_path}", "eval.alignment_prompts=2", "data.resolution=8",
                               "samples.prompts=[a red circle]", *(f"fid.{key}={value}" for key, value in fid.items())])
    cfg = dataclasses.replace(cfg, stage=4)
    student, teacher = tiny_model(in_channels=3, sample_size=8), tiny_model(in_channels=3, sample_size=8)
    records = compare_few_step(student, teacher, PixelSpace(), StubEncoder(), cfg)
    assert [(r["model"], r["sampler"], r["steps"], r["cfg_scale"]) for r in records] == [
        ("student", "lcm", 1, 1.0), ("student", "lcm", 2, 1.0), ("student", "lcm", 4, 1.0), ("student", "lcm", 8, 1.0),
        ("teacher", "dpm++", 20, cfg.distill.cfg_scale)]
    assert all(0 <= r["alignment"]["alignment"] <= 1 and r["fid"] > 0 and r["seconds_per_image"] > 0 for r in records)
    assert [r["fid_images"] for r in records] == [2] * 5
    assert len({r["fid"] for r in records}) == len(records)  # each contender's own images

    unit = Unit(4, None, cfg)
    unit.dir.mkdir(parents=True)
    (unit.dir / "manifest.json").write_text(json.dumps({"status": "done", "wall_time_s": 12.0, "few_step": records}))
    print_summary([unit])
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if line.strip().startswith(("student", "teacher"))]
    assert [(row[0], row[1], row[2]) for row in rows] == [("student", "lcm", "1"), ("student", "lcm", "2"),
                                                          ("student", "lcm", "4"), ("student", "lcm", "8"),
                                                          ("teacher", "dpm++", "20")]
    assert all("alignment" in row and "FID" in row and "ms/image" in row for row in rows)
    assert all(row[-1] == "faster)" for row in rows[:4]) and rows[4][-1] == "ms/image"
    assert comparison_lines(records) == [line.strip() for line in lines if line.strip().startswith(("student", "teacher"))]
    assert lines[lines.index(next(line for line in lines if "teacher" in line)) + 1].strip() == (
        "FID of 2 images per row (at most 2: it ranks the rows); the student's full FID: pixart-lightning eval fid "
        f"--ckpt {unit.dir} --steps 4")

    stage3 = tmp_path / "stage3"
    for name in ("final.safetensors", "final-ema.safetensors"):
        save_weights(teacher, stage3 / name)
    # The file distilled from, as recorded (the handoff records the EMA; a named final.safetensors stays itself)
    assert teacher_weights({"parent": {"path": str(stage3 / "final-ema.safetensors")}}) == stage3 / "final-ema.safetensors"
    assert teacher_weights({"parent": {"path": str(stage3 / "final.safetensors")}}) == stage3 / "final.safetensors"
    assert teacher_weights({"parent": {"path": "PixArt-alpha/PixArt-XL-2-512x512"}}) is None
