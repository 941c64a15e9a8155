"""Model FLOPs against hand counts, the throughput callback's arithmetic, and its data-wait measurement."""

from __future__ import annotations

import time
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader, Dataset

import callbacks.throughput as throughput
from callbacks.throughput import Throughput, batch_geometry
from pixart_lightning.encoders.frozen import FrozenEncoders
from pixart_lightning.encoders.vae import PixelSpace
from pixart_lightning.models import PixArt, PixArtConfig
from pixart_lightning.training.flops import forward_flops, peak_tflops, train_flops_per_image

XL2 = PixArtConfig.from_name("PixArt-XL/2")


@pytest.mark.parametrize("px, tflop", [(256, 0.895), (512, 3.71), (1024, 19.5)])
def test_pixart_xl2_matches_the_hand_count(px: int, tflop: float):
    """3x forward with 120 caption tokens (docs: performance anchors, PixArt-XL/2 table)."""
    assert train_flops_per_image(XL2, px, px, caption_tokens=120) / 1e12 == pytest.approx(tflop, rel=0.02)


@pytest.mark.parametrize("px, gmac", [(256, 118.6), (512, 524.6)])
def test_class_mode_matches_dit_xl2(px: int, gmac: float):
    """DiT's paper reports forward MACs (as "Gflops"): 118.6 at 256 px, 524.6 at 512 px."""
    dit = XL2.replace(mode="class")
    assert forward_flops(dit, px, px, caption_tokens=0) / 2e9 == pytest.approx(gmac, rel=0.01)


def test_caption_and_resolution_terms():
    """Fewer caption tokens cost less; a 2:1 latent has the tokens of its area."""
    assert forward_flops(XL2, 256, 256, caption_tokens=10) < forward_flops(XL2, 256, 256, caption_tokens=120)
    tall, wide = (forward_flops(XL2, h, w, caption_tokens=0) for h, w in [(512, 256), (256, 512)])
    assert tall == wide
    assert forward_flops(XL2, 256, 256, caption_tokens=0) < tall < forward_flops(XL2, 512, 512, caption_tokens=0)


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA A10G", 125.0),
    ("NVIDIA L40S", 362.0), ("Tesla V100-SXM2-32GB", 125.0), ("Tesla V100-PCIE-16GB", 112.0),
    ("Intel Xeon", None),
])
def test_peak_lookup(name: str, peak: float | None):
    assert peak_tflops(name) == peak


class Clock:
    """Stands in for ``perf_counter``: hands out the given times in order."""

    def __init__(self, *times: float):
        self.times = list(times)

    def __call__(self) -> float:
        return self.times.pop(0)


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call as (step, metrics)."""

    def __init__(self):
        super().__init__()
        self.logged: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.logged.append((step, dict(metrics)))


def xl2_module(**cfg) -> SimpleNamespace:
    return SimpleNamespace(
        model=SimpleNamespace(cfg=XL2.replace(**cfg)), encoders=SimpleNamespace(vae=SimpleNamespace(downsample_factor=8)), device=torch.device("cpu")
    )


def test_window_arithmetic_with_a_fake_clock(monkeypatch):
    """Two batches of 4 XL/2 images at 256 px in 2.5 s, 0.5 s of it between the batches, on 4 ranks."""
    # batch 1 starts at 10, ends at 11; batch 2 starts at 11.5, ends at 12.5; the window closes at 12.5
    monkeypatch.setattr(throughput, "perf_counter", Clock(10.0, 11.0, 11.5, 12.5, 12.5))
    logger = MemoryLogger()
    trainer = SimpleNamespace(world_size=4, loggers=[logger], global_step=2)
    module = xl2_module()
    callback = Throughput(every_n_steps=2, peak_tflops=989.0)
    batch = {"key": list("abcd"), "latent_mean": torch.zeros(4, 4, 32, 32), "caption_mask": torch.ones(4, 120)}
    callback.on_train_start(trainer, module)
    for i in range(2):
        callback.on_train_batch_start(trainer, module, batch, i)
        callback.on_train_batch_end(trainer, module, None, batch, i)
    [(step, m)] = logger.logged
    per_image = train_flops_per_image(XL2, 256, 256, caption_tokens=120)
    assert step == 2
    assert m["train/images_per_s_per_device"] == pytest.approx(8 / 2.5)
    assert m["train/images_per_s"] == pytest.approx(4 * 8 / 2.5)
    assert m["train/tokens_per_s_per_device"] == pytest.approx(8 * 256 / 2.5)
    assert m["train/tokens_per_s"] == pytest.approx(4 * 8 * 256 / 2.5)
    assert m["train/tflops_per_device"] == pytest.approx(8 * per_image / 2.5 / 1e12)
    assert m["train/mfu"] == pytest.approx(8 * per_image / 2.5 / 989e12)
    assert m["train/data_wait_fraction"] == pytest.approx(0.5 / 2.5)


@pytest.mark.parametrize("flops_per_image", [2e12, lambda module, batch: 2e12])
def test_given_flops_per_image_and_no_peak(monkeypatch, flops_per_image):
    """A number or a function replaces the count; without a known peak (CPU) there is no MFU."""
    monkeypatch.setattr(throughput, "perf_counter", Clock(0.0, 1.0, 1.0))
    logger = MemoryLogger()
    trainer = SimpleNamespace(world_size=1, loggers=[logger], global_step=1)
    module = xl2_module()
    callback = Throughput(flops_per_image, every_n_steps=1)
    batch = {"key": ["a", "b"], "pixels": torch.zeros(2, 3, 256, 256)}
    callback.on_train_start(trainer, module)
    callback.on_train_batch_start(trainer, module, batch, 0)
    callback.on_train_batch_end(trainer, module, None, batch, 0)
    [(_, m)] = logger.logged
    assert m["train/tflops_per_device"] == pytest.approx(4.0)
    assert "train/mfu" not in m


def test_batch_geometry():
    pixels = {"key": ["a"], "pixels": torch.zeros(1, 3, 512, 256)}
    assert batch_geometry(xl2_module(), pixels) == (64, 32, 120)  # text mode, captions encoded on the fly
    assert batch_geometry(xl2_module(mode="class"), pixels) == (64, 32, 0)
    latents = {"key": ["a"], "latent_mean": torch.zeros(1, 4, 32, 48), "caption_features": torch.ones(1, 17, 8), "caption_mask": None}
    assert batch_geometry(xl2_module(), latents) == (32, 48, 17)


class SlowImages(Dataset):
    """8 x 8 images that take ``delay`` seconds each to load."""

    def __init__(self, delay: float):
        self.delay = delay

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict:
        time.sleep(self.delay)
        return {"key": f"{i:03d}", "pixels": torch.randn(3, 8, 8)}


class TinyDiT(L.LightningModule):
    """A 2-block class-mode backbone in pixel space, fed dict batches like the stages are."""

    def __init__(self):
        super().__init__()
        self.model = PixArt(PixArtConfig.from_name(
            "PixArt-debug/2", mode="class", num_classes=2, in_channels=3, learn_sigma=False, sample_size=8
        ))
        self.encoders = FrozenEncoders(PixelSpace())

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x = batch["pixels"]
        return (self.model(x, torch.zeros(len(x), dtype=torch.long)) - x).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.model.parameters(), lr=0.01)


def test_slow_loader_shows_as_data_wait():
    """A loader that sleeps 0.25 s per image (0.5 s per batch of 2) keeps a tiny model's step waiting most of the time.

    Every fetch inside a window is counted as waiting (the first batch's is before the first window);
    the fraction is checked after the first window, whose first steps are slower.
    """
    delay, batch_size, every = 0.25, 2, 3
    logger = MemoryLogger()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=3 * every, logger=logger, callbacks=[Throughput(every_n_steps=every)],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(TinyDiT(), DataLoader(SlowImages(delay), batch_size=batch_size))
    windows = [(step, m) for step, m in logger.logged if "train/data_wait_fraction" in m]
    assert [step for step, _ in windows] == [every, 2 * every, 3 * every]
    for i, (_, m) in enumerate(windows):
        assert set(m) == {
            "train/images_per_s_per_device", "train/images_per_s", "train/tokens_per_s_per_device",
            "train/tokens_per_s", "train/tflops_per_device", "train/data_wait_fraction",
        }  # no MFU: no known peak on CPU
        images_per_s = m["train/images_per_s_per_device"]
        fetches = every - 1 if i == 0 else every  # the first window starts after the first batch's fetch
        assert 0 < images_per_s < every * batch_size / (fetches * batch_size * delay)  # the loader's ceiling
        assert m["train/tokens_per_s_per_device"] == pytest.approx(16 * images_per_s)
        elapsed = every * batch_size / images_per_s
        assert m["train/data_wait_fraction"] * elapsed > 0.99 * fetches * batch_size * delay
        if i > 0:
            assert m["train/data_wait_fraction"] > 0.3
