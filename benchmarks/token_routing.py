"""Training-step time with token routing (``model.token_routing``) or patch masking against without, side by side.

Two copies of the stage-2 module (same weights) run the stage's own loss (``DiffusionStage.losses``: the step's
draws, the route, the hybrid loss), backward and AdamW on the same fixed batch; the steps alternate so that machine
noise hits both alike. Medians after warm-up; the ratio routed/plain is what to read (< 1: routing saves).

    python benchmarks/token_routing.py                                   # CPU: configs/demo stage 2, ratio 0.5
    python benchmarks/token_routing.py --option patch_masking --ratio 0.5
    python benchmarks/token_routing.py --config configs/pixart-xl2 --resolution 256 --batch 32 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.backbone_step import _now  # noqa: E402  (the device-synchronised clock)
from pixart_lightning.config import load_stage  # noqa: E402
from pixart_lightning.encoders.vae import PixelSpace  # noqa: E402
from stages import STAGE_MODULES  # noqa: E402


def make_module(args: argparse.Namespace, option: str | None, device: torch.device):
    """The stage-2 module of ``args.config``, with ``model.<option>.ratio=args.ratio`` when ``option`` is given."""
    extra = [f"model.{option}={{ratio: {args.ratio}}}"] if option else []
    size = [f"data.resolution={args.resolution}"] if args.resolution else []
    cfg = load_stage(args.config, 2, ["data.shards=unused", f"data.batch_size={args.batch}", *size, *extra])
    torch.manual_seed(0)
    model = STAGE_MODULES[2].initial_model(cfg, None, args.caption_channels)
    return STAGE_MODULES[2](cfg, model, PixelSpace(), None).to(device).train(), cfg


def make_step(module, batch: dict, device: torch.device):
    optimizer = torch.optim.AdamW(module.model.parameters(), lr=1e-4)

    def step() -> float:
        start = _now(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = module.losses(batch["x0"], {"y": batch["y"], "mask": batch["mask"]})["loss"].mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return _now(device) - start

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo")
    parser.add_argument("--option", choices=("token_routing", "patch_masking"), default="token_routing")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=None, help="image side in pixels; default: the config's")
    parser.add_argument("--caption-channels", type=int, default=32, help="4096 for T5-XXL")
    parser.add_argument("--tokens", type=int, default=32, help="caption tokens")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    plain, cfg = make_module(args, None, device)
    routed, _ = make_module(args, args.option, device)
    routed.model.load_state_dict(plain.model.state_dict())
    side = cfg.data.resolution // cfg.latent_factor
    gen = torch.Generator().manual_seed(0)
    batch = {"x0": torch.randn(args.batch, plain.model.cfg.in_channels, side, side, generator=gen),
             "y": torch.randn(args.batch, args.tokens, args.caption_channels, generator=gen),
             "mask": torch.ones(args.batch, args.tokens)}
    batch = {k: v.to(device) for k, v in batch.items()}
    steps = {"plain": make_step(plain, batch, device), "routed": make_step(routed, batch, device)}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(args.warmup + args.steps):
        for name, step in steps.items():
            elapsed = step()
            if i >= args.warmup:
                times[name].append(elapsed)
    medians = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    tokens = (side // plain.model.cfg.patch_size) ** 2
    print(f"{args.config} stage 2: {plain.model.cfg.depth} blocks x {plain.model.cfg.hidden_size}, {tokens} tokens, "
          f"batch {args.batch}, {device.type}, {torch.get_num_threads()} threads; median of {args.steps} steps")
    print(f"routed: model.{args.option} ratio {args.ratio} -> {routed.token_routing}")
    for name, ms in medians.items():
        print(f"  {name:7s} {ms:9.2f} ms/step")
    print(f"  routed/plain {medians['routed'] / medians['plain']:.3f}")


if __name__ == "__main__":
    main()
