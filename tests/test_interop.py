"""Checkpoint interop: official PixArt-α / DiT files, diffusers folders and our own format."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pytest
import torch
from conftest import tiny_model
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from pixart_lightning.cli import main
from pixart_lightning.encoders.text import T5TextEncoder
from pixart_lightning.encoders.vae import VAE
from pixart_lightning.evaluation.generate import generate
from pixart_lightning.interop import (
    IncompatibleCheckpointError,
    export_diffusers,
    infer_config,
    load_diffusers,
    load_model,
    model_from_official,
    read_prediction,
    read_state_dict,
    save_weights,
    to_official,
)
from pixart_lightning.interop.diffusers_keys import pixart_rules, to_theirs
from pixart_lightning.models import PixArt, PixArtConfig
from pixart_lightning.shapes.tiny_models import build_tiny_t5, build_tiny_vae

# diffusers' PixArt-α converter (scripts/convert_pixart_alpha_to_diffusers.py), transcribed as data
# for one block: official name -> diffusers names; several names = equal row blocks, in order.
DIFFUSERS_CONVERTER_TABLE = {
    "x_embedder.proj": ["pos_embed.proj"],
    "y_embedder.y_proj.fc1": ["caption_projection.linear_1"],
    "y_embedder.y_proj.fc2": ["caption_projection.linear_2"],
    "t_embedder.mlp.0": ["adaln_single.emb.timestep_embedder.linear_1"],
    "t_embedder.mlp.2": ["adaln_single.emb.timestep_embedder.linear_2"],
    "csize_embedder.mlp.0": ["adaln_single.emb.resolution_embedder.linear_1"],
    "csize_embedder.mlp.2": ["adaln_single.emb.resolution_embedder.linear_2"],
    "ar_embedder.mlp.0": ["adaln_single.emb.aspect_ratio_embedder.linear_1"],
    "ar_embedder.mlp.2": ["adaln_single.emb.aspect_ratio_embedder.linear_2"],
    "t_block.1": ["adaln_single.linear"],
    "blocks.0.scale_shift_table": ["transformer_blocks.0.scale_shift_table"],
    "blocks.0.attn.qkv": ["transformer_blocks.0.attn1.to_q", "transformer_blocks.0.attn1.to_k", "transformer_blocks.0.attn1.to_v"],
    "blocks.0.attn.proj": ["transformer_blocks.0.attn1.to_out.0"],
    "blocks.0.cross_attn.q_linear": ["transformer_blocks.0.attn2.to_q"],
    "blocks.0.cross_attn.kv_linear": ["transformer_blocks.0.attn2.to_k", "transformer_blocks.0.attn2.to_v"],
    "blocks.0.cross_attn.proj": ["transformer_blocks.0.attn2.to_out.0"],
    "blocks.0.mlp.fc1": ["transformer_blocks.0.ff.net.0.proj"],
    "blocks.0.mlp.fc2": ["transformer_blocks.0.ff.net.2"],
    "final_layer.linear": ["proj_out"],
    "final_layer.scale_shift_table": ["scale_shift_table"],
}


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("changes", [dict(mode="text", micro_conditions=True), dict(mode="text", interpolation_scale=2.0), dict(mode="class")])
def test_official_round_trip_is_identity(changes):
    """official keys -> ours -> official keys returns the very same tensors, pos_embed included."""
    official = to_official(tiny_model(**changes))
    back = to_official(model_from_official(official, num_heads=4))
    assert _same_state(official, back)
    assert back["pos_embed"].shape == (1, 16, 48)


def test_official_to_diffusers_follows_diffusers_converter():
    """Our mapping of an official state dict equals the diffusers converter's table, splits included."""
    official = to_official(tiny_model(depth=1, micro_conditions=True))
    theirs = to_theirs(official, pixart_rules(1), skip=("pos_embed", "y_embedder.y_embedding"))
    expected = {}
    for ours, names in DIFFUSERS_CONVERTER_TABLE.items():
        for suffix in ("", ".weight", ".bias"):
            if ours + suffix in official:
                for name, part in zip(names, official[ours + suffix].chunk(len(names))):
                    expected[name + suffix] = part
    assert _same_state(theirs, expected)


def test_official_pth_file_loads(tmp_path):
    """A PixArt-XL-2-*.pth style file ({'state_dict': ...}, pos_embed inside) loads and runs the same."""
    model = tiny_model(micro_conditions=True, interpolation_scale=2.0)
    path = tmp_path / "PixArt-tiny.pth"
    torch.save({"state_dict": to_official(model), "state_dict_ema": to_official(model)}, path)
    loaded = load_model(path, num_heads=4).eval()
    assert loaded.cfg == model.cfg  # sample_size and lewei scale read off pos_embed
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), torch.randn(2, 3, 16)
    cond = dict(resolution=torch.tensor([[64.0, 64.0]] * 2), aspect_ratio=torch.ones(2, 1))
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y, **cond), model(x, t, y, **cond))


def test_dit_checkpoints_load_by_key(tmp_path):
    """Both a released DiT .pt (raw EMA dict) and a DiT training checkpoint (with argparse args) load."""
    model = tiny_model(mode="class")
    released = tmp_path / "DiT-tiny.pt"
    torch.save(to_official(model), released)
    training = tmp_path / "0100000.pt"
    torch.save({"model": to_official(model), "ema": to_official(model), "opt": {}, "args": argparse.Namespace(model="DiT-XL/2")}, training)
    for path in (released, training):
        loaded = load_model(path, num_heads=4)
        assert loaded.cfg.mode == "class" and loaded.cfg.num_classes == 10
        assert _same_state(loaded.state_dict(), model.state_dict())


def test_heads_come_from_size_or_option():
    """Shapes cannot tell heads: a named size or num_heads supplies them, else a clear error."""
    xl = {"x_embedder.proj.weight": torch.empty(1152, 4, 2, 2), "final_layer.linear.weight": torch.empty(32, 1152),
          "blocks.27.mlp.fc1.weight": torch.empty(4608, 1152), "blocks.0.mlp.fc1.weight": torch.empty(4608, 1152),
          "y_embedder.y_proj.fc1.weight": torch.empty(1152, 4096)}
    assert infer_config(xl).num_heads == 16  # unique registry match for depth 28, width 1152
    assert infer_config(xl, num_heads=8).num_heads == 8
    assert infer_config(to_official(tiny_model())).num_heads == 4  # depth 2, width 48 is PixArt-debug/2
    state = to_official(tiny_model(depth=3))
    with pytest.raises(IncompatibleCheckpointError, match="pass num_heads or a size"):
        infer_config(state)
    assert infer_config(state, size="PixArt-XL/2").num_heads == 16


def test_incompatible_checkpoint_names_the_keys():
    """A checkpoint that does not fit is refused with the offending keys in the message."""
    state = to_official(tiny_model())
    del state["blocks.1.cross_attn.q_linear.bias"]
    state["blocks.0.extra.weight"] = torch.zeros(1)
    state["t_block.1.weight"] = torch.zeros(10, 48)
    with pytest.raises(IncompatibleCheckpointError) as err:
        model_from_official(state, num_heads=4)
    message = str(err.value)
    assert "blocks.1.cross_attn.q_linear.bias" in message and "blocks.0.extra.weight" in message
    assert "t_block.1.weight (10, 48) != (288, 48)" in message


def test_pickle_that_runs_code_is_refused(tmp_path):
    """A checkpoint whose unpickling would execute code is refused, and the code never runs."""
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": Exploit()}, path)
    with pytest.raises(IncompatibleCheckpointError, match="would run code"):
        read_state_dict(path)
    assert not marker.exists()


def test_diffusers_folder_round_trip(tmp_path):
    """Export to a diffusers folder and import it back: identical weights, null caption included."""
    model = tiny_model(micro_conditions=True, interpolation_scale=0.5)
    folder = export_diffusers(model, tmp_path / "transformer")
    assert (folder / "config.json").is_file() and (folder / "diffusion_pytorch_model.safetensors").is_file()
    back = load_model(folder)
    assert back.cfg == model.cfg
    assert _same_state(back.state_dict(), model.state_dict())


def test_diffusers_dit_folder_is_refused(tmp_path):
    """Only PixArt transformers import from diffusers; a DiT folder gets a clear message."""
    folder = export_diffusers(tiny_model(mode="class"), tmp_path / "dit")
    with pytest.raises(IncompatibleCheckpointError, match="only PixArt"):
        load_diffusers(folder)


def test_native_weights_round_trip(tmp_path):
    """Our .safetensors keeps the config and prediction type in its metadata and reloads the exact model."""
    model = tiny_model(learned_null_caption=True)
    path = save_weights(model, tmp_path / "model.safetensors", prediction="v")
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # the temporary file renamed, none left
    back = load_model(path)
    assert back.cfg == model.cfg
    assert _same_state(back.state_dict(), model.state_dict())
    assert read_prediction(path) == "v"


@pytest.fixture(scope="module")
def plain_t5_and_vae(tmp_path_factory):
    """The tiny T5 without its position code (diffusers' pipeline cannot add one) and the tiny VAE."""
    folder = tmp_path_factory.mktemp("plain")
    return build_tiny_t5(folder / "t5", position_code=False), build_tiny_vae(folder / "vae")


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_exported_pipeline_and_sample_draw_what_the_model_was_trained_for(tmp_path, plain_t5_and_vae, prediction):
    """Weights record their prediction type; `export-pipeline` and `sample`, told nothing, both use it.

    Without guidance (diffusers' negative prompt is T5(""), ours the null caption) the pipeline draws the image
    our sampler draws for the same seed, to one level of rounding; read as the other type, pixels differ by 100+.
    """
    from diffusers import PixArtAlphaPipeline

    t5, vae = plain_t5_and_vae
    model = tiny_model(caption_channels=32, sample_size=4)
    weights = save_weights(model, tmp_path / "final.safetensors", prediction)
    prompt, seed, steps = "a red circle", 3, 5
    expected = generate(model, VAE.from_pretrained(vae), prompts=[prompt], encoder=T5TextEncoder.from_pretrained(t5),
                        height=32, width=32, steps=steps, cfg_scale=1.0, seed=seed, prediction=prediction)[0]
    expected = expected.permute(1, 2, 0).float()

    parts = ["--text-encoder", str(t5), "--vae", str(vae)]
    assert main(["export-pipeline", str(weights), str(tmp_path / "pipe"), *parts]) == 0
    assert read_prediction(tmp_path / "pipe") == prediction
    pipe = PixArtAlphaPipeline.from_pretrained(tmp_path / "pipe")
    theirs = pipe(prompt, height=32, width=32, num_inference_steps=steps, guidance_scale=1.0, output_type="pt",
                  use_resolution_binning=False, clean_caption=False, generator=torch.Generator().manual_seed(seed))
    assert (theirs.images[0].permute(1, 2, 0) * 255 - expected).abs().max() <= 1.0

    assert main(["sample", "--ckpt", str(weights), "--prompt", prompt, *parts, "--height", "32", "--width", "32",
                 "--num", "1", "--steps", str(steps), "--cfg", "1", "--seed", str(seed), "--out", str(tmp_path)]) == 0
    assert torch.equal(torch.from_numpy(np.array(Image.open(tmp_path / "000-00.png"))).float(), expected)


def test_weights_without_a_prediction_type_fall_back_to_the_run_manifest_then_epsilon(tmp_path, capsys):
    """Files written before the field existed: the run folder's manifest says, else epsilon with a note."""
    recorded = save_weights(tiny_model(), tmp_path / "run" / "new.safetensors", "v")
    with safe_open(recorded, framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
        metadata = {k: v for k, v in f.metadata().items() if k != "prediction"}
    old = tmp_path / "run" / "final.safetensors"
    save_file(tensors, old, metadata=metadata)

    assert main(["info", str(old)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[-1].split() == ["prediction", "epsilon"]
    assert "does not record what the model predicts; assuming epsilon" in err
    (tmp_path / "run" / "manifest.json").write_text(json.dumps({"prediction": "v"}))
    assert main(["info", str(tmp_path / "run")]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[-1].split() == ["prediction", "v"] and "note" not in err
    (tmp_path / "run" / "manifest.json").write_text(json.dumps({"prediction": "epsilon"}))
    assert main(["info", str(recorded)]) == 0  # what the weights record outranks the manifest
    assert capsys.readouterr().out.splitlines()[-1].split() == ["prediction", "v"]


def test_meta_built_xl_exports_keys_diffusers_expects():
    """The XL/2 key set maps one-to-one onto diffusers' 603 (611 with micro-conditions) keys."""
    for micro, count in ((False, 603), (True, 611)):
        with torch.device("meta"):
            model = PixArt(PixArtConfig.from_name("PixArt-XL/2", micro_conditions=micro))
        theirs = to_theirs(model.state_dict(), pixart_rules(28), skip=("y_embedder.y_embedding",))
        assert len(theirs) == count
