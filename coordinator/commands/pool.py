"""``synthfed-coordinator pool ROUND``: pool the verified bundles of a round."""

from __future__ import annotations

from typing import Annotated

import typer

from coordinator.commands.options import CoordinatorHomeOption, JsonOption
from protocols.cli_support import emit


def register(app: typer.Typer) -> None:
    @app.command("pool")
    def pool_command(
        round_id: Annotated[str, typer.Argument(help="round id")],
        home: CoordinatorHomeOption = None,
        json_out: JsonOption = False,
    ) -> None:
        """Write pools/ROUND: images.npy (memory-mappable), index.jsonl, pool.json."""
        import json

        from coordinator.config import resolve_coordinator_home
        from coordinator.pool import build_pool

        dest = build_pool(resolve_coordinator_home(home), round_id)
        manifest = json.loads((dest / "pool.json").read_text(encoding="utf-8"))
        counts = manifest["counts"]
        emit(json_out, {"pool": str(dest), **counts, "bundles": len(manifest["bundles"])},
             f"pooled {counts['total']} images from {len(manifest['bundles'])} bundles "
             f"into {dest}")
