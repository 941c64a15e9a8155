"""Commands on a trained model's images: ``sample``, ``eval alignment``, ``eval fid``."""

from __future__ import annotations

import argparse
from pathlib import Path

from pixart_lightning.cli.parsing import add_command, add_prediction_option


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    add_command(subparsers, "sample", "generate PNGs for prompts (or class labels) from a checkpoint", _sample_options,
                cmd_sample)
    evaluate = subparsers.add_parser("eval", help="evaluation").add_subparsers(dest="eval_command", required=True)
    add_command(evaluate, "alignment", "shapes-world prompt following, by a pixel detector", _alignment_options,
                cmd_eval_alignment)
    add_command(evaluate, "fid", "FID of generated images against real ones (MS-COCO-30K protocol)", _fid_options,
                cmd_eval_fid)


def _add_checkpoint(p: argparse.ArgumentParser) -> None:
    from pixart_lightning.diffusion import SAMPLERS
    from pixart_lightning.diffusion.sampling import DEFAULT_CFG_SCALE, DEFAULT_STEPS
    from pixart_lightning.encoders.text import DEFAULT_T5
    from pixart_lightning.encoders.vae import DEFAULT_VAE, PIXEL_SPACE

    p.add_argument("--ckpt", required=True, help="a stage folder (runs/demo/stage3), its final.safetensors, "
                   "or any checkpoint `info` reads; a run folder supplies the encoder, VAE and resolution")
    p.add_argument("--text-encoder", help=f"T5 hub id or folder (default: the run's, else {DEFAULT_T5})")
    p.add_argument("--vae", help=f"VAE hub id or folder, or {PIXEL_SPACE!r} (default: the run's, else {DEFAULT_VAE})")
    add_prediction_option(p)
    defaults = ", ".join(f"{steps} for {sampler}" for sampler, steps in DEFAULT_STEPS.items())
    p.add_argument("--sampler", choices=SAMPLERS, help="default: lcm for a stage-4 (consistency-distilled) folder, "
                   "else dpm++")
    p.add_argument("--steps", type=int, help=f"sampler steps (default: {defaults}); a stage-4 folder takes only the "
                   "step counts it was distilled for (its distill.steps)")
    p.add_argument("--cfg", type=float, help=f"classifier-free guidance scale (default: {DEFAULT_CFG_SCALE:g}; 1 "
                   "with lcm, whose stage-4 model has its guidance folded in)")
    p.add_argument("--height", type=int, help="pixels (default: the run's resolution)")
    p.add_argument("--width", type=int, help="pixels (default: the run's resolution)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lora", help="merge these LoRA adapters into --ckpt first: a LoRA stage folder (its EMA's where "
                   "kept) or its final-lora.safetensors, trained on the --ckpt weights")


def _sample_options(p: argparse.ArgumentParser) -> None:
    _add_checkpoint(p)
    p.add_argument("--prompt", action="append", help="caption (text mode); repeat for more prompts")
    p.add_argument("--label", type=int, action="append", help="class label (stage 1); repeat for more")
    p.add_argument("--num", type=int, default=4, help="images per prompt")
    p.add_argument("--out", default="samples", help="output folder")
    p.add_argument("--zoom", type=int, default=1, help="enlarge the PNGs (nearest neighbour)")


def _alignment_options(p: argparse.ArgumentParser) -> None:
    _add_checkpoint(p)
    p.add_argument("--num", type=int, default=64, help="number of held-out prompts")
    p.add_argument("--recolor", action="append", metavar="NAME=NEW", help="score a recolouring instead (red=teal: "
                   "captions say red, pixels should be teal; make finetune-demo): the share of prompts naming NAME "
                   "drawn in NEW, and the alignment of prompts that do not name it; repeat for more colours")


def _fid_options(p: argparse.ArgumentParser) -> None:
    from pixart_lightning.config import EXTRACTORS

    _add_checkpoint(p)
    p.set_defaults(seed=None)  # the stage's own fid settings unless given
    p.add_argument("--reference", help="real images: shard folder, pattern or image folder (default: the stage's fid "
                   "settings)")
    p.add_argument("--captions", help="captions file (COCO captions JSON, JSON list, .txt) or shards; default: the "
                   "reference's own captions")
    p.add_argument("--num-images", type=int, help="default 30000 (the FID-30K protocol) or the stage's setting")
    p.add_argument("--reference-count", type=int, help="use the first N reference images (0: all)")
    p.add_argument("--extractor", choices=EXTRACTORS, help="inception (local weights file) or tiny (offline)")
    p.add_argument("--inception-weights", help="path of inception-2015-12-05.pt (the error says where to get it)")
    p.add_argument("--cache-dir", help="where reference statistics are cached")
    p.add_argument("--out", help="also write the record (everything that pins the protocol) as JSON here")


def _load(args: argparse.Namespace):
    from pixart_lightning.runner.folders import load_run_artifacts

    return load_run_artifacts(args.ckpt, text_encoder=args.text_encoder, vae=args.vae, prediction=args.prediction,
                              lora=args.lora)


def _sampling(args: argparse.Namespace):
    """--sampler, --steps and --cfg as --ckpt takes them (a stage-4 folder: lcm at its distilled step counts)."""
    from pixart_lightning.runner.distilled import sampling_choice

    return sampling_choice(args.ckpt, args.sampler, args.steps, args.cfg)


def cmd_sample(args: argparse.Namespace) -> None:
    from pixart_lightning.evaluation.generate import generate, save_grid

    sampling = _sampling(args)
    run = _load(args)
    mode = run.model.cfg.mode
    if mode == "text" and not args.prompt:
        raise ValueError("a text-mode checkpoint needs --prompt")
    if mode == "class" and args.label is None:
        raise ValueError("a class-mode (stage 1) checkpoint needs --label")
    conditions = args.prompt if mode == "text" else args.label
    repeated = [c for c in conditions for _ in range(args.num)]
    images = generate(
        run.model, run.vae, **{"prompts" if mode == "text" else "labels": repeated}, encoder=run.encoder,
        height=args.height or run.resolution, width=args.width or run.resolution, seed=args.seed, progress=True,
        prediction=run.prediction, **sampling.given(),
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        save_grid(image[None], out / f"{i // args.num:03d}-{i % args.num:02d}.png", scale=args.zoom)
    grid = save_grid(images, out / "grid.png", columns=args.num, scale=args.zoom)
    print(f"wrote {len(images)} images and {grid}")


def cmd_eval_alignment(args: argparse.Namespace) -> None:
    import json

    from pixart_lightning.evaluation.alignment import alignment, attribute_accuracies

    sampling = _sampling(args)
    run = _load(args)
    if args.recolor:
        _recolor_alignment(args, run, sampling)
        return
    result = alignment(run.model, run.vae, run.encoder, num=args.num, seed=args.seed,
                       height=args.height or run.resolution, width=args.width or run.resolution,
                       prediction=run.prediction, progress=True, **sampling.given())
    print(json.dumps({k: v for k, v in result.items() if k != "examples"}, indent=2))
    print(f"alignment: {result['alignment']:.3f} over {result['num_prompts']} held-out prompts")
    for attribute, accuracy in attribute_accuracies(result).items():
        print(f"  {attribute:10s} {accuracy:.3f}")


def _recolor_alignment(args: argparse.Namespace, run, sampling) -> None:
    from pixart_lightning.evaluation.alignment import recolor_alignment

    pairs = [item.split("=", 1) for item in args.recolor]
    if any(len(pair) != 2 for pair in pairs):
        raise ValueError(f"--recolor takes NAME=NEW (e.g. red=teal), not {' '.join(args.recolor)}")
    scores = recolor_alignment(run.model, run.vae, run.encoder, dict(pairs), num=args.num, seed=args.seed,
                               height=args.height or run.resolution, width=args.width or run.resolution,
                               prediction=run.prediction, **sampling.given())
    named = ", ".join(f'"{name}" as {new}' for name, new in pairs)
    print(f"{args.ckpt}: {named}: {scores['recolored']:.2f} of {scores['num_recolored_prompts']} held-out prompts; "
          f"alignment without them {scores['untouched_alignment']:.2f} over {scores['num_untouched_prompts']}")


def cmd_eval_fid(args: argparse.Namespace) -> None:
    import dataclasses
    import json

    from pixart_lightning.config import FIDSection
    from pixart_lightning.evaluation.fid import evaluate_fid
    from pixart_lightning.files import write_json_atomic
    from pixart_lightning.runner.folders import saved_config

    sampling = _sampling(args)
    run = _load(args)
    stage = saved_config(args.ckpt)  # a stage folder: its own FID settings are the defaults
    chosen = {"reference": args.reference, "num_images": args.num_images, "extractor": args.extractor,
              "inception_weights": args.inception_weights, "captions": args.captions,
              "reference_count": args.reference_count, "seed": args.seed, "cache_dir": args.cache_dir,
              **sampling.given()}
    settings = dataclasses.replace(stage.fid if stage else FIDSection(),
                                   **{k: v for k, v in chosen.items() if v is not None})
    if not settings.reference:
        raise ValueError("FID needs real images to compare with: --reference FOLDER (shards or an image folder)")
    record = evaluate_fid(run.model, run.vae, run.encoder, settings, height=args.height or run.resolution,
                          width=args.width or run.resolution, prediction=run.prediction, progress=True)
    print(json.dumps(record, indent=2, default=str))
    if args.out:
        write_json_atomic(args.out, record)
    print(f"FID {record['fid']:.2f} over {record['num_images']} images ({settings.extractor} features)")
