"""The ``pixart-lightning`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

OUTPUT_FORMATS = ("native", "official", "diffusers")
TRACEBACK = "Traceback (most recent call last):\n"
WORKER_TRACEBACK = f"\nOriginal {TRACEBACK}"
"""How torch's ExceptionWrapper embeds a DataLoader worker's traceback in the error it re-raises."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from callbacks.checkpoints import DamagedCheckpoints
    from pixart_lightning.hub import ModelNotAvailableError
    from pixart_lightning.runner.chain import RunnerError

    return (ValueError, FileNotFoundError, FileExistsError, ModelNotAvailableError, RunnerError, DamagedCheckpoints)


def _source(args: argparse.Namespace) -> Path:
    """The checkpoint ``source`` names: a stage folder's final weights (their EMA with --ema), else ``source``."""
    source = Path(args.source)
    if (source / "final.safetensors").is_file():
        source = source / ("final-ema.safetensors" if args.ema else "final.safetensors")
        if not source.is_file():
            raise FileNotFoundError(f"{source} does not exist (was the stage trained with optim.ema_rate=0?)")
    elif args.ema:
        raise ValueError("--ema picks a stage folder's final-ema.safetensors; give a stage folder, e.g. runs/demo/stage3")
    return source


def _load(args: argparse.Namespace, source: Path):
    from pixart_lightning.interop import load_model

    options = {k: v for k, v in (("size", args.size), ("num_heads", args.num_heads), ("container", args.container)) if v}
    return load_model(source, **options)


def _run_manifest(checkpoint: Path) -> dict:
    """The manifest of the run folder that is or holds ``checkpoint``; {} outside a run folder."""
    import json

    from pixart_lightning.runner.chain import MANIFEST

    path = (checkpoint if checkpoint.is_dir() else checkpoint.parent) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {}


def _prediction(chosen: str | None, checkpoint: Path) -> str:
    """What the model predicts: ``chosen``, else what the checkpoint records, else its run's manifest, else epsilon."""
    from pixart_lightning.interop import read_prediction

    prediction = chosen or read_prediction(checkpoint) or _run_manifest(checkpoint).get("prediction")
    if prediction is None:
        print(f"note: {checkpoint} does not record what the model predicts; assuming epsilon "
              "(pass --prediction v for a model trained with diffusion.prediction=v)", file=sys.stderr)
        return "epsilon"
    return prediction


def cmd_info(args: argparse.Namespace) -> None:
    source = _source(args)
    model = _load(args, source)
    print(f"{args.source}: {model.cfg.mode} mode, {sum(p.numel() for p in model.parameters()):,} parameters")
    for key, value in model.cfg.to_dict().items():
        print(f"  {key:22s} {value}")
    print(f"  {'prediction':22s} {_prediction(None, source)}")


def cmd_convert(args: argparse.Namespace) -> None:
    import torch

    from pixart_lightning.interop import export_diffusers, save_weights, to_official

    source = _source(args)
    model = _load(args, source)
    out = Path(args.out)
    fmt = args.to or ("native" if out.suffix == ".safetensors" else "official" if out.suffix in (".pt", ".pth") else "diffusers")
    if fmt == "native":
        save_weights(model, out, _prediction(args.prediction, source))
    elif fmt == "official":
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": to_official(model)}, out)
    else:
        export_diffusers(model, out)
    print(f"wrote {out} ({fmt})")


def cmd_reparam(args: argparse.Namespace) -> None:
    from pixart_lightning.interop import save_weights
    from pixart_lightning.models import class_to_text

    source = _source(args)
    model = class_to_text(_load(args, source), caption_channels=args.caption_channels, t=args.t,
                          t_block_init=args.t_block_init)
    save_weights(model, args.out, _prediction(args.prediction, source))
    print(f"wrote the text-mode model to {args.out} (equal to the class model at t={args.t}, label left out)")


def cmd_export_pipeline(args: argparse.Namespace) -> None:
    from pixart_lightning.interop.pipeline import export_pipeline

    source = _source(args)
    prediction = _prediction(args.prediction, source)
    export_pipeline(_load(args, source), args.out, args.text_encoder, args.vae, prediction)
    print(f"wrote {args.out} ({prediction} prediction): load it with "
          f"diffusers.PixArtAlphaPipeline.from_pretrained({str(args.out)!r})")


def cmd_tiny_models(args: argparse.Namespace) -> None:
    from pixart_lightning.shapes.tiny_models import build_tiny_models

    for name, path in build_tiny_models(args.out).items():
        print(f"{name}: {path}")


def _run_artifacts(args: argparse.Namespace):
    """Model, VAE, text encoder, prediction and resolution for --ckpt, defaulted from the run folder's manifest."""
    from pixart_lightning.interop import load_model
    from pixart_lightning.runner.chain import load_text_encoder, load_vae

    ckpt = Path(args.ckpt)
    run = _run_manifest(ckpt)
    if ckpt.is_dir() and (ckpt / "final.safetensors").is_file():
        ckpt = ckpt / ("final-ema.safetensors" if (ckpt / "final-ema.safetensors").is_file() else "final.safetensors")
    elif ckpt.is_dir() and not (ckpt / "config.json").is_file() and list(ckpt.glob("*/final.safetensors")):
        phases = ", ".join(sorted(p.parent.name for p in ckpt.glob("*/final.safetensors")))
        raise ValueError(f"{ckpt} is a stage run in phases; pass one of its phase folders ({phases})")
    model = load_model(ckpt)
    text_name = args.text_encoder or run.get("text_encoder") or "DeepFloyd/t5-v1_1-xxl"
    encoder = load_text_encoder(text_name, run.get("text_max_length", 120), run.get("text_dtype", "fp32")) \
        if model.cfg.mode == "text" else None
    vae = load_vae(args.vae or run.get("vae") or "stabilityai/sd-vae-ft-ema")
    prediction = _prediction(args.prediction, ckpt)
    resolution = run.get("resolution") or model.cfg.sample_size * vae.downsample_factor
    return model, vae, encoder, prediction, resolution


def cmd_sample(args: argparse.Namespace) -> None:
    from pixart_lightning.evaluation.generate import generate, save_grid

    model, vae, encoder, prediction, resolution = _run_artifacts(args)
    if model.cfg.mode == "text" and not args.prompt:
        raise ValueError("a text-mode checkpoint needs --prompt")
    if model.cfg.mode == "class" and args.label is None:
        raise ValueError("a class-mode (stage 1) checkpoint needs --label")
    conditions = args.prompt if model.cfg.mode == "text" else args.label
    repeated = [c for c in conditions for _ in range(args.num)]
    key = "prompts" if model.cfg.mode == "text" else "labels"
    images = generate(
        model, vae, **{key: repeated}, encoder=encoder, height=args.height or resolution,
        width=args.width or resolution, sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg,
        seed=args.seed, progress=True, prediction=prediction,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        save_grid(image[None], out / f"{i // args.num:03d}-{i % args.num:02d}.png", scale=args.zoom)
    grid = save_grid(images, out / "grid.png", columns=args.num, scale=args.zoom)
    print(f"wrote {len(images)} images and {grid}")


def cmd_run(args: argparse.Namespace) -> None:
    from pixart_lightning.runner.chain import run

    stages = [int(s) for s in args.stages.split(",")] if args.stages else None
    run(args.config, stages, args.overrides)


def cmd_slurm(args: argparse.Namespace) -> None:
    from pixart_lightning.runner.slurm import SlurmOptions, submit

    stages = [int(s) for s in args.stages.split(",")] if args.stages else None
    options = SlurmOptions(nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
                           cpus_per_task=args.cpus_per_task, partition=args.partition, time=args.time,
                           account=args.account, qos=args.qos, sbatch_args=args.sbatch_arg)
    submit(args.config, stages, args.overrides, options, dry_run=args.dry_run)


def cmd_data_synth(args: argparse.Namespace) -> None:
    from pixart_lightning.shapes.synth import synthesize

    buckets = [tuple(int(v) for v in size.split("x")) for size in args.buckets.split(",")] if args.buckets else None
    synthesize(args.out, count=args.count, seed=args.seed, resolution=args.resolution, buckets=buckets,
               two_shape_fraction=args.two_shape_fraction, min_aesthetic=args.min_aesthetic,
               samples_per_shard=args.samples_per_shard)


def cmd_data_ingest(args: argparse.Namespace) -> None:
    from pixart_lightning.data.counts import Counts
    from pixart_lightning.data.ingest import ingest

    m = ingest(args.sources, args.out, samples_per_shard=args.samples_per_shard)
    print(f"wrote {m['count']} samples in {len(m['shards'])} shards to {args.out}")
    print(f"skipped: {Counts.from_fields(m, 'skipped').summary()}")
    print(f"ignored: {Counts.from_fields(m, 'ignored').summary()}")


def cmd_data_caption(args: argparse.Namespace) -> None:
    from pixart_lightning.data.caption import recaption
    from pixart_lightning.data.counts import Counts
    from pixart_lightning.data.workers import process_rank

    rank, world_size = process_rank(args.rank, args.world_size)
    summary = recaption(args.source, args.out, model=args.model, batch_size=args.batch_size,
                        max_new_tokens=args.max_new_tokens, seed_with_caption=not args.no_seed_caption,
                        dtype=args.dtype, device=args.device, rank=rank, world_size=world_size,
                        image_aspect=args.image_aspect)
    print(f"{summary['count']} samples captioned in {summary['shards_finished']} of {summary['shards']} shards "
          f"({summary['shards_done']} this run, {summary['shards_already_done']} done already) -> {args.out}; "
          f"skipped: {Counts.from_fields(summary).summary()}")


def cmd_data_stats(args: argparse.Namespace) -> None:
    from pixart_lightning.data.caption_stats import caption_statistics, format_table, read_captions, write_statistics
    from pixart_lightning.data.counts import Counts

    columns = dict(column.split("=", 1) if "=" in column else (column, column) for column in args.columns)
    skipped = Counts()
    captions = read_captions(args.source, list(columns.values()), skipped)
    stats = caption_statistics({name: captions[key] for name, key in columns.items()}, args.valid_min_count)
    print(format_table(stats, skipped))
    if args.json:
        write_statistics({"columns": stats, **skipped.fields()}, args.json)
        print(f"wrote {args.json}")


def cmd_data_extract(args: argparse.Namespace) -> None:
    from pixart_lightning.data.counts import Counts
    from pixart_lightning.data.extract import ExtractSettings, extract

    if args.no_latents and args.no_text:
        raise ValueError("--no-latents and --no-text together leave nothing to extract")
    settings = ExtractSettings(
        vae=None if args.no_latents else args.vae, text_encoder=None if args.no_text else args.text_encoder,
        resolution=args.resolution, multi_scale=args.multi_scale, min_ratio=args.min_ratio, max_ratio=args.max_ratio,
        patch_size=args.patch_size, caption_key=args.caption_key, max_length=args.max_length, t5_dtype=args.t5_dtype,
        t5_compress=not args.no_compress, keep_images=args.keep_images,
    )
    result = extract(args.source, args.out, settings, batch_size=args.batch_size, device=args.device,
                     rank=args.rank, world_size=args.world_size)
    if "count" in result:
        print(f"wrote features of {result['count']} samples to {args.out} ({result['bytes'] / 2**20:.1f} MiB); "
              f"skipped: {Counts.from_fields(result).summary()}")
    else:
        print("this process's shards are done; the manifest is written when the other processes finish")


def cmd_eval_alignment(args: argparse.Namespace) -> None:
    import json

    from pixart_lightning.evaluation.alignment import alignment

    model, vae, encoder, prediction, resolution = _run_artifacts(args)
    result = alignment(model, vae, encoder, num=args.num, seed=args.seed, height=args.height or resolution,
                       width=args.width or resolution, steps=args.steps, cfg_scale=args.cfg, prediction=prediction,
                       progress=True)
    print(json.dumps({k: v for k, v in result.items() if k != "examples"}, indent=2))
    print(f"alignment: {result['alignment']:.3f} over {result['num_prompts']} held-out prompts")


def cmd_eval_fid(args: argparse.Namespace) -> None:
    import dataclasses
    import json

    from omegaconf import OmegaConf

    from pixart_lightning.config import FIDSection
    from pixart_lightning.evaluation.fid import evaluate_fid
    from pixart_lightning.files import write_json_atomic

    model, vae, encoder, prediction, resolution = _run_artifacts(args)
    run_config = Path(args.ckpt) / "config.yaml"  # a stage folder: its own FID settings are the defaults
    base = OmegaConf.load(run_config).get("fid", {}) if run_config.is_file() else {}
    settings = FIDSection(**{k: v for k, v in OmegaConf.to_container(OmegaConf.create(base)).items()})
    chosen = {"reference": args.reference, "num_images": args.num_images, "extractor": args.extractor,
              "inception_weights": args.inception_weights, "captions": args.captions,
              "reference_count": args.reference_count, "steps": args.steps, "cfg_scale": args.cfg, "seed": args.seed,
              "cache_dir": args.cache_dir}
    settings = dataclasses.replace(settings, **{k: v for k, v in chosen.items() if v is not None})
    if not settings.reference:
        raise ValueError("FID needs real images to compare with: --reference FOLDER (shards or an image folder)")
    record = evaluate_fid(model, vae, encoder, settings, height=args.height or resolution,
                          width=args.width or resolution, prediction=prediction, progress=True)
    print(json.dumps(record, indent=2, default=str))
    if args.out:
        write_json_atomic(args.out, record)
    print(f"FID {record['fid']:.2f} over {record['num_images']} images ({settings.extractor} features)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pixart-lightning", description="Train and convert PixArt-α models.")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_source(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("source", help="our .safetensors, an official PixArt/DiT .pth/.pt, a diffusers folder, "
                       "or a stage folder (runs/demo/stage3: its final weights)")
        p.add_argument("--ema", action="store_true", help="with a stage folder: its EMA weights instead of the raw ones")
        p.add_argument("--size", help="named size for what shapes cannot tell (heads), e.g. PixArt-XL/2")
        p.add_argument("--num-heads", type=int, help="number of attention heads (overrides --size)")
        p.add_argument("--container", help="sub-dict of the checkpoint to read, e.g. state_dict_ema")
        return p

    p = with_source(sub.add_parser("info", help="print a checkpoint's config and parameter count"))
    p.set_defaults(func=cmd_info)

    def with_prediction(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--prediction", choices=("epsilon", "v"), help="what the model predicts (default: what its "
                       "weights record, else its run folder's manifest.json, else epsilon)")
        return p

    p = with_prediction(with_source(sub.add_parser("convert", help="convert weights between formats")))
    p.add_argument("out", help="output file or folder")
    p.add_argument("--to", choices=OUTPUT_FORMATS, help="default: from OUT (.safetensors native, .pt/.pth official, else diffusers)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("reparam", help="stage 1 -> 2: class-mode DiT to adaLN-single text model")
    p = with_prediction(with_source(p))
    p.add_argument("out", help="output .safetensors")
    p.add_argument("--caption-channels", type=int, default=4096, help="caption feature width (T5-XXL: 4096)")
    p.add_argument("--t", type=int, default=500, help="timestep at which the two models agree")
    p.add_argument("--t-block-init", choices=("mean", "random"), default="mean")
    p.set_defaults(func=cmd_reparam)

    p = with_prediction(with_source(sub.add_parser("export-pipeline", help="write a diffusers PixArtAlphaPipeline")))
    p.add_argument("out", help="output folder")
    p.add_argument("--text-encoder", required=True, help="T5 hub id or local folder")
    p.add_argument("--vae", required=True, help="VAE hub id or local folder")
    p.set_defaults(func=cmd_export_pipeline)

    p = sub.add_parser("tiny-models", help="build the tiny offline T5 (with tokenizer), VAE and LLaVA")
    p.add_argument("out", help="output folder")
    p.set_defaults(func=cmd_tiny_models)

    def with_ckpt(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--ckpt", required=True, help="a stage folder (runs/demo/stage3), its final.safetensors, "
                       "or any checkpoint `info` reads; a run folder supplies the encoder, VAE and resolution")
        p.add_argument("--text-encoder", help="T5 hub id or folder (default: the run's, else DeepFloyd/t5-v1_1-xxl)")
        p.add_argument("--vae", help="VAE hub id or folder, or 'pixel' (default: the run's, else sd-vae-ft-ema)")
        with_prediction(p)
        p.add_argument("--steps", type=int, help="sampler steps (default: 20 for dpm++, 100 for ancestral)")
        p.add_argument("--cfg", type=float, default=4.5, help="classifier-free guidance scale")
        p.add_argument("--height", type=int, help="pixels (default: the run's resolution)")
        p.add_argument("--width", type=int, help="pixels (default: the run's resolution)")
        p.add_argument("--seed", type=int, default=0)
        return p

    p = with_ckpt(sub.add_parser("sample", help="generate PNGs for prompts (or class labels) from a checkpoint"))
    p.add_argument("--prompt", action="append", help="caption (text mode); repeat for more prompts")
    p.add_argument("--label", type=int, action="append", help="class label (stage 1); repeat for more")
    p.add_argument("--num", type=int, default=4, help="images per prompt")
    p.add_argument("--sampler", choices=("dpm++", "ancestral"), default="dpm++")
    p.add_argument("--out", default="samples", help="output folder")
    p.add_argument("--zoom", type=int, default=1, help="enlarge the PNGs (nearest neighbour)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("run", help="train the stages of a config folder, each from the previous one's weights")
    p.add_argument("config", help="config folder, e.g. configs/demo or configs/pixart-xl2")
    p.add_argument("--stages", help="comma-separated, e.g. 1,2,3 (default: all)")
    p.add_argument("overrides", nargs="*", help="key=value (all stages) or stageN.key=value (one stage)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("slurm", help="submit stages as chained Slurm jobs (each starts when the previous succeeded)")
    p.add_argument("config", help="config folder, e.g. configs/pixart-xl2")
    p.add_argument("--stages", help="comma-separated, e.g. 1,2,3 (default: all)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0, help="0: CPU processes")
    p.add_argument("--tasks-per-node", type=int, help="processes per node (default: one per GPU, 1 without GPUs)")
    p.add_argument("--cpus-per-task", type=int, help="default: the cluster's")
    p.add_argument("--partition")
    p.add_argument("--time", help="time limit per job, e.g. 2-00:00:00; SIGUSR1 90 s before it checkpoints and requeues")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="--OPTION=VALUE",
                   help="another #SBATCH option (repeatable), e.g. --sbatch-arg=--constraint=a100")
    p.add_argument("--dry-run", action="store_true", help="write the scripts under <run>/slurm and print the sbatch "
                   "commands; submit nothing")
    p.add_argument("overrides", nargs="*", help="key=value (all stages) or stageN.key=value (one stage)")
    p.set_defaults(func=cmd_slurm)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("synth", help="write webdataset shards of the synthetic shapes world")
    p.add_argument("out", help="output folder")
    p.add_argument("--count", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--buckets", help="image sizes HxW to draw from, e.g. 24x48,32x32,48x24 (default: square)")
    p.add_argument("--min-aesthetic", type=float, help="keep only scenes whose aesthetic score reaches this")
    p.add_argument("--two-shape-fraction", type=float, default=0.0)
    p.add_argument("--samples-per-shard", type=int, default=2000)
    p.set_defaults(func=cmd_data_synth)

    p = data.add_parser("ingest", help="image folders or tar shards -> webdataset shards with stable keys and sizes")
    p.add_argument("sources", nargs="+", help="image folders (captions in .txt/.json beside the images), folders "
                   "of .tar shards, brace or glob patterns")
    p.add_argument("--out", required=True, help="output folder (new)")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.set_defaults(func=cmd_data_ingest)

    p = data.add_parser("caption", help="dense captions with a LLaVA model, written as dense.txt beside the original")
    p.add_argument("source", help="folder of .tar shards (e.g. from `data ingest`), or a pattern")
    p.add_argument("out", help="output folder; a rerun resumes, skipping finished shards")
    p.add_argument("--model", default="llava-hf/llava-1.5-7b-hf", help="LLaVA hub id or local folder")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, help="new tokens per caption at most (default: the limit in the "
                   "model's generation config)")
    p.add_argument("--no-seed-caption", action="store_true", help="do not show the model the original caption")
    p.add_argument("--image-aspect", choices=("pad", "crop"), default="pad",
                   help="pad: the whole image on a square of the processor's mean colour (PixArt-α, LLaVA's 'pad'); "
                   "crop: the processor's centre crop, which loses the sides of wide images")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) or a torch dtype name")
    p.add_argument("--device", help="default: this process's GPU ($LOCAL_RANK or $SLURM_LOCALID) if any, else cpu")
    p.add_argument("--rank", type=int, help="this process (default: $RANK or $SLURM_PROCID, else 0)")
    p.add_argument("--world-size", type=int, help="processes sharing the shards (default: $WORLD_SIZE or "
                   "$SLURM_NTASKS, else 1)")
    p.set_defaults(func=cmd_data_caption)

    p = data.add_parser("stats", help="the paper's concept-density table: nouns in original vs dense captions")
    p.add_argument("source", help="folder of .tar shards, or a pattern")
    p.add_argument("--columns", nargs="+", default=["original=txt", "dense=dense.txt"],
                   help="NAME=MEMBER caption columns (default: original=txt dense=dense.txt)")
    p.add_argument("--valid-min-count", type=int, default=10, help="a distinct noun is valid above this count")
    p.add_argument("--json", help="also write the statistics here")
    p.set_defaults(func=cmd_data_stats)

    p = data.add_parser("extract", help="precompute VAE latents (per aspect-ratio bucket) and trimmed T5 features")
    p.add_argument("source", help="folder of .tar shards (from `data ingest` or `data caption`), or a pattern")
    p.add_argument("out", help="output folder; a rerun resumes, skipping finished shards")
    p.add_argument("--vae", default="stabilityai/sd-vae-ft-ema", help="hub id, folder, or 'pixel'")
    p.add_argument("--text-encoder", default="DeepFloyd/t5-v1_1-xxl", help="T5 hub id or folder")
    p.add_argument("--no-latents", action="store_true", help="caption features only")
    p.add_argument("--no-text", action="store_true", help="latents only (stage 1)")
    p.add_argument("--resolution", type=int, default=256, help="the training stage's data.resolution")
    p.add_argument("--multi-scale", action="store_true", help="aspect-ratio buckets (stage 3), as data.multi_scale")
    p.add_argument("--min-ratio", type=float, default=0.25)
    p.add_argument("--max-ratio", type=float, default=4.0)
    p.add_argument("--patch-size", type=int, default=2, help="the model's patch size (bucket sides are multiples "
                   "of patch x VAE factor)")
    p.add_argument("--caption-key", default="txt", help="caption to encode: txt, dense.txt, or a json field")
    p.add_argument("--max-length", type=int, default=120, help="T5 tokens at most")
    p.add_argument("--t5-dtype", choices=("fp16", "bf16", "fp32"), default="bf16", help="stored feature dtype")
    p.add_argument("--no-compress", action="store_true", help="store T5 features raw, not packed losslessly "
                   "(~70%% of raw bf16 bytes, ~3 ms to unpack per sample)")
    p.add_argument("--keep-images", action="store_true", help="keep the image members too")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", help="default: this process's GPU ($LOCAL_RANK or $SLURM_LOCALID) if any, else cpu")
    p.add_argument("--rank", type=int, help="this process (default: $RANK or $SLURM_PROCID, else 0)")
    p.add_argument("--world-size", type=int, help="processes sharing the shards (default: $WORLD_SIZE or "
                   "$SLURM_NTASKS, else 1)")
    p.set_defaults(func=cmd_data_extract)

    evaluate = sub.add_parser("eval", help="evaluation").add_subparsers(dest="eval_command", required=True)
    p = with_ckpt(evaluate.add_parser("alignment", help="shapes-world prompt following, by a pixel detector"))
    p.add_argument("--num", type=int, default=64, help="number of held-out prompts")
    p.set_defaults(func=cmd_eval_alignment)

    p = with_ckpt(evaluate.add_parser("fid", help="FID of generated images against real ones (MS-COCO-30K protocol)"))
    p.set_defaults(cfg=None, seed=None)  # the stage's own fid settings unless given
    p.add_argument("--reference", help="real images: shard folder, pattern or image folder (default: the stage's fid "
                   "settings)")
    p.add_argument("--captions", help="captions file (COCO captions JSON, JSON list, .txt) or shards; default: the "
                   "reference's own captions")
    p.add_argument("--num-images", type=int, help="default 30000 (the FID-30K protocol) or the stage's setting")
    p.add_argument("--reference-count", type=int, help="use the first N reference images (0: all)")
    p.add_argument("--extractor", choices=("inception", "tiny"), help="inception (local weights file) or tiny (offline)")
    p.add_argument("--inception-weights", help="path of inception-2015-12-05.pt (the error says where to get it)")
    p.add_argument("--cache-dir", help="where reference statistics are cached")
    p.add_argument("--out", help="also write the record (everything that pins the protocol) as JSON here")
    p.set_defaults(func=cmd_eval_fid)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may follow options (`run configs/demo --stages 1 optim.lr=1e-4`).
    args, extra = parser.parse_known_args(argv)
    if extra and (args.command not in ("run", "slurm") or any("=" not in e or e.startswith("-") for e in extra)):
        _chosen_parser(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    command = _command_name(args)
    try:
        args.func(args)
    except Exception as err:
        from callbacks.preemption import Preempted  # late imports: keep `--help` and user errors fast

        if isinstance(err, Preempted):  # checkpointed on SIGUSR1; the requeued job (or the same command) resumes
            print(f"{command}: {err}", file=sys.stderr)
            return 0
        if not isinstance(err, _user_errors()):
            raise  # real crashes keep their traceback
        message = _own_message(err).splitlines()  # user mistakes: one line, no traceback
        print(f"{command}: error: {message[0] if message else type(err).__name__}", file=sys.stderr)
        for line in message[1:]:
            print(f"  {line}", file=sys.stderr)
        return 2
    return 0


def _chosen_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)parser of the command as typed, so that its errors show its own usage line and name
    (``pixart-lightning data ingest: error: ...``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return _chosen_parser(action.choices[getattr(args, action.dest)], args)
    return parser


def _command_name(args: argparse.Namespace) -> str:
    """The command as typed, with its subcommand if it has one: ``pixart-lightning data extract``."""
    sub = getattr(args, f"{args.command}_command", None)  # the dest of a command's subparsers (``data_command``)
    return " ".join(["pixart-lightning", args.command, *([sub] if sub else [])])


def _own_message(err: BaseException) -> str:
    """The error's message as where it was raised. torch re-raises an error of a DataLoader worker in the main
    process as the same type with the worker's traceback for a message; that is cut back to the error's own text."""
    text = str(err).strip()
    if WORKER_TRACEBACK not in text:
        return text
    last = text.rsplit(TRACEBACK, 1)[-1].splitlines()
    raised = "\n".join(last[next((i for i, line in enumerate(last) if not line.startswith(" ")), len(last)):])
    for name in (f"{type(err).__module__}.{type(err).__qualname__}", type(err).__qualname__):
        if raised.startswith(f"{name}: "):
            return raised[len(name) + 2:].strip()
    return raised.strip()


