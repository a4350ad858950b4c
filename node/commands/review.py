"""``synthfed-node review``: verify a bundle and show its review report (and, locally only,
each image beside its closest real slice)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from node.commands.options import HomeOption, JsonOption
from protocols.cli_support import emit


def register(app: typer.Typer) -> None:
    @app.command("review")
    def review_command(
        bundle: Annotated[str, typer.Argument(help="bundle of the outbox: its folder or its id")],
        out: Annotated[
            Path | None, typer.Option("--out", help="also write the review report to FILE")
        ] = None,
        local_closest: Annotated[
            bool,
            typer.Option(
                "--local-closest",
                help="also write a LOCAL-ONLY page with each image beside its closest real "
                "slice (into runs/, never into the bundle)",
            ),
        ] = False,
        home: HomeOption = None,
        json_out: JsonOption = False,
    ) -> None:
        """Verify a bundle of this node and point to (or copy) its review report."""
        from node.config import load_node_config, resolve_home
        from node.review import review_bundle

        paths = resolve_home(home)
        config = load_node_config(paths)
        result = review_bundle(paths, config, bundle, out=out, local_closest=local_closest)
        lines = [
            f"bundle {result['bundle_id']} ({result['state']}) verified: {result['images']} "
            f"{result['modality']} images, {result['reviewer_signatures']} reviewer signature(s)",
            f"review report: {result['report']}",
        ]
        if result.get("closest_view"):
            lines.append(f"LOCAL ONLY closest-real view (never send it): {result['closest_view']}")
        emit(json_out, result, "\n".join(lines))
