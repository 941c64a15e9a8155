"""The command line: fast where nothing heavy is needed, choices as their owners list them."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pixart_lightning.cli import build_parser, main
from pixart_lightning.config import EXTRACTORS
from pixart_lightning.diffusion import PREDICTIONS, SAMPLERS
from pixart_lightning.encoders.loading import DTYPES
from pixart_lightning.encoders.text import DEFAULT_T5
from pixart_lightning.encoders.vae import DEFAULT_VAE

IMPORTS_AFTER = """
import sys
from pixart_lightning.cli import build_parser, main
try:
    main({argv!r})
except SystemExit:
    pass
print(sorted(m for m in ("torch", "transformers", "diffusers", "lightning") if m in sys.modules))
"""


@pytest.mark.parametrize("argv", [["--help"], ["data", "--help"], ["data", "stats", "--help"], ["run", "--help"]])
def test_help_of_commands_without_heavy_choices_imports_no_torch(argv: list[str]) -> None:
    """A command's choices come from modules that import torch; only the chosen command's options are built."""
    result = subprocess.run([sys.executable, "-c", IMPORTS_AFTER.format(argv=argv)], capture_output=True, text=True,
                            check=True)
    assert result.stdout.splitlines()[-1] == "[]"


def usage_choices(argv: list[str], flag: str, capsys) -> tuple[str, ...]:
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    usage = capsys.readouterr().out
    return tuple(usage.split(f"{flag} {{", 1)[1].split("}", 1)[0].split(","))


@pytest.mark.parametrize("argv, flag, owned", [
    (["sample"], "--sampler", SAMPLERS),
    (["sample"], "--prediction", PREDICTIONS),
    (["convert"], "--prediction", PREDICTIONS),
    (["eval", "fid"], "--extractor", EXTRACTORS),
    (["data", "extract"], "--t5-dtype", tuple(DTYPES)),
])
def test_choices_are_their_owners(argv: list[str], flag: str, owned: tuple[str, ...], capsys) -> None:
    assert usage_choices(argv, flag, capsys) == owned


def test_default_encoders_are_the_encoders_own(capsys) -> None:
    extract = build_parser().parse_args(["data", "extract", "shards", "features"])
    assert (extract.text_encoder, extract.vae) == (DEFAULT_T5, DEFAULT_VAE)
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    sample_help = " ".join(capsys.readouterr().out.split())
    assert f"else {DEFAULT_T5})" in sample_help and f"else {DEFAULT_VAE})" in sample_help
