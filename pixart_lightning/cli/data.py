"""Dataset commands: ``data synth``, ``data ingest``, ``data caption``, ``data stats``, ``data extract``."""

from __future__ import annotations

import argparse

from pixart_lightning.cli.parsing import add_command


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    add_command(data, "synth", "write webdataset shards of the synthetic shapes world", _synth_options, cmd_synth)
    add_command(data, "ingest", "image folders or tar shards -> webdataset shards with stable keys and sizes",
                _ingest_options, cmd_ingest)
    add_command(data, "caption", "dense captions with a LLaVA model, written as dense.txt beside the original",
                _caption_options, cmd_caption)
    add_command(data, "stats", "the paper's concept-density table: nouns in original vs dense captions",
                _stats_options, cmd_stats)
    add_command(data, "extract", "precompute VAE latents (per aspect-ratio bucket) and trimmed T5 features",
                _extract_options, cmd_extract)


def _add_processes(p: argparse.ArgumentParser) -> None:
    """Which device and which share of the shards this process takes (torchrun and srun set them)."""
    p.add_argument("--device", help="default: this process's GPU ($LOCAL_RANK or $SLURM_LOCALID) if any, else cpu")
    p.add_argument("--rank", type=int, help="this process (default: $RANK or $SLURM_PROCID, else 0)")
    p.add_argument("--world-size", type=int, help="processes sharing the shards (default: $WORLD_SIZE or "
                   "$SLURM_NTASKS, else 1)")


def _synth_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="output folder")
    p.add_argument("--count", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--buckets", help="image sizes HxW to draw from, e.g. 24x48,32x32,48x24 (default: square)")
    p.add_argument("--min-aesthetic", type=float, help="keep only scenes whose aesthetic score reaches this")
    p.add_argument("--two-shape-fraction", type=float, default=0.0)
    p.add_argument("--samples-per-shard", type=int, default=2000)


def _ingest_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("sources", nargs="+", help="image folders (captions in .txt/.json beside the images), folders "
                   "of .tar shards, brace or glob patterns")
    p.add_argument("--out", required=True, help="output folder (new)")
    p.add_argument("--samples-per-shard", type=int, default=1000)


def _caption_options(p: argparse.ArgumentParser) -> None:
    from pixart_lightning.data.caption import DEFAULT_LLAVA, IMAGE_ASPECTS

    p.add_argument("source", help="folder of .tar shards (e.g. from `data ingest`), or a pattern")
    p.add_argument("out", help="output folder; a rerun resumes, skipping finished shards")
    p.add_argument("--model", default=DEFAULT_LLAVA, help="LLaVA hub id or local folder")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, help="new tokens per caption at most (default: the limit in the "
                   "model's generation config)")
    p.add_argument("--no-seed-caption", action="store_true", help="do not show the model the original caption")
    p.add_argument("--image-aspect", choices=IMAGE_ASPECTS, default="pad",
                   help="pad: the whole image on a square of the processor's mean colour (PixArt-α, LLaVA's 'pad'); "
                   "crop: the processor's centre crop, which loses the sides of wide images")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) or a torch dtype name")
    _add_processes(p)


def _stats_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="folder of .tar shards, or a pattern")
    p.add_argument("--columns", nargs="+", default=["original=txt", "dense=dense.txt"],
                   help="NAME=MEMBER caption columns (default: original=txt dense=dense.txt)")
    p.add_argument("--valid-min-count", type=int, default=10, help="a distinct noun is valid above this count")
    p.add_argument("--json", help="also write the statistics here")


def _extract_options(p: argparse.ArgumentParser) -> None:
    from pixart_lightning.encoders.loading import DTYPES
    from pixart_lightning.encoders.text import DEFAULT_T5
    from pixart_lightning.encoders.vae import DEFAULT_VAE, PIXEL_SPACE
    from pixart_lightning.models.config import CAPTION_TOKENS

    p.add_argument("source", help="folder of .tar shards (from `data ingest` or `data caption`), or a pattern")
    p.add_argument("out", help="output folder; a rerun resumes, skipping finished shards")
    p.add_argument("--vae", default=DEFAULT_VAE, help=f"hub id, folder, or {PIXEL_SPACE!r}")
    p.add_argument("--text-encoder", default=DEFAULT_T5, help="T5 hub id or folder")
    p.add_argument("--no-latents", action="store_true", help="caption features only")
    p.add_argument("--no-text", action="store_true", help="latents only (stage 1)")
    p.add_argument("--resolution", type=int, default=256, help="the training stage's data.resolution")
    p.add_argument("--multi-scale", action="store_true", help="aspect-ratio buckets (stage 3), as data.multi_scale")
    p.add_argument("--min-ratio", type=float, default=0.25)
    p.add_argument("--max-ratio", type=float, default=4.0)
    p.add_argument("--patch-size", type=int, default=2, help="the model's patch size (bucket sides are multiples "
                   "of patch x VAE factor)")
    p.add_argument("--caption-key", default="txt", help="caption to encode: txt, dense.txt, or a json field")
    p.add_argument("--max-length", type=int, default=CAPTION_TOKENS, help="T5 tokens at most")
    p.add_argument("--t5-dtype", choices=tuple(DTYPES), default="bf16", help="stored feature dtype")
    p.add_argument("--no-compress", action="store_true", help="store T5 features raw, not packed losslessly "
                   "(~70%% of raw bf16 bytes, ~3 ms to unpack per sample)")
    p.add_argument("--keep-images", action="store_true", help="keep the image members too")
    p.add_argument("--batch-size", type=int, default=32)
    _add_processes(p)


def cmd_synth(args: argparse.Namespace) -> None:
    from pixart_lightning.shapes.synth import synthesize

    buckets = [tuple(int(v) for v in size.split("x")) for size in args.buckets.split(",")] if args.buckets else None
    synthesize(args.out, count=args.count, seed=args.seed, resolution=args.resolution, buckets=buckets,
               two_shape_fraction=args.two_shape_fraction, min_aesthetic=args.min_aesthetic,
               samples_per_shard=args.samples_per_shard)


def cmd_ingest(args: argparse.Namespace) -> None:
    from pixart_lightning.data.counts import Counts
    from pixart_lightning.data.ingest import ingest

    m = ingest(args.sources, args.out, samples_per_shard=args.samples_per_shard)
    print(f"wrote {m['count']} samples in {len(m['shards'])} shards to {args.out}")
    print(f"skipped: {Counts.from_fields(m, 'skipped').summary()}")
    print(f"ignored: {Counts.from_fields(m, 'ignored').summary()}")


def cmd_caption(args: argparse.Namespace) -> None:
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


def cmd_stats(args: argparse.Namespace) -> None:
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


def cmd_extract(args: argparse.Namespace) -> None:
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
