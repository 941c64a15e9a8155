"""A few stage-2 (or ``--stage 4``) steps on fixed global batches, as one or several processes (Lightning launches
the others).

Used by tests/test_parallel.py to compare strategies: with N processes each rank trains its 1/N slice of
the same global batches a single process trains whole, so losses and weights must agree.

    python tests/multiproc_train.py OUT TAG --strategy ddp --devices 2 --steps 4 [--accumulate 2] [--stop-at 2] [--resume CKPT]
        [--set model.lora={rank: 2} ...]

Rank 0 writes OUT/TAG.json (the global loss per step) and OUT/TAG.safetensors + OUT/TAG-ema.safetensors; under LoRA
those are the merged weights, as a stage hands them on, and OUT/TAG-lora.safetensors the adapters.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pixart_lightning.config import load_stage  # noqa: E402
from pixart_lightning.encoders.vae import PixelSpace  # noqa: E402
from pixart_lightning.interop import save_weights  # noqa: E402
from pixart_lightning.training import lora  # noqa: E402
from pixart_lightning.training.parallel import consolidated, is_sharded, make_strategy  # noqa: E402
from stages import STAGE_MODULES  # noqa: E402
from tests.conftest import randomize  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo"
GLOBAL_BATCH, CAPTION_DIM, SIDE = 8, 16, 16


def small_stage2(steps: int, *overrides: str):
    """The small one-process CPU stage-2 module the single-process tests train (seeded, fp32, batch 8)."""
    cfg = load_stage(DEMO, 2, [
        "data.shards=unused", "model.depth=2", "model.hidden_size=48", "model.patch_size=2", f"data.resolution={SIDE}",
        "data.batch_size=8", "train.accelerator=cpu", "train.precision=32", f"train.max_steps={steps}",
        "optim.warmup_steps=1", "optim.ema_rate=0.9", *overrides,
    ])
    torch.manual_seed(0)
    return STAGE_MODULES[2](cfg, STAGE_MODULES[2].initial_model(cfg, None, CAPTION_DIM), PixelSpace(), None)


class GlobalBatches(Dataset):
    """Batch ``step`` of a fixed sequence of global batches, sliced to this rank's share: with gradient
    accumulation, item i is micro-batch i % accumulation of step i // accumulation, and micro-batch m of rank r
    holds slot m x world + r of the global batch (the order the stages draw their noise in)."""

    def __init__(self, first_step: int, steps: int, rank: int, world: int, accumulation: int = 1):
        self.first_step, self.steps, self.rank, self.world = first_step, steps, rank, world
        self.accumulation = accumulation

    def __len__(self) -> int:
        return (self.steps - self.first_step) * self.accumulation

    def __getitem__(self, index: int) -> dict:
        i, micro = divmod(index, self.accumulation)
        gen = torch.Generator().manual_seed(1000 + self.first_step + i)
        lengths = torch.randint(3, 9, (GLOBAL_BATCH,), generator=gen)
        batch = {
            "latent_mean": torch.rand(GLOBAL_BATCH, 3, SIDE, SIDE, generator=gen) * 2 - 1,
            "latent_std": torch.zeros(GLOBAL_BATCH, 3, SIDE, SIDE),
            "caption_features": torch.randn(GLOBAL_BATCH, 8, CAPTION_DIM, generator=gen),
            "caption_mask": (torch.arange(8)[None] < lengths[:, None]).long(),
            "key": [f"{self.first_step + i}-{j}" for j in range(GLOBAL_BATCH)],
        }
        share = GLOBAL_BATCH // (self.world * self.accumulation)
        slot = micro * self.world + self.rank
        mine = slice(slot * share, (slot + 1) * share)
        return {k: v[mine] for k, v in batch.items()}


class Data(L.LightningDataModule):
    def __init__(self, steps: int):
        super().__init__()
        self.steps = steps

    def train_dataloader(self) -> DataLoader:
        t = self.trainer  # built after a checkpoint restored the step: continue from there
        batches = GlobalBatches(t.global_step, self.steps, t.global_rank, t.world_size, t.accumulate_grad_batches)
        return DataLoader(batches, batch_size=None)


class Record(L.Callback):
    """Global (all-rank mean) loss per step; stop early after a checkpoint when asked (or only save it, going on)."""

    def __init__(self, stop_at: int | None, checkpoint: Path, keep_going: bool = False):
        self.losses: list[float] = []
        self.stop_at, self.checkpoint, self.keep_going = stop_at, checkpoint, keep_going
        self.step_loss = 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # Lightning divides each micro-batch's loss by the accumulation steps: their sum is the step's mean.
        self.step_loss += float(trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean"))
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        self.losses.append(self.step_loss)
        self.step_loss = 0.0
        if trainer.global_step == self.stop_at:
            trainer.save_checkpoint(self.checkpoint)
            trainer.should_stop = not self.keep_going


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("tag")
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--stage", type=int, default=2, choices=(2, 4), help="4: distil the (randomized) model")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--accumulate", type=int, default=1, help="split each rank's share into this many micro-batches")
    parser.add_argument("--stop-at", type=int)
    parser.add_argument("--keep-going", action="store_true", help="save the checkpoint at --stop-at, then go on")
    parser.add_argument("--resume")
    parser.add_argument("--sharded-checkpoint", default="true")
    parser.add_argument("--randomize", action="store_true", help="random weights everywhere (zero-initialised "
                        "layers too: adapters on a fresh model would get no gradient)")
    parser.add_argument("--set", action="append", default=[], help="a further config override (repeatable)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_stage(DEMO, args.stage, [
        "data.shards=unused", "model.depth=2", "model.hidden_size=48", "model.patch_size=2", f"data.resolution={SIDE}",
        f"data.global_batch_size={GLOBAL_BATCH}", f"data.batch_size={GLOBAL_BATCH // (args.devices * args.accumulate)}",
        f"train.strategy={args.strategy}",
        f"train.devices={args.devices}", "train.accelerator=cpu", "train.precision=32", f"train.max_steps={args.steps}",
        f"train.sharded_checkpoint={args.sharded_checkpoint}", "optim.warmup_steps=1", "optim.lr=1e-2",
        "optim.grad_clip=0.5", "optim.ema_rate=0.9", *args.set,
    ])
    L.seed_everything(0, verbose=False)
    model = STAGE_MODULES[2].initial_model(cfg, None, CAPTION_DIM)  # a fresh text model (stage 4's wants weights)
    if args.randomize:
        randomize(model)
    module = STAGE_MODULES[args.stage](cfg, model, PixelSpace(), None)
    record = Record(args.stop_at, args.out / f"{args.tag}.ckpt", args.keep_going)
    trainer = L.Trainer(
        accelerator="cpu", devices=args.devices, strategy=make_strategy(cfg.train), precision=cfg.train.precision,
        max_steps=args.steps, accumulate_grad_batches=cfg.batch_plan().accumulation, callbacks=[record], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=Data(args.steps), ckpt_path=args.resume)
    final, ema = consolidated(module.model, module.averaged, module.device)
    if trainer.is_global_zero:
        if cfg.model.lora is not None:
            lora.save_adapters(final, lora.adapter_path(args.out / f"{args.tag}.safetensors"), cfg.model.lora)
            final, ema = lora.merged(final), lora.merged(ema)
        save_weights(final, args.out / f"{args.tag}.safetensors")
        save_weights(ema, args.out / f"{args.tag}-ema.safetensors")
        result = {"losses": record.losses, "world_size": trainer.world_size, "step": trainer.global_step,
                  "sharded": [is_sharded(module.model), module.ema is not None and is_sharded(module.ema.model)]}
        (args.out / f"{args.tag}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
