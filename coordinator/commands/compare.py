"""``synthfed-coordinator compare --config FILE``: the arm comparison (S, R, L, F, 0)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from coordinator.commands.options import JsonOption
from protocols.cli_support import emit


def register(app: typer.Typer) -> None:
    @app.command("compare")
    def compare_command(
        config: Annotated[Path, typer.Option("--config", help="comparison YAML (see bench/)")],
        out: Annotated[
            Path | None, typer.Option("--out", help="report folder (overrides the config's)")
        ] = None,
        json_out: JsonOption = False,
    ) -> None:
        """Train every arm alike, evaluate each on every site's holdout; write the report.

        Every arm has the same network, steps and seeds; the report is report.md, report.html,
        PNGs and results.json.

        Arm S uses real guarded synthetic data only: generate_and_screen at each site, or a
        coordinator pool (synthetic.source in the config)."""
        from coordinator.restore.compare import load_compare_config, run_comparison
        from coordinator.restore.report import summary_lines
        from protocols.errors import UsageError

        cfg = load_compare_config(config)
        out_dir = out or (Path(cfg.out) if cfg.out else None)
        if out_dir is None:
            raise UsageError("no report folder: pass --out DIR or set out: in the config")
        results = run_comparison(cfg, out_dir, progress=not json_out)
        lines = [f"report: {out_dir / 'report.md'} and {out_dir / 'report.html'}"]
        lines += summary_lines(results)
        summary = {
            "report": str(out_dir / "report.md"), "html": str(out_dir / "report.html"),
            "arms_run": results["arms_run"], "notes": results["notes"],
            "overall": {a: {m: results["table"][a]["overall"][m]["mean"]
                            for m in ("psnr_db", "ssim", "rmse")} for a in results["table"]},
            "verdicts": {k: {m: v[m]["overall"]["verdict"] for m in v}
                         for k, v in results["tests"].items()},
            "wall_s": results["wall_s"],
        }
        emit(json_out, summary, "\n".join(lines))
