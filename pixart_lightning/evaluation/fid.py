"""FID of generated images against cached statistics of real ones: the protocol, pinned so two numbers compare.

- **captions** (:mod:`~pixart_lightning.evaluation.captions`): a fixed list (``fid.captions``, or by default the
  captions of the reference images themselves); when it holds more than ``num_images``, ``seed`` draws the subset
  (MS-COCO-30K) and the chosen ids are written beside the results;
- **generation** (here): the configured sampler, steps and guidance, under the training precision (recorded);
  captions are cut into chunks of ``batch_size``, chunk ``c`` is generated with seed ``seed + c`` by rank
  ``c % world_size``, so the images do not depend on the number of processes;
- **resize and features** (:mod:`~pixart_lightning.evaluation.extractors`): every image, real or generated, is
  centre-cropped to a square and resized to ``resize`` (299) with clean-fid's "clean" resizer, then goes through
  clean-fid's Inception-v3 (a local file, never downloaded here) or the offline ``tiny`` extractor for the demo;
- **statistics** (:mod:`~pixart_lightning.evaluation.feature_stats`): mean and covariance accumulated as sums,
  summed across ranks; the reference's are computed once per (source files, extractor, resize, count) and cached.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from pixart_lightning.config import FIDSection
from pixart_lightning.encoders.vae import VAE, LazyVAE, PixelSpace
from pixart_lightning.evaluation.captions import Caption, ids_digest, pinned_captions
from pixart_lightning.evaluation.errors import FIDError
from pixart_lightning.evaluation.extractors import RESIZE_METHOD, FeatureExtractor, load_extractor
from pixart_lightning.evaluation.feature_stats import Moments, frechet_distance, settings_reference
from pixart_lightning.evaluation.generate import Encoder, generate
from pixart_lightning.files import write_json_atomic
from pixart_lightning.models import PixArt
from pixart_lightning.training.parallel import is_sharded


def check_settings(settings: FIDSection) -> None:
    """Raise :class:`FIDError` listing every invalid field (the runner validates configs the same way)."""
    found = settings.problems()
    if found:
        raise FIDError("invalid FID settings:\n  " + "\n  ".join(found))


def rank_chunks(num: int, batch_size: int, rank: int, world_size: int) -> list[range]:
    """This rank's chunks of the caption list: chunk ``c`` = captions [c·B, (c+1)·B) goes to rank c % world_size."""
    return [range(s, min(s + batch_size, num)) for s in range(rank * batch_size, num, world_size * batch_size)]


def generated_moments(
    model: PixArt, vae: VAE | LazyVAE | PixelSpace, encoder: Encoder | None, settings: FIDSection,
    captions: Sequence[Caption], extractor: FeatureExtractor, *, height: int, width: int, prediction: str = "epsilon",
    rank: int = 0, world_size: int = 1, precision: str = "32", progress: bool = False,
) -> Moments:
    """Feature moments of this rank's share of the images (sum them over ranks for the whole set).

    Under FSDP every rank must join every forward pass, so ranks with one chunk fewer generate a
    throw-away chunk to keep step with the others. ``precision``: the training precision, generated under
    (:func:`~pixart_lightning.evaluation.generate.generate`).
    """
    text = model.cfg.mode == "text"
    if text and not all(c.caption for c in captions):
        raise FIDError("a text-mode model needs a caption for every FID caption id (some are empty)")
    if not text and any(c.label is None for c in captions):
        raise FIDError("a class-mode model (stage 1) needs class labels for the FID captions "
                       "(shards with .cls or a json 'label', or a caption JSON with 'label')")
    chunks: list[range | None] = list(rank_chunks(len(captions), settings.batch_size, rank, world_size))
    if is_sharded(model):
        rounds = math.ceil(math.ceil(len(captions) / settings.batch_size) / world_size)
        chunks += [None] * (rounds - len(chunks))
    moments = Moments(extractor.dim)
    for chunk in tqdm(chunks, disable=not progress, desc="FID images", leave=False):
        part = [captions[i] for i in (chunk if chunk is not None else range(min(settings.batch_size, len(captions))))]
        inputs = ({"prompts": [c.caption for c in part], "encoder": encoder} if text
                  else {"labels": [int(c.label) for c in part]})
        images = generate(model, vae, **inputs, height=height, width=width, sampler=settings.sampler,
                          steps=settings.steps, cfg_scale=settings.cfg_scale, prediction=prediction,
                          seed=settings.seed + (chunk.start // settings.batch_size if chunk is not None else 0),
                          precision=precision, decode_batch=settings.decode_batch)
        if chunk is not None:
            moments.add(extractor(images))
    return moments


def _process_group(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def evaluate_fid(
    model: PixArt, vae: VAE | LazyVAE | PixelSpace, encoder: Encoder | None, settings: FIDSection, *,
    height: int, width: int, prediction: str = "epsilon", captions: Sequence[Caption] | None = None,
    extractor: FeatureExtractor | None = None, rank: int | None = None, world_size: int | None = None,
    device: torch.device | str | None = None, ids_file: str | os.PathLike | None = None, precision: str = "32",
    progress: bool = False,
) -> dict[str, Any] | None:
    """FID of ``model``'s images for the pinned captions: the record on rank 0, None on the others.

    Every rank generates its share; feature moments are summed over ``torch.distributed`` when it is
    initialised. ``captions`` and ``extractor`` may be passed in to skip reloading them;
    ``ids_file`` receives the pinned caption list (rank 0). The record holds everything that pins the
    protocol (caption ids' hash and file, sampler, steps, guidance, size, extractor, resize, reference and
    counts) and ``seconds``: setup (captions, extractor, reference statistics) and generation (images,
    features, distance).
    """
    check_settings(settings)
    started = time.time()
    rank, world_size = _process_group(rank, world_size)
    if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        raise FIDError(f"world_size={world_size} without torch.distributed: the ranks' images could not be combined")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    captions = list(captions) if captions is not None else pinned_captions(settings)
    extractor = extractor or load_extractor(settings, device)
    reference = settings_reference(settings, extractor, progress) if rank == 0 else None  # fails before generating
    setup_s = time.time() - started
    was_training = model.training
    moments = generated_moments(model, vae, encoder, settings, captions, extractor, height=height, width=width,
                                prediction=prediction, rank=rank, world_size=world_size, precision=precision,
                                progress=progress)
    model.train(was_training)
    if world_size > 1:
        moments.all_reduce(device)
    if reference is None:
        return None
    fid = frechet_distance(*moments.mean_cov(), reference.mu, reference.sigma)
    if ids_file:
        write_json_atomic(ids_file, [c.as_json() for c in captions])
    return {
        "fid": fid,
        "num_images": moments.count,
        "captions": {"source": settings.captions or settings.reference, "caption_key": settings.caption_key,
                     "seed": settings.seed, "ids_sha256": ids_digest(captions),
                     "ids_file": str(ids_file) if ids_file else None},
        "sampler": settings.sampler, "steps": settings.steps, "cfg_scale": settings.cfg_scale,
        "height": height, "width": width, "prediction": prediction, "batch_size": settings.batch_size,
        "seed": settings.seed, "mode": model.cfg.mode, "precision": precision,
        "extractor": {"name": extractor.name, "identity": extractor.identity, "dim": extractor.dim},
        "resize": {"size": extractor.resize, "method": RESIZE_METHOD},
        "reference": {"source": settings.reference, "count": reference.count, "cache": str(reference.cache)},
        "world_size": world_size,
        "seconds": {"setup": round(setup_s, 2), "generation": round(time.time() - started - setup_s, 2)},
    }


def append_record(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Add a record to a JSON list file, written atomically. A record with a ``step`` replaces those at that step
    or later: they came from an attempt that stopped before its next checkpoint, which the stage trains again."""
    path = Path(path)
    records = json.loads(path.read_text()) if path.is_file() else []
    if "step" in record:
        records = [r for r in records if r.get("step", -1) < record["step"]]
    write_json_atomic(path, [*records, record])
