"""The prepared GPU check: its CPU run end to end, the budget and error handling, out-of-memory handling, the wheel
list, and the like-with-like benchmark it measures with."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import lightning as L
import pytest
import torch
from packaging.requirements import Requirement

from pixart_lightning.gpu_check import PROJECT, benchmark
from pixart_lightning.gpu_check.harness import (
    CUT_SHORT,
    FAILED,
    OK,
    TIMED_OUT,
    UNAVAILABLE,
    Check,
    Context,
    Unavailable,
    run_all,
    write_reports,
)
from pixart_lightning.gpu_check.memory import is_out_of_memory, largest_batch
from pixart_lightning.gpu_check.wheels import download_command, missing_packages, project_requirements, wheel_pin
from pixart_lightning.training.compilation import compile_unavailable

CHECK_NAMES = ["environment", "train_256", "train_512", "fsdp", "numerics", "syncs", "sampling", "attention", "chain",
               "finetune", "distill"]


@pytest.fixture(scope="module")
def cpu_report(tmp_path_factory) -> dict:
    """`python -m pixart_lightning.gpu_check --device cpu`, run once: every check at tiny sizes."""
    out = tmp_path_factory.mktemp("gpu-check")
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    done = subprocess.run([sys.executable, "-m", "pixart_lightning.gpu_check", "--device", "cpu", "--out", str(out)],
                          cwd=PROJECT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu-check.json").read_text())
    report["markdown"] = (out / "gpu-check.md").read_text()
    return report


def _figures(report: dict, name: str) -> dict:
    return next(c for c in report["checks"] if c["name"] == name)["figures"]


def test_cpu_run_reports_every_check_in_order(cpu_report):
    """The header names the device and versions; every check ran, in order of value, within its budget."""
    assert cpu_report["mode"] == "cpu"
    assert {"torch", "lightning", "diffusers", "transformers"} <= set(cpu_report["versions"])
    assert cpu_report["versions"]["torch"] == torch.__version__.split("+")[0]
    assert [c["name"] for c in cpu_report["checks"]] == CHECK_NAMES
    assert {c["name"]: c["status"] for c in cpu_report["checks"]} == dict.fromkeys(CHECK_NAMES, OK)
    assert _figures(cpu_report, "environment")["matmul_bf16_tflops"] > 0
    for name in CHECK_NAMES:
        assert f"## {name}: " in cpu_report["markdown"]


def test_cpu_run_training_figures(cpu_report):
    """Pairs run like with like (eager, and with activation checkpointing on both sides); stage 3 trains in the
    bucket nearest 3:4; bf16 differs from fp32 a little on a model whose output is not zero, and no step is skipped."""
    pairs = _figures(cpu_report, "train_256")["pairs"]
    assert [p["variant"] for p in pairs] == ["eager", "eager+ckpt"]  # compiled pairs need a GPU's budget
    for pair in pairs:
        assert pair["ours_images_per_s"] > 0 and pair["diffusers_images_per_s"] > 0 and pair["speedup"] > 0
    (run_512,) = _figures(cpu_report, "train_512")["runs"]
    assert run_512["height"] < run_512["width"] and "diffusers_step_ms" not in run_512
    numerics = _figures(cpu_report, "numerics")
    assert 0 < numerics["relative_difference"] < 0.05
    assert numerics["steps"] == 3 and numerics["non_finite_losses"] == 0 and numerics["skipped_steps"] == 0
    syncs = _figures(cpu_report, "syncs")  # the EMA update: a few grouped foreach ops, not one per parameter
    assert syncs["ema_groups"] == 1 and 0 < syncs["ema_kernels_per_update"] < syncs["ema_parameters"]


def test_cpu_run_runner_sampling_attention_chain(cpu_report):
    """FSDP2 resumes with the identical loss; the exported pipeline draws the CLI's image; the chain hands over."""
    fsdp = _figures(cpu_report, "fsdp")
    assert fsdp["resume_identical"] and fsdp["resumed_from_step"] == 2
    assert fsdp["largest_batch_512"]["largest"] >= 1
    sampling = _figures(cpu_report, "sampling")
    assert sampling["seconds_per_image"] > 0
    assert sampling["pipeline_vs_sample_epsilon"]["same_image"] and sampling["pipeline_vs_sample_v"]["same_image"]
    assert _figures(cpu_report, "attention")["all_usable_backends_agree"]
    chain = _figures(cpu_report, "chain")
    assert chain["stage1"]["status"] == chain["stage2"]["status"] == "done"
    assert chain["handoff_matches_stage1_weights"] and chain["summary_written"]


def test_cpu_run_finetune_figures(cpu_report):
    """LoRA and full fine-tuning took turns, each reporting its figures; LoRA trains a fraction of the parameters.
    The CPU has no device peak, so no batch is projected there."""
    finetune = _figures(cpu_report, "finetune")
    lora, full = finetune["lora"], finetune["full"]
    for figures in (lora, full):
        assert figures["steps"] == 2 and figures["images_per_s"] > 0 and figures["peak_gib"] is None
    assert 0 < lora["trainable_params"] < full["trainable_params"] == full["params"]
    assert 0 < finetune["lora_over_full"]["grad_optimizer_mib"] < 1
    assert "lora_largest_batch_projected" not in finetune


def test_cpu_run_distill_figures(cpu_report):
    """Student and teacher were timed on one batch; both stage-4 variants trained their steps. The full variant
    holds a teacher copy and a target as large as the student; under LoRA the teacher is the student's base (no
    memory of its own), while the target, the EMA copy, holds its own frozen base beside its adapters."""
    distill = _figures(cpu_report, "distill")
    student, teacher = distill["student_seconds_per_image"], distill["teacher_seconds_per_image"]
    assert student > 0 and teacher > 0 and distill["teacher_over_student"] == pytest.approx(teacher / student)
    full, lora = distill["full"], distill["lora"]
    for figures in (full, lora):
        assert figures["steps"] == 2 and figures["images_per_s"] > 0 and figures["peak_gib"] is None
        assert figures["resident_total_gib"] == pytest.approx(sum(figures["resident_gib"].values()))
    assert full["resident_gib"]["teacher"] == pytest.approx(full["resident_gib"]["student"])
    assert full["resident_gib"]["target"] == pytest.approx(full["resident_gib"]["student"])
    assert lora["resident_gib"]["teacher"] == 0
    assert lora["resident_gib"]["target"] == pytest.approx(lora["resident_gib"]["student"])
    assert 0 < lora["trainable_params"] < full["trainable_params"] == full["params"]
    assert "largest_batch_projected" not in full


# ---------------------------------------------------------------------- budgets, errors, reports
def _context(tmp_path: Path, check: Check, deadline: float) -> Context:
    return Context(torch.device("cpu"), None, tmp_path / check.name, deadline, {})


def _run(tmp_path: Path, *checks: Check, total: float = 60.0):
    return run_all(list(checks), lambda check, deadline: _context(tmp_path, check, deadline), total)


def test_a_check_past_its_budget_is_stopped_keeps_its_figures_and_the_next_runs(tmp_path):
    def slow(ctx):
        ctx.record("before", 1.5)
        time.sleep(30)
        ctx.record("after", 2)

    late, after = _run(tmp_path, Check("slow", "sleeps", "", 0.5, slow),
                       Check("next", "records", "", 5, lambda ctx: ctx.record("ran", True)))
    assert late.status == TIMED_OUT and late.figures == {"before": 1.5}
    assert after.status == OK and after.figures == {"ran": True}


def test_a_failing_check_records_its_error_and_traceback_then_the_next_runs(tmp_path):
    def inner():
        raise ValueError("the kernel returned garbage")

    def failing(ctx):
        ctx.record("measured", 3)
        inner()

    failed, after = _run(tmp_path, Check("bad", "fails", "", 5, failing),
                         Check("next", "records", "", 5, lambda ctx: ctx.record("ran", True)))
    assert failed.status == FAILED and failed.figures == {"measured": 3}
    assert failed.error == "ValueError: the kernel returned garbage"
    assert "in inner" in failed.traceback and failed.traceback.rstrip().endswith("garbage")
    assert after.status == OK


def test_cut_short_and_unavailable_checks(tmp_path):
    def partial(ctx):
        ctx.record("first", 1)
        ctx.cut_short("no time for the second")

    def missing(ctx):
        raise Unavailable("pixart_lightning.something: not in this build")

    cut, unavailable = _run(tmp_path, Check("partial", "", "", 5, partial), Check("missing", "", "", 5, missing))
    assert cut.status == CUT_SHORT and cut.notes == ["no time for the second"] and cut.figures == {"first": 1}
    assert unavailable.status == UNAVAILABLE and "not in this build" in unavailable.error


def test_checks_after_the_total_budget_is_spent_are_not_started(tmp_path):
    first, never = _run(tmp_path, Check("sleeps", "", "", 5, lambda ctx: time.sleep(30)),
                        Check("never", "", "", 5, lambda ctx: ctx.record("ran", True)), total=0.3)
    assert first.status == TIMED_OUT  # stopped at the total's end, its own budget being longer
    assert never.status == TIMED_OUT and never.figures == {} and "total budget" in never.notes[0]


def test_reports_write_json_without_nan_and_markdown_tables(tmp_path):
    (result,) = _run(tmp_path, Check("rows", "a table", "fast", 5, lambda ctx: (
        ctx.record("rows", [{"variant": "eager", "mfu": 0.41}, {"variant": "compiled", "mfu": float("nan")}]),
        ctx.record("peak", float("inf")))))
    json_path, md_path = write_reports(tmp_path / "out", {"device": "test"}, [result])
    report = json.loads(json_path.read_text())
    assert report["checks"][0]["figures"] == {"rows": [{"variant": "eager", "mfu": 0.41},
                                                       {"variant": "compiled", "mfu": None}], "peak": None}
    markdown = md_path.read_text()
    assert "| variant | mfu |" in markdown and "| eager | 0.41 |" in markdown and "| compiled | – |" in markdown
    assert "| rows: a table | ok |" in markdown


# ---------------------------------------------------------------------- out of memory
def _cpu_out_of_memory() -> RuntimeError:
    """A real allocation failure: more bytes than a 64-bit process's address space can hold."""
    try:
        torch.empty(2**50, dtype=torch.uint8)
    except RuntimeError as err:
        return err
    raise AssertionError("a petabyte allocation succeeded")


def test_out_of_memory_is_recognised_through_wrapping_errors():
    oom = _cpu_out_of_memory()
    assert is_out_of_memory(oom)
    try:
        try:
            raise oom
        except RuntimeError as inner:
            raise ValueError("the trainer stopped") from inner
    except ValueError as wrapped:
        assert is_out_of_memory(wrapped)
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA error: out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch")) and not is_out_of_memory(ValueError("out of memory"))


def test_largest_batch_doubles_until_memory_runs_out():
    def fits(batch: int) -> None:  # up to 4 fit; 8 asks for 2**47 bytes, more than the address space
        torch.empty(1 if batch <= 4 else batch * 2**44, dtype=torch.uint8)

    assert largest_batch(fits, 1, 64, lambda: 1.0) == {"largest": 4, "out_of_memory_at": 8, "stopped_by": "out of memory"}
    assert largest_batch(fits, 1, 3, lambda: 1.0) == {"largest": 2, "out_of_memory_at": None, "stopped_by": "limit"}
    assert largest_batch(fits, 1, 64, lambda: 0.0) == {"largest": 0, "out_of_memory_at": None, "stopped_by": "time"}

    def broken(batch: int) -> None:
        raise ValueError("not a memory problem")

    with pytest.raises(ValueError, match="not a memory problem"):
        largest_batch(broken, 1, 64, lambda: 1.0)


# ---------------------------------------------------------------------- the wheels the GPU machine lacks
def test_wheel_list_of_this_project_is_pinned_to_this_environment():
    pins = dict(missing_packages(project_requirements()))
    assert {"diffusers", "webdataset", "braceexpand", "omegaconf", "clean-fid"} <= set(pins)
    assert not {"torch", "lightning", "transformers", "safetensors", "einops", "numpy", "huggingface-hub"} & set(pins)
    assert all(version == metadata.version(name) for name, version in pins.items())


def test_wheel_list_evaluates_markers_for_the_target_and_stops_at_present_packages():
    graph = {"app": ["lib", "docs-only; extra == 'docs'", "old-python-only; python_version < '3.12'", "torch"],
             "lib": ["Helper_Pkg>=1"], "helper-pkg": []}
    requires = graph.__getitem__  # asking for torch's requirements (present on the target) would fail
    pins = missing_packages([Requirement("app")], frozenset({"torch"}), requires, lambda name: f"1.{len(name)}")
    assert pins == [("app", "1.3"), ("helper-pkg", "1.10"), ("lib", "1.3")]


def test_wheel_download_command_targets_the_gpu_machine(tmp_path):
    command = download_command([("diffusers", "0.42.1"), ("omegaconf", "2.4.0")], tmp_path)
    assert command[command.index("--python-version") + 1] == "3.12" and "--no-deps" in command
    assert "--only-binary=:all:" in command and "manylinux_2_17_x86_64" in command
    assert command[-2:] == ["diffusers==0.42.1", "omegaconf==2.4.0"]
    assert wheel_pin(Path("clean_fid-0.1.35-py3-none-any.whl")) == ("clean-fid", "0.1.35")


# ---------------------------------------------------------------------- the benchmark compares like with like
class _StopBeforeTheFirstStep(L.Callback):
    """Ends ``trainer.fit`` once the model is configured: the variant is applied, no step runs (nothing compiles)."""

    def on_fit_start(self, trainer, pl_module) -> None:
        trainer.should_stop = True


def test_a_variant_sets_both_sides_alike(tmp_path):
    """A variant overrides the config's compile and checkpointing (the XL config turns both on) and applies the
    same to both models: ours through the benchmark's own fit (the stage's ``configure_model``), diffusers' in
    ``reference_model``: gradient checkpointing enabled, each transformer block compiled."""
    train_step = benchmark("train_step")
    setup = train_step.Setup(batch=2, steps=1, warmup=0, overrides=("model.gradient_checkpointing=true",))
    plain = train_step.stage_config(setup, train_step.VARIANTS["eager"])
    assert not plain.model.compile and not plain.model.gradient_checkpointing
    variant = train_step.VARIANTS["compiled+ckpt"]
    built = train_step.prepare(setup, variant, tmp_path)
    trainer = train_step.fit(built, torch.device("cpu"), [_StopBeforeTheFirstStep()], tmp_path / "run")
    assert trainer.global_step == 0
    ours = built.module.model
    assert built.cfg.model.compile and ours.gradient_checkpointing
    theirs = train_step.reference_model(built.module, variant, torch.device("cpu"))
    assert theirs.gradient_checkpointing
    if compile_unavailable(torch.device("cpu")) is None:
        assert all(block._compiled_call_impl is not None for block in ours.blocks)
        assert all(block._compiled_call_impl is not None for block in theirs.transformer_blocks)


def test_a_pair_that_runs_out_of_memory_is_a_row_not_a_crash():
    train_step = benchmark("train_step")
    row = train_step.measure_or_oom(train_step.Setup(batch=2**44, steps=1, warmup=0), train_step.VARIANTS["eager"])
    assert row["variant"] == "eager" and row["error"].startswith("out of memory")
