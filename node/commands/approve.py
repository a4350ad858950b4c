"""``synthfed-node approve``: a reviewer signs a pending bundle."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from node.commands.options import HomeOption, JsonOption
from protocols.cli_support import emit


def register(app: typer.Typer) -> None:
    @app.command("approve")
    def approve_command(
        bundle: Annotated[str, typer.Argument(help="pending bundle: its folder or its id")],
        reviewer_key: Annotated[
            Path | None,
            typer.Option(
                "--reviewer-key",
                help="reviewer's private key file (listed in policy.reviewer_keys); may be "
                "left out only when the site policy requires zero reviewer signatures (demos)",
            ),
        ] = None,
        home: HomeOption = None,
        json_out: JsonOption = False,
    ) -> None:
        """Verify a pending bundle and add the reviewer's signature to its manifest."""
        from node.config import resolve_home
        from node.export import approve_bundle, locate_bundle
        from protocols.keys import load_signing_key

        paths = resolve_home(home)
        key = load_signing_key(reviewer_key) if reviewer_key is not None else None
        target = approve_bundle(paths, bundle, key)
        state, _ = locate_bundle(paths, target)
        emit(
            json_out,
            {"bundle": str(target), "state": state,
             "reviewer_keyid": None if key is None else key.public.keyid},
            f"signed; bundle is now {state}: {target}",
        )
