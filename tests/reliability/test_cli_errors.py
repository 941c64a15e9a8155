"""Every command has --help; user mistakes exit 2 with one line naming the problem, before any work."""

from __future__ import annotations

import pytest

from pixart_lightning.cli import build_parser, main


def commands() -> list[list[str]]:
    """Every command and sub-command path of the CLI."""
    found = []
    for action in build_parser()._subparsers._group_actions:  # argparse keeps sub-parsers here
        for name, parser in action.choices.items():
            subs = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
            found += [[name, sub] for a in subs for sub in a.choices] if subs else [[name]]
    return found


@pytest.mark.parametrize("command", commands(), ids=" ".join)
def test_every_command_has_help(command: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0 and "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["run", "configs/demo", "optim.lrr=1"], "optim.lrr"),
    (["run", "configs/demo", "train.max_steps=many"], "train.max_steps"),
    (["run", "configs/demo", "train.strategy=zero"], "valid choices are auto, ddp, fsdp"),
    (["run", "configs/demo", "model.num_heads=5"], "num_heads"),
    (["run", "configs/demo", "stage3.data.resolution=30"], "not divisible by patch size"),
    (["run", "configs/pixart-xl2", "--stages", "2"], "data.shards"),
    (["run", "configs/nowhere"], "does not exist"),
    (["info", "/nowhere/model.pth"], "nowhere"),
    (["data", "extract", "/nowhere", "/tmp/x"], "does not exist"),
])
def test_user_mistakes_exit_2_with_one_line(argv: list[str], message: str, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("pixart-lightning") and message in err and "Traceback" not in err
