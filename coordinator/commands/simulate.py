"""``synthfed-coordinator simulate``: one whole round in Flower's simulation engine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from coordinator.commands.options import CoordinatorHomeOption, JsonOption
from protocols.cli_support import emit


def register(app: typer.Typer) -> None:
    @app.command("simulate")
    def simulate_command(
        site: Annotated[list[Path], typer.Option("--site", help="a node home; repeat per site")],
        modality: Annotated[Literal["CT", "MR", "PT"], typer.Option(help="modality asked")],
        count: Annotated[int, typer.Option(help="images asked of each site")],
        auto_approve_with: Annotated[
            list[Path] | None,
            typer.Option(
                "--auto-approve-with",
                help="DEMO SWITCH — NEVER FOR REAL DATA: a reviewer key file that signs every "
                "bundle automatically (once for all sites, or once per --site). Recorded in "
                "each manifest as demo_auto_approved; the coordinator policy must allow it.",
            ),
        ] = None,
        round_id: Annotated[
            str | None, typer.Option("--round", help="resume this round instead of a new one")
        ] = None,
        home: CoordinatorHomeOption = None,
        json_out: JsonOption = False,
    ) -> None:
        """Run a whole round with the given node homes as SuperNodes in Flower's simulation."""
        import sys

        from coordinator.config import resolve_coordinator_home
        from coordinator.simulate import simulate_round

        paths = resolve_coordinator_home(home)
        if auto_approve_with:
            print("WARNING: demo switch --auto-approve-with: bundles are approved by a script, "
                  "not by a reviewer", file=sys.stderr)
        summary = simulate_round(paths, site, modality, count,
                                 auto_approve_keys=auto_approve_with, round_id=round_id)
        lines = [f"round {summary['round']}: {summary['accepted_images']} images accepted"]
        for name, entry in sorted(summary["sites"].items()):
            reason = f" — {entry['reason']}" if entry.get("reason") else ""
            lines.append(f"  {name}: {entry['state']}{reason}")
        if summary.get("pool"):
            lines.append(f"pool: {summary['pool']}")
        emit(json_out, summary, "\n".join(lines))
