"""Commands on weights: ``info``, ``convert``, ``reparam``, ``export-pipeline``, ``export-lora``, ``tiny-models``."""

from __future__ import annotations

import argparse
import typing
from pathlib import Path

from pixart_lightning.cli.parsing import add_command, add_prediction_option

OUTPUT_FORMATS = ("native", "official", "diffusers")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    add_command(subparsers, "info", "print a checkpoint's config and parameter count", _add_source, cmd_info)
    add_command(subparsers, "convert", "convert weights between formats", _convert_options, cmd_convert)
    add_command(subparsers, "reparam", "stage 1 -> 2: class-mode DiT to adaLN-single text model", _reparam_options,
                cmd_reparam)
    add_command(subparsers, "export-pipeline", "write a diffusers PixArtAlphaPipeline", _export_pipeline_options,
                cmd_export_pipeline)
    add_command(subparsers, "export-lora", "write a LoRA stage's adapters as a PEFT folder for diffusers' transformer",
                _export_lora_options, cmd_export_lora)
    add_command(subparsers, "tiny-models", "build the tiny offline T5 (with tokenizer), VAE and LLaVA",
                _tiny_models_options, cmd_tiny_models)


def _add_source(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="our .safetensors, an official PixArt/DiT .pth/.pt, a diffusers folder, "
                   "or a stage folder (runs/demo/stage3: its final weights)")
    p.add_argument("--ema", action="store_true", help="with a stage folder: its EMA weights instead of the raw ones")
    p.add_argument("--size", help="named size for what shapes cannot tell (heads), e.g. PixArt-XL/2")
    p.add_argument("--num-heads", type=int, help="number of attention heads (overrides --size)")
    p.add_argument("--container", help="sub-dict of the checkpoint to read (default: state_dict_ema where present, else state_dict)")


def _convert_options(p: argparse.ArgumentParser) -> None:
    _add_source(p)
    add_prediction_option(p)
    p.add_argument("out", help="output file or folder")
    p.add_argument("--to", choices=OUTPUT_FORMATS, help="default: from OUT (.safetensors native, .pt/.pth official, "
                   "else diffusers)")
    _add_lora(p, "--merge-lora")


def _add_lora(p: argparse.ArgumentParser, flag: str) -> None:
    p.add_argument(flag, dest="lora", metavar="LORA", help="merge these LoRA adapters into the weights first: a LoRA "
                   "stage folder or its final-lora.safetensors, trained on SOURCE")


def _reparam_options(p: argparse.ArgumentParser) -> None:
    from pixart_lightning.models.reparam import TBlockInit

    _add_source(p)
    add_prediction_option(p)
    p.add_argument("out", help="output .safetensors")
    p.add_argument("--caption-channels", type=int, default=4096, help="caption feature width (T5-XXL: 4096)")
    p.add_argument("--t", type=int, default=500, help="timestep at which the two models agree")
    p.add_argument("--t-block-init", choices=typing.get_args(TBlockInit), default="mean")


def _export_pipeline_options(p: argparse.ArgumentParser) -> None:
    _add_source(p)
    add_prediction_option(p)
    p.add_argument("out", help="output folder")
    p.add_argument("--text-encoder", required=True, help="T5 hub id or local folder")
    p.add_argument("--vae", required=True, help="VAE hub id or local folder")
    _add_lora(p, "--lora")


def _export_lora_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("lora", help="a LoRA stage folder (its EMA's adapters where kept) or its final-lora.safetensors")
    p.add_argument("out", help="output folder: PeftModel.from_pretrained(transformer, OUT) loads it onto the "
                   "diffusers transformer of the weights the adapters were trained on")


def _tiny_models_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="output folder")


def _load(args: argparse.Namespace, weights: Path):
    """The model in ``weights``, shaped by the --size, --num-heads and --container given, with the LoRA adapters of
    --merge-lora / --lora merged in where the command has them."""
    from pixart_lightning.interop import load_model
    from pixart_lightning.runner.folders import with_adapters

    options = {"size": args.size, "num_heads": args.num_heads, "container": args.container}
    model = load_model(weights, **{k: v for k, v in options.items() if v})
    return with_adapters(model, weights, getattr(args, "lora", None))


def _output_format(out: Path) -> str:
    """--to's default, from OUT's name: native for .safetensors, official for .pt/.pth, else a diffusers folder."""
    if out.suffix == ".safetensors":
        return "native"
    return "official" if out.suffix in (".pt", ".pth") else "diffusers"


def cmd_info(args: argparse.Namespace) -> None:
    from pixart_lightning.runner.folders import resolve_prediction, stage_weights

    weights = stage_weights(args.source, args.ema)
    model = _load(args, weights)
    print(f"{args.source}: {model.cfg.mode} mode, {sum(p.numel() for p in model.parameters()):,} parameters")
    for key, value in model.cfg.to_dict().items():
        print(f"  {key:22s} {value}")
    print(f"  {'prediction':22s} {resolve_prediction(weights)}")


def cmd_convert(args: argparse.Namespace) -> None:
    import torch

    from pixart_lightning.interop import export_diffusers, save_weights, to_official
    from pixart_lightning.runner.folders import resolve_prediction, stage_weights

    weights = stage_weights(args.source, args.ema)
    model = _load(args, weights)
    out = Path(args.out)
    fmt = args.to or _output_format(out)
    if fmt == "native":
        save_weights(model, out, resolve_prediction(weights, args.prediction))
    elif fmt == "official":
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": to_official(model)}, out)
    else:
        export_diffusers(model, out)
    print(f"wrote {out} ({fmt})")


def cmd_reparam(args: argparse.Namespace) -> None:
    from pixart_lightning.interop import save_weights
    from pixart_lightning.models import class_to_text
    from pixart_lightning.runner.folders import resolve_prediction, stage_weights

    weights = stage_weights(args.source, args.ema)
    model = class_to_text(_load(args, weights), caption_channels=args.caption_channels, t=args.t,
                          t_block_init=args.t_block_init)
    save_weights(model, args.out, resolve_prediction(weights, args.prediction))
    print(f"wrote the text-mode model to {args.out} (equal to the class model at t={args.t}, label left out)")


def cmd_export_pipeline(args: argparse.Namespace) -> None:
    from pixart_lightning.diffusion.sampling import CONSISTENCY_SAMPLER, DEFAULT_SAMPLER
    from pixart_lightning.interop.pipeline import export_pipeline
    from pixart_lightning.runner.distilled import distilled_steps
    from pixart_lightning.runner.folders import resolve_prediction, stage_weights

    weights = stage_weights(args.source, args.ema)
    prediction = resolve_prediction(weights, args.prediction)
    served = distilled_steps(args.source)  # a stage-4 folder: LCMScheduler, unguided
    export_pipeline(_load(args, weights), args.out, args.text_encoder, args.vae, prediction,
                    sampler=CONSISTENCY_SAMPLER if served else DEFAULT_SAMPLER)
    print(f"wrote {args.out} ({prediction} prediction): load it with "
          f"diffusers.PixArtAlphaPipeline.from_pretrained({str(args.out)!r})")
    if served:
        print(f"  a consistency-distilled model with LCMScheduler: call it with guidance_scale=1.0 (its guidance is "
              f"folded in) and num_inference_steps one of {', '.join(map(str, served))}")


def cmd_export_lora(args: argparse.Namespace) -> None:
    from pixart_lightning.interop.lora import export_peft, read_adapters
    from pixart_lightning.runner.folders import adapter_weights

    adapters = read_adapters(adapter_weights(args.lora))
    export_peft(adapters, args.out)
    print(f"wrote {args.out}: load it with peft.PeftModel.from_pretrained(transformer, {str(args.out)!r})")


def cmd_tiny_models(args: argparse.Namespace) -> None:
    from pixart_lightning.shapes.tiny_models import build_tiny_models

    for name, path in build_tiny_models(args.out).items():
        print(f"{name}: {path}")
