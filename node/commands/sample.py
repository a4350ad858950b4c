"""``synthfed-node sample``: draw unscreened samples for a person to look at.

The output is marked UNSCREENED (a text file beside it and a flag inside samples.npz) and the
command refuses to write inside the home's outbox. It can never become an export: export only
takes the guard's in-memory accepted set (``generate_and_screen``), never files from disk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from node.commands.options import HomeOption, JsonOption
from protocols.cli_support import emit


def register(app: typer.Typer) -> None:
    @app.command("sample")
    def sample_command(
        out: Annotated[Path, typer.Option("--out", help="folder for samples.npz + PNG grid")],
        count: Annotated[int, typer.Option("--count", help="images to draw")] = 16,
        home: HomeOption = None,
        seed: Annotated[int, typer.Option("--seed", help="sampling seed")] = 0,
        scheduler: Annotated[
            str, typer.Option("--scheduler", help="dpm (default) | ddim | ddpm")
        ] = "dpm",
        steps: Annotated[
            int | None, typer.Option("--steps", help="sampler steps (default: config)")
        ] = None,
        modality: Annotated[
            str | None, typer.Option("--modality", help="modality to draw (CT, MR, ...)")
        ] = None,
        label: Annotated[
            str | None,
            typer.Option("--label", help="label-conditioned generator: draw this label only"
                         " (default: labels in the train proportions)"),
        ] = None,
        device: Annotated[str | None, typer.Option("--device", help="cpu, cuda")] = None,
        json_out: JsonOption = False,
    ) -> None:
        """Write COUNT unscreened samples (physical units) and a PNG grid to OUT."""
        from node.config import resolve_home
        from node.generator.sampling import load_generator, write_unscreened_samples

        paths = resolve_home(home)
        generator = load_generator(paths, device)
        result = write_unscreened_samples(
            paths, generator, out, count=count, seed=seed, scheduler=scheduler, steps=steps,
            modality=modality, label=label, progress=not json_out,
        )
        emit(
            json_out,
            result,
            f"wrote {result['count']} UNSCREENED samples ({result['modality']},"
            f" {result['unit']}) to {result['npz']}\ngrid: {result['png']}\n"
            "these images were not screened by the guard and can never be exported",
        )
