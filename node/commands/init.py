"""``synthfed-node init``: create a node home."""

from __future__ import annotations

from typing import Annotated

import typer

from node.commands.options import HomeOption, JsonOption
from protocols.cli_support import emit
from protocols.errors import UsageError


def register(app: typer.Typer) -> None:
    @app.command("init")
    def init_command(
        site: Annotated[str, typer.Option("--site", help="site id (no patient data)")],
        home: HomeOption = None,
        json_out: JsonOption = False,
    ) -> None:
        """Create a node home: node.yaml, site key, pseudonym secret, folders, audit log."""
        from node.home import init_home

        if home is None:
            raise UsageError("no node home given: pass --home DIR or set SYNTHFED_HOME")
        paths = init_home(home, site)
        from protocols.keys import load_public_key

        keyid = load_public_key(paths.site_pub).keyid
        emit(
            json_out,
            {"home": str(paths.root), "site": site, "site_keyid": keyid},
            f"initialised node home for site {site} at {paths.root}\nsite key id: {keyid}",
        )
