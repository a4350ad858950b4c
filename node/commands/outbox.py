"""``synthfed-node outbox``: list pending, approved and sent bundles."""

from __future__ import annotations

import typer

from node.commands.options import HomeOption, JsonOption
from protocols.cli_support import emit


def register(app: typer.Typer) -> None:
    @app.command("outbox")
    def outbox_command(home: HomeOption = None, json_out: JsonOption = False) -> None:
        """List the outbox by state (from the manifests; `review` verifies a bundle)."""
        from node.config import resolve_home
        from node.export import list_outbox

        paths = resolve_home(home)
        listing = list_outbox(paths)
        lines = []
        for state, rows in listing.items():
            lines.append(f"{state}: {len(rows)}")
            for row in rows:
                if "problem" in row:
                    lines.append(f"  {row['bundle_id']}  UNREADABLE: {row['problem']}")
                    continue
                rnd = f" round {row['round']}" if row.get("round") else ""
                lines.append(
                    f"  {row['bundle_id']}  {row['images']} {row['modality']} images"
                    f"{rnd}, {row['signatures']} signature(s), created {row['created']}"
                )
        emit(json_out, listing, "\n".join(lines))
