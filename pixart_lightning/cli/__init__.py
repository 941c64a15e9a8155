"""The ``pixart-lightning`` command line: the command groups' parsers, and how a command's errors are reported.

Each group (``weights``, ``evaluate``, ``train``, ``data``) declares its commands and their handlers; a handler
parses nothing and decides nothing the library can, and imports what it runs only when it runs.
"""

from __future__ import annotations

import argparse
import sys

from pixart_lightning.cli import data, evaluate, finetune, train, weights
from pixart_lightning.cli.parsing import CommandParser

TRACEBACK = "Traceback (most recent call last):\n"
WORKER_TRACEBACK = f"\nOriginal {TRACEBACK}"
"""How torch's ExceptionWrapper embeds a DataLoader worker's traceback in the error it re-raises."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from callbacks.checkpoints import DamagedCheckpoints
    from pixart_lightning.hub import ModelNotAvailableError
    from pixart_lightning.runner.unit import RunnerError

    return (ValueError, FileNotFoundError, FileExistsError, ModelNotAvailableError, RunnerError, DamagedCheckpoints)


def build_parser() -> argparse.ArgumentParser:
    """Every command; a command's options are added when it is chosen (:class:`CommandParser`)."""
    parser = CommandParser(prog="pixart-lightning", description="Train and convert PixArt-α models.")
    commands = parser.add_subparsers(dest="command", required=True)
    for group in (weights, evaluate, train, finetune, data):
        group.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may follow options (`run configs/demo --stages 1 optim.lr=1e-4`) in the commands taking them.
    args, extra = parser.parse_known_args(argv)
    if extra and (not hasattr(args, "overrides") or any("=" not in e or e.startswith("-") for e in extra)):
        _chosen_parser(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    command = _command_name(args)
    try:
        args.func(args)
    except Exception as err:
        from callbacks.preemption import Preempted  # late imports: keep `--help` and user errors fast

        if isinstance(err, Preempted):  # checkpointed on SIGUSR1; the requeued job (or the same command) resumes
            print(f"{command}: {err}", file=sys.stderr)
            return 0
        if not isinstance(err, _user_errors()):
            raise  # real crashes keep their traceback
        message = _own_message(err).splitlines()  # user mistakes: one line, no traceback
        print(f"{command}: error: {message[0] if message else type(err).__name__}", file=sys.stderr)
        for line in message[1:]:
            print(f"  {line}", file=sys.stderr)
        return 2
    return 0


def _chosen_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)parser of the command as typed, so that its errors show its own usage line and name
    (``pixart-lightning data ingest: error: ...``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return _chosen_parser(action.choices[getattr(args, action.dest)], args)
    return parser


def _command_name(args: argparse.Namespace) -> str:
    """The command as typed, with its subcommand if it has one: ``pixart-lightning data extract``."""
    sub = getattr(args, f"{args.command}_command", None)  # the dest of a command's subparsers (``data_command``)
    return " ".join(["pixart-lightning", args.command, *([sub] if sub else [])])


def _own_message(err: BaseException) -> str:
    """The error's message as where it was raised. torch re-raises an error of a DataLoader worker in the main
    process as the same type with the worker's traceback for a message; that is cut back to the error's own text."""
    text = str(err).strip()
    if WORKER_TRACEBACK not in text:
        return text
    last = text.rsplit(TRACEBACK, 1)[-1].splitlines()
    raised = "\n".join(last[next((i for i, line in enumerate(last) if not line.startswith(" ")), len(last)):])
    for name in (f"{type(err).__module__}.{type(err).__qualname__}", type(err).__qualname__):
        if raised.startswith(f"{name}: "):
            return raised[len(name) + 2:].strip()
    return raised.strip()


