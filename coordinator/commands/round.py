"""``synthfed-coordinator round open | status | close``."""

from __future__ import annotations

from typing import Annotated, Literal

import typer

from coordinator.commands.options import CoordinatorHomeOption, JsonOption
from protocols.cli_support import emit


def _status_text(summary: dict) -> str:  # type: ignore[type-arg]
    lines = [f"round {summary['round']} ({summary['status']}): {summary['modality']} "
             f"{summary['image_size']}x{summary['image_size']}, {summary['count']} per site"]
    for site, entry in sorted(summary["sites"].items()):
        reason = f" — {entry['reason']}" if entry.get("reason") else ""
        extra = f", {entry['n_images']} images" if entry.get("n_images") else ""
        lines.append(f"  {site}: {entry['state']}{extra}{reason}")
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    rounds = typer.Typer(help="Pooling rounds: open, status, close.", no_args_is_help=True)
    app.add_typer(rounds, name="round")

    @rounds.command("open")
    def open_command(
        modality: Annotated[Literal["CT", "MR", "PT"], typer.Option(help="modality asked")],
        count: Annotated[int, typer.Option(help="images asked of each site")],
        size: Annotated[int, typer.Option(help="image size (64, 128, 256, 512)")] = 64,
        sites: Annotated[
            str | None, typer.Option(help="comma-separated sites (default: every trusted site)")
        ] = None,
        home: CoordinatorHomeOption = None,
        json_out: JsonOption = False,
    ) -> None:
        """Open a round: a fresh id and nonce, and a request signed by the coordinator key."""
        from coordinator.config import resolve_coordinator_home
        from coordinator.rounds import open_round

        paths = resolve_coordinator_home(home)
        site_list = [s.strip() for s in sites.split(",") if s.strip()] if sites else None
        handle = open_round(paths, modality, size, count, site_list)
        state = handle.state()
        emit(json_out, {"round": handle.round_id, "nonce": state["nonce"],
                        "request": str(handle.request_file), "sites": sorted(state["sites"])},
             f"opened round {handle.round_id}\nsigned request: {handle.request_file}")

    @rounds.command("status")
    def status_command(
        round_id: Annotated[str | None, typer.Argument(help="round id (default: all)")] = None,
        home: CoordinatorHomeOption = None,
        json_out: JsonOption = False,
    ) -> None:
        """Each site's state in a round (or in every round)."""
        from coordinator.config import resolve_coordinator_home
        from coordinator.rounds import list_rounds, load_round, round_summary

        paths = resolve_coordinator_home(home)
        handles = [load_round(paths, round_id)] if round_id else list_rounds(paths)
        summaries = [round_summary(h) for h in handles]
        if round_id:
            emit(json_out, summaries[0], _status_text(summaries[0]))
        else:
            emit(json_out, {"rounds": summaries},
                 "\n".join(_status_text(s) for s in summaries) or "no rounds")

    @rounds.command("close")
    def close_command(
        round_id: Annotated[str, typer.Argument(help="round id")],
        home: CoordinatorHomeOption = None,
        json_out: JsonOption = False,
    ) -> None:
        """Close a round: no further bundle is accepted for it."""
        from coordinator.config import resolve_coordinator_home
        from coordinator.rounds import close_round, load_round

        paths = resolve_coordinator_home(home)
        close_round(paths, load_round(paths, round_id))
        emit(json_out, {"round": round_id, "status": "closed"}, f"closed round {round_id}")
