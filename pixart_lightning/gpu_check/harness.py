"""Running checks in order, each within its time budget, and writing what they measured as JSON and Markdown.

A check is a function of a :class:`Context`. It writes its figures into ``ctx.figures`` as it goes, so whatever it
measured before stopping is kept. It watches ``ctx.time_left()`` and calls ``ctx.cut_short(why)`` where it skips
the rest of its work; past its budget an alarm interrupts it (a running CUDA kernel or compilation finishes first,
Python then raises :class:`BudgetExceeded`). A check that raises is recorded with the error and its traceback's
tail, and the next check runs.
"""

from __future__ import annotations

import json
import math
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from pixart_lightning.gpu_check.memory import release_memory
from pixart_lightning.gpu_check.sizes import Sizes

OK, FAILED, TIMED_OUT, CUT_SHORT, UNAVAILABLE = "ok", "failed", "timed out", "cut short", "not available in this build"
TRACEBACK_LINES = 25


class BudgetExceeded(Exception):
    """A check ran past its time budget."""


class Unavailable(Exception):
    """What a check needs is not part of this build (a function another change adds, a package not installed)."""


@dataclass
class Context:
    """What a check runs with: the device, its sizes, a scratch folder, its deadline, and where its figures go."""

    device: torch.device
    sizes: Sizes
    work: Path
    deadline: float
    shared: dict[str, Any]
    """Figures later checks use (the measured matmul peak)."""
    figures: dict[str, Any] = field(default_factory=dict)
    cut: list[str] = field(default_factory=list)

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def record(self, key: str, value: Any) -> Any:
        """Keep a figure (printed as it comes, so a killed run still shows it in the log)."""
        self.figures[key] = value
        print(f"    {key}: {_cell(value)}", flush=True)
        return value

    def cut_short(self, why: str) -> None:
        print(f"    cut short: {why}", flush=True)
        self.cut.append(why)


@dataclass(frozen=True)
class Check:
    name: str
    title: str
    goal: str
    budget_s: float
    """On a GPU; a CPU run scales it (``Sizes.budget_scale``)."""
    run: Callable[[Context], None]


@dataclass
class Result:
    name: str
    title: str
    goal: str
    status: str
    seconds: float
    budget_s: float
    figures: dict[str, Any]
    notes: list[str]
    error: str | None = None
    traceback: str | None = None


def _raise_budget_exceeded(signum, frame) -> None:
    raise BudgetExceeded("the check ran past its time budget")


def run_check(check: Check, ctx: Context) -> Result:
    """Run one check with an alarm at its deadline; never raises (a KeyboardInterrupt excepted)."""
    start = time.monotonic()
    budget = ctx.time_left()
    print(f"[{check.name}] {check.title} (budget {budget:.0f} s)", flush=True)
    ctx.work.mkdir(parents=True, exist_ok=True)
    previous = signal.signal(signal.SIGALRM, _raise_budget_exceeded)
    signal.setitimer(signal.ITIMER_REAL, max(budget, 0.001))
    status, error, trace = OK, None, None
    try:
        check.run(ctx)
    except BudgetExceeded as exc:
        status, error = TIMED_OUT, str(exc)
    except Unavailable as exc:
        status, error = UNAVAILABLE, str(exc)
    except Exception as exc:
        status, error = FAILED, f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        trace = "".join(traceback.format_exc().splitlines(keepends=True)[-TRACEBACK_LINES:])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    if status == OK and ctx.cut:
        status = CUT_SHORT
    seconds = time.monotonic() - start
    print(f"[{check.name}] {status} in {seconds:.1f} s" + (f": {error}" if error else ""), flush=True)
    if trace:
        print(trace, flush=True)
    _reset_between_checks()
    return Result(check.name, check.title, check.goal, status, seconds, check.budget_s, ctx.figures, ctx.cut,
                  error, trace)


def _reset_between_checks() -> None:
    """Free the check's memory and compiled graphs: the next one starts from a clean device and compile cache
    (dynamo caches a bounded number of graphs per function; leftovers would push later checks to eager)."""
    torch._dynamo.reset()
    release_memory()


def run_all(checks: list[Check], make_context: Callable[[Check, float], Context], total_s: float) -> list[Result]:
    """Run the checks in order; each gets its budget, less if the total budget has less left."""
    end = time.monotonic() + total_s
    results = []
    for check in checks:
        budget = min(check.budget_s, end - time.monotonic())
        if budget <= 0:
            results.append(Result(check.name, check.title, check.goal, TIMED_OUT, 0.0, check.budget_s, {},
                                  ["the total budget was spent before this check"]))
            continue
        results.append(run_check(check, make_context(check, time.monotonic() + budget)))
    return results


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: such figures are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def write_reports(out: Path, header: dict[str, Any], results: list[Result]) -> tuple[Path, Path]:
    """``gpu-check.json`` (everything) and ``gpu-check.md`` (a summary table, then each check's figures)."""
    out.mkdir(parents=True, exist_ok=True)
    report = _finite({**header, "checks": [asdict(r) for r in results]})
    json_path = out / "gpu-check.json"
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    md_path = out / "gpu-check.md"
    md_path.write_text(markdown(report))
    return json_path, md_path


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_cell(v)}" for k, v in value.items())
    if isinstance(value, list):
        return f"{len(value)} rows" if value and isinstance(value[0], dict) else ", ".join(map(_cell, value))
    return "–" if value is None else str(value)


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: environment, one summary row per check, then each check's figures and errors."""
    lines = ["# GPU check", ""]
    lines += [f"- **{key}**: {_cell(value)}" for key, value in report.items() if key != "checks"]
    lines += ["", "| check | status | seconds (budget) | goal |", "|---|---|---|---|"]
    for c in report["checks"]:
        lines.append(f"| {c['name']}: {c['title']} | {c['status']} | {c['seconds']:.0f} ({c['budget_s']:.0f}) "
                     f"| {c['goal'] or '–'} |")
    for c in report["checks"]:
        lines += ["", f"## {c['name']}: {c['title']}", "", f"status: **{c['status']}**"]
        lines += [f"- {note}" for note in c["notes"]]
        for key, value in c["figures"].items():
            if isinstance(value, list) and value and isinstance(value[0], dict):
                lines += ["", f"{key}:", "", *_table(value)]
            else:
                lines.append(f"- {key}: {_cell(value)}")
        if c["error"]:
            lines += ["", f"error: `{c['error']}`"]
        if c["traceback"]:
            lines += ["", "```", c["traceback"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def _table(rows: list[dict[str, Any]]) -> list[str]:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
            *("| " + " | ".join(_cell(row.get(k)) for k in columns) + " |" for row in rows)]
