"""The backbone against diffusers' PixArt and DiT transformers, and its own contracts."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config, tiny_model

from pixart_lightning.interop import export_diffusers
from pixart_lightning.models import MODEL_SIZES, PixArt, PixArtConfig
from pixart_lightning.models.pixart import sincos_2d
from pixart_lightning.training.parallel import checkpoint_activations


def _caption_batch(batch: int = 3, length: int = 7, channels: int = 16):
    y = torch.randn(batch, length, channels)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, 3:] = 0  # padded captions of different lengths
    mask[1, 5:] = 0
    return y, mask


@pytest.mark.parametrize("scale", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("micro", [False, True])
def test_text_mode_matches_diffusers_pixart(tmp_path, scale, micro):
    """Same weights, fp32: padded mask, non-square latent, micro-conditions, lewei scale, several t."""
    from diffusers import PixArtTransformer2DModel

    model = tiny_model(micro_conditions=micro, interpolation_scale=scale)
    theirs = PixArtTransformer2DModel.from_pretrained(export_diffusers(model, tmp_path / "t")).eval()
    x = torch.randn(3, 4, 8, 12)
    t = torch.tensor([0, 500, 999])
    y, mask = _caption_batch()
    cond = dict(resolution=torch.tensor([[64.0, 96.0]] * 3), aspect_ratio=torch.tensor([[0.667]] * 3)) if micro else {}
    with torch.no_grad():
        ours = model(x, t, y, mask, **cond)
        ref = theirs(x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask,
                     added_cond_kwargs=cond or {"resolution": None, "aspect_ratio": None}).sample
    assert ours.shape == (3, 8, 8, 12)
    assert ours.abs().max() > 0.1  # a real signal, not two zero outputs
    assert (ours - ref).abs().max() <= 1e-5


def test_class_mode_matches_diffusers_dit(tmp_path):
    """With diffusers' two conventions switched on, class mode equals DiTTransformer2DModel."""
    from diffusers import DiTTransformer2DModel

    model = tiny_model(mode="class", freq_shift=1.0, mlp_norm_eps=1e-5)
    theirs = DiTTransformer2DModel.from_pretrained(export_diffusers(model, tmp_path / "dit")).eval()
    x, t, labels = torch.randn(3, 4, 8, 8), torch.tensor([3, 500, 999]), torch.tensor([1, 7, 10])  # 10 = null
    with torch.no_grad():
        ours, ref = model(x, t, labels), theirs(x, timestep=t, class_labels=labels).sample
    assert ours.abs().max() > 0.1
    assert (ours - ref).abs().max() <= 1e-5
    # DiT's own convention (no frequency shift) is a different function: the option matters.
    model.t_embedder.freq_shift = 0.0
    with torch.no_grad():
        assert (model(x, t, labels) - ref).abs().max() > 1e-3


@pytest.mark.parametrize("micro,expected", [(False, 610_856_096), (True, 611_349_152)])
def test_xl2_parameter_count(micro, expected):
    """PixArt-XL/2 built on the meta device has the paper's parameter count."""
    with torch.device("meta"):
        model = PixArt(PixArtConfig.from_name("PixArt-XL/2", micro_conditions=micro))
    assert sum(p.numel() for p in model.parameters()) == expected
    assert model.state_dict()["y_embedder.y_embedding"].shape == (120, 4096)  # a buffer, not trained


def test_fresh_model_predicts_zero():
    """Zero-initialised output layer: a fresh model outputs exactly zero, in both modes."""
    for mode in ("class", "text"):
        model = PixArt(tiny_config(mode=mode)).eval()
        y = torch.tensor([1, 2]) if mode == "class" else torch.randn(2, 5, 16)
        assert model(torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), y).abs().max() == 0


def test_forced_drop_uses_null_condition():
    """force_drop_ids swaps in the null caption / null class; eval mode never drops on its own."""
    text = tiny_model()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([100, 700])
    y, mask = _caption_batch(2, 6)
    null = text.y_embedder.y_embedding[None, :6].expand(2, -1, -1)
    with torch.no_grad():
        dropped = text(x, t, y, mask, force_drop_ids=torch.tensor([1, 0]))
        assert torch.allclose(dropped[0], text(x, t, null, mask)[0], atol=1e-6)
        assert torch.allclose(dropped[1], text(x, t, y, mask)[1], atol=1e-6)
        assert torch.equal(text(x, t, y, mask), text(x, t, y, mask))
    dit = tiny_model(mode="class")
    with torch.no_grad():
        forced = dit(x, t, torch.tensor([3, 4]), force_drop_ids=torch.tensor([1, 1]))
        assert torch.allclose(forced, dit(x, t, torch.tensor([10, 10])), atol=1e-6)


def test_training_drops_about_ten_percent():
    """In training mode captions are replaced by the null one with probability 0.1."""
    embedder = tiny_model().y_embedder.train()
    y = torch.randn(4000, 2, 16)
    out = embedder(y)
    null = embedder(embedder.y_embedding[None, :2].expand(1, -1, -1), force_drop_ids=torch.tensor([1]))
    dropped = (out - null).abs().amax(dim=(1, 2)) < 1e-6
    assert 0.08 < dropped.float().mean() < 0.12


def test_position_embedding_interpolation_scale():
    """A 2x grid at lewei scale 2 spans the base grid's extent: its even rows/cols are the base table."""
    base = sincos_2d(48, 16, 16, 16, 1.0).view(16, 16, 48)
    doubled = sincos_2d(48, 64, 64, 64, 2.0).view(64, 64, 48)  # 1024 px at scale 2 ...
    native_512 = sincos_2d(48, 32, 32, 32, 1.0).view(32, 32, 48)  # ... equals 512 px at scale 1
    assert torch.allclose(doubled[::2, ::2], native_512, atol=1e-6)
    stretched = sincos_2d(48, 32, 32, 16, 1.0).view(32, 32, 48)  # any grid is stretched to the base extent
    assert torch.allclose(stretched[::2, ::2], base, atol=1e-6)


def test_gradient_checkpointing_gives_same_gradients():
    """Activation checkpointing per block changes memory, not gradients."""
    model = tiny_model().train()
    model.y_embedder.dropout_prob = 0.0
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([5, 600])
    y, mask = _caption_batch(2, 5)
    grads = []
    for flag in (False, True):
        model.zero_grad()
        checkpoint_activations(model, flag)
        model(x, t, y, mask).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_config_errors_name_the_problem():
    """Invalid shapes and unknown sizes fail at construction with a message naming the field."""
    with pytest.raises(ValueError, match="num_heads=5 must divide hidden_size=48"):
        tiny_config(num_heads=5)
    with pytest.raises(ValueError, match="divisible by 3"):
        tiny_config(hidden_size=64, micro_conditions=True)
    with pytest.raises(ValueError, match="valid choices: PixArt-XL/2"):
        PixArtConfig.from_name("PixArt-XXL/2")
    assert "PixArt-debug/2" in MODEL_SIZES


def test_text_mode_requires_micro_condition_inputs():
    """A micro-conditioned model refuses a call without resolution and aspect ratio."""
    model = tiny_model(micro_conditions=True)
    with pytest.raises(ValueError, match="resolution"):
        model(torch.randn(1, 4, 8, 8), torch.tensor([1]), torch.randn(1, 3, 16))
