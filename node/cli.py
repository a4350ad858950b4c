"""``synthfed-node``: the site's command line. One module per command under node/commands.

Each command module exposes ``register(app)``; importing it must stay light (no torch, faiss
or ray at import time) so ``--help`` is fast.
"""

from __future__ import annotations

import importlib

import typer

from protocols.cli_support import run_app

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
    "ingest",
    "audit",
    "train",
    "sample",
    "quality",
    "generate",
    "screen",
    "export",
    "review",
    "approve",
    "send",
    "outbox",
    "evaluate",
    "run",
)

for _name in COMMANDS:
    try:
        _module = importlib.import_module(f"node.commands.{_name}")
    except ModuleNotFoundError as _exc:
        # A command whose module is not written yet is simply absent from the app.
        if _exc.name != f"node.commands.{_name}":
            raise
        continue
    _module.register(app)


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
