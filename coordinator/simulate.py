"""A whole pooling round in Flower's simulation engine, with real node homes as SuperNodes.

The same ServerApp (coordinator) and ClientApp (node daemon) as a deployment; Flower's
simulation engine (Ray backend, the only one flwr 1.41 ships) runs them on one machine with
one small Ray worker, so the sites answer one after another. Each simulated SuperNode gets its
node home through ``SYNTHFED_SIM_HOMES`` (indexed by its partition id).

``auto_approve_keys`` is a DEMO SWITCH: a scripted reviewer signs each site's bundle as soon as
it is exported. The bundle's manifest says so (``demo_auto_approved``), and a coordinator policy
refuses such bundles unless it sets ``allow_demo_auto_approved``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from coordinator.config import CoordinatorPaths
from coordinator.rounds import load_round, open_round, round_summary
from node.config import load_node_config, resolve_home
from protocols.audit import append_audit
from protocols.errors import UsageError

__all__ = ["simulate_round", "SIM_BACKEND_CONFIG"]

SIM_BACKEND_CONFIG: dict[str, Any] = {
    "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
    "init_args": {"num_cpus": 1, "object_store_memory": 100 * 1024 * 1024,
                  "log_to_driver": False},
}


def simulate_round(
    paths: CoordinatorPaths,
    homes: Sequence[Path],
    modality: str,
    count: int,
    *,
    image_size: int | None = None,
    auto_approve_keys: Sequence[Path] | None = None,
    round_id: str | None = None,
    pool: bool = True,
    round_timeout_s: float = 3600.0,
    poll_interval_s: float = 0.5,
) -> dict[str, Any]:
    """Open (or resume) a round, run it in simulation, pool it; returns the summary."""
    from flwr.simulation import run_simulation

    from coordinator.pool import build_pool
    from coordinator.server_app import make_server_app
    from node.client_app import SIM_AUTO_APPROVE_ENV, SIM_HOMES_ENV
    from node.client_app import app as client_app

    if not homes:
        raise UsageError("simulate needs at least one --site HOME", "--site")
    node_paths = [resolve_home(h) for h in homes]
    sites = [load_node_config(p).site for p in node_paths]
    if len(set(sites)) != len(sites):
        raise UsageError("two homes belong to the same site", "--site")
    if auto_approve_keys:
        if len(auto_approve_keys) not in (1, len(homes)):
            raise UsageError("give one --auto-approve-with key, or one per site",
                             "--auto-approve-with")
        for key in auto_approve_keys:
            if not Path(key).is_file():
                raise UsageError("reviewer key file not found", str(key))
        from coordinator.home import load_coordinator_policy

        if not getattr(load_coordinator_policy(paths), "allow_demo_auto_approved", False):
            # Fail before any site spends minutes generating bundles we would refuse.
            raise UsageError(
                "the coordinator policy refuses demo-approved bundles; set "
                "allow_demo_auto_approved in a demo coordinator's policy (policy set FILE)",
                str(paths.policy))
    if round_id is None:
        size = image_size or load_node_config(node_paths[0]).store.image_size
        handle = open_round(paths, modality, size, count, sites)
    else:
        handle = load_round(paths, round_id)
    if auto_approve_keys:
        append_audit(paths.audit, "demo_auto_approve_enabled", {
            "round": handle.round_id, "note": "DEMO SWITCH: scripted reviewer approval"})
    keys = [str(Path(k).resolve()) for k in (auto_approve_keys or [])]
    if len(keys) == 1:
        keys = keys * len(homes)
    saved = {k: os.environ.get(k) for k in (SIM_HOMES_ENV, SIM_AUTO_APPROVE_ENV)}
    os.environ[SIM_HOMES_ENV] = json.dumps([str(p.root) for p in node_paths])
    if keys:
        os.environ[SIM_AUTO_APPROVE_ENV] = json.dumps(keys)
    else:
        os.environ.pop(SIM_AUTO_APPROVE_ENV, None)
    server = make_server_app(paths.root, handle.round_id, node_wait_s=120.0,
                             poll_interval_s=poll_interval_s, round_timeout_s=round_timeout_s)
    started = time.perf_counter()
    try:
        run_simulation(server_app=server, client_app=client_app, num_supernodes=len(homes),
                       backend_config=json.loads(json.dumps(SIM_BACKEND_CONFIG)))
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    simulation_s = time.perf_counter() - started
    summary = round_summary(handle)
    summary["simulation_wall_s"] = round(simulation_s, 3)
    summary["demo_auto_approved"] = bool(keys)
    if pool and any(e["state"] == "verified" for e in summary["sites"].values()):
        dest = build_pool(paths, handle.round_id)
        summary = {**round_summary(handle), "simulation_wall_s": summary["simulation_wall_s"],
                   "demo_auto_approved": bool(keys), "pool": str(dest)}
    state = handle.state()
    accepted = sum(int(e.get("n_images", 0)) for e in state["sites"].values()
                   if e["state"] == "verified")
    summary["accepted_images"] = accepted
    summary["wire_bytes"] = int(state.get("wire_bytes", 0))
    summary["wire_bytes_per_accepted_image"] = (
        round(summary["wire_bytes"] / accepted, 1) if accepted else None)
    return summary
