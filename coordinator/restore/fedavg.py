"""Arm F of the comparison: FedAvg over the sites' real training slices, through Flower.

Flower's own ``FedAvg`` strategy (``flwr.serverapp.strategy``) drives the rounds in Flower's
simulation engine: one virtual SuperNode per site, each a ``ClientApp`` that trains the shared
network for ``local_steps`` optimiser steps on its own (degraded, clean) pairs and replies with its
weights and its number of examples; the strategy averages weights by example count.

Step budget: ``rounds * local_steps * n_sites`` equals the other arms' step count when
``budget="summed"`` (the same number of gradient steps, hence the same compute and the same
number of image presentations, as the pooled arms); with ``budget="per-site"`` every site runs
the full budget (``rounds * local_steps`` = steps), i.e. n_sites times the compute. The learning
rate follows one schedule over the rounds (``rounds * local_steps`` local steps long): round r's
local steps run its r-th slice, so a cosine decay ends at zero in the last round as it does for
the pooled arms.

The site data reach the ClientApps as files in a private work folder (one ``site-<i>.npz`` per
SuperNode); the simulation runs in this process and Ray actors on this machine only. Nothing here
is used by a real deployment, where each site's data stay in its own node.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = ["plan_rounds", "shared_settings", "local_settings", "train_fedavg"]


def plan_rounds(
    steps: int, n_sites: int, rounds: int, budget: Literal["summed", "per-site"] = "summed"
) -> tuple[int, int]:
    """(rounds, local_steps) for a step budget; rounds is lowered when steps are too few."""
    if steps < 1 or n_sites < 1 or rounds < 1:
        raise ValueError("steps, n_sites and rounds must be >= 1")
    per_site = steps if budget == "per-site" else steps // n_sites
    if budget not in ("summed", "per-site"):
        raise ValueError(f"budget must be 'summed' or 'per-site', not {budget!r}")
    if per_site < 1:
        raise ValueError(f"{steps} steps cannot be shared by {n_sites} sites")
    rounds = min(rounds, per_site)
    return rounds, max(1, per_site // rounds)


def shared_settings(settings: Any, n_rounds: int, local_steps: int) -> dict[str, Any]:
    """The settings every site receives (JSON types): the schedule spans all rounds."""
    from coordinator.restore.train import _settings_dict

    return {**_settings_dict(settings), "schedule_offset": 0,
            "schedule_steps": n_rounds * local_steps}


def local_settings(
    settings_dict: dict[str, Any], local_steps: int, server_round: int, partition: int
) -> Any:
    """A site's TrainSettings for one round (``server_round`` counts from 1)."""
    from coordinator.restore.train import TrainSettings

    local = dict(settings_dict)
    local["steps"] = local_steps
    # A different batch order in every round and at every site, reproducible.
    local["seed"] = int(settings_dict["seed"]) * 10_007 + server_round * 101 + partition
    # one learning-rate schedule over all rounds: round r runs its slice of it
    local["schedule_offset"] = (server_round - 1) * local_steps
    local["checkpoint_every"] = local_steps
    local["log_every"] = local_steps
    return TrainSettings(**local)


def _client_train(msg: Any, context: Any) -> Any:
    """The ClientApp's train handler: local steps on this SuperNode's own pairs."""
    import torch
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    from coordinator.restore.train import train_network

    cfg = msg.content["config"]
    partition = int(context.node_config["partition-id"])
    data = np.load(Path(str(cfg["data-dir"])) / f"site-{partition}.npz")
    settings = local_settings(
        json.loads(str(cfg["settings"])), int(cfg["local-steps"]), int(cfg["server-round"]),
        partition,
    )
    torch.set_num_threads(1)
    state = msg.content["arrays"].to_torch_state_dict()
    net, summary = train_network(
        data["inputs"], data["targets"], settings, None, progress=False, initial_state=state,
        device="cpu",
    )
    content = RecordDict({
        "arrays": ArrayRecord(net.state_dict()),
        "metrics": MetricRecord({
            "num-examples": int(data["inputs"].shape[0]),
            "train-wall-s": float(summary["wall_s"]),
        }),
    })
    return Message(content=content, reply_to=msg)


def _make_client_app() -> Any:
    from flwr.clientapp import ClientApp

    app = ClientApp()
    app.train()(_client_train)
    return app


def __getattr__(name: str) -> Any:
    # the ClientApp is built lazily so that importing this module stays light
    if name == "client_app":
        return _make_client_app()
    raise AttributeError(name)


def train_fedavg(
    site_pairs: list[tuple[np.ndarray, np.ndarray]],
    settings: Any,
    work_dir: Path,
    *,
    rounds: int = 10,
    budget: Literal["summed", "per-site"] = "summed",
    progress: bool = True,
    num_cpus: int | None = None,
) -> tuple[Any, dict[str, Any]]:
    """FedAvg in Flower's simulation engine; returns (global net, summary)."""
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    from coordinator.restore.nets import build_network

    n_sites = len(site_pairs)
    if n_sites < 2:
        raise ValueError("FedAvg needs at least two sites")
    n_rounds, local_steps = plan_rounds(settings.steps, n_sites, rounds, budget)
    work_dir.mkdir(parents=True, exist_ok=True)
    for i, (inputs, targets) in enumerate(site_pairs):
        np.savez(work_dir / f"site-{i}.npz", inputs=inputs.astype(np.float32),
                 targets=targets.astype(np.float32))
    torch.manual_seed(settings.seed)
    net = build_network(settings.net, settings.net_config)
    initial = ArrayRecord(net.state_dict())
    outcome: dict[str, Any] = {}

    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(
            fraction_train=1.0, fraction_evaluate=0.0,
            min_train_nodes=n_sites, min_available_nodes=n_sites,
        )
        result = strategy.start(
            grid=grid, initial_arrays=initial, num_rounds=n_rounds,
            train_config=ConfigRecord({
                "data-dir": str(work_dir), "local-steps": local_steps,
                "settings": json.dumps(shared_settings(settings, n_rounds, local_steps)),
            }),
        )
        outcome["arrays"] = result.arrays

    t0 = time.monotonic()
    if progress:
        print(f"FedAvg: {n_sites} sites, {n_rounds} rounds x {local_steps} local steps "
              f"(budget {budget})", file=sys.stderr)
    cpus = num_cpus or max(1, min(n_sites, _available_cpus()))
    run_simulation(
        server_app=server, client_app=_make_client_app(), num_supernodes=n_sites,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": cpus, "include_dashboard": False},
        },
    )
    if "arrays" not in outcome:
        raise RuntimeError("the FedAvg simulation returned no model")
    net.load_state_dict(outcome["arrays"].to_torch_state_dict())
    net.eval()
    summary = {
        "rounds": n_rounds, "local_steps": local_steps, "sites": n_sites, "budget": budget,
        "total_steps": n_rounds * local_steps * n_sites,
        "steps_per_site": n_rounds * local_steps,
        "wall_s": round(time.monotonic() - t0, 3),
        "engine": "flwr simulation (ray backend), flwr.serverapp.strategy.FedAvg",
    }
    if not all(bool(torch.isfinite(p.detach()).all()) for p in net.parameters()):
        raise RuntimeError("FedAvg produced non-finite weights")
    return net, summary


def _available_cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
