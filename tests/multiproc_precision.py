"""Two steps of a randomised stage-3 model (micro-conditions on) in ``bf16-mixed``, under DDP or FSDP, 2 CPU processes.

Used by tests/test_parallel.py: FSDP must compute what DDP under autocast computes, so the residual stream and the
conditions stay fp32 between blocks and only the matmuls run in bf16.

    python tests/multiproc_precision.py OUT TAG --strategy fsdp

Rank 0 writes OUT/TAG.json: the global loss per step and, from rank 0's first forward pass, the dtypes of a few
tensors and the size embedder's output.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pixart_lightning.config import load_stage  # noqa: E402
from pixart_lightning.encoders.vae import PixelSpace  # noqa: E402
from pixart_lightning.training.parallel import make_strategy  # noqa: E402
from stages import STAGE_MODULES  # noqa: E402
from tests.conftest import randomize  # noqa: E402
from tests.multiproc_train import CAPTION_DIM, DEMO, GLOBAL_BATCH, SIDE, GlobalBatches  # noqa: E402

ORIGINAL_SIZE = 1001.0
"""A raw micro-condition that bf16 cannot hold (it rounds to 1000)."""


class SizedBatches(GlobalBatches):
    """The global batches with stage 3's micro-conditions: original size and aspect ratio."""

    def __getitem__(self, i: int) -> dict:
        share = GLOBAL_BATCH // self.world
        return super().__getitem__(i) | {"original_size": torch.full((share, 2), ORIGINAL_SIZE),
                                         "aspect_ratio": torch.ones(share, 1)}


class Data(L.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        t = self.trainer
        return DataLoader(SizedBatches(0, t.max_steps, t.global_rank, t.world_size), batch_size=None)


class Probe(L.Callback):
    """Global loss per step; from the first forward pass, the dtypes of what enters block 2 and the size embedder,
    and of a matmul inside block 2, and the size embedder's output."""

    def __init__(self):
        self.losses: list[float] = []
        self.dtypes: dict[str, str] = {}
        self.size_embedding: list | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        model = pl_module.model
        model.blocks[1].register_forward_hook(self._dtype("block 2 input", lambda args, out: args[0]))
        model.blocks[1].mlp.fc1.register_forward_hook(self._dtype("block 2 matmul output", lambda args, out: out))
        model.csize_embedder.register_forward_hook(self._dtype("size embedder input", lambda args, out: args[0]))
        model.csize_embedder.register_forward_hook(self._size_embedding)

    def _dtype(self, name: str, pick):
        def hook(module, args, output) -> None:
            self.dtypes.setdefault(name, str(pick(args, output).dtype))

        return hook

    def _size_embedding(self, module, args, output) -> None:
        if self.size_embedding is None:
            self.size_embedding = output.float().tolist()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("tag")
    parser.add_argument("--strategy", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_stage(DEMO, 3, [
        "data.shards=unused", "model.depth=2", "model.hidden_size=48", "model.patch_size=2", f"data.resolution={SIDE}",
        f"data.batch_size={GLOBAL_BATCH // 2}", f"train.strategy={args.strategy}", "train.devices=2",
        "train.accelerator=cpu", "train.precision=bf16-mixed", "train.max_steps=2", "optim.warmup_steps=1",
        "optim.lr=1e-3",
    ])
    L.seed_everything(0, verbose=False)
    model = randomize(STAGE_MODULES[3].initial_model(cfg, None, CAPTION_DIM))  # every path carries signal
    module = STAGE_MODULES[3](cfg, model, PixelSpace(), None)
    probe = Probe()
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=make_strategy(cfg.train), precision="bf16-mixed", max_steps=2,
        callbacks=[probe], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=Data())
    if trainer.is_global_zero:
        result = {"losses": probe.losses, "dtypes": probe.dtypes, "size_embedding": probe.size_embedding}
        (args.out / f"{args.tag}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
