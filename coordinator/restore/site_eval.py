"""Sending a shared model to the sites for evaluation, and collecting their numbers.

Two paths, and the results say which one ran:

- ``flower``: a Flower ``ServerApp`` sends one ``evaluate`` message (the model file in chunks and
  the task) to every SuperNode; each node's ``ClientApp`` (``node.client_app``, the node daemon)
  runs contract E on its own holdout and replies with a ``MetricRecord``. Here it runs in Flower's
  simulation engine with the given node homes as SuperNodes (the same messages a deployment
  carries).
- ``local``: the coordinator process calls ``node.evaluate.evaluate_model`` on node homes it can
  read directly. Only for a simulation on one machine; labelled as such.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from protocols.errors import OperationError, UsageError

__all__ = ["evaluate_locally", "evaluate_over_flower", "flower_path_available"]

METRICS = ("psnr_db", "ssim", "rmse")


def flower_path_available() -> bool:
    """Whether the node daemon's Flower ClientApp (with an evaluate handler) is installed."""
    try:
        from node.client_app import app  # noqa: F401
    except ImportError:
        return False
    return True


def evaluate_locally(
    homes: Sequence[Path], model_blob: bytes, task: str, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """{site: contract-E reply} from node homes on this machine."""
    from node.config import load_node_config, resolve_home
    from node.evaluate import evaluate_model

    replies: dict[str, dict[str, Any]] = {}
    for home in homes:
        paths = resolve_home(home)
        config = load_node_config(paths)
        if config.site in replies:
            raise UsageError("two homes belong to the same site", str(home))
        replies[config.site] = evaluate_model(paths, config, model_blob, task, seed)  # type: ignore[arg-type]
    return replies


def evaluate_over_flower(
    homes: Sequence[Path],
    model_blob: bytes,
    task: str,
    seed: int = 0,
    *,
    timeout_s: float = 900.0,
    chunk_bytes: int = 1 << 20,
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """({label: reply numbers} from every SuperNode, node errors), in Flower's simulation
    engine.

    The node's evaluate handler decides what it returns (numbers only); the label is the site
    name when the reply carries one, else ``node-<id>``.
    """
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from node.client_app import SIM_HOMES_ENV
    from node.client_app import app as client_app
    from protocols.rounds import split_chunks

    if not homes:
        raise UsageError("no sites to evaluate at: pass --site HOME", "--site")
    chunks = split_chunks(model_blob, chunk_bytes)
    outcome: dict[str, Any] = {"replies": {}, "errors": []}
    want = len(homes)

    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        deadline = time.monotonic() + 120.0
        nodes = list(grid.get_node_ids())
        while len(nodes) < want and time.monotonic() < deadline:
            time.sleep(0.5)
            nodes = list(grid.get_node_ids())
        messages = [
            Message(RecordDict({"synthfed": ConfigRecord({"model": chunks, "task": task,
                                                        "seed": int(seed)})}),
                    dst_node_id=node, message_type="evaluate")
            for node in nodes
        ]
        for reply in grid.send_and_receive(messages, timeout=timeout_s):
            node = reply.metadata.src_node_id
            if reply.has_error():
                outcome["errors"].append(f"node-{node}: {reply.error.reason}"[:300])
                continue
            numbers: dict[str, Any] = {}
            for record in reply.content.metric_records.values():
                numbers.update({k: v for k, v in record.items()})
            site = None
            for config in reply.content.config_records.values():
                if "site" in config:
                    site = str(config["site"])
            outcome["replies"][site or f"node-{node}"] = numbers

    previous = os.environ.get(SIM_HOMES_ENV)
    os.environ[SIM_HOMES_ENV] = json.dumps([str(Path(h).resolve()) for h in homes])
    try:
        run_simulation(
            server_app=server, client_app=client_app, num_supernodes=want,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                            "init_args": {"num_cpus": 1, "include_dashboard": False}},
        )
    finally:
        if previous is None:
            os.environ.pop(SIM_HOMES_ENV, None)
        else:
            os.environ[SIM_HOMES_ENV] = previous
    if outcome["errors"] and not outcome["replies"]:
        raise OperationError("no site returned an evaluation: " + "; ".join(outcome["errors"]))
    replies: dict[str, dict[str, Any]] = outcome["replies"]
    for label, numbers in replies.items():
        numbers.setdefault("n_images", float(len(numbers.get("psnr_db", []))))
        missing = [m for m in METRICS if m not in numbers]
        if missing:
            raise OperationError(f"evaluation reply of {label} lacks {missing}")
    return replies, list(outcome["errors"])
