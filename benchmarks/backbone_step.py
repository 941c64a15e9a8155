"""Training-step speed of our backbone vs diffusers' PixArtTransformer2DModel, side by side.

Both models hold the same weights (ours exported through ``export_diffusers``) and run the same
step: forward, MSE on the output, backward, AdamW. Timings alternate between the two models so
that machine noise hits both alike; the ratio ours/diffusers is what to read (< 1: ours faster).

    python benchmarks/backbone_step.py                      # CPU: tiny config (default)
    python benchmarks/backbone_step.py --size PixArt-XL/2 --resolution 256 --batch 32 --dtype bf16 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pixart_lightning.interop import export_diffusers  # noqa: E402
from pixart_lightning.models import PixArt, PixArtConfig  # noqa: E402


def make_step(model: torch.nn.Module, call, dtype: torch.dtype | None, device: torch.device):
    """One training step of ``model`` on fixed inputs, timed as (forward+backward, optimizer)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> tuple[float, float]:
        start = _now(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = call(model)
        out.float().square().mean().backward()
        middle = _now(device)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return middle - start, _now(device) - middle

    return step


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="PixArt-tiny/2")
    parser.add_argument("--resolution", type=int, default=256, help="image side in pixels (latent = /8)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--caption-channels", type=int, default=None, help="default: 4096 for XL, 64 otherwise")
    parser.add_argument("--tokens", type=int, default=120, help="caption length, padded")
    parser.add_argument("--pad-fraction", type=float, default=0.25, help="share of the caption tokens that are padding")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = bf16 autocast, fp32 weights")
    args = parser.parse_args()

    from diffusers import PixArtTransformer2DModel

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(max(torch.get_num_threads(), 1))
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
    channels = args.caption_channels or (4096 if "XL" in args.size else 64)
    latent = args.resolution // 8
    cfg = PixArtConfig.from_name(args.size, caption_channels=channels, sample_size=latent)
    torch.manual_seed(0)
    ours = PixArt(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        theirs = PixArtTransformer2DModel.from_pretrained(export_diffusers(ours, Path(tmp) / "t"))
    ours.to(device).train()
    theirs.to(device).train()

    x = torch.randn(args.batch, 4, latent, latent, device=device)
    t = torch.randint(0, 1000, (args.batch,), device=device)
    y = torch.randn(args.batch, args.tokens, channels, device=device)
    mask = torch.ones(args.batch, args.tokens, dtype=torch.long, device=device)
    mask[:, round(args.tokens * (1 - args.pad_fraction)) :] = 0
    ours.y_embedder.dropout_prob = 0.0  # identical work on both sides
    dtype = torch.bfloat16 if args.dtype == "bf16" else None
    steps = {
        "ours": make_step(ours, lambda m: m(x, t, y, mask), dtype, device),
        "diffusers": make_step(
            theirs,
            lambda m: m(x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask,
                        added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample,
            dtype,
            device,
        ),
    }
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in steps}
    for _ in range(args.steps):
        for name, step in steps.items():
            times[name].append(step())

    # medians of forward+backward, of the AdamW update, and of the whole step
    med = {name: [statistics.median(v) for v in (*zip(*runs), [a + b for a, b in runs])] for name, runs in times.items()}
    params = sum(p.numel() for p in ours.parameters())
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"backbone training step: {args.size} ({params / 1e6:.2f}M params), {args.resolution} px "
          f"({(latent // cfg.patch_size) ** 2} tokens), batch {args.batch}, {args.tokens} caption tokens "
          f"({args.pad_fraction:.0%} padding), {args.dtype}, {where}; torch {torch.__version__}, {args.steps} steps")
    print(f"  {'':10s} {'fwd+bwd ms':>11s} {'AdamW ms':>9s} {'step ms':>9s} {'img/s':>8s}")
    for name, (fb, optim, total) in med.items():
        print(f"  {name:10s} {fb * 1e3:11.2f} {optim * 1e3:9.2f} {total * 1e3:9.2f} {args.batch / total:8.1f}")
    ratios = [a / b for a, b in zip(med["ours"], med["diffusers"])]
    print(f"  ratio ours/diffusers: fwd+bwd {ratios[0]:.3f}, AdamW {ratios[1]:.3f}, whole step {ratios[2]:.3f}")


if __name__ == "__main__":
    main()
