"""``synthfed-coordinator receive DIR...``: take in bundles dropped by hand (full verification)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from coordinator.commands.options import CoordinatorHomeOption, JsonOption
from protocols.cli_support import emit
from protocols.errors import VerificationError


def register(app: typer.Typer) -> None:
    @app.command("receive")
    def receive_command(
        bundles: Annotated[list[Path], typer.Argument(help="bundle folders")],
        round_id: Annotated[
            str | None, typer.Option("--round", help="the round the bundles must answer")
        ] = None,
        home: CoordinatorHomeOption = None,
        json_out: JsonOption = False,
    ) -> None:
        """Verify bundle folders against trust store, policy and round; keep the good ones."""
        from coordinator.config import resolve_coordinator_home
        from coordinator.intake import receive_bundle_dir

        paths = resolve_coordinator_home(home)
        results = [receive_bundle_dir(paths, b, via="file", round_id=round_id) for b in bundles]
        lines = [
            f"{r.source}: verified, site {r.site}, round {r.round_id}, {r.n_images} images"
            if r.accepted else f"{r.source}: REJECTED — {r.reason}" for r in results
        ]
        rejected = [r for r in results if not r.accepted]
        if json_out or not rejected:
            emit(json_out, {"results": [r.to_dict() for r in results],
                            "rejected": len(rejected)}, "\n".join(lines))
        if rejected:
            if not json_out:
                print("\n".join(lines))
            raise VerificationError(f"{len(rejected)} of {len(results)} bundles rejected")
