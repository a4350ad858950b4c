"""``synthfed-node audit``: verify the hash chain of the audit log."""

from __future__ import annotations

import typer

from node.commands.options import HomeOption, JsonOption
from protocols.cli_support import emit


def register(app: typer.Typer) -> None:
    @app.command("audit")
    def audit_command(home: HomeOption = None, json_out: JsonOption = False) -> None:
        """Verify the audit log; exit 2 naming the first broken record."""
        from node.config import resolve_home
        from protocols.audit import verify_audit_log

        paths = resolve_home(home)
        report = verify_audit_log(paths.audit)
        emit(
            json_out,
            {"ok": True, "records": report.records, "last_hash": report.last_hash},
            f"audit log intact: {report.records} records, last {report.last_hash[:16]}",
        )
