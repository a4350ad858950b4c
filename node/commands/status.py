"""``synthfed-node status``: the state of a node home at a glance."""

from __future__ import annotations

import typer

from node.commands.options import HomeOption, JsonOption
from protocols.cli_support import emit, fail


def register(app: typer.Typer) -> None:
    @app.command("status")
    def status_command(home: HomeOption = None, json_out: JsonOption = False) -> None:
        """Store, generator, guard calibration, outbox and audit log of this home.

        Exit 2 when the audit log fails verification."""
        from node.config import load_node_config, resolve_home
        from node.status import format_status, node_status

        paths = resolve_home(home)
        status = node_status(paths, load_node_config(paths))
        emit(json_out, status, format_status(status))
        if status["audit"]["state"] != "intact":
            raise fail(f"the audit log fails verification: {status['audit']['problem']}",
                       str(paths.audit))
