"""The stage-1 -> stage-2 handoff: a class-conditional DiT becomes a text-conditional PixArt.

PixArt-α §2.3 re-parameterises DiT's per-block adaLN-Zero MLPs as adaLN-single: one global
``t_block`` shared by all blocks plus a per-block bias ``scale_shift_table``. The tables are set so
that, at t = 500 and with the class embedding left out, every block receives exactly the
modulation it had in DiT; cross-attention starts as a no-op (zero output projection), so for any
caption the new model computes the old model's function at t = 500.

``t_block`` itself is not pinned by that equality. We initialise it to the mean of the blocks'
adaLN-Zero linear layers: then adaLN-single is exact at t = 500 and, at every other t, follows the
average block's response to the timestep, so the handoff also stays close to DiT away from t = 500
(``tests/test_reparam.py`` measures this against the official random init).
"""

from __future__ import annotations

from typing import Literal

import torch

from pixart_lightning.models.config import PixArtConfig
from pixart_lightning.models.pixart import PixArt

TBlockInit = Literal["mean", "random"]


@torch.no_grad()
def class_to_text(
    class_model: PixArt,
    *,
    caption_channels: int | None = None,
    t: int = 500,
    t_block_init: TBlockInit = "mean",
    **config_changes,
) -> PixArt:
    """Build the text-mode model that equals ``class_model`` (label left out) at timestep ``t``.

    ``t_block_init="random"`` keeps the official N(0, 0.02) initialisation of ``t_block`` instead
    of the blocks' mean; the equality at ``t`` holds either way.
    """
    src = class_model.cfg
    if src.mode != "class":
        raise ValueError(f"class_to_text needs a class-mode model, got mode={src.mode!r}")
    if t_block_init not in ("mean", "random"):
        raise ValueError(f"t_block_init={t_block_init!r}: valid choices are 'mean', 'random'")
    changes = {"mode": "text", "micro_conditions": False, **config_changes}
    if caption_channels is not None:
        changes["caption_channels"] = caption_channels
    cfg: PixArtConfig = src.replace(**changes)
    param = next(class_model.parameters())
    text_model = PixArt(cfg).to(device=param.device, dtype=param.dtype)

    # The trunk (patches, timestep MLP, attention, MLPs, output linear) carries over by key.
    text_keys = set(text_model.state_dict())
    trunk = {k: v for k, v in class_model.state_dict().items() if k in text_keys}
    text_model.load_state_dict(trunk, strict=False)

    D = cfg.hidden_size
    c = class_model.t_embedder(torch.tensor([t], device=param.device))  # (1, D), no label term
    if t_block_init == "mean":
        linears = [block.adaLN_modulation[-1] for block in class_model.blocks]
        text_model.t_block[-1].weight.copy_(torch.stack([m.weight for m in linears]).mean(0))
        text_model.t_block[-1].bias.copy_(torch.stack([m.bias for m in linears]).mean(0))
    shared = text_model.t_block(c)  # (1, 6D)
    for src_block, dst_block in zip(class_model.blocks, text_model.blocks):
        dst_block.scale_shift_table.copy_((src_block.adaLN_modulation(c) - shared).view(6, D))
    # The final layer is modulated by c itself: shift = table[0] + c, scale = table[1] + c.
    final = class_model.final_layer.adaLN_modulation(c).view(2, D)
    text_model.final_layer.scale_shift_table.copy_(final - c)
    for block in text_model.blocks:  # already zero from init; stated here because it is the contract
        block.cross_attn.proj.weight.zero_()
        block.cross_attn.proj.bias.zero_()
    return text_model


@torch.no_grad()
def to_resolution(
    model: PixArt, sample_size: int, *, interpolation_scale: float, micro_conditions: bool | None = None
) -> PixArt:
    """The stage-2 -> stage-3 handoff: a text model for latents of side ``sample_size``.

    The position table is recomputed for the new grid with the given ``interpolation_scale``, which the
    stage's config sets: PixArt-α goes 1 -> 1 -> 2 over 256 -> 512 -> 1024 px, so 512 px extends 256 px's
    coordinates (0..31 instead of 0..15) and 1024 px interpolates 512 px's (0..31.5 in steps of 0.5).
    Switching on micro-conditions adds the size and aspect-ratio embedders with their output layers
    zeroed, so the new model computes exactly the old function until training moves them.
    """
    src = model.cfg
    if src.mode != "text":
        raise ValueError("to_resolution needs a text-mode model (stage 2 or later)")
    micro = src.micro_conditions if micro_conditions is None else micro_conditions
    cfg = src.replace(
        sample_size=sample_size,
        interpolation_scale=interpolation_scale,
        micro_conditions=micro,
    )
    param = next(model.parameters())
    new = PixArt(cfg).to(device=param.device, dtype=param.dtype)
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    added = {k for k in missing if k.startswith(("csize_embedder.", "ar_embedder."))}
    if set(missing) - added or unexpected:
        raise ValueError(f"unexpected key differences at the handoff: missing {missing}, unexpected {unexpected}")
    if added and not src.micro_conditions:
        for embedder in (new.csize_embedder, new.ar_embedder):
            last = embedder.mlp[-1]
            last.weight.zero_()
            last.bias.zero_()
    return new
