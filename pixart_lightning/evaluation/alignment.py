"""Prompt-following on the embedded shapes world, scored by its own pixel detectors (colours and form)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tqdm.auto import tqdm

from pixart_lightning.diffusion.sampling import DEFAULT_CFG_SCALE, DEFAULT_SAMPLER
from pixart_lightning.encoders.vae import VAE, LazyVAE, PixelSpace
from pixart_lightning.evaluation.generate import Encoder, generate
from pixart_lightning.models import PixArt
from pixart_lightning.shapes import form, world

ATTRIBUTES = {
    "background": "background_accuracy", "colour": "shape_accuracy", "shape": "kind_accuracy",
    "position": "position_accuracy", "size": "size_accuracy", "all right": "all_accuracy",
}
"""What ``alignment`` scores, as shown (attribute -> its key in the result); ``shape_accuracy`` is the shape's
colour (its name from before the form was read), ``kind_accuracy`` its kind."""
_CLASS_ATTRIBUTES = ("colour", "shape")
"""The attributes a class label names."""


def alignment(
    model: PixArt,
    vae: VAE | LazyVAE | PixelSpace,
    encoder: Encoder | None,
    *,
    num: int = 64,
    seed: int = 0,
    height: int = 32,
    width: int = 32,
    sampler: str = DEFAULT_SAMPLER,
    steps: int = 20,
    cfg_scale: float = DEFAULT_CFG_SCALE,
    prediction: str = "epsilon",
    batch_size: int = 32,
    precision: str = "32",
    decode_batch: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Fraction of generated images whose shape colour and background colour are as asked (``alignment``), and the
    accuracy of each attribute (``ATTRIBUTES``) with ``all_accuracy`` for every one right.

    Prompts are single-shape scenes whose wording is held out of every training set. A text model
    gets the dense caption; a class model (stage 1) gets the scene's class label, which names the
    shape colour and kind but not the background, position or size, so for it only those two are meaningful (its
    ``alignment`` is the shape-colour accuracy). Colours are read by ``world.detect``, the form by
    ``form.read_form``. ``precision`` and ``decode_batch`` are :func:`~pixart_lightning.evaluation.generate.generate`'s.
    """
    scenes = world.alignment_prompts(num, seed)
    hits = dict.fromkeys(("both", "background", "shape", "kind", "position", "size", "all"), 0)
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
            pixels = image.permute(1, 2, 0).numpy()
            found, shape = world.detect(pixels), form.read_form(pixels)
            asked = scene.shapes[0]
            right = {"background": found.background == scene.background, "shape": found.shape_color == asked.color,
                     **{name: shape is not None and getattr(shape, name) == getattr(asked, name)
                        for name in ("kind", "position", "size")}}
            right |= {"both": right["background"] and right["shape"], "all": all(right.values())}
            for name, ok in right.items():
                hits[name] += ok
            if len(examples) < 8:
                examples.append({"prompt": caption, "found_background": found.background,
                                 "found_shape_color": found.shape_color,
                                 **({f"found_{k}": v for k, v in vars(shape).items()} if shape else {})})
    scores = {name: count / num for name, count in hits.items()}
    return {
        "alignment": scores["both"] if model.cfg.mode == "text" else scores["shape"],
        **{f"{name}_accuracy": value for name, value in scores.items()},
        "num_prompts": num, "seed": seed, "height": height, "width": width, "sampler": sampler, "steps": steps,
        "cfg_scale": cfg_scale, "mode": model.cfg.mode, "examples": examples,
    }


def attribute_accuracies(result: Mapping[str, Any]) -> dict[str, float]:
    """An ``alignment`` result's accuracies by attribute name: all of ``ATTRIBUTES`` for a text model, colour and
    shape for a class model; those a result from before the form was read lacks are left out."""
    names = ATTRIBUTES if result.get("mode", "text") == "text" else _CLASS_ATTRIBUTES
    return {name: result[ATTRIBUTES[name]] for name in names if ATTRIBUTES[name] in result}


def attribute_line(result: Mapping[str, Any]) -> str:
    """E.g. "background 1.00  colour 0.92  shape 0.27  position 0.80  size 0.84  all right 0.14"."""
    return "  ".join(f"{name} {value:.2f}" for name, value in attribute_accuracies(result).items())


def recolor_alignment(
    model: PixArt,
    vae: VAE | LazyVAE | PixelSpace,
    encoder: Encoder | None,
    recolor: Mapping[str, str],
    *,
    num: int = 64,
    seed: int = 0,
    height: int = 32,
    width: int = 32,
    sampler: str = DEFAULT_SAMPLER,
    steps: int = 20,
    cfg_scale: float = DEFAULT_CFG_SCALE,
    prediction: str = "epsilon",
    batch_size: int = 32,
) -> dict[str, Any]:
    """How a text model follows a recolouring (``{"red": "teal"}``: captions say red, pixels should be teal).

    Of the held-out single-shape prompts (the first ``num`` that name a recoloured colour, and the first ``num``
    that name none), scored with ``world.DETECTOR_COLORS``: ``recolored`` is the share of the first kind whose
    every recoloured part (shape or background) is drawn in its new colour; ``recolored_alignment`` their
    alignment with the recoloured names; ``untouched_alignment`` the alignment of the second kind as worded.
    """
    unknown = sorted(set(recolor.values()) - set(world.DETECTOR_COLORS))
    if model.cfg.mode != "text" or unknown:
        raise ValueError(f"recolor_alignment needs a text model and colours of world.DETECTOR_COLORS (not {unknown})")
    pool = world.alignment_prompts(len(world.held_out_prompts()), seed)
    named = [(c, s) for c, s in pool if {s.background, s.shapes[0].color} & set(recolor)][:num]
    untouched = [(c, s) for c, s in pool if not {s.background, s.shapes[0].color} & set(recolor)][:num]
    found = _detections(model, vae, encoder, named + untouched, height=height, width=width, sampler=sampler,
                        steps=steps, cfg_scale=cfg_scale, seed=seed, prediction=prediction, batch_size=batch_size)
    recolored = both = 0
    for (_, scene), seen in zip(named, found[: len(named)]):
        background = recolor.get(scene.background, scene.background)
        shape = recolor.get(scene.shapes[0].color, scene.shapes[0].color)
        both += seen.background == background and seen.shape_color == shape
        recolored += all(seen_name == recolor[asked] for asked, seen_name in
                         ((scene.background, seen.background), (scene.shapes[0].color, seen.shape_color))
                         if asked in recolor)
    kept = sum(seen.background == scene.background and seen.shape_color == scene.shapes[0].color
               for (_, scene), seen in zip(untouched, found[len(named):]))
    return {
        "recolored": recolored / len(named), "recolored_alignment": both / len(named),
        "untouched_alignment": kept / len(untouched), "num_recolored_prompts": len(named),
        "num_untouched_prompts": len(untouched), "recolor": dict(recolor), "seed": seed, "sampler": sampler,
        "steps": steps, "cfg_scale": cfg_scale,
    }


def _detections(
    model: PixArt, vae: VAE | LazyVAE | PixelSpace, encoder: Encoder | None, prompts: list[tuple[str, world.Scene]],
    *, seed: int, batch_size: int, **sampling: Any,
) -> list[world.Detection]:
    """What ``world.detect`` reads (with ``DETECTOR_COLORS``) off the images generated for ``prompts``' captions."""
    found = []
    for start in range(0, len(prompts), batch_size):
        chunk = [caption for caption, _ in prompts[start : start + batch_size]]
        images = generate(model, vae, prompts=chunk, encoder=encoder, seed=seed + start, **sampling)
        found += [world.detect(image.permute(1, 2, 0).numpy(), world.DETECTOR_COLORS) for image in images]
    return found
