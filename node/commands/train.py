"""``synthfed-node train``: train (or resume) the site's latent diffusion generator."""

from __future__ import annotations

from typing import Annotated

import typer

from node.commands.options import HomeOption, JsonOption
from protocols.cli_support import emit
from protocols.cpu import warn_if_cores_busy


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_command(
        home: HomeOption = None,
        preset: Annotated[
            str | None,
            typer.Option("--preset", help="tiny | cpu | gpu (overrides node.yaml's preset)"),
        ] = None,
        resume: Annotated[
            bool, typer.Option("--resume", help="continue from models/generator.pt")
        ] = False,
        overwrite: Annotated[
            bool, typer.Option("--overwrite", help="replace an existing generator checkpoint")
        ] = False,
        max_steps: Annotated[
            int | None,
            typer.Option("--max-steps", help="stop after this many steps (resumable)"),
        ] = None,
        device: Annotated[
            str | None, typer.Option("--device", help="cpu, cuda, cuda:N (default: best)")
        ] = None,
        json_out: JsonOption = False,
    ) -> None:
        """Train the generator on the store's train split (the holdout is never read)."""
        from node.config import load_node_config, resolve_home
        from node.generator.train import train_generator
        from protocols.errors import UsageError

        if resume and overwrite:
            raise UsageError("--resume and --overwrite exclude each other")
        paths = resolve_home(home)
        config = load_node_config(paths)
        warn_if_cores_busy(device)
        summary = train_generator(
            paths, config, preset=preset, resume=resume, max_steps=max_steps,
            progress=not json_out, overwrite=overwrite, device=device,
        )
        losses = ", ".join(f"{k} {v:.4g}" for k, v in summary["final_losses"].items())
        state = "finished" if summary["finished"] else "stopped (resume with --resume)"
        emit(
            json_out,
            summary,
            f"generator {state} at step {summary['step']} of {summary['total_steps']} "
            f"({summary['preset']}, {summary['device']}, {summary['wall_s']:.0f} s)\n"
            f"final losses: {losses}\ncheckpoint: {summary['checkpoint']}\n"
            f"run folder: {summary['run_dir']}",
        )
