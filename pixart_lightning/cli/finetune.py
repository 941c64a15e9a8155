"""``finetune``: your photos to a fine-tuned diffusers pipeline in one resumable command (``make finetune``)."""

from __future__ import annotations

import argparse
import re

from pixart_lightning.cli.parsing import add_command

OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")
"""A ``key=value`` override (a dotted key, no slash), told apart from the image sources given before it."""


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    add_command(subparsers, "finetune", "fine-tune released weights on your images: ingest, caption, extract, train, "
                "export a diffusers pipeline, with sample grids before and after", _options, cmd_finetune)


def _options(p: argparse.ArgumentParser) -> None:
    from pixart_lightning.data.caption import DEFAULT_LLAVA
    from pixart_lightning.runner.finetune import CAPTION_MODES, DEFAULT_CONFIG

    p.add_argument("data", nargs="+", metavar="DATA", help="image folders (captions in .txt/.json beside the images "
                   "are used), folders of .tar shards or patterns; then key=value overrides for the stage")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="a config folder of one stage that starts from "
                   f"model.init_from (default: {DEFAULT_CONFIG})")
    p.add_argument("--caption", choices=CAPTION_MODES, default="auto", help="auto: LLaVA captions only the images "
                   "without a caption of their own; llava: dense LLaVA captions for every image (the paper's choice)")
    p.add_argument("--lora", type=int, metavar="RANK", help="train LoRA adapters of this rank (model.lora.rank) "
                   "instead of every weight")
    p.add_argument("--out", help="run folder (out_dir; default: the config's, runs/finetune)")
    p.add_argument("--caption-model", default=DEFAULT_LLAVA, help="LLaVA hub id or local folder")
    p.add_argument("--caption-tokens", type=int, help="new tokens per LLaVA caption at most (default: the model's)")
    p.add_argument("--batch-size", type=int, default=8, help="images per captioning and per extraction batch")
    p.set_defaults(overrides=[])  # key=value items after the options join the overrides (cli.main)


def cmd_finetune(args: argparse.Namespace) -> None:
    from pixart_lightning.runner.finetune import finetune

    items = [*args.data, *args.overrides]
    sources = [item for item in items if not OVERRIDE.match(item)]
    overrides = [item for item in items if OVERRIDE.match(item)] + ([f"out_dir={args.out}"] if args.out else [])
    if not sources:
        raise ValueError("finetune needs at least one image folder or tar (DATA)")
    finetune(sources, args.config, caption=args.caption, lora=args.lora, overrides=overrides,
             caption_model=args.caption_model, caption_tokens=args.caption_tokens, batch_size=args.batch_size)
