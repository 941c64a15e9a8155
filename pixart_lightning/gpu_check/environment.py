"""What the run ran on (device, driver, CUDA, library versions), and check 1: the device's practical bf16 peak."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import time
from importlib import metadata
from typing import Any

import torch

from pixart_lightning.gpu_check.harness import Context
from pixart_lightning.training import flops

LIBRARIES = ("torch", "lightning", "transformers", "diffusers", "torchvision", "triton", "webdataset", "omegaconf",
             "safetensors", "numpy", "clean-fid")


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment(device: torch.device) -> dict[str, Any]:
    """The report's header: when, where, and every library version that decides a figure."""
    info: dict[str, Any] = {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "mode": device.type,
        "python": platform.python_version(), "cpu_threads": torch.get_num_threads(), "host_cpus": os.cpu_count(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {"device": props.name, "device_memory_gib": props.total_memory / 2**30,
                 "multiprocessors": props.multi_processor_count, "capability": f"{props.major}.{props.minor}",
                 "driver": _driver_version(), "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                 "datasheet_bf16_tflops": flops.peak_tflops(props.name)}
    else:
        info["device"] = platform.processor() or platform.machine()
    info["versions"] = {name: _version(name) for name in LIBRARIES}
    return info


def matmul_tflops(n: int, device: torch.device, repeats: int = 10) -> float:
    """Mean TFLOP/s of an n x n x n bf16 matrix product on random data, after three warm-up products."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def check_environment(ctx: Context) -> None:
    """The device's memory and its practical bf16 peak: MFU is reported against it as well as the datasheet's."""
    if ctx.device.type == "cuda":
        free, total = torch.cuda.mem_get_info(ctx.device)
        ctx.record("memory_free_gib", free / 2**30)
        ctx.record("memory_total_gib", total / 2**30)
    n = ctx.sizes.matmul
    ctx.record("matmul_size", n)
    measured = ctx.shared["matmul_tflops"] = ctx.record("matmul_bf16_tflops", matmul_tflops(n, ctx.device))
    datasheet = flops.peak_tflops(torch.cuda.get_device_name(ctx.device)) if ctx.device.type == "cuda" else None
    ctx.record("datasheet_bf16_tflops", datasheet)
    if datasheet:
        ctx.record("matmul_fraction_of_datasheet", measured / datasheet)
