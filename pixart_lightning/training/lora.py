"""LoRA fine-tuning through peft: low-rank adapters on the backbone's Linear layers, everything else frozen.

Each targeted ``nn.Linear`` W becomes W·x + (alpha / rank)·B·A·x (peft's ``lora.Linear`` around the original layer,
kept as its ``base_layer``): only A and B train, so only they have gradients, optimizer state and an EMA, and a
stage's resumable checkpoint holds only them (megabytes; the frozen base is rebuilt from the stage's parent or init
weights). The handoff to the next stage is the merged model (:func:`merged`), so nothing downstream needs to know;
the adapters alone are saved beside it (:func:`save_adapters`) in peft's key layout.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from torch import nn

from pixart_lightning.config.schema import LoRASection
from pixart_lightning.files import atomic_path
from pixart_lightning.interop.lora import ADAPTER_TAG
from pixart_lightning.models import PixArt

ATTENTION = r"blocks\.\d+\.(attn\.(qkv|proj)|cross_attn\.(q_linear|kv_linear|proj))"
MLP = r"blocks\.\d+\.mlp\.(fc1|fc2)"
CONDITIONING = r"t_block\.1|y_embedder\.y_proj\.(fc1|fc2)|(blocks\.\d+|final_layer)\.adaLN_modulation\.1"
TARGETS: dict[str, str] = {"attention": ATTENTION, "attention+mlp": f"{ATTENTION}|{MLP}",
                           "all": f"{ATTENTION}|{MLP}|{CONDITIONING}"}
"""The module names (``re.fullmatch`` over ``PixArt.named_modules()``) of each ``model.lora.targets`` set; the
schema's docstring says what each holds."""


def is_adapted(model: nn.Module) -> bool:
    return any(isinstance(module, LoraLayer) for module in model.modules())


def is_adapter_key(key: str) -> bool:
    """Whether a state-dict key (of the model, or of a module holding it) names adapter weights."""
    return ".lora_" in key


def add_adapters(model: PixArt, lora: LoRASection, like: PixArt | None = None, seed: int = 0) -> None:
    """Inject adapters into ``model``'s target layers in place and freeze the rest; calling again changes nothing.

    The adapters are created (A random, B zero: the model's output is unchanged) while the base is still fp32, and
    stay fp32 master weights; then, with ``base_dtype: bf16``, the frozen Linear layers are cast to bf16, which
    ``bf16-mixed`` autocast multiplies as they are. A is drawn from torch's CPU generator seeded with ``seed``, apart
    from the global random state, so that every process draws the same whatever the world size (FSDP keeps each
    rank's shard of its own copy, broadcasting nothing). ``like`` (the EMA copy's case) gives the adapters their
    starting weights, and then nothing of ``model`` trains.
    """
    if is_adapted(model):
        return
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=TARGETS[lora.targets])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, model)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(like is None and is_adapter_key(name))
    if lora.base_dtype == "bf16":
        for module in model.modules():
            if isinstance(module, nn.Linear) and not any(p.requires_grad for p in module.parameters()):
                module.to(torch.bfloat16)
    if like is not None:
        set_peft_model_state_dict(model, get_peft_model_state_dict(like))


def add_adapters_like(model: PixArt, adapted: nn.Module) -> None:
    """Inject into a plain ``model`` the adapters ``adapted`` holds (the same layers, rank and alpha; fresh weights,
    the base left fp32), so that ``adapted``'s state dict loads into it: how a sharded LoRA model is consolidated."""
    inject_adapter_in_model(adapted.peft_config["default"], model)


def frozen_base_keys(module: nn.Module) -> set[str]:
    """The state-dict keys of ``module`` that belong to the frozen base of an adapted ``PixArt`` within it (its
    weights and tables other than the adapters): what a LoRA stage's checkpoint leaves out, the model as built
    holding them already. Empty without adapters."""
    keys = set()
    for prefix, part in module.named_modules():
        if isinstance(part, PixArt) and is_adapted(part):
            keys |= {f"{prefix}.{k}" if prefix else k for k in part.state_dict(keep_vars=True)
                     if not is_adapter_key(k)}
    return keys


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that train: the adapters under LoRA, all of them otherwise."""
    return [p for p in model.parameters() if p.requires_grad]


def merged(model: PixArt) -> PixArt:
    """A plain fp32 ``PixArt`` with each adapter folded into its base weight (W + (alpha / rank)·B·A): what a LoRA
    stage hands on. An unadapted model is returned as it is."""
    if not is_adapted(model):
        return model
    plain = copy.deepcopy(model).float()
    for name, layer in list(plain.named_modules()):
        if isinstance(layer, LoraLayer):
            layer.merge()
            parent, _, child = name.rpartition(".")
            setattr(plain.get_submodule(parent), child, layer.get_base_layer())
    del plain.peft_config
    return plain


def adapter_path(weights: str | Path) -> Path:
    """Where the adapters of a handoff file are saved: beside it, ``final.safetensors`` -> ``final-lora.safetensors``."""
    weights = Path(weights)
    return weights.with_name(f"{weights.stem}-lora{weights.suffix}")


def save_adapters(model: PixArt, path: str | Path, lora: LoRASection) -> Path:
    """The adapters alone, keyed as peft saves them (``blocks.0.attn.qkv.lora_A.weight``), to one ``.safetensors``
    file, atomically; its metadata holds the rank, alpha, dropout, target set and module pattern, and the backbone
    config they fit."""
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    metadata = {"format": ADAPTER_TAG, "rank": str(lora.rank), "alpha": str(lora.alpha), "dropout": str(lora.dropout),
                "targets": lora.targets, "target_modules": TARGETS[lora.targets],
                "config": json.dumps(model.cfg.to_dict())}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return Path(path)
