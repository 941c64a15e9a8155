"""Generation while a stage trains: the prompts it encodes up front, its sample images and its alignment score, under
its settings."""

from __future__ import annotations

import torch
from torch import Tensor

from pixart_lightning.config import StageConfig
from pixart_lightning.diffusion.sampling import DEFAULT_CFG_SCALE
from pixart_lightning.encoders.frozen import FrozenEncoders
from pixart_lightning.evaluation.alignment import alignment
from pixart_lightning.evaluation.generate import generate
from pixart_lightning.models import PixArt
from pixart_lightning.shapes import world


def generation_prompts(cfg: StageConfig) -> list[str]:
    """The prompts a text-mode stage generates from, known before it trains: the sample grid's and the alignment
    eval's (their features are stored in one T5 load at most, see :meth:`FrozenEncoders.prepare_prompts`)."""
    scenes = world.alignment_prompts(cfg.eval.alignment_prompts, cfg.eval.seed)
    return [*cfg.samples.prompts, *(caption for caption, _ in scenes)]


@torch.no_grad()
def sample_images(
    model: PixArt, encoders: FrozenEncoders, cfg: StageConfig, precision: str, *,
    prompts: list[str] | None = None, labels: list[int] | None = None, cfg_scale: float = DEFAULT_CFG_SCALE, seed: int = 0,
) -> Tensor:
    """uint8 images (B, 3, H, W) of a training stage's ``model`` for fixed prompts or labels, at the stage's
    resolution with its sampler and prediction, under the trainer's ``precision``; the model is left in the mode
    (train or eval) it was in."""
    was_training = model.training
    s = cfg.samples
    images = generate(
        model, encoders.vae, prompts=prompts, labels=labels, encoder=encoders.prompt_encoder,
        height=cfg.data.resolution, width=cfg.data.resolution,
        sampler=s.sampler, steps=s.steps, cfg_scale=cfg_scale, seed=seed, prediction=cfg.diffusion.prediction,
        precision=precision, decode_batch=s.decode_batch,
    )
    model.train(was_training)
    return images


@torch.no_grad()
def score_alignment(model: PixArt, encoders: FrozenEncoders, cfg: StageConfig, precision: str) -> dict:
    """:func:`~pixart_lightning.evaluation.alignment.alignment` of a training stage's ``model`` on its
    ``eval.alignment_prompts`` held-out prompts, at its resolution, sampler and prediction; the model is left in the
    mode (train or eval) it was in."""
    was_training = model.training
    result = alignment(
        model, encoders.vae, encoders.prompt_encoder, num=cfg.eval.alignment_prompts, seed=cfg.eval.seed,
        height=cfg.data.resolution, width=cfg.data.resolution, sampler=cfg.samples.sampler, steps=cfg.samples.steps,
        cfg_scale=cfg.eval.cfg_scale, prediction=cfg.diffusion.prediction, precision=precision,
        decode_batch=cfg.samples.decode_batch,
    )
    model.train(was_training)
    return result
