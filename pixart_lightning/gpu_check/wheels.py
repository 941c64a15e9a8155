"""The wheels the GPU machine lacks: this project's runtime requirements, closed over their own requirements, less
what that machine's image already holds, pinned to the versions installed here.

    python -m pixart_lightning.gpu_check.wheels --dest .whl      # what `make gpu-wheels` runs

The GPU machine cannot reach a package index, so ``make gpu-check`` installs these wheels from the carried folder
with ``pip install --no-index --no-deps``. Pure-Python wheels fit any platform; a compiled one is taken for
CPython 3.12 on manylinux x86-64, which is what that machine runs.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterable
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

from pixart_lightning.gpu_check import PROJECT

WHEEL_LIMIT_MIB = 40
"""The folder travels with the working tree to the GPU machine (64 MiB in all): keep it well below that."""

TARGET_PYTHON = "3.12"
TARGET_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
TARGET_ENVIRONMENT = {
    "python_version": TARGET_PYTHON, "python_full_version": f"{TARGET_PYTHON}.3", "implementation_name": "cpython",
    "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
    "platform_machine": "x86_64", "os_name": "posix", "extra": "",
}
"""Where requirement markers are evaluated: the GPU machine's Python, not this one."""

GPU_MACHINE_PACKAGES = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())
"""The Python packages of the GPU machine's image (the device tool's package list, read 2026-11-17). Python 3.12
with PyTorch 2.11, Lightning, transformers 5, huggingface-hub 1.33; no diffusers, webdataset, omegaconf, clean-fid."""

Requires = Callable[[str], Iterable[str] | None]
Version = Callable[[str], str]


def canonical(name: str) -> str:
    """A distribution name as package indexes compare them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def project_requirements(pyproject: Path = PROJECT / "pyproject.toml") -> list[Requirement]:
    """The project's runtime requirements (``[project] dependencies``; extras such as dev are not shipped)."""
    with pyproject.open("rb") as f:
        return [Requirement(line) for line in tomllib.load(f)["project"]["dependencies"]]


def missing_packages(
    requirements: Iterable[Requirement], present: frozenset[str] = GPU_MACHINE_PACKAGES,
    requires: Requires = metadata.requires, version: Version = metadata.version,
) -> list[tuple[str, str]]:
    """(name, version) of each package the target lacks, sorted: the requirements that apply there (markers
    evaluated for the target, extras off) and, through the requirements of each missing one, theirs. A package the
    target has ends the walk: its own requirements are met there. Versions are this environment's (``version``)."""
    todo, found = list(requirements), {}
    while todo:
        requirement = todo.pop()
        name = canonical(requirement.name)
        if name in present or name in found:
            continue
        if requirement.marker is not None and not requirement.marker.evaluate(TARGET_ENVIRONMENT):
            continue
        try:
            found[name] = version(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{name} is required on the GPU machine but not installed here: run `make venv` "
                             "first (the wheels are pinned to the versions installed in .venv)") from None
        todo += [Requirement(line) for line in requires(name) or ()]
    return sorted(found.items())


def wheel_pin(wheel: Path) -> tuple[str, str]:
    """(name, version) of a wheel file, from its name (``name-version-python-abi-platform.whl``)."""
    name, version = wheel.name.split("-")[:2]
    return canonical(name), version


def download_command(pins: list[tuple[str, str]], dest: Path) -> list[str]:
    """``pip download`` of exactly these wheels for the GPU machine's Python and platform, no dependencies."""
    platforms = [arg for platform in TARGET_PLATFORMS for arg in ("--platform", platform)]
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
            TARGET_PYTHON, "--implementation", "cp", *platforms, "-d", str(dest),
            *(f"{name}=={version}" for name, version in pins)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, default=PROJECT / ".whl", help="wheel folder (git-ignored)")
    parser.add_argument("--list", action="store_true", help="print the pinned list and download nothing")
    args = parser.parse_args(argv)
    pins = missing_packages(project_requirements())
    print("the GPU machine lacks: " + ", ".join(f"{name}=={version}" for name, version in pins))
    if args.list:
        return 0
    args.dest.mkdir(parents=True, exist_ok=True)
    for stale in args.dest.glob("*.whl"):  # two versions of one package would stop the install there
        if wheel_pin(stale) not in pins:
            stale.unlink()
    subprocess.run(download_command(pins, args.dest), check=True)
    size = sum(p.stat().st_size for p in args.dest.glob("*.whl")) / 2**20
    print(f"{len(list(args.dest.glob('*.whl')))} wheels, {size:.1f} MiB in {args.dest}")
    if size > WHEEL_LIMIT_MIB:
        print(f"error: {size:.1f} MiB of wheels is over {WHEEL_LIMIT_MIB} MiB: too much to carry", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
