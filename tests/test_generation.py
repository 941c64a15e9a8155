"""Sampling in both modes, the diffusers pipeline export, and the command line, end to end."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from test_fid import StubEncoder

from pixart_lightning.cli import main
from pixart_lightning.diffusion import sample
from pixart_lightning.encoders.vae import VAE, PixelSpace
from pixart_lightning.evaluation.generate import generate
from pixart_lightning.interop import save_weights
from pixart_lightning.interop.pipeline import export_pipeline
from pixart_lightning.models import class_to_text
from pixart_lightning.shapes.tiny_models import build_tiny_models


@pytest.fixture(scope="module")
def tiny_parts(tmp_path_factory):
    """The offline tiny T5 (with tokenizer) and VAE, built once for this module."""
    return build_tiny_models(tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("sampler", ["dpm++", "ancestral"])
@pytest.mark.parametrize("mode", ["class", "text"])
def test_samplers_run_in_both_modes(mode, sampler):
    """DPM-Solver++ and learned-variance ancestral sampling, with guidance, in class and text mode."""
    model = tiny_model(mode=mode)
    kwargs = {"y": torch.tensor([1, 4])} if mode == "class" else {"y": torch.randn(2, 5, 16), "mask": torch.ones(2, 5)}
    runs = [sample(model, (2, 4, 8, 8), kwargs, sampler=sampler, steps=10, generator=torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert runs[0].shape == (2, 4, 8, 8) and torch.isfinite(runs[0]).all()
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    unguided = sample(model, (2, 4, 8, 8), kwargs, sampler=sampler, steps=10, cfg_scale=1.0, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(unguided, runs[0])  # guidance changes the result


def test_micro_batched_decoding_equals_whole_batch(tiny_parts):
    """decode_batch=2 decodes 5 latents as 2 + 2 + 1 (fp32 tiny VAE) into exactly the images of one whole batch."""
    vae = VAE.from_pretrained(tiny_parts["vae"])
    seen = []
    vae.model.decoder.register_forward_pre_hook(lambda module, args: seen.append(len(args[0])))
    model = tiny_model(mode="class", sample_size=4)
    whole = generate(model, vae, labels=[0, 1, 2, 3, 4], height=32, width=32, steps=2)
    assert seen == [5]
    seen.clear()
    parts = generate(model, vae, labels=[0, 1, 2, 3, 4], height=32, width=32, steps=2, decode_batch=2)
    assert seen == [2, 2, 1]
    assert torch.equal(parts, whole)


def test_generation_under_bf16_mixed_computes_the_backbone_in_bf16():
    """precision="bf16-mixed" runs every backbone matmul in bf16 (fp32 at "32"), and the images stay close."""
    model = tiny_model(in_channels=3, sample_size=16)
    dtypes = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda module, args, out: dtypes.add(out.dtype))
    inputs = dict(prompts=["a red circle", "a blue square", "a green triangle"], encoder=StubEncoder(), height=16,
                  width=16, steps=10)
    fp32 = generate(model, PixelSpace(), **inputs, precision="32")
    assert dtypes == {torch.float32}
    dtypes.clear()
    bf16 = generate(model, PixelSpace(), **inputs, precision="bf16-mixed")
    assert dtypes == {torch.bfloat16}
    difference = (bf16.float() - fp32.float()).abs()
    assert 0 < difference.mean() < 1.5  # of 255; about 0.2 observed


def test_exported_pipeline_runs_offline_and_matches_our_transformer(tmp_path, tiny_parts):
    """PixArtAlphaPipeline.from_pretrained(folder) loads our export and generates; its transformer is ours."""
    from diffusers import PixArtAlphaPipeline

    model = tiny_model(caption_channels=32, sample_size=4)
    folder = export_pipeline(model, tmp_path / "pipe", tiny_parts["t5"], tiny_parts["vae"])
    pipe = PixArtAlphaPipeline.from_pretrained(folder)
    image = pipe("a red circle", height=32, width=32, num_inference_steps=3, use_resolution_binning=False,
                 clean_caption=False, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3)
    x, t, y = torch.randn(2, 4, 4, 4), torch.tensor([10, 900]), torch.randn(2, 6, 32)
    with torch.no_grad():
        theirs = pipe.transformer(x, encoder_hidden_states=y, timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        assert (model(x, t, y) - theirs).abs().max() <= 1e-5


def test_pipeline_export_refuses_mismatched_text_encoder(tmp_path, tiny_parts):
    """A text encoder whose width differs from caption_channels is refused with both numbers named."""
    with pytest.raises(ValueError, match="text encoder width 32 != model caption_channels 16"):
        export_pipeline(tiny_model(), tmp_path / "pipe", tiny_parts["t5"], tiny_parts["vae"])


def test_cli_reparam_convert_info_sample(tmp_path, tiny_parts, capsys):
    """The CLI chain: DiT checkpoint -> reparam -> diffusers folder -> info -> sample PNG."""
    dit = tiny_model(mode="class")
    save_weights(dit, tmp_path / "dit.safetensors")
    assert main(["reparam", str(tmp_path / "dit.safetensors"), str(tmp_path / "text.safetensors"), "--caption-channels", "32"]) == 0
    assert main(["convert", str(tmp_path / "text.safetensors"), str(tmp_path / "text-diffusers")]) == 0
    assert main(["convert", str(tmp_path / "text-diffusers"), str(tmp_path / "official.pth")]) == 0
    assert main(["info", str(tmp_path / "official.pth")]) == 0
    assert "text mode" in capsys.readouterr().out
    from pixart_lightning.interop import load_model

    converted = load_model(tmp_path / "official.pth").state_dict()
    expected = class_to_text(dit, caption_channels=32).state_dict()
    pinned = [k for k in expected if "scale_shift_table" in k or k.startswith(("t_block", "blocks.0.attn", "final_layer.linear"))]
    assert all(torch.equal(converted[k], expected[k]) for k in pinned)  # the rest is freshly initialised
    out = tmp_path / "samples"
    assert main(["sample", "--ckpt", str(tmp_path / "text-diffusers"), "--prompt", "a red circle", "--prompt", "a blue square",
                 "--text-encoder", str(tiny_parts["t5"]), "--vae", str(tiny_parts["vae"]), "--height", "32", "--width", "32",
                 "--num", "1", "--steps", "3", "--out", str(out)]) == 0
    from PIL import Image

    assert Image.open(out / "grid.png").size == (32, 64)  # one column per image of a prompt, one row per prompt
    assert Image.open(out / "001-00.png").size == (32, 32)


def test_cli_user_mistakes_exit_2_with_one_line(tmp_path, capsys):
    """A missing file or an incompatible checkpoint: exit code 2, an error line, no traceback."""
    assert main(["info", str(tmp_path / "missing.pth")]) == 2
    err = capsys.readouterr().err
    assert "error: no such checkpoint file" in err and "Traceback" not in err
    torch.save({"state_dict": {"x_embedder.proj.weight": torch.zeros(1)}}, tmp_path / "bad.pth")
    assert main(["info", str(tmp_path / "bad.pth")]) == 2
    assert "not a PixArt/DiT state dict" in capsys.readouterr().err
