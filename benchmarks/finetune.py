"""LoRA against full fine-tuning, side by side in one run: trainable parameters, step time, memory, checkpoint bytes.

Each side is the real stage module (stage 2 ``TextAlignment`` by default) in the Trainer the runner builds, fed the
same batches as ``benchmarks/train_step.py`` feeds it; the LoRA side adds ``model.lora`` (rank 16, alpha 16, the
``attention`` targets; with ``bf16-mixed`` its frozen base is bf16). The two sides train in two processes, so each
one's peak RSS (or GPU peak) is its own, and they take turns step by step: a side holds the turn from one batch start
to the next (its step, hooks, logging and next batch fetch), then hands it over, so machine noise hits both alike.
After warm-up, medians are reported.

Memory per side: the process's peak RSS (the interpreter and libraries included: on the CPU at demo size that is
most of it), and the gradient + AdamW state bytes, which is what LoRA shrinks (counted from the tensors after the
last step). On a GPU also ``peak GiB``, the most device memory allocated during a timed step (resident weights,
optimizer state and EMA included; the CUDA context not). Each side then writes one Lightning checkpoint through
``trainer.save_checkpoint`` (under LoRA the stage saves only the adapters and their EMA); its bytes are reported.

    python benchmarks/finetune.py                               # CPU: configs/demo stage 2 (tiny, fp32)
    python benchmarks/finetune.py --config configs/pixart-xl2 --resolution 512 --device cuda --batch 8 --checkpointing
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import resource
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.train_step import VARIANTS, Setup, Variant, fit, prepare, stage_config  # noqa: E402
from pixart_lightning.gpu_check.memory import is_out_of_memory, peak_gib, start_peak_window  # noqa: E402
from pixart_lightning.training.lora import trainable  # noqa: E402

SIDES = ("lora", "full")
"""In the order they take turns."""
RANK = 16
SIDE_TIMEOUT_S = 3600
"""How long the parent waits for a side with no news before it gives up on both."""

RATIOS = ("trainable_params", "step_ms", "peak_rss_mib", "grad_optimizer_mib", "peak_gib", "checkpoint_bytes")
"""The figures compared as LoRA / full."""

COLUMNS = (("trainable_params", "trainable", "{:,.0f}"), ("step_ms", "step ms", "{:.2f}"),
           ("images_per_s", "img/s", "{:.1f}"), ("peak_rss_mib", "peak RSS MiB", "{:.0f}"),
           ("grad_optimizer_mib", "grad+AdamW MiB", "{:.3f}"), ("peak_gib", "GPU peak GiB", "{:.2f}"),
           ("checkpoint_bytes", "ckpt bytes", "{:,.0f}"))
"""The printed table's columns: figure, title, format."""


def lora_overrides(setup: Setup, variant: Variant) -> tuple[str, ...]:
    """The LoRA side's config: rank :data:`RANK`, alpha = rank (scale 1), a bf16 frozen base under ``bf16-mixed``."""
    bf16 = stage_config(setup, variant).train.precision == "bf16-mixed"
    return (f"model.lora.rank={RANK}", f"model.lora.alpha={RANK}", f"model.lora.base_dtype={'bf16' if bf16 else 'fp32'}")


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class TakeTurns(L.Callback):
    """Holds this side's turn from one batch start to the next, timing that span, then hands the turn over.

    ``mine`` and ``theirs`` are the two sides' semaphores; the side that goes first starts with ``mine`` at 1. On a
    GPU it also keeps each timed step's peak and the memory allocated when the step began (resident state)."""

    def __init__(self, mine, theirs, warmup: int):
        self.mine, self.theirs, self.warmup = mine, theirs, warmup
        self.times: list[float] = []
        self.peaks: list[float] = []
        self.resident: list[float] = []
        self._start: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        device = pl_module.device
        if self._start is not None:
            now = _now(device)
            if batch_idx > self.warmup:
                self.times.append(now - self._start)
                if device.type == "cuda":
                    self.peaks.append(peak_gib(device))
            self.theirs.release()
        self.mine.acquire()
        resident = start_peak_window(device)
        if device.type == "cuda" and batch_idx >= self.warmup:
            self.resident.append(resident / 2**30)
        self._start = _now(device)

    def on_train_end(self, trainer, pl_module) -> None:
        self.theirs.release()


def state_bytes(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the gradients (one per trainable parameter, in its dtype) and of the optimizer's state tensors."""
    grads = sum(p.numel() * p.element_size() for p in trainable(module))
    moments = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                  if isinstance(v, torch.Tensor))
    return grads + moments


def train_side(setup: Setup, variant: Variant, side: str, folder: Path, mine, theirs, results, checkpoint: bool) -> None:
    """One side, in its own process: train, taking turns, then put ``(side, figures)`` (or an ``error``) on
    ``results``. On failure the turn is handed over for good, so the other side is not left waiting."""
    try:
        adapters = lora_overrides(setup, variant) if side == "lora" else ()
        bench = prepare(replace(setup, overrides=setup.overrides + adapters), variant, folder)
        turns = TakeTurns(mine, theirs, setup.warmup)
        trainer = fit(bench, setup.torch_device, [turns], folder / "run")
        model = bench.module.model
        step = statistics.median(turns.times)
        figures: dict[str, Any] = {
            "batch": bench.cfg.data.batch_size, "height": bench.height, "width": bench.width,
            "precision": bench.cfg.train.precision, "params": sum(p.numel() for p in model.parameters()),
            "trainable_params": sum(p.numel() for p in trainable(model)), "steps": len(turns.times),
            "step_ms": step * 1e3, "images_per_s": bench.cfg.data.batch_size / step,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "grad_optimizer_mib": state_bytes(model, trainer.optimizers[0]) / 2**20,
            "peak_gib": max(turns.peaks) if turns.peaks else None,
            "resident_gib": min(turns.resident) if turns.resident else None,
            "checkpoint_bytes": None,
        }
        if checkpoint:
            path = folder / f"{side}.ckpt"
            trainer.save_checkpoint(path)
            figures["checkpoint_bytes"] = path.stat().st_size
        results.put((side, figures))
    except BaseException as error:
        for _ in range(setup.warmup + setup.steps + 2):
            theirs.release()
        reason = "out of memory" if is_out_of_memory(error) else "".join(traceback.format_exception(error)[-3:])
        results.put((side, {"error": reason.strip()[-2000:]}))


def start_passive(processes) -> None:
    """Start the processes with ``OMP_WAIT_POLICY=PASSIVE`` (unless set): a side waiting for its turn must not keep its
    OpenMP threads spinning on the cores the other side computes on (on 2 cores that made each step 50x slower)."""
    before = os.environ.get("OMP_WAIT_POLICY")
    os.environ["OMP_WAIT_POLICY"] = before or "PASSIVE"
    try:
        for process in processes:
            process.start()
    finally:
        if before is None:
            del os.environ["OMP_WAIT_POLICY"]


def measure(setup: Setup, variant: Variant = VARIANTS["eager"], checkpoint: bool = True) -> dict[str, Any]:
    """Both sides, taking turns: ``{"lora": figures, "full": figures, "ratio": {figure: lora / full}}``; a side that
    failed has ``error`` instead of figures (and there are no ratios)."""
    spawn = mp.get_context("spawn")  # CUDA in the children; nothing inherited from this process
    turns = {"lora": spawn.Semaphore(1), "full": spawn.Semaphore(0)}
    results = spawn.Queue()
    row: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="finetune-") as tmp:
        processes = {
            side: spawn.Process(target=train_side, name=f"finetune-{side}", args=(
                setup, variant, side, Path(tmp) / side, turns[side], turns[other], results, checkpoint))
            for side, other in zip(SIDES, reversed(SIDES))
        }
        try:
            start_passive(processes.values())
            waited = 0.0
            while len(row) < len(SIDES):
                try:
                    side, figures = results.get(timeout=1.0)
                    row[side], waited = figures, 0.0
                except queue.Empty:
                    waited += 1.0
                    dead = [s for s, p in processes.items() if s not in row and p.exitcode not in (None, 0)]
                    for s in dead:  # exit code 0: its result is still on the way
                        row[s] = {"error": f"the process exited with code {processes[s].exitcode}"}
                    if waited > SIDE_TIMEOUT_S:
                        raise TimeoutError(f"no result from a side in {SIDE_TIMEOUT_S} s") from None
        finally:  # also when the caller's time budget interrupts the wait
            for process in processes.values():
                if process.is_alive():
                    process.terminate()
                process.join()
    if not any("error" in row[s] for s in SIDES):
        row["ratio"] = {key: row["lora"][key] / row["full"][key] for key in RATIOS
                        if row["lora"][key] is not None and row["full"][key]}
    return row


def _cell(value: Any, pattern: str) -> str:
    return "n/a" if value is None else pattern.format(value)


def format_row(row: dict[str, Any]) -> str:
    """A side per line, then ``lora/full``: the ratio of each figure."""
    widths = [max(len(title), 15) for _, title, _ in COLUMNS]
    lines = ["  " + f"{'side':10s}" + " ".join(f"{title:>{w}s}" for (_, title, _), w in zip(COLUMNS, widths))]
    for side in SIDES:
        figures = row[side]
        if "error" in figures:
            lines.append(f"  {side:10s}error: {figures['error']}")
            continue
        lines.append(f"  {side:10s}" + " ".join(f"{_cell(figures[key], pattern):>{w}s}"
                                                for (key, _, pattern), w in zip(COLUMNS, widths)))
    if "ratio" in row:
        ratio = row["ratio"]
        lines.append(f"  {'lora/full':10s}" + " ".join(
            f"{_cell(ratio.get(key), '{:.4f}') if key in RATIOS else '':>{w}s}" for (key, _, _), w in zip(COLUMNS, widths)))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo", help="a config folder")
    parser.add_argument("--stage", type=int, default=2, choices=(2, 3))
    parser.add_argument("--batch", type=int, default=None, help="default: the config's data.batch_size")
    parser.add_argument("--resolution", type=int, default=None, help="image side in pixels; default: the config's")
    parser.add_argument("--caption-channels", type=int, default=None, help="default: 4096 (T5-XXL), 32 for tiny")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--precision", default=None, help="default: bf16-mixed on GPU, 32 on CPU")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing on both sides")
    parser.add_argument("--no-checkpoint", action="store_true", help="skip writing a checkpoint per side")
    parser.add_argument("overrides", nargs="*", help="config overrides for both sides, key=value")
    args = parser.parse_args()
    setup = Setup(config=args.config, stage=args.stage, device=args.device, batch=args.batch,
                  resolution=args.resolution, caption_channels=args.caption_channels, steps=args.steps,
                  warmup=args.warmup, precision=args.precision, reference=False,
                  overrides=(*(["data.multi_scale=true"] if args.stage == 3 else []), *args.overrides))
    variant = VARIANTS["eager+ckpt" if args.checkpointing else "eager"]
    device = setup.torch_device
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"stage-{args.stage} fine-tuning, LoRA r{RANK} vs full: {args.config}; {where}; {variant.name}; "
          f"torch {torch.__version__}, lightning {L.__version__}; median of {args.steps} steps after "
          f"{args.warmup} warm-up, the sides taking turns", flush=True)
    row = measure(setup, variant, checkpoint=not args.no_checkpoint)
    full = row["full"]
    if "error" not in full:
        print(f"{full['params']:,} parameters, {full['height']}x{full['width']} px, batch {full['batch']}, "
              f"precision {full['precision']}")
    print(format_row(row))
    if any("error" in row[s] for s in SIDES):
        sys.exit(1)


if __name__ == "__main__":
    main()
