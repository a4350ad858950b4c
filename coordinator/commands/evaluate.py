"""``synthfed-coordinator evaluate MODEL --round ROUND``: the sites score a shared model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from coordinator.commands.options import CoordinatorHomeOption, JsonOption
from protocols.cli_support import emit


def register(app: typer.Typer) -> None:
    @app.command("evaluate")
    def evaluate_command(
        model: Annotated[Path, typer.Argument(help="model file from synthfed-coordinator train")],
        round_id: Annotated[str, typer.Option("--round", help="the round the model belongs to")],
        site: Annotated[
            list[Path] | None,
            typer.Option("--site", help="node home of a site (simulation; repeat per site)"),
        ] = None,
        transport: Annotated[
            str, typer.Option("--transport", help="flower (simulation engine) | local")
        ] = "flower",
        seed: Annotated[int, typer.Option("--seed", help="degradation seed")] = 0,
        home: CoordinatorHomeOption = None,
        json_out: JsonOption = False,
    ) -> None:
        """Score MODEL on every site's real holdout; per site and overall PSNR / SSIM / RMSE.

        MODEL goes to every site (a Flower evaluate message); each site degrades its own real
        holdout, restores it and returns per-image PSNR / SSIM / RMSE only. Aggregated per site
        and overall, written to rounds/ROUND/evaluations/<model digest>.json."""
        from coordinator.config import resolve_coordinator_home
        from coordinator.restore.evaluate import aggregate_sites
        from coordinator.restore.site_eval import (
            evaluate_locally,
            evaluate_over_flower,
            flower_path_available,
        )
        from coordinator.restore.train import load_model
        from protocols.audit import append_audit
        from protocols.errors import UsageError
        from protocols.files import atomic_write_json

        paths = resolve_coordinator_home(home)
        if not (paths.rounds / round_id).is_dir():
            raise UsageError("no such round", str(paths.rounds / round_id))
        if not model.is_file():
            raise UsageError("model file not found", str(model))
        blob = model.read_bytes()
        _, info = load_model(blob, str(model))
        homes = list(site or [])
        if not homes:
            raise UsageError("name the sites' node homes with --site HOME (simulation)", "--site")
        errors: list[str] = []
        if transport == "flower":
            if not flower_path_available():
                raise UsageError("the node ClientApp is not installed; use --transport local")
            if seed != 0:
                raise UsageError("the Flower evaluate message uses the sites' default seed 0",
                                 "--seed")
            replies, errors = evaluate_over_flower(homes, blob, str(info["task"]), seed)
            how = "Flower evaluate messages, simulation engine, node ClientApp"
        elif transport == "local":
            replies = evaluate_locally(homes, blob, str(info["task"]), seed)
            how = "LOCAL: node homes read directly by this process (simulation only)"
        else:
            raise UsageError(f"unknown transport {transport!r}: use flower or local",
                             "--transport")
        result = {
            "round": round_id, "model": str(model), "model_digest": info["digest"],
            "task": info["task"], "modality": info["modality"], "transport": how,
            "node_errors": errors, **aggregate_sites(replies),
        }
        out = paths.rounds / round_id / "evaluations" / f"{info['digest'][:16]}.json"
        from coordinator.restore.report import json_safe

        atomic_write_json(out, json_safe({**result, "replies": replies}))
        append_audit(paths.audit, "restore_model_evaluated", {
            "round": round_id, "model_digest": info["digest"], "transport": transport,
            "sites": sorted(replies), "node_errors": len(errors),
        })
        lines = [f"evaluated {info['net']} ({info['task']}, {info['modality']}) via {how}"]
        for name, entry in result["sites"].items():
            m, i = entry["model"], entry["input"]
            lines.append(f"  {name}: n={entry['n_images']} PSNR {m['psnr_db']['mean']:.2f} dB "
                         f"(input {i['psnr_db']['mean']:.2f}), SSIM {m['ssim']['mean']:.4f} "
                         f"(input {i['ssim']['mean']:.4f})")
        o = result["overall"]["model"]
        lines.append(f"  overall: PSNR {o['psnr_db']['mean']:.2f} dB, "
                     f"SSIM {o['ssim']['mean']:.4f}")
        for err in errors:
            lines.append(f"  node error: {err}")
        lines.append(f"written to {out}")
        emit(json_out, json_safe({**result, "written": str(out)}), "\n".join(lines))
