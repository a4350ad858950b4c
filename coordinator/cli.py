"""``synthfed-coordinator``: rounds, intake, pooling, shared training, evaluation.

One module per command (group) under coordinator/commands, each exposing ``register(app)``;
imports stay light so ``--help`` is fast.
"""

from __future__ import annotations

import importlib

import typer

from protocols.cli_support import run_app

__all__ = ["app", "main"]

app = typer.Typer(
    name="synthfed-coordinator",
    help="The synthfed coordinator: trust, rounds, intake, pooling, shared networks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

COMMANDS = (
    "init",
    "trust",
    "policy",
    "round",
    "receive",
    "pool",
    "simulate",
    "train",
    "evaluate",
    "compare",
)

for _name in COMMANDS:
    try:
        _module = importlib.import_module(f"coordinator.commands.{_name}")
    except ModuleNotFoundError as _exc:
        if _exc.name != f"coordinator.commands.{_name}":
            raise
        continue
    _module.register(app)


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
