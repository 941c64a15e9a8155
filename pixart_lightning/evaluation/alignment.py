"""Prompt-following on the embedded shapes world, scored by the world's own pixel detector."""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm

from pixart_lightning.encoders.vae import VAE, LazyVAE, PixelSpace
from pixart_lightning.evaluation.generate import Encoder, generate
from pixart_lightning.models import PixArt
from pixart_lightning.shapes import world


def alignment(
    model: PixArt,
    vae: VAE | LazyVAE | PixelSpace,
    encoder: Encoder | None,
    *,
    num: int = 64,
    seed: int = 0,
    height: int = 32,
    width: int = 32,
    sampler: str = "dpm++",
    steps: int = 20,
    cfg_scale: float = 4.5,
    prediction: str = "epsilon",
    batch_size: int = 32,
    precision: str = "32",
    decode_batch: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Fraction of generated images whose shape colour and background colour are as asked.

    Prompts are single-shape scenes whose wording is held out of every training set. A text model
    gets the dense caption; a class model (stage 1) gets the scene's class label, which names the
    shape colour but not the background, so for it only ``shape`` is meaningful. ``precision`` and ``decode_batch``
    are :func:`~pixart_lightning.evaluation.generate.generate`'s.
    """
    scenes = world.alignment_prompts(num, seed)
    hits = {"both": 0, "background": 0, "shape": 0}
    examples = []
    for start in tqdm(range(0, num, batch_size), disable=not progress, desc="alignment", leave=False):
        chunk = scenes[start : start + batch_size]
        if model.cfg.mode == "text":
            inputs = {"prompts": [caption for caption, _ in chunk], "encoder": encoder}
        else:
            inputs = {"labels": [world.class_label(scene) for _, scene in chunk]}
        images = generate(model, vae, **inputs, height=height, width=width, sampler=sampler, steps=steps,
                          cfg_scale=cfg_scale, seed=seed + start, prediction=prediction, precision=precision,
                          decode_batch=decode_batch)
        for (caption, scene), image in zip(chunk, images):
            found = world.detect(image.permute(1, 2, 0).numpy())
            bg_ok = found.background == scene.background
            shape_ok = found.shape_color == scene.shapes[0].color
            hits["both"] += bg_ok and shape_ok
            hits["background"] += bg_ok
            hits["shape"] += shape_ok
            if len(examples) < 8:
                examples.append({"prompt": caption, "found_background": found.background,
                                 "found_shape_color": found.shape_color})
    scores = {name: count / num for name, count in hits.items()}
    return {
        "alignment": scores["both"] if model.cfg.mode == "text" else scores["shape"],
        **{f"{name}_accuracy": value for name, value in scores.items()},
        "num_prompts": num, "seed": seed, "height": height, "width": width, "sampler": sampler, "steps": steps,
        "cfg_scale": cfg_scale, "mode": model.cfg.mode, "examples": examples,
    }
