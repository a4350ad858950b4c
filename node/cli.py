"""``synthfed-node``: the site's command line. One module per command under node/commands.

Each command module exposes ``register(app)``; importing it must stay light (no torch, faiss
or ray at import time) so ``--help`` is fast.
"""

from __future__ import annotations

import typer

from protocols.cli_support import register_commands, run_app

__all__ = ["app", "main"]

app = typer.Typer(
    name="synthfed-node",
    help="A synthfed site node: ingest, train, generate, screen, export, approve, send.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

COMMANDS = (
    "init",
    "status",
    "ingest",
    "audit",
    "train",
    "sample",
    "quality",
    "generate",
    "screen",
    "review",
    "approve",
    "send",
    "outbox",
    "evaluate",
    "run",
)

register_commands(app, "node.commands", COMMANDS)


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
