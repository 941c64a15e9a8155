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


def make_step(model: torch.nn.Module, call, dtype: torch.dtype | None):
    """One optimizer step of ``model`` on fixed inputs; ``call`` adapts the forward signature."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=None)
    device_type = next(model.parameters()).device.type

    def step() -> None:
        with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
            out = call(model)
        out.float().square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def timed(step, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="PixArt-tiny/2")
    parser.add_argument("--resolution", type=int, default=256, help="image side in pixels (latent = /8)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--caption-channels", type=int, default=None, help="default: 4096 for XL, 64 otherwise")
    parser.add_argument("--tokens", type=int, default=120, help="caption length; the last quarter is padding")
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
    mask[:, (3 * args.tokens) // 4 :] = 0
    ours.y_embedder.dropout_prob = 0.0  # identical work on both sides
    dtype = torch.bfloat16 if args.dtype == "bf16" else None
    steps = {
        "ours": make_step(ours, lambda m: m(x, t, y, mask), dtype),
        "diffusers": make_step(
            theirs,
            lambda m: m(x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask,
                        added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample,
            dtype,
        ),
    }
    for _ in range(args.warmup):
        for step in steps.values():
            timed(step, device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.steps):
        for name, step in steps.items():
            times[name].append(timed(step, device))

    median = {name: statistics.median(v) for name, v in times.items()}
    params = sum(p.numel() for p in ours.parameters())
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"backbone training step: {args.size} ({params / 1e6:.2f}M params), {args.resolution} px "
          f"({(latent // cfg.patch_size) ** 2} tokens), batch {args.batch}, {args.tokens} caption tokens, "
          f"{args.dtype}, {where}; torch {torch.__version__}")
    for name, value in median.items():
        print(f"  {name:10s} {value * 1e3:9.2f} ms/step   {args.batch / value:9.1f} img/s")
    print(f"  ratio ours/diffusers (time per step): {median['ours'] / median['diffusers']:.3f}")


if __name__ == "__main__":
    main()
