"""``synthfed-coordinator``: rounds, intake, pooling, shared training, evaluation.

One module per command (group) under coordinator/commands, each exposing ``register(app)``;
imports stay light so ``--help`` is fast.
"""

from __future__ import annotations

import typer

from protocols.cli_support import register_commands, run_app

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

register_commands(app, "coordinator.commands", COMMANDS)


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
