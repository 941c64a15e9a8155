"""The stage-1 -> stage-2 re-parameterisation (class-mode DiT -> adaLN-single text model)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from pixart_lightning.models import class_to_text


@pytest.mark.parametrize("t_block_init", ["mean", "random"])
def test_text_model_equals_class_model_at_t500(t_block_init):
    """Right after the handoff, for any caption, text model(t=500) == class model(t=500, no label)."""
    dit = tiny_model(mode="class")
    text = class_to_text(dit, caption_channels=16, t_block_init=t_block_init).eval()
    x, t = torch.randn(4, 4, 8, 12), torch.full((4,), 500)
    with torch.no_grad():
        expected = dit(x, t)  # label embedding left out
        assert expected.abs().max() > 0.1
        for length in (1, 7, 120):
            caption = torch.randn(4, length, 16) * 3
            mask = (torch.arange(length)[None] < torch.tensor([[1], [length], [max(length // 2, 1)], [length]])).long()
            assert (text(x, t, caption, mask) - expected).abs().max() <= 1e-5
        # ... but not at other timesteps, and not with the label in: only t = 500 is pinned
        assert (text(x, t - 300, caption, mask) - dit(x, t - 300)).abs().max() > 1e-4


def test_handoff_keys():
    """The class embedding and adaLN-Zero MLPs are dropped; the trunk is copied; cross-attn output is zero."""
    dit = tiny_model(mode="class")
    text = class_to_text(dit, caption_channels=16)
    keys = set(text.state_dict())
    assert not any("embedding_table" in k or "adaLN_modulation" in k for k in keys)
    for name in ("x_embedder.proj.weight", "t_embedder.mlp.2.weight", "blocks.1.attn.qkv.weight", "final_layer.linear.bias"):
        assert torch.equal(text.state_dict()[name], dit.state_dict()[name])
    assert all(b.cross_attn.proj.weight.abs().max() == 0 for b in text.blocks)


def test_mean_t_block_stays_closer_to_dit_away_from_t500():
    """Our t_block choice (mean of the blocks' adaLN MLPs) tracks DiT at other t better than random init."""
    dit = tiny_model(mode="class")
    x = torch.randn(8, 4, 8, 8)
    caption = torch.randn(8, 5, 16)
    errors = {}
    for init in ("mean", "random"):
        text = class_to_text(dit, caption_channels=16, t_block_init=init).eval()
        with torch.no_grad():
            errors[init] = sum(
                (text(x, torch.full((8,), t), caption) - dit(x, torch.full((8,), t))).abs().mean().item()
                for t in (50, 250, 750, 950)
            )
    assert errors["mean"] < errors["random"]


def test_rejects_text_model():
    """Only a class-mode model can be re-parameterised."""
    with pytest.raises(ValueError, match="class-mode"):
        class_to_text(tiny_model(mode="text"))
