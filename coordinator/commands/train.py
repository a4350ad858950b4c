"""``synthfed-coordinator train --pool ROUND``: train a shared restoration network on a pool."""

from __future__ import annotations

from typing import Annotated

import typer

from coordinator.commands.options import CoordinatorHomeOption, JsonOption
from protocols.cli_support import emit
from protocols.cpu import warn_if_cores_busy


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_command(
        pool: Annotated[str, typer.Option("--pool", help="round id of the pool to train on")],
        task: Annotated[str, typer.Option("--task", help="denoise (CT low dose) | sr")],
        net: Annotated[
            str | None, typer.Option("--net", help="redcnn | dncnn | srcnn | edsr")
        ] = None,
        preset: Annotated[str, typer.Option("--preset", help="tiny | cpu | gpu")] = "cpu",
        resume: Annotated[bool, typer.Option("--resume", help="continue checkpoint.pt")] = False,
        overwrite: Annotated[
            bool, typer.Option("--overwrite", help="replace an existing run")
        ] = False,
        steps: Annotated[
            int | None, typer.Option("--steps", help="override the preset's steps")
        ] = None,
        seed: Annotated[int, typer.Option("--seed", help="initialisation seed")] = 0,
        lr_schedule: Annotated[
            str, typer.Option("--lr-schedule", help="cosine (decay to zero) | constant")
        ] = "cosine",
        decay_fraction: Annotated[
            float, typer.Option("--lr-decay-fraction",
                                help="cosine: the last fraction of the steps decays (0 < f <= 1)")
        ] = 0.2,
        device: Annotated[
            str | None, typer.Option("--device", help="cpu, cuda, cuda:N (default: best)")
        ] = None,
        home: CoordinatorHomeOption = None,
        json_out: JsonOption = False,
    ) -> None:
        """Train on the pooled dataset only; writes models/<round>-<task>-<net>/model.pt.

        For several GPUs launch with torchrun (DDP), e.g.
        torchrun --nproc_per_node 4 -m coordinator.cli train --pool R1 --task sr --preset gpu
        """
        from coordinator.config import resolve_coordinator_home
        from coordinator.restore.nets import NETWORKS, default_net
        from coordinator.restore.train import train_from_pool
        from protocols.audit import append_audit
        from protocols.errors import UsageError

        if task not in ("denoise", "sr"):
            raise UsageError(f"unknown task {task!r}: use denoise or sr", "--task")
        name = net or default_net(task)
        if name not in NETWORKS:
            raise UsageError(f"unknown network {name!r}: use {', '.join(sorted(NETWORKS))}",
                             "--net")
        if resume and overwrite:
            raise UsageError("--resume and --overwrite exclude each other")
        paths = resolve_coordinator_home(home)
        pool_dir = paths.pools / pool
        if not pool_dir.is_dir():
            raise UsageError("no such pool: run synthfed-coordinator pool ROUND", str(pool_dir))
        out_dir = paths.root / "models" / f"{pool}-{task}-{name}"
        warn_if_cores_busy(device)
        summary = train_from_pool(
            pool_dir, task, name, out_dir, preset=preset, resume=resume, overwrite=overwrite,
            steps=steps, seed=seed, device=device, progress=not json_out,
            lr_schedule=lr_schedule, decay_fraction=decay_fraction,
        )
        import os

        if os.environ.get("RANK", "0") != "0":
            return  # under torchrun only rank 0 records and reports
        if summary.get("model_digest"):
            append_audit(paths.audit, "restore_model_trained", {
                "round": pool, "task": task, "net": name, "preset": preset,
                "steps": summary["steps"], "model_digest": summary["model_digest"],
            })
        emit(
            json_out, summary,
            f"trained {name} for {task} on pool {pool} ({summary['n_images']} "
            f"{summary['modality']} images, {summary['steps']} steps, {summary['wall_s']:.0f} s)"
            f"\nfinal loss (MSE): {summary.get('final_loss_mse')}\n"
            f"model: {summary.get('model')}",
        )
