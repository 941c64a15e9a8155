"""LoRA adapter files in the ecosystem's formats: merged into full weights, or as a PEFT folder for diffusers.

A LoRA stage saves its adapters as one ``.safetensors`` file (``training/lora.py``): peft's keys on our module names
(``blocks.0.attn.qkv.lora_A.weight``), the rank, alpha, target set and backbone config in its metadata. Here that
file is read, checked against a base model, folded into it (W + (alpha / rank)·B·A), or rewritten as the folder
``PeftModel.from_pretrained(transformer, folder)`` loads onto diffusers' ``PixArtTransformer2DModel``.

Our fused projections (``attn.qkv``; ``cross_attn.kv_linear``) are split there into ``to_q``, ``to_k``, ``to_v``.
A LoRA on the fused layer splits exactly: its output rows are the projections' rows, so each projection gets the
shared A and its own block of B's rows (same rank and alpha), and each one's W·x + s·B·A·x is the fused one's rows.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from pixart_lightning.interop.diffusers_keys import dit_rules, pixart_rules
from pixart_lightning.interop.state_dicts import IncompatibleCheckpointError
from pixart_lightning.models.config import PixArtConfig
from pixart_lightning.models.pixart import PixArt

ADAPTER_TAG = "pixart-lightning-lora"
"""``format`` in the metadata of an adapters file."""
PEFT_WEIGHTS = "adapter_model.safetensors"
"""The weights file of a PEFT adapter folder (peft's ``SAFETENSORS_WEIGHTS_NAME``), beside its ``adapter_config.json``."""
PEFT_PREFIX = "base_model.model."
"""What ``PeftModel`` puts before the wrapped model's module names in the keys it saves and loads."""
_FACTORS = ("lora_A", "lora_B")


@dataclass(frozen=True)
class Adapters:
    """The adapters of one file: ``factors[module] = (A, B)``, A (rank x in) and B (out x rank), on our names."""

    factors: dict[str, tuple[Tensor, Tensor]]
    rank: int
    alpha: float
    dropout: float
    config: PixArtConfig
    """The backbone they were trained on."""
    source: Path

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def read_adapters(path: str | Path) -> Adapters:
    """Read an adapters file that ``training.lora.save_adapters`` wrote; anything else is refused."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        raise FileNotFoundError(f"{path} is not a LoRA adapters file (a LoRA stage's final-lora.safetensors)")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != ADAPTER_TAG:
        raise IncompatibleCheckpointError(f"{path} holds no LoRA adapters (no {ADAPTER_TAG} metadata)")
    tensors, factors = load_file(path), {}
    for module in sorted({key.rsplit(".", 2)[0] for key in tensors}):
        keys = [f"{module}.{factor}.weight" for factor in _FACTORS]
        if not all(key in tensors for key in keys):
            raise IncompatibleCheckpointError(f"{path}: {module} lacks lora_A or lora_B (only plain LoRA is supported)")
        factors[module] = tuple(tensors.pop(key).float() for key in keys)
    if tensors:
        raise IncompatibleCheckpointError(f"{path}: unsupported adapter tensors: {', '.join(sorted(tensors)[:4])}")
    return Adapters(factors, rank=int(meta["rank"]), alpha=float(meta["alpha"]), dropout=float(meta["dropout"]),
                    config=PixArtConfig(**json.loads(meta["config"])), source=path)


def check_fits(adapters: Adapters, model: PixArt) -> None:
    """Refuse adapters trained on another base: layers it lacks, or of other shapes, named with the config fields
    that differ."""
    layers = dict(model.named_modules())
    problems = []
    for module, (a, b) in adapters.factors.items():
        layer = layers.get(module)
        if not isinstance(layer, torch.nn.Linear):
            problems.append(f"{module}: no such Linear layer")
        elif (layer.in_features, layer.out_features) != (a.shape[1], b.shape[0]):
            problems.append(f"{module}: adapter {a.shape[1]} -> {b.shape[0]}, layer "
                            f"{layer.in_features} -> {layer.out_features}")
    if problems:
        ours, base = adapters.config.to_dict(), model.cfg.to_dict()
        differ = [f"{key} {ours[key]} != {base.get(key)}" for key in ours if ours[key] != base.get(key)]
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise IncompatibleCheckpointError(
            f"{adapters.source} was trained on another base ({'; '.join(problems[:3])}{more})"
            + (f"; adapters' config vs base: {', '.join(differ)}" if differ else ""))


def merge_adapters(model: PixArt, adapters: Adapters) -> PixArt:
    """A copy of ``model`` in fp32 with each adapter folded into its layer's weight: W + (alpha / rank)·(B·A), the sum
    peft's ``merge()`` makes."""
    check_fits(adapters, model)
    merged = copy.deepcopy(model).float()
    with torch.no_grad():
        for module, (a, b) in adapters.factors.items():
            merged.get_submodule(module).weight.data += (b @ a) * adapters.scale
    return merged


def to_peft_state(adapters: Adapters) -> dict[str, Tensor]:
    """The adapters keyed as ``PeftModel`` saves them on diffusers' transformer, fused projections split.

    Refused, naming it, where a layer has no diffusers counterpart or its rows do not split evenly.
    """
    depth = adapters.config.depth
    rules = {rule.ours: rule for rule in (pixart_rules if adapters.config.mode == "text" else dit_rules)(depth)}
    state = {}
    for module, (a, b) in adapters.factors.items():
        rule = rules.get(module)
        if rule is None:
            raise IncompatibleCheckpointError(f"{adapters.source}: {module} has no diffusers counterpart")
        if rule.fanout == "split" and b.shape[0] % len(rule.theirs):
            raise IncompatibleCheckpointError(
                f"{adapters.source}: {module}'s {b.shape[0]} rows do not split into {', '.join(rule.theirs)}")
        blocks = b.chunk(len(rule.theirs)) if rule.fanout == "split" else [b] * len(rule.theirs)
        for name, block in zip(rule.theirs, blocks):
            state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.clone().contiguous()
            state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = block.clone().contiguous()
    return state


def export_peft(adapters: Adapters, folder: str | Path) -> Path:
    """Write the PEFT adapter folder that ``PeftModel.from_pretrained(transformer, folder)`` loads onto the diffusers
    transformer of the adapters' base (``export_diffusers`` of the weights they were trained on)."""
    from peft import LoraConfig

    state = to_peft_state(adapters)
    targets = sorted(key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight") for key in state
                     if key.endswith(".lora_A.weight"))
    folder = Path(folder)
    LoraConfig(r=adapters.rank, lora_alpha=adapters.alpha, lora_dropout=adapters.dropout,
               target_modules=targets).save_pretrained(folder)
    save_file(state, folder / PEFT_WEIGHTS, metadata={"format": "pt"})
    return folder
