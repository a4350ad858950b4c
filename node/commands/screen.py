"""``synthfed-node screen``: the site's guard applied to candidates from any generator."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from node.commands.options import HomeOption, JsonOption
from protocols.cli_support import emit


def register(app: typer.Typer) -> None:
    @app.command("screen")
    def screen_command(
        candidates: Annotated[
            Path, typer.Argument(help=".npz (array 'images'), .npy, PNG folder or DICOM folder")
        ],
        out: Annotated[Path, typer.Option("--out", help="folder for accepted.npz and reports")],
        normalized: Annotated[
            bool, typer.Option("--normalized", help="values are already in [0, 1]")
        ] = False,
        modality: Annotated[
            str | None, typer.Option("--modality", help="modality of the candidates")
        ] = None,
        seed: Annotated[int, typer.Option("--seed", help="seed of the canaries")] = 0,
        home: HomeOption = None,
        json_out: JsonOption = False,
    ) -> None:
        """Screen CANDIDATES against every real slice of the site (exact, with canaries)."""
        from node.config import load_node_config, resolve_home
        from node.guard.run import canary_summary
        from node.guard.screen import screen_candidates

        paths = resolve_home(home)
        config = load_node_config(paths)
        doc = screen_candidates(
            paths, config, candidates, out, normalized=normalized, modality=modality,
            seed=seed, progress=not json_out,
        )
        summary = {
            "candidates": doc["candidates"],
            "accepted": len(doc["accepted"]),
            "rejected": len(doc["rejected"]),
            "thresholds": doc["thresholds"],
            "canary_catch_rates": {k: v["rate"] for k, v in doc["canary_catch_rates"].items()},
            "out": str(out),
        }
        emit(
            json_out,
            summary,
            f"screened {doc['candidates']} candidates: {len(doc['accepted'])} accepted, "
            f"{len(doc['rejected'])} rejected; report in {out}\n"
            + canary_summary(doc["canary_catch_rates"]),
        )
