"""Check: what only a GPU shows of the training step's hot path, the host-device syncs and the EMA's kernels.

On the CPU the sync-free step is enforced by ``tests/test_performance.py`` (a dispatch-mode counter); on CUDA,
torch's sync debug mode sees every synchronising call, including blocking copies from pageable host memory.
"""

from __future__ import annotations

import warnings

import lightning as L
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from pixart_lightning.gpu_check import benchmark
from pixart_lightning.gpu_check.harness import Context

QUIET = 10**6  # a logging interval no run reaches: only the last step reads the device (its non-finite check)


class SyncWatch(L.Callback):
    """Synchronising CUDA calls per training step, from batch start to batch end (torch's sync debug mode)."""

    def __init__(self) -> None:
        self.per_step: list[int] = []
        self._catcher: warnings.catch_warnings | None = None
        self._caught: list[warnings.WarningMessage] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._catcher = warnings.catch_warnings(record=True)
        self._caught = self._catcher.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        torch.cuda.set_sync_debug_mode("default")
        self._catcher.__exit__(None, None, None)
        self.per_step.append(sum("synchroniz" in str(w.message) for w in self._caught))


def ema_kernels(module, device: torch.device) -> int:
    """Device kernels (CPU: foreach ops) one guarded EMA update launches."""
    skip = torch.zeros((), dtype=torch.bool, device=device)
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        module.ema.update(module.model, skip=skip)
        if cuda:
            torch.cuda.synchronize(device)
    if cuda:
        return sum(e.device_type == DeviceType.CUDA for e in prof.events())
    return sum(e.name.startswith("aten::_foreach") for e in prof.events())


def check_step_syncs(ctx: Context) -> None:
    """Steady-state stage-2 steps (not the first: it copies the schedule to the device once; not the last: it
    reads the non-finite count) must make no host-device sync; one EMA update takes a few fused kernels."""
    s = ctx.sizes
    cuda = ctx.device.type == "cuda"
    train_step = benchmark("train_step")
    setup = train_step.Setup(
        config=s.config, stage=2, device=str(ctx.device), batch=s.numerics_batch, resolution=s.resolution_256,
        caption_channels=s.caption_channels, steps=s.numerics_steps, warmup=0, reference=False,
        overrides=(f"train.log_every={QUIET}",))
    built = train_step.prepare(setup, train_step.VARIANTS["eager"], ctx.work)
    watch = [SyncWatch()] if cuda else []
    train_step.fit(built, ctx.device, watch, ctx.work / "syncs")
    if cuda:
        steady = watch[0].per_step[1:-1]
        ctx.record("syncs_per_steady_step", steady)
        ctx.record("sync_free", all(n == 0 for n in steady))
    else:
        ctx.record("syncs_per_steady_step", "CUDA only (CPU: tests/test_performance.py)")
    ctx.record("ema_parameters", sum(1 for _ in built.module.model.parameters()))
    ctx.record("ema_groups", len(built.module.ema._groups))
    ctx.record("ema_kernels_per_update", ema_kernels(built.module, ctx.device))
