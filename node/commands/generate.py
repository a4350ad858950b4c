"""``synthfed-node generate``: sample, screen with the guard, export the accepted set."""

from __future__ import annotations

from typing import Annotated

import typer

from node.commands.options import HomeOption, JsonOption
from protocols.cli_support import emit


def register(app: typer.Typer) -> None:
    @app.command("generate")
    def generate_command(
        count: Annotated[int, typer.Option("--count", help="images to export", min=1)],
        round_id: Annotated[
            str | None,
            typer.Option("--round", help="round id this export answers (nonce defaults to it)"),
        ] = None,
        nonce: Annotated[str | None, typer.Option("--nonce", help="the round's nonce")] = None,
        seed: Annotated[int, typer.Option("--seed", help="sampling and canary seed")] = 0,
        max_tries: Annotated[
            int | None, typer.Option("--max-tries", help="cap on candidates sampled", min=1)
        ] = None,
        modality: Annotated[str | None, typer.Option("--modality", help="modality")] = None,
        home: HomeOption = None,
        json_out: JsonOption = False,
    ) -> None:
        """Generate COUNT guard-accepted images and export them as a pending bundle."""
        from node.config import load_node_config, resolve_home
        from node.guard.run import canary_summary, export_run, generate_and_screen
        from protocols.errors import UsageError

        if round_id is not None and nonce is None:
            nonce = round_id  # a manual round without a coordinator nonce
        if nonce is not None and round_id is None:
            raise UsageError("--nonce needs --round", "--nonce")
        paths = resolve_home(home)
        config = load_node_config(paths)
        run = generate_and_screen(
            paths, config, count, seed=seed, round_id=round_id, nonce=nonce,
            max_tries=max_tries, progress=not json_out, modality=modality,
        )
        bundle = export_run(paths, config, run, round_id, nonce)
        report = run.report
        lines = [
            f"accepted {report['exported']} of {report['candidates_tried']} candidates "
            f"(acceptance rate {report['acceptance_rate']:.1%}); run report in {run.run_dir}",
        ]
        lines.append(canary_summary(report["canary_catch_rates"]))
        if not run.complete:
            lines.append(f"only {report['exported']} of the {count} requested passed the guard")
        if report["copying_warning"]:
            lines.append("WARNING: " + report["copying_warning"])
        lines.append(f"exported a pending bundle: {bundle} (review and approve before sending)")
        emit(
            json_out,
            {
                "bundle": str(bundle),
                "requested": count,
                "exported": report["exported"],
                "candidates_tried": report["candidates_tried"],
                "acceptance_rate": report["acceptance_rate"],
                "copying_warning": report["copying_warning"],
                "canary_catch_rates": {
                    k: v["rate"] for k, v in report["canary_catch_rates"].items()
                },
                "run": run.run_id,
            },
            "\n".join(lines),
        )
