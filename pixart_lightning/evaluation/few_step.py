"""Stage 4's end-of-stage comparison: the consistency student at every step count it serves beside its teacher at
DPM-Solver++ 20 steps with the guidance the student was distilled at: alignment, FID (when the stage configures
it, on at most :data:`COMPARISON_FID_IMAGES` images) and the wall time per image, all measured alike in one run."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pixart_lightning.config import FIDSection, StageConfig
from pixart_lightning.diffusion.sampling import CONSISTENCY_SAMPLER, DEFAULT_SAMPLER, DEFAULT_STEPS
from pixart_lightning.encoders.vae import VAE, LazyVAE, PixelSpace
from pixart_lightning.evaluation.alignment import alignment
from pixart_lightning.evaluation.captions import pinned_captions
from pixart_lightning.evaluation.extractors import load_extractor
from pixart_lightning.evaluation.fid import evaluate_fid
from pixart_lightning.evaluation.generate import Encoder, generate
from pixart_lightning.evaluation.stage_samples import generation_prompts
from pixart_lightning.models import PixArt

STUDENT_SAMPLER, TEACHER_SAMPLER = CONSISTENCY_SAMPLER, DEFAULT_SAMPLER
TEACHER_STEPS = DEFAULT_STEPS[TEACHER_SAMPLER]
TIMING_BATCH = 32
"""Images generated at once when timing (the first of the stage's stored prompts)."""
TIMING_REPEATS = 3
"""Each contender generates the timing batch this often; the fastest counts (the first also warms up)."""
COMPARISON_FID_IMAGES = 1000
"""The most images each contender's FID is measured on in the comparison (fewer when ``fid.num_images`` says so).
The comparison runs on rank 0 alone while the other ranks wait at a barrier, and five contenders at FID-30K's 30,000
images each would outlast the process group's timeout. FID on 1,000 images is biased upwards, alike for every
contender: it ranks them, and the student's FID-30K is ``pixart-lightning eval fid --ckpt <stage folder>``."""


@dataclass(frozen=True)
class Contender:
    """One row of the comparison: a model and how it is sampled."""

    role: str
    model: PixArt
    sampler: str
    steps: int
    cfg_scale: float


def comparison_fid(settings: FIDSection) -> FIDSection:
    """The stage's FID settings with at most :data:`COMPARISON_FID_IMAGES` images."""
    return dataclasses.replace(settings, num_images=min(settings.num_images, COMPARISON_FID_IMAGES))


def contenders(student: PixArt, teacher: PixArt | None, cfg: StageConfig) -> list[Contender]:
    """The student at each of ``distill.steps`` (unguided: its guidance is folded in), then the teacher at 20 steps
    guided at ``distill.cfg_scale`` (left out without a teacher)."""
    rows = [Contender("student", student, STUDENT_SAMPLER, steps, 1.0) for steps in sorted(cfg.distill.steps)]
    if teacher is not None:
        rows.append(Contender("teacher", teacher, TEACHER_SAMPLER, TEACHER_STEPS, cfg.distill.cfg_scale))
    return rows


class EncodedPrompts:
    """The caption features of fixed prompts, encoded once: an encoder for :func:`generate` that costs nothing."""

    def __init__(self, encoder: Encoder, prompts: list[str]):
        self.prompts = list(prompts)
        self.features = encoder.encode(self.prompts, trim=True)

    def encode(self, prompts: list[str], trim: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        if list(prompts) != self.prompts or not trim:
            raise ValueError("EncodedPrompts encodes only the prompts it was made with")
        return self.features


def seconds_per_image(
    contender: Contender, vae: VAE | LazyVAE | PixelSpace, encoder: Encoder | None, prompts: list[str], **generation: Any
) -> float:
    """Wall time of sampling and decoding ``prompts`` in one batch, per image (the prompts are encoded once before:
    text encoding costs every contender the same): the fastest of :data:`TIMING_REPEATS` runs, so that warm-up and
    a busy machine's hiccups count least."""
    encoded = EncodedPrompts(encoder, prompts) if encoder is not None else None
    runs = []
    for _ in range(TIMING_REPEATS):
        started = time.perf_counter()
        generate(contender.model, vae, prompts=prompts, encoder=encoded, sampler=contender.sampler,
                 steps=contender.steps, cfg_scale=contender.cfg_scale, **generation)  # images return on the CPU: synced
        runs.append(time.perf_counter() - started)
    return min(runs) / len(prompts)


@torch.no_grad()
def compare_few_step(
    student: PixArt, teacher: PixArt | None, vae: VAE | LazyVAE | PixelSpace, encoder: Encoder | None,
    cfg: StageConfig, precision: str = "32", progress: bool = False,
) -> list[dict[str, Any]]:
    """One record per contender (:func:`contenders`): role, sampler, steps, guidance, ``alignment`` (with its
    per-attribute accuracies; when ``eval.alignment_prompts``), ``fid`` and ``fid_images`` (when ``fid.reference``;
    :func:`comparison_fid`'s images, not FID-30K) and ``seconds_per_image`` (on the stage's first stored prompts, the
    same batch for every contender)."""
    resolution = cfg.data.resolution
    generation = {"height": resolution, "width": resolution, "prediction": cfg.diffusion.prediction,
                  "precision": precision, "decode_batch": cfg.samples.decode_batch}
    timing_prompts = generation_prompts(cfg)[:TIMING_BATCH]
    fid_settings = comparison_fid(cfg.fid)
    fid_inputs = {}
    if fid_settings.enabled:
        fid_inputs = {"captions": pinned_captions(fid_settings),
                      "extractor": load_extractor(cfg.fid, next(student.parameters()).device)}
    records = []
    for contender in contenders(student, teacher, cfg):
        sampling = {"sampler": contender.sampler, "steps": contender.steps, "cfg_scale": contender.cfg_scale}
        record: dict[str, Any] = {"model": contender.role, **sampling}
        if timing_prompts:
            record["seconds_per_image"] = seconds_per_image(contender, vae, encoder, timing_prompts, **generation)
        if cfg.eval.alignment_prompts:
            scores = alignment(contender.model, vae, encoder, num=cfg.eval.alignment_prompts, seed=cfg.eval.seed,
                               progress=progress, **generation, **sampling)
            record["alignment"] = {k: v for k, v in scores.items() if k == "alignment" or k.endswith("accuracy")}
        if fid_inputs:
            settings = dataclasses.replace(fid_settings, **sampling)
            measured = evaluate_fid(contender.model, vae, encoder, settings, height=resolution, width=resolution,
                                    prediction=cfg.diffusion.prediction, rank=0, world_size=1, precision=precision,
                                    progress=progress, **fid_inputs)
            record |= {"fid": measured["fid"], "fid_images": measured["num_images"]}
        records.append(record)
    return records


def comparison_lines(records: list[dict[str, Any]]) -> list[str]:
    """The comparison as console lines, one per record, with each student's speed-up over the teacher."""
    teacher = next((r for r in records if r["model"] == "teacher"), None)
    lines = []
    for r in records:
        guidance = f"guidance {r['cfg_scale']:g}" if r["cfg_scale"] != 1.0 else "unguided"
        line = f"{r['model']} {r['sampler']:5s} {r['steps']:2d} step{'s' if r['steps'] > 1 else ' '} {guidance:13s}"
        if "alignment" in r:
            line += f"  alignment {r['alignment']['alignment']:.2f}"
        if "fid" in r:
            line += f"  FID {r['fid']:.1f}"
        if "seconds_per_image" in r:
            line += f"  {r['seconds_per_image'] * 1000:.2f} ms/image"
            if teacher is not None and r is not teacher and "seconds_per_image" in teacher:
                line += f" ({teacher['seconds_per_image'] / r['seconds_per_image']:.1f}x faster)"
        lines.append(line)
    return lines


def fid_note(records: list[dict[str, Any]], folder: Path) -> str | None:
    """What the comparison's FID is, and the command that measures the stage-4 ``folder``'s student by the stage's
    own FID settings (FID-30K at full scale); None without FID."""
    counts = sorted({r["fid_images"] for r in records if "fid_images" in r})
    if not counts:
        return None
    steps = sorted(r["steps"] for r in records if r["model"] == "student")
    default = DEFAULT_STEPS[STUDENT_SAMPLER] if DEFAULT_STEPS[STUDENT_SAMPLER] in steps else steps[-1]
    return (f"FID of {', '.join(map(str, counts))} images per row (at most {COMPARISON_FID_IMAGES}: it ranks the rows); "
            f"the student's full FID: pixart-lightning eval fid --ckpt {folder} --steps {default}")
