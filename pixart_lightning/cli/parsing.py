"""How a command is declared: its parser, filled with its options when it is chosen, and its handler."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

Options = Callable[[argparse.ArgumentParser], None]
Handler = Callable[[argparse.Namespace], None]


class CommandParser(argparse.ArgumentParser):
    """An argument parser that adds its options the first time it parses.

    A command's choices and defaults come from the modules that own them (the samplers from the diffusion package,
    the default T5 from the encoders), and importing those means importing torch and transformers: seconds. Adding
    a command's options only when that command is chosen keeps ``pixart-lightning --help`` and the other commands
    from waiting for them.
    """

    def __init__(self, *args, options: Options | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._pending_options = options

    def parse_known_args(
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if self._pending_options is not None:
            options, self._pending_options = self._pending_options, None
            options(self)
        return super().parse_known_args(args, namespace)


def add_command(subparsers: argparse._SubParsersAction, name: str, help: str, options: Options,
                handler: Handler) -> None:
    """Command ``name``: ``options`` adds its arguments (when it is chosen), ``handler`` runs it."""
    subparsers.add_parser(name, help=help, options=options).set_defaults(func=handler)


def add_prediction_option(parser: argparse.ArgumentParser) -> None:
    from pixart_lightning.diffusion import PREDICTIONS

    parser.add_argument("--prediction", choices=PREDICTIONS, help="what the model predicts (default: what its "
                        "weights record, else its run folder's manifest.json, else epsilon)")
