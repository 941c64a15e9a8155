"""Key maps between our (official-layout) state dicts and diffusers' transformer classes.

Each rule names one of our tensors and the diffusers tensors it becomes: ``split`` cuts fused
projections into equal row blocks (``qkv`` -> q, k, v; ``kv_linear`` -> k, v); ``copy`` repeats a
shared tensor into every block (diffusers' DiT keeps a timestep and label embedder per block).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

from pixart_lightning.interop.state_dicts import IncompatibleCheckpointError


class Rule(NamedTuple):
    ours: str
    theirs: tuple[str, ...]
    fanout: Literal["split", "copy"] = "split"


def pixart_rules(depth: int) -> list[Rule]:
    """Ours <-> ``PixArtTransformer2DModel`` (the mapping of diffusers' PixArt-α converter)."""
    rules = [
        Rule("x_embedder.proj", ("pos_embed.proj",)),
        Rule("t_embedder.mlp.0", ("adaln_single.emb.timestep_embedder.linear_1",)),
        Rule("t_embedder.mlp.2", ("adaln_single.emb.timestep_embedder.linear_2",)),
        Rule("csize_embedder.mlp.0", ("adaln_single.emb.resolution_embedder.linear_1",)),
        Rule("csize_embedder.mlp.2", ("adaln_single.emb.resolution_embedder.linear_2",)),
        Rule("ar_embedder.mlp.0", ("adaln_single.emb.aspect_ratio_embedder.linear_1",)),
        Rule("ar_embedder.mlp.2", ("adaln_single.emb.aspect_ratio_embedder.linear_2",)),
        Rule("t_block.1", ("adaln_single.linear",)),
        Rule("y_embedder.y_proj.fc1", ("caption_projection.linear_1",)),
        Rule("y_embedder.y_proj.fc2", ("caption_projection.linear_2",)),
        Rule("final_layer.linear", ("proj_out",)),
        Rule("final_layer.scale_shift_table", ("scale_shift_table",)),
    ]
    for i in range(depth):
        ours, theirs = f"blocks.{i}.", f"transformer_blocks.{i}."
        rules += [
            Rule(ours + "scale_shift_table", (theirs + "scale_shift_table",)),
            Rule(ours + "attn.qkv", tuple(theirs + f"attn1.to_{x}" for x in "qkv")),
            Rule(ours + "attn.proj", (theirs + "attn1.to_out.0",)),
            Rule(ours + "cross_attn.q_linear", (theirs + "attn2.to_q",)),
            Rule(ours + "cross_attn.kv_linear", (theirs + "attn2.to_k", theirs + "attn2.to_v")),
            Rule(ours + "cross_attn.proj", (theirs + "attn2.to_out.0",)),
            Rule(ours + "mlp.fc1", (theirs + "ff.net.0.proj",)),
            Rule(ours + "mlp.fc2", (theirs + "ff.net.2",)),
        ]
    return rules


def dit_rules(depth: int) -> list[Rule]:
    """Ours (class mode, = facebookresearch DiT) -> ``DiTTransformer2DModel``."""
    every_block = [f"transformer_blocks.{i}.norm1.emb." for i in range(depth)]
    rules = [
        Rule("x_embedder.proj", ("pos_embed.proj",)),
        Rule("t_embedder.mlp.0", tuple(p + "timestep_embedder.linear_1" for p in every_block), "copy"),
        Rule("t_embedder.mlp.2", tuple(p + "timestep_embedder.linear_2" for p in every_block), "copy"),
        Rule("y_embedder.embedding_table", tuple(p + "class_embedder.embedding_table" for p in every_block), "copy"),
        Rule("final_layer.adaLN_modulation.1", ("proj_out_1",)),
        Rule("final_layer.linear", ("proj_out_2",)),
    ]
    for i in range(depth):
        ours, theirs = f"blocks.{i}.", f"transformer_blocks.{i}."
        rules += [
            Rule(ours + "adaLN_modulation.1", (theirs + "norm1.linear",)),
            Rule(ours + "attn.qkv", tuple(theirs + f"attn1.to_{x}" for x in "qkv")),
            Rule(ours + "attn.proj", (theirs + "attn1.to_out.0",)),
            Rule(ours + "mlp.fc1", (theirs + "ff.net.0.proj",)),
            Rule(ours + "mlp.fc2", (theirs + "ff.net.2",)),
        ]
    return rules


def _split_key(key: str) -> tuple[str, str]:
    """``blocks.0.attn.qkv.weight`` -> (``blocks.0.attn.qkv``, ``.weight``); tables have no suffix."""
    for suffix in (".weight", ".bias"):
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix
    return key, ""


def to_theirs(state: dict[str, Tensor], rules: list[Rule], skip: tuple[str, ...] = ()) -> dict[str, Tensor]:
    """Rename (and split or copy) our tensors into the diffusers layout."""
    by_ours = {r.ours: r for r in rules}
    out, unmapped = {}, []
    for key, value in state.items():
        if key in skip:
            continue
        stem, suffix = _split_key(key)
        rule = by_ours.get(stem)
        if rule is None:
            unmapped.append(key)
            continue
        parts = value.chunk(len(rule.theirs), dim=0) if rule.fanout == "split" else [value] * len(rule.theirs)
        for name, part in zip(rule.theirs, parts):
            out[name + suffix] = part.clone()
    if unmapped:
        raise IncompatibleCheckpointError(f"no diffusers name for: {', '.join(sorted(unmapped))}")
    return out


def to_ours(state: dict[str, Tensor], rules: list[Rule]) -> dict[str, Tensor]:
    """Rename diffusers tensors to ours, re-fusing split projections."""
    out, used = {}, set()
    for rule in rules:
        for suffix in (".weight", ".bias", ""):
            names = [name + suffix for name in rule.theirs]
            if not all(name in state for name in names):
                continue
            used.update(names)
            parts = [state[name] for name in names]
            out[rule.ours + suffix] = torch.cat(parts, dim=0) if rule.fanout == "split" else parts[0].clone()
    leftover = sorted(set(state) - used)
    if leftover:
        raise IncompatibleCheckpointError(f"unexpected diffusers keys: {', '.join(leftover[:8])}")
    return out
