"""What a unit records: its ``manifest.json``, the handoff weights and alignment at its end, the run's summary."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.utilities.rank_zero import rank_zero_only

from callbacks.alignment import CURVE, AlignmentCurve, time_to_quality
from callbacks.fid import RECORDS as FID_RECORDS
from pixart_lightning.config import DISTILL_STAGE, BatchPlan
from pixart_lightning.encoders.frozen import FrozenEncoders
from pixart_lightning.evaluation.alignment import attribute_line
from pixart_lightning.evaluation.few_step import comparison_lines, fid_note
from pixart_lightning.evaluation.stage_samples import score_alignment
from pixart_lightning.files import sha256, write_json_atomic
from pixart_lightning.interop import save_weights
from pixart_lightning.models import PixArt
from pixart_lightning.runner.distilled import score_few_step
from pixart_lightning.runner.logs import chain_tensorboard
from pixart_lightning.runner.unit import ALIGNMENT, FINAL, FINAL_EMA, MANIFEST, SAMPLES, SAVED_CONFIG, Unit
from pixart_lightning.training import lora


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON atomically; in a multi-process run only rank 0 writes."""
    if rank_zero_only.rank == 0:
        write_json_atomic(path, payload)


def start_manifest(
    unit: Unit, text_path: str | None, parent: dict[str, str] | None, batches: BatchPlan, wall_time_s: float
) -> dict[str, Any]:
    """The manifest of a unit that starts (or resumes, after ``wall_time_s`` of training): what it trains on and
    from (``parent``: path and sha256 of the weights it starts from), written as ``running``."""
    cfg = unit.cfg
    manifest = {
        "stage": unit.stage, "phase": unit.phase, "status": "running", "config": str(unit.dir / SAVED_CONFIG),
        "parent": parent, "text_encoder": text_path, "text_max_length": cfg.text_encoder.max_length,
        "text_dtype": cfg.text_encoder.dtype, "vae": cfg.vae.name, "prediction": cfg.diffusion.prediction,
        "resolution": cfg.data.resolution, "max_steps": cfg.train.max_steps, "learning_rate": cfg.learning_rate(),
        "batch": dataclasses.asdict(batches) | {"global": batches.global_batch},
        "wall_time_s": wall_time_s,
    }
    write_json(unit.dir / MANIFEST, manifest)
    return manifest


def record_training(unit: Unit, manifest: dict[str, Any], skipped: dict[str, int]) -> None:
    """Add what training left to the manifest: the skipped samples and the FID records, if any."""
    manifest["skipped_samples"] = skipped
    if (unit.dir / FID_RECORDS).is_file():
        records = json.loads((unit.dir / FID_RECORDS).read_text())
        manifest["fid"] = [{"step": r["step"], "fid": r["fid"]} for r in records]


def finish(
    unit: Unit, trainer: L.Trainer, model: PixArt, ema: PixArt | None, manifest: dict[str, Any],
    encoders: FrozenEncoders,
) -> None:
    """Save the handoff weights (plain, unsharded models), score alignment if asked, mark the unit done.

    A LoRA unit hands on its merged weights, so the next unit, ``sample``, ``eval`` and ``export-pipeline`` read
    them as any other; its adapters alone are saved beside them (``final-lora.safetensors``, ``final-ema-lora``).
    """
    cfg = unit.cfg
    outputs = {}
    if cfg.model.lora is not None:
        outputs["lora"] = lora.save_adapters(model, lora.adapter_path(unit.dir / FINAL), cfg.model.lora)
        if ema is not None:
            outputs["ema_lora"] = lora.save_adapters(ema, lora.adapter_path(unit.dir / FINAL_EMA), cfg.model.lora)
        model, ema = lora.merged(model), lora.merged(ema) if ema is not None else None
    outputs["final"] = save_weights(model, unit.dir / FINAL, cfg.diffusion.prediction)
    if ema is not None:
        outputs["ema"] = save_weights(ema, unit.dir / FINAL_EMA, cfg.diffusion.prediction)
    manifest["weights"] = {name: {"path": str(p), "sha256": sha256(p)} for name, p in outputs.items()}
    scored = ema if cfg.samples.use_ema and ema is not None else model
    if unit.stage == DISTILL_STAGE:  # alignment, FID and time per image at each step count, beside the teacher's
        manifest["few_step"] = score_few_step(unit, trainer, scored, encoders, manifest)
    elif cfg.eval.alignment_prompts:
        manifest["alignment"] = _score_alignment(unit, trainer, scored, encoders)
    manifest["status"] = "done"
    manifest["steps"] = cfg.train.max_steps
    write_json(unit.dir / MANIFEST, manifest)
    print(f"{unit.label}: done in {manifest['wall_time_s']:.0f} s -> {unit.dir / FINAL}\n"
          f"  samples: {unit.dir / SAMPLES}   TensorBoard: tensorboard --logdir {chain_tensorboard(cfg.run_dir)}",
          flush=True)


def _score_alignment(unit: Unit, trainer: L.Trainer, model: PixArt, encoders: FrozenEncoders) -> dict[str, float]:
    """The embedded world's caption alignment of the final model, to ``alignment.json`` and TensorBoard."""
    scored = [c.final for c in trainer.callbacks if isinstance(c, AlignmentCurve) and c.final]  # the curve's end
    result = scored[0] if scored else score_alignment(model, encoders, unit.cfg, trainer.precision)
    write_json(unit.dir / ALIGNMENT, result)
    for logger in trainer.loggers:
        logger.log_metrics({f"eval/{k}": v for k, v in result.items() if k.endswith("accuracy")}, trainer.global_step)
        logger.save()
    print(f"{unit.label}: alignment {result['alignment']:.2f} ({attribute_line(result)})")
    return result


def print_summary(units: list[Unit]) -> None:
    """One line per unit: wall time, alignment (embedded world) and where to look, with the accuracy per attribute
    on a second line when alignment was scored, and a stage-4 unit's comparison with its teacher below, with how many
    images its FID had and the command for the student's full FID (rank 0 prints)."""
    if rank_zero_only.rank != 0:
        return
    print("\nsummary:")
    for unit in units:
        m = unit.manifest()
        score = m.get("alignment", {}).get("alignment")
        fids = " -> ".join(f"{r['fid']:.1f}" for r in m.get("fid", []))
        print(f"  {unit.label:16s} {m.get('wall_time_s', 0):7.0f} s   "
              + (f"alignment {score:.2f}   " if score is not None else "")
              + (f"FID {fids}   " if fids else "")
              + f"samples: {unit.dir / SAMPLES / 'final.png'}")
        if score is not None:
            print(f"  {'':16s} {attribute_line(m['alignment'])}")
        if unit.cfg.text_mode and (unit.dir / CURVE).is_file():  # "all right" needs a caption's place and size
            print(f"  {'':16s} {time_to_quality(json.loads((unit.dir / CURVE).read_text()))}")
        few_step, note = m.get("few_step", []), fid_note(m.get("few_step", []), unit.dir)
        for line in comparison_lines(few_step) + ([note] if note else []):
            print(f"  {'':16s} {line}")
    if units:
        print(f"  TensorBoard: tensorboard --logdir {chain_tensorboard(units[0].cfg.run_dir)}   (or: make tensorboard)")
