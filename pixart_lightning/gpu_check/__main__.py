"""python -m pixart_lightning.gpu_check [--device cuda|cpu] [--out DIR] [--only NAME,...]: the checks in order of value."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from pixart_lightning.gpu_check.environment import check_environment, environment
from pixart_lightning.gpu_check.harness import CUT_SHORT, OK, Check, Context, run_all, write_reports
from pixart_lightning.gpu_check.sizes import CPU, GPU


def all_checks() -> list[Check]:
    """The checks in order of value, with their GPU budgets (480 s in all). Imported here: a missing package (the
    wheels not installed) is then one line of advice, not a traceback."""
    from pixart_lightning.gpu_check.distill import STUDENT_STEPS, TEACHER_STEPS, check_distill
    from pixart_lightning.gpu_check.finetune import GOAL_BATCH_24GIB, check_finetune
    from pixart_lightning.gpu_check.fsdp import check_fsdp
    from pixart_lightning.gpu_check.sampling import check_sampling
    from pixart_lightning.gpu_check.steps import check_step_syncs
    from pixart_lightning.gpu_check.system import check_attention, check_chain
    from pixart_lightning.gpu_check.training import (
        GOAL_MFU_256,
        GOAL_MFU_512,
        GOAL_SPEEDUP_256,
        check_numerics,
        check_train_256,
        check_train_512,
    )

    return [
        Check("environment", "device memory and practical bf16 matmul peak", "", 10, check_environment),
        Check("train_256", "XL/2-256 bf16 training step, ours vs diffusers, like with like",
              f">= {GOAL_MFU_256:.0%} MFU and >= {GOAL_SPEEDUP_256}x diffusers", 85, check_train_256),
        Check("train_512", "XL/2-512 stage-3 step (multi-scale bucket, micro-conditions)", f">= {GOAL_MFU_512:.0%} MFU",
              50, check_train_512),
        Check("fsdp", "FSDP2 through the runner: resume, peak memory, largest batch at 512 px",
              "identical loss after resume", 85, check_fsdp),
        Check("numerics", "bf16-mixed vs fp32 loss; non-finite steps", "no non-finite step", 25, check_numerics),
        Check("syncs", "host-device syncs per training step; EMA kernels per update", "0 syncs; a few kernels",
              20, check_step_syncs),
        Check("sampling", "1024 px DPM-Solver++ speed; `export-pipeline`'s pipeline vs `pixart-lightning sample`'s PNG",
              "same image for the same seed", 35, check_sampling),
        Check("attention", "SDPA backends vs math, bf16 forward + backward", "every usable backend agrees", 25,
              check_attention),
        Check("chain", "configs/demo stages 1 -> 2 through the runner on the device", "handoff and summary written",
              35, check_chain),
        Check("finetune", "XL/2-512 bf16 LoRA r16 vs full fine-tuning, act. ckpt: images/s, peak memory, largest batch",
              f"LoRA fits batch >= {GOAL_BATCH_24GIB} in 24 GiB", 60, check_finetune),
        Check("distill", f"XL/2-512 stage 4: {STUDENT_STEPS}-step student vs {TEACHER_STEPS}-step teacher s/image; "
              "distillation step and memory (student + teacher + target), full and LoRA", "", 50, check_distill),
    ]


def default_out() -> Path:
    return Path(os.environ["OUT"]) if os.environ.get("OUT") else Path("runs/gpu-check")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pixart_lightning.gpu_check", description=__doc__)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: the same checks, tiny sizes")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default: $OUT, else runs/gpu-check)")
    parser.add_argument("--only", default=None, help="comma-separated names of the checks to run (default: all)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here; run the tiny CPU version with --device cpu (make gpu-check DEVICE=cpu)",
              file=sys.stderr)
        return 2
    try:
        known = all_checks()
    except ModuleNotFoundError as err:
        print(f"error: {err.name} is not installed: run `make gpu-wheels` where pip reaches PyPI, carry .whl/ along, "
              "and start with `make gpu-check`, which installs them (docs/gpu.md)", file=sys.stderr)
        return 2
    names = args.only.split(",") if args.only else [c.name for c in known]
    unknown = sorted(set(names) - {c.name for c in known})
    if unknown:
        parser.error(f"--only {','.join(unknown)}: valid checks are {', '.join(c.name for c in known)}")
    device = torch.device(args.device)
    sizes = GPU if device.type == "cuda" else CPU
    checks = [replace(c, budget_s=c.budget_s * sizes.budget_scale) for c in known if c.name in names]
    header = environment(device) | {"sizes": asdict(sizes)}
    shared: dict = {}
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        results = run_all(checks, lambda check, deadline: Context(device, sizes, Path(work) / check.name, deadline,
                                                                  shared), sum(c.budget_s for c in checks))
    header["total_s"] = time.monotonic() - start
    json_path, md_path = write_reports(args.out or default_out(), header, results)
    print(f"\nreports: {json_path} {md_path}")
    for r in results:
        print(f"  {r.name:12s} {r.status:28s} {r.seconds:6.0f} s" + (f"  {r.error}" if r.error else ""))
    return 0 if all(r.status in (OK, CUT_SHORT) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
