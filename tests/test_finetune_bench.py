"""benchmarks/finetune.py: LoRA and full fine-tuning side by side, each a real Trainer run in its own process."""

from __future__ import annotations

import subprocess
import sys

from pixart_lightning.gpu_check import PROJECT
from pixart_lightning.gpu_check.finetune import CONTEXT_GIB, projected_largest_batch

COLUMNS = ["trainable", "step_ms", "images_per_s", "peak_rss_mib", "grad_optimizer_mib", "gpu_peak_gib", "ckpt_bytes"]


def _number(cell: str) -> float | None:
    return None if cell == "n/a" else float(cell.replace(",", ""))


def test_the_benchmark_prints_both_sides_and_lora_is_the_smaller():
    """At a tiny size: a row per side and the ratios; LoRA trains fewer parameters, keeps less gradient and AdamW
    state and writes a smaller checkpoint (times are printed, never asserted)."""
    done = subprocess.run([sys.executable, "benchmarks/finetune.py", "--steps", "2", "--warmup", "1", "--batch", "2"],
                          cwd=PROJECT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {}
    for line in done.stdout.splitlines():
        cells = line.split()
        if cells and cells[0] in ("lora", "full", "lora/full") and line.startswith("  "):
            rows[cells[0]] = cells[1:]
    assert set(rows) == {"lora", "full", "lora/full"}
    lora, full = ({k: _number(c) for k, c in zip(COLUMNS, rows[side], strict=True)} for side in ("lora", "full"))
    for figures in (lora, full):
        assert figures["step_ms"] > 0 and figures["images_per_s"] > 0 and figures["peak_rss_mib"] > 0
        assert figures["gpu_peak_gib"] is None  # the CPU has no device peak
    assert 0 < lora["trainable"] < full["trainable"]
    assert 0 < lora["grad_optimizer_mib"] < full["grad_optimizer_mib"]
    assert 0 < lora["ckpt_bytes"] < full["ckpt_bytes"]
    ratios = [_number(c) for c in rows["lora/full"]]
    assert ratios[0] == round(lora["trainable"] / full["trainable"], 4)


def test_largest_batch_projection():
    """Resident state plus memory per image times the batch, under the capacity less the CUDA context."""
    resident, per_image = 3.0, 0.5
    capacity = 24.0
    batch = projected_largest_batch(resident, resident + 8 * per_image, 8, capacity)
    assert batch == int((capacity - CONTEXT_GIB - resident) / per_image)
    assert resident + batch * per_image + CONTEXT_GIB <= capacity < resident + (batch + 1) * per_image + CONTEXT_GIB
    assert projected_largest_batch(30.0, 31.0, 8, capacity) == 0  # not even the weights fit
