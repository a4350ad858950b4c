"""``synthfed-node send``: copy an approved bundle to a folder (file drop) and mark it sent."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from node.commands.options import HomeOption, JsonOption
from protocols.cli_support import emit


def register(app: typer.Typer) -> None:
    @app.command("send")
    def send_command(
        bundle: Annotated[str, typer.Argument(help="approved bundle: its folder or its id")],
        to: Annotated[Path, typer.Option("--to", help="destination folder (file drop)")],
        home: HomeOption = None,
        json_out: JsonOption = False,
    ) -> None:
        """Copy an approved, verified bundle to DIR atomically; refuses anything else."""
        from node.config import resolve_home
        from node.export import send_bundle

        paths = resolve_home(home)
        dest = send_bundle(paths, bundle, to)
        emit(json_out, {"sent_to": str(dest)}, f"sent: {dest}")
