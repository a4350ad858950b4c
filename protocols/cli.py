"""``synthfed-manifest``: keygen, verify and show for bundles, without torch, ray or faiss."""

from __future__ import annotations

import typer

from protocols.cli_support import run_app
from protocols.manifest_cli import register as register_commands

__all__ = ["app", "main"]

app = typer.Typer(
    name="synthfed-manifest",
    help="Make keys and verify or show synthfed bundle manifests (DSSE / in-toto).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

register_commands(app)


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
