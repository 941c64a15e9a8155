"""The full stage-2 training step, ours vs diffusers' PixArtTransformer2DModel: images/s side by side in one run.

Ours is the real thing: the stage-2 ``TextAlignment`` module in the Trainer the runner builds (same strategy,
precision, logger and per-step callbacks; samples, FID and checkpoint saves off), fed by a DataLoader.
The reference is what a diffusers user writes: ``PixArtTransformer2DModel`` holding the same weights, the same
hybrid loss (our ``GaussianDiffusion.training_losses``, ε/v MSE + VLB), ``torch.optim.AdamW`` with the same
hyper-parameters and torch's default implementation, the same gradient clipping, and diffusers' ``EMAModel``
at the same rate, under the same autocast. Both see the same batches (precomputed caption features, and
latent moments or pixels) and draw timesteps, noise and caption drops every step.

The two alternate step by step: each reference step runs inside our step's batch-end hook and is timed on
its own, so machine noise hits both alike. Our step is the time from one batch start to the next minus that,
so it includes Lightning's loop, logging and the next batch's fetch. After warm-up, medians are reported.

    python benchmarks/train_step.py                      # CPU: the demo's stage-2 config (tiny, fp32)
    python benchmarks/train_step.py --config configs/pixart-xl2 --batch 64 --resolution 256   # GPU: XL/2, bf16
    python benchmarks/train_step.py --config configs/pixart-xl2 --batch 32 --resolution 512 model.compile=true
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from callbacks.checkpoints import Checkpoints  # noqa: E402
from pixart_lightning import flops  # noqa: E402
from pixart_lightning.config import load_stage  # noqa: E402
from pixart_lightning.diffusion import create_diffusion  # noqa: E402
from pixart_lightning.interop import export_diffusers  # noqa: E402
from pixart_lightning.runner import make_trainer  # noqa: E402
from pixart_lightning.tiny_models import build_tiny_vae  # noqa: E402
from pixart_lightning.vae import VAE, PixelSpace  # noqa: E402
from stages import STAGE_MODULES  # noqa: E402


def make_batches(count: int, batch: int, latent: int, channels: int, tokens: int, caption_channels: int,
                 pixel_space: bool, pad_fraction: float) -> list[dict[str, Any]]:
    """Batches in the loader's format. Every other caption ends ``pad_fraction`` early (the collate pads to the
    longest caption of the batch, so the mask has padding but no all-padding column)."""
    gen = torch.Generator().manual_seed(0)
    batches = []
    for i in range(count):
        mask = torch.ones(batch, tokens, dtype=torch.long)
        mask[::2, round(tokens * (1 - pad_fraction)):] = 0
        item: dict[str, Any] = {
            "key": [f"{i}-{j}" for j in range(batch)], "skipped": {},
            "caption_features": torch.randn(batch, tokens, caption_channels, generator=gen) * mask[..., None],
            "caption_mask": mask,
        }
        if pixel_space:
            item["pixels"] = torch.rand(batch, channels, latent, latent, generator=gen) * 2 - 1
        else:  # stored moments, as feature shards hold them
            item["latent_mean"] = torch.randn(batch, channels, latent, latent, generator=gen).half()
            item["latent_std"] = (torch.rand(batch, channels, latent, latent, generator=gen) * 0.1).half()
        batches.append(item)
    return batches


class Batches(torch.utils.data.IterableDataset):
    def __init__(self, batches: list[dict[str, Any]]):
        self.batches = batches

    def __iter__(self):
        while True:
            yield from self.batches


class DiffusersStep:
    """One training step of the reference: diffusers' model, our loss, torch's AdamW, diffusers' EMAModel."""

    def __init__(self, model: torch.nn.Module, module: L.LightningModule, device: torch.device, dtype):
        from diffusers.training_utils import EMAModel

        cfg = module.cfg
        o = cfg.optim
        self.model, self.device, self.dtype, self.cfg = model.to(device).train(), device, dtype, cfg
        self.diffusion = create_diffusion(learn_sigma=module.model.cfg.learn_sigma, prediction=cfg.diffusion.prediction)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                           weight_decay=o.weight_decay)
        self.ema = EMAModel(model.parameters(), decay=o.ema_rate) if o.ema_rate > 0 else None
        self.null = module.model.y_embedder.y_embedding.detach().to(device)
        self.vae = module.vae
        self.drop_prob = module.model.cfg.class_dropout_prob

    def __call__(self, batch: dict[str, Any]) -> None:
        dev = self.device
        y, mask = batch["caption_features"].to(dev).float(), batch["caption_mask"].to(dev)
        if "pixels" in batch:
            x0 = batch["pixels"].to(dev)
        else:
            mean, std = batch["latent_mean"].to(dev).float(), batch["latent_std"].to(dev).float()
            x0 = self.vae.latents_from_posterior(mean, std, torch.randn_like(mean))
        B = x0.shape[0]
        t = torch.randint(0, self.diffusion.num_timesteps, (B,), device=dev)
        drop = torch.rand(B, device=dev) < self.drop_prob
        y = torch.where(drop[:, None, None], self.null[None, : y.shape[1]], y)

        def call(xt, timesteps):
            return self.model(xt, encoder_hidden_states=y, timestep=timesteps, encoder_attention_mask=mask,
                              added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample

        with torch.autocast(dev.type, dtype=self.dtype, enabled=self.dtype is not None):
            loss = self.diffusion.training_losses(call, x0, t, {}, torch.randn_like(x0))["loss"].mean()
        loss.backward()
        if self.cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.model.parameters())


class Alternate(L.Callback):
    """Times our steps (batch start to batch start) and runs and times one reference step after each."""

    def __init__(self, reference: DiffusersStep, batches: list[dict[str, Any]], warmup: int):
        self.reference, self.batches, self.warmup = reference, batches, warmup
        self.ours: list[float] = []
        self.theirs: list[float] = []
        self._start: float | None = None
        self._theirs_in_step = 0.0

    def _now(self, device: torch.device) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = self._now(pl_module.device)
        if self._start is not None and batch_idx > self.warmup:
            self.ours.append(now - self._start - self._theirs_in_step)
        self._start = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        start = self._now(pl_module.device)
        self.reference(self.batches[batch_idx % len(self.batches)])
        self._theirs_in_step = self._now(pl_module.device) - start
        if batch_idx >= self.warmup:
            self.theirs.append(self._theirs_in_step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo", help="a config folder; its stage-2 config is used")
    parser.add_argument("--batch", type=int, default=None, help="default: the config's data.batch_size")
    parser.add_argument("--resolution", type=int, default=None, help="image side in pixels; default: the config's")
    parser.add_argument("--tokens", type=int, default=None, help="caption tokens; default: text_encoder.max_length")
    parser.add_argument("--pad-fraction", type=float, default=0.25, help="padding at the end of every other caption")
    parser.add_argument("--caption-channels", type=int, default=None, help="default: 4096 (T5-XXL), 32 for tiny")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default=None, help="default: the config's (bf16-mixed on GPU, 32 on CPU)")
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value (e.g. model.compile=true)")
    args = parser.parse_args()

    import diffusers

    device = torch.device(args.device)
    base = load_stage(args.config, 2, args.overrides)
    precision = args.precision or ("bf16-mixed" if device.type == "cuda" else "32")
    total = args.warmup + args.steps + 1
    overrides = [
        *args.overrides, f"train.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}", "train.devices=1",
        "train.strategy=auto", f"train.precision={precision}", f"train.max_steps={total}",
        f"train.checkpoint_every={10 * total}", "train.progress_bar=false", "data.num_workers=0",
        *([f"data.batch_size={args.batch}"] if args.batch else []),
        *([f"data.resolution={args.resolution}"] if args.resolution else []),
    ]
    cfg = load_stage(args.config, 2, overrides)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    pixel_space = cfg.vae.name == "pixel"
    caption_channels = args.caption_channels or (32 if cfg.text_encoder.name == "tiny" else 4096)
    tokens = args.tokens or base.text_encoder.max_length
    stage_cls = STAGE_MODULES[2]
    L.seed_everything(0, verbose=False)
    model = stage_cls.initial_model(cfg, None, caption_channels)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # Feature batches need the VAE only for its latent scale: a tiny one stands in for the SD VAE.
        vae = PixelSpace() if pixel_space else VAE.from_pretrained(str(build_tiny_vae(tmp / "vae")), cfg.vae.scale_factor)
        theirs = diffusers.PixArtTransformer2DModel.from_pretrained(export_diffusers(model, tmp / "diffusers"))
        module = stage_cls(cfg, model, vae, None)
        latent = cfg.data.resolution // vae.downsample_factor
        batches = make_batches(4, cfg.data.batch_size, latent, model.cfg.in_channels, tokens, caption_channels,
                               pixel_space, args.pad_fraction)
        dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
        alternate = Alternate(DiffusersStep(theirs, module, device, dtype), batches, args.warmup)
        trainer = make_trainer(cfg, tmp / "run", Checkpoints(tmp / "run" / "checkpoints", 10 * total, 1),
                               [alternate], evaluation=False)
        loader = torch.utils.data.DataLoader(Batches(batches), batch_size=None, pin_memory=device.type == "cuda")
        trainer.fit(module, train_dataloaders=loader)

    B = cfg.data.batch_size
    med = {"ours": statistics.median(alternate.ours), "diffusers": statistics.median(alternate.theirs)}
    per_image = flops.train_flops_per_image(model.cfg, cfg.data.resolution, cfg.data.resolution,
                                            vae.downsample_factor, caption_tokens=tokens)
    peak = cfg.train.peak_tflops or (flops.peak_tflops(torch.cuda.get_device_name(device))
                                     if device.type == "cuda" else None)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    params = sum(p.numel() for p in model.parameters())
    print(f"stage-2 training step: {args.config} ({model.cfg.depth} blocks x {model.cfg.hidden_size}, "
          f"{params / 1e6:.2f}M params), {cfg.data.resolution} px ({(latent // model.cfg.patch_size) ** 2} tokens), "
          f"batch {B}, {tokens} caption tokens ({args.pad_fraction:.0%} padding on half), {precision}, "
          f"compile={cfg.model.compile}; {where}; torch {torch.__version__}, lightning {L.__version__}, "
          f"diffusers {diffusers.__version__}; median of {len(alternate.ours)} steps after {args.warmup} warm-up")
    print(f"  {'':10s} {'step ms':>9s} {'img/s':>9s} {'TFLOP/s':>9s} {'MFU':>7s}")
    for name, seconds in med.items():
        tflops = per_image * B / seconds / 1e12
        mfu = f"{tflops / peak:7.1%}" if peak else f"{'n/a':>7s}"
        print(f"  {name:10s} {seconds * 1e3:9.2f} {B / seconds:9.1f} {tflops:9.3f} {mfu}")
    print(f"  ours/diffusers images/s: {med['diffusers'] / med['ours']:.3f}")


if __name__ == "__main__":
    main()
