"""The drawing of the house (docs/architecture.md) holds: imports point down the layers, never in a cycle, and no
module grows past the size at which it stops having one job."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pixart_lightning", "stages", "callbacks")
LAYERS = (
    ("files", "hub"),
    ("models", "diffusion", "encoders"),
    ("config",),
    ("data", "shapes", "interop"),
    ("training",),
    ("evaluation",),
    ("stages", "callbacks"),
    ("runner",),
    ("cli", "gpu_check"),
)
"""Bottom to top, as docs/architecture.md draws them; a module may import from its own layer or the ones below."""
MAX_LINES = 400
WORD_LISTS = {"pixart_lightning/data/nouns.py"}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project modules it imports (a ``from package import name`` counts the submodule when it is one)."""
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            for candidate in candidates:
                while candidate and candidate not in modules:
                    candidate = candidate.rpartition(".")[0]
                if candidate and candidate != name:
                    targets.add(candidate)
        edges[name] = targets
    return edges


def _layer(module: str) -> tuple[int, str]:
    parts = module.split(".")
    area = parts[1] if parts[0] == "pixart_lightning" and len(parts) > 1 else parts[0]
    for index, names in enumerate(LAYERS):
        if area in names:
            return index, area
    raise AssertionError(f"{module}: its area {area!r} is in no layer of docs/architecture.md")


def _upward(edges: dict[str, set[str]]) -> list[str]:
    """The imports that point up the layers (the package's own ``__init__`` imports nothing of note)."""
    return sorted(f"{source} -> {target}" for source, targets in edges.items() for target in targets
                  if source != "pixart_lightning" and _layer(target)[0] > _layer(source)[0])


@pytest.fixture(scope="module")
def edges() -> dict[str, set[str]]:
    return _imports(_modules())


def test_imports_point_down_the_layers(edges: dict[str, set[str]]) -> None:
    upward = _upward(edges)
    assert not upward, "imports pointing up the layers:\n" + "\n".join(upward)


def test_no_import_cycles(edges: dict[str, set[str]]) -> None:
    state: dict[str, str] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(edges[node]):
            if state.get(target) == "open":
                cycles.append(" -> ".join([*path[path.index(target):], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[node] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_layer_check_sees_an_upward_import() -> None:
    """The check itself: a data module importing the runner (as the data tools once did) is caught, found in the
    source by the same import reader."""
    edges = {"pixart_lightning.data.extract": {"pixart_lightning.runner.chain", "pixart_lightning.files"},
             "pixart_lightning.runner.chain": {"pixart_lightning.data.extract"}}
    assert _upward(edges) == ["pixart_lightning.data.extract -> pixart_lightning.runner.chain"]


def test_modules_stay_short() -> None:
    long = {str(path.relative_to(ROOT)): n for path in _modules().values()
            if (n := len(path.read_text().splitlines())) > MAX_LINES and str(path.relative_to(ROOT)) not in WORD_LISTS}
    assert not long, f"modules over {MAX_LINES} lines (split them along their seams): {long}"
