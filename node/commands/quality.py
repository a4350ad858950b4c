"""``synthfed-node quality``: compare generator samples with the real train slices."""

from __future__ import annotations

from typing import Annotated

import typer

from node.commands.options import HomeOption, JsonOption
from protocols.cli_support import emit


def register(app: typer.Typer) -> None:
    @app.command("quality")
    def quality_command(
        home: HomeOption = None,
        count: Annotated[
            int | None,
            typer.Option("--count", help="synthetic images per modality (default: config)"),
        ] = None,
        seed: Annotated[int, typer.Option("--seed", help="sampling seed")] = 0,
        device: Annotated[str | None, typer.Option("--device", help="cpu, cuda")] = None,
        json_out: JsonOption = False,
    ) -> None:
        """Intensity Wasserstein, power-spectrum distance, precision / recall; JSON + PNG."""
        from node.config import resolve_home
        from node.generator.quality import quality_report
        from node.generator.sampling import load_generator
        from protocols.errors import UsageError

        if count is not None and count < 8:
            raise UsageError("--count must be at least 8 (k-NN manifolds need points)")
        paths = resolve_home(home)
        generator = load_generator(paths, device)
        report = quality_report(
            paths, generator, count or generator.config.quality_count, seed=seed,
            progress=not json_out,
        )
        lines = [f"quality report: {report['path']}"]
        for modality, figures in report["summary"].items():
            lines.append(
                f"{modality}: " + ", ".join(f"{k} {v:.4g}" for k, v in figures.items())
            )
        emit(json_out, report, "\n".join(lines))
