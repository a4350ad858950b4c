"""``synthfed-node evaluate MODEL``: score a shared restoration model on this site's holdout."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from node.commands.options import HomeOption, JsonOption
from protocols.cli_support import emit


def register(app: typer.Typer) -> None:
    @app.command("evaluate")
    def evaluate_command(
        model: Annotated[Path, typer.Argument(help="model file from synthfed-coordinator train")],
        home: HomeOption = None,
        seed: Annotated[int, typer.Option("--seed", help="degradation seed")] = 0,
        json_out: JsonOption = False,
    ) -> None:
        """Restore this site's degraded real holdout with MODEL; print PSNR / SSIM / RMSE.

        The site's real holdout slices are degraded, restored with MODEL and scored per image:
        numbers only; no image leaves the site."""
        from node.config import load_node_config, resolve_home
        from node.evaluate import evaluate_model
        from protocols.errors import UsageError

        paths = resolve_home(home)
        config = load_node_config(paths)
        if not model.is_file():
            raise UsageError("model file not found", str(model))
        blob = model.read_bytes()
        from coordinator.restore.train import load_model

        _, info = load_model(blob, str(model))
        reply = evaluate_model(paths, config, blob, info["task"], seed=seed)
        means = {m: reply[f"mean_{m}"] for m in ("psnr_db", "ssim", "rmse")}
        base = {m: reply[f"input_mean_{m}"] for m in ("psnr_db", "ssim", "rmse")}
        window = f", window {reply['window_hu']} HU" if reply["window_hu"] else ""
        emit(
            json_out,
            reply,
            f"site {reply['site']}: {reply['n_images']} holdout slices ({reply['modality']}, "
            f"task {reply['task']}, scored in {reply['unit']}{window})\n"
            f"restored:       PSNR {means['psnr_db']:.2f} dB, SSIM {means['ssim']:.4f}, "
            f"RMSE {means['rmse']:.2f}\n"
            f"degraded input: PSNR {base['psnr_db']:.2f} dB, SSIM {base['ssim']:.4f}, "
            f"RMSE {base['rmse']:.2f}",
        )
