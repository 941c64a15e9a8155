"""The ``pixart-lightning`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

OUTPUT_FORMATS = ("native", "official", "diffusers")


def _load(args: argparse.Namespace):
    from .interop import load_model

    options = {k: v for k, v in (("size", args.size), ("num_heads", args.num_heads), ("container", args.container)) if v}
    return load_model(args.source, **options)


def cmd_info(args: argparse.Namespace) -> None:
    model = _load(args)
    print(f"{args.source}: {model.cfg.mode} mode, {sum(p.numel() for p in model.parameters()):,} parameters")
    for key, value in model.cfg.to_dict().items():
        print(f"  {key:22s} {value}")


def cmd_convert(args: argparse.Namespace) -> None:
    import torch

    from .interop import export_diffusers, save_weights, to_official

    model = _load(args)
    out = Path(args.out)
    fmt = args.to or ("native" if out.suffix == ".safetensors" else "official" if out.suffix in (".pt", ".pth") else "diffusers")
    if fmt == "native":
        save_weights(model, out)
    elif fmt == "official":
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": to_official(model)}, out)
    else:
        export_diffusers(model, out)
    print(f"wrote {out} ({fmt})")


def cmd_reparam(args: argparse.Namespace) -> None:
    from .interop import save_weights
    from .models import class_to_text

    model = class_to_text(_load(args), caption_channels=args.caption_channels, t=args.t, t_block_init=args.t_block_init)
    save_weights(model, args.out)
    print(f"wrote the text-mode model to {args.out} (equal to the class model at t={args.t}, label left out)")


def cmd_export_pipeline(args: argparse.Namespace) -> None:
    from .interop.pipeline import export_pipeline

    export_pipeline(_load(args), args.out, args.text_encoder, args.vae)
    print(f"wrote {args.out}: load it with diffusers.PixArtAlphaPipeline.from_pretrained({str(args.out)!r})")


def cmd_tiny_models(args: argparse.Namespace) -> None:
    from .tiny_models import build_tiny_models

    for name, path in build_tiny_models(args.out).items():
        print(f"{name}: {path}")


def cmd_sample(args: argparse.Namespace) -> None:
    from .generate import generate, save_grid
    from .text_encoder import T5TextEncoder
    from .vae import VAE

    model = _load(args)
    encoder = T5TextEncoder.from_pretrained(args.text_encoder) if model.cfg.mode == "text" else None
    images = generate(
        model, VAE.from_pretrained(args.vae), prompts=args.prompt, labels=args.label, encoder=encoder,
        height=args.height, width=args.width, sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg_scale,
        seed=args.seed, progress=True,
    )
    print(f"wrote {save_grid(images, args.out, scale=args.zoom)}")


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(Path(args.out))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pixart-lightning", description="Train and convert PixArt-α models.")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_source(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("source", help="our .safetensors, an official PixArt/DiT .pth/.pt, or a diffusers folder")
        p.add_argument("--size", help="named size for what shapes cannot tell (heads), e.g. PixArt-XL/2")
        p.add_argument("--num-heads", type=int, help="number of attention heads (overrides --size)")
        p.add_argument("--container", help="sub-dict of the checkpoint to read, e.g. state_dict_ema")
        return p

    p = with_source(sub.add_parser("info", help="print a checkpoint's config and parameter count"))
    p.set_defaults(func=cmd_info)

    p = with_source(sub.add_parser("convert", help="convert weights between formats"))
    p.add_argument("out", help="output file or folder")
    p.add_argument("--to", choices=OUTPUT_FORMATS, help="default: from OUT (.safetensors native, .pt/.pth official, else diffusers)")
    p.set_defaults(func=cmd_convert)

    p = with_source(sub.add_parser("reparam", help="stage 1 -> 2: class-mode DiT to adaLN-single text model"))
    p.add_argument("out", help="output .safetensors")
    p.add_argument("--caption-channels", type=int, default=4096, help="caption feature width (T5-XXL: 4096)")
    p.add_argument("--t", type=int, default=500, help="timestep at which the two models agree")
    p.add_argument("--t-block-init", choices=("mean", "random"), default="mean")
    p.set_defaults(func=cmd_reparam)

    p = with_source(sub.add_parser("export-pipeline", help="write a diffusers PixArtAlphaPipeline folder"))
    p.add_argument("out", help="output folder")
    p.add_argument("--text-encoder", required=True, help="T5 hub id or local folder")
    p.add_argument("--vae", required=True, help="VAE hub id or local folder")
    p.set_defaults(func=cmd_export_pipeline)

    p = sub.add_parser("tiny-models", help="build the tiny offline T5 (with tokenizer) and VAE")
    p.add_argument("out", help="output folder")
    p.set_defaults(func=cmd_tiny_models)

    p = with_source(sub.add_parser("sample", help="generate an image grid"))
    p.add_argument("--prompt", action="append", help="caption (text mode); repeat for more images")
    p.add_argument("--label", type=int, action="append", help="class label (class mode); repeat for more")
    p.add_argument("--text-encoder", default="DeepFloyd/t5-v1_1-xxl")
    p.add_argument("--vae", default="stabilityai/sd-vae-ft-ema")
    p.add_argument("--out", default="samples.png")
    p.add_argument("--sampler", choices=("dpm++", "ancestral"), default="dpm++")
    p.add_argument("--steps", type=int, help="default: 20 (dpm++), 100 (ancestral)")
    p.add_argument("--cfg-scale", type=float, default=4.5)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--zoom", type=int, default=1, help="enlarge the PNG (nearest neighbour)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("demo", help="the model-core chain end to end on tiny offline models")
    p.add_argument("--out", default="runs/demo")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:  # user mistakes: one line, no traceback
        message = str(err).strip().splitlines()
        print(f"pixart-lightning {args.command}: error: {message[0] if message else type(err).__name__}", file=sys.stderr)
        for line in message[1:]:
            print(f"  {line}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
