"""Export a text-mode backbone with a text encoder and VAE as a diffusers ``PixArtAlphaPipeline``."""

from __future__ import annotations

import os
from pathlib import Path

from pixart_lightning.diffusion.gaussian_diffusion import check_prediction
from pixart_lightning.diffusion.sampling import DEFAULT_SAMPLER, diffusers_scheduler
from pixart_lightning.encoders.text import T5TextEncoder
from pixart_lightning.encoders.vae import VAE
from pixart_lightning.interop.formats import save_null_caption, to_diffusers_model
from pixart_lightning.models.pixart import PixArt


def export_pipeline(
    model: PixArt, folder: str | os.PathLike, text_encoder: str | os.PathLike, vae: str | os.PathLike,
    prediction: str = "epsilon", sampler: str = DEFAULT_SAMPLER,
) -> Path:
    """Write a folder that ``PixArtAlphaPipeline.from_pretrained(folder)`` loads and runs offline.

    ``text_encoder`` and ``vae`` are hub ids or local folders (a pipeline folder works for both).
    The scheduler is our ``sampler``'s (:func:`~pixart_lightning.diffusion.sampling.diffusers_scheduler`), set to
    what the model predicts (``epsilon`` or ``v``, as it was trained): ``dpm++``, 2nd-order DPM-Solver++ over the
    training schedule, as PixArt-α samples; ``lcm``, diffusers' ``LCMScheduler`` for a consistency-distilled
    (stage-4) model. The latter has its guidance folded in: call the pipeline with ``guidance_scale=1.0`` (any
    value ≤ 1 turns diffusers' classifier-free guidance off; its default, 4.5, would guide a second time) and
    ``num_inference_steps`` one of the step counts it was distilled for.
    Note that diffusers guides with T5("") as the negative prompt, while our sampler uses the
    model's null caption embedding; it is kept in ``transformer/`` as ``null_caption.safetensors``
    so that importing the folder restores it.
    """
    from diffusers import PixArtAlphaPipeline

    if model.cfg.mode != "text":
        raise ValueError("only a text-mode model can be exported as a PixArtAlphaPipeline")
    scheduler = diffusers_scheduler(sampler, check_prediction(prediction))
    encoder = T5TextEncoder.from_pretrained(text_encoder)
    autoencoder = VAE.from_pretrained(vae)
    problems = []
    if encoder.dim != model.cfg.caption_channels:
        problems.append(f"text encoder width {encoder.dim} != model caption_channels {model.cfg.caption_channels}")
    if autoencoder.latent_channels != model.cfg.in_channels:
        problems.append(f"VAE latent channels {autoencoder.latent_channels} != model in_channels {model.cfg.in_channels}")
    if problems:
        raise ValueError("cannot export pipeline: " + "; ".join(problems))
    pipeline = PixArtAlphaPipeline(
        tokenizer=encoder.tokenizer,
        text_encoder=encoder.model,
        vae=autoencoder.model,
        transformer=to_diffusers_model(model),
        scheduler=scheduler,
    )
    folder = Path(folder)
    pipeline.save_pretrained(folder)
    save_null_caption(model, folder / "transformer")
    return folder
