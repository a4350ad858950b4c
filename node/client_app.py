"""The node daemon as a Flower ``ClientApp`` (Message API): query.round and evaluate.

Flower only carries bytes here; every decision is made by :mod:`node.daemon`. The node home
comes from the SuperNode's node config (``--node-config 'home="/var/lib/synthfed/node"'``), in
Flower's simulation engine from the list in ``SYNTHFED_SIM_HOMES`` indexed by the simulated
node's ``partition-id``, else from ``SYNTHFED_HOME``.

Nothing but a signed reply (with, in state "bundle", the packed bytes of an approved bundle
this node has just verified) or evaluation metrics is ever put into a reply.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from node.config import NodePaths, resolve_home
from protocols.errors import UsageError
from protocols.rounds import split_chunks

__all__ = ["app", "home_for", "SIM_HOMES_ENV", "SIM_AUTO_APPROVE_ENV"]

SIM_HOMES_ENV = "SYNTHFED_SIM_HOMES"
SIM_AUTO_APPROVE_ENV = "SYNTHFED_SIM_AUTO_APPROVE"
CHUNK_BYTES = 1 << 20

app = ClientApp()


def home_for(context: Context) -> tuple[NodePaths, int | None]:
    """(node home, simulation partition or None) for this SuperNode."""
    config = context.node_config
    if "home" in config:
        return resolve_home(str(config["home"])), None
    if "partition-id" in config and os.environ.get(SIM_HOMES_ENV):
        homes = json.loads(os.environ[SIM_HOMES_ENV])
        partition = int(config["partition-id"])
        return resolve_home(homes[partition]), partition
    return resolve_home(None), None


def _auto_approve_key(partition: int | None):  # type: ignore[no-untyped-def]
    """The demo switch: a scripted reviewer key, only ever set by ``simulate``."""
    raw = os.environ.get(SIM_AUTO_APPROVE_ENV)
    if not raw or partition is None:
        return None
    from protocols.keys import load_signing_key

    keys = json.loads(raw)
    path = keys[partition] if isinstance(keys, list) else keys
    return load_signing_key(Path(path)) if path else None


@app.query("round")
def round_query(msg: Message, context: Context) -> Message:
    from node.daemon import handle_round_request

    paths, partition = home_for(context)
    record = msg.content.config_records.get("synthfed")
    request = record.get("request") if record is not None else None
    if not isinstance(request, bytes):
        raise UsageError("round query without a request")
    answer = handle_round_request(paths, request,
                                  auto_approve_key=_auto_approve_key(partition))
    content = ConfigRecord({"reply": answer.envelope})
    if answer.bundle is not None:
        content["bundle"] = split_chunks(answer.bundle, CHUNK_BYTES)
    return Message(RecordDict({"synthfed": content}), reply_to=msg)


@app.evaluate()
def evaluate_shared_model(msg: Message, context: Context) -> Message:
    """Evaluate a shared model on this site's holdout; only numbers go back (contract E).

    The message is ``message_type="evaluate"`` with ``ConfigRecord`` "synthfed" holding
    ``model`` (list of bytes chunks of the model blob) and ``task`` ("denoise" or "sr"); the
    reply is one ``MetricRecord`` "metrics" (numbers and lists of numbers only).
    """
    from node.config import load_node_config
    from node.evaluate import evaluate_model
    from protocols.audit import append_audit

    paths, _ = home_for(context)
    config = load_node_config(paths)
    record = msg.content.config_records.get("synthfed")
    if record is None:
        raise UsageError("evaluate message without a model")
    chunks = record.get("model")
    task = str(record.get("task", "denoise"))
    if task not in ("denoise", "sr") or not isinstance(chunks, list):
        raise UsageError("evaluate message is malformed")
    blob = b"".join(c for c in chunks if isinstance(c, bytes))
    seed = record.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise UsageError("evaluate message has a non-integer seed")
    result = evaluate_model(paths, config, blob, task, seed)  # type: ignore[arg-type]
    metrics = MetricRecord()
    for key, value in result.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            metrics[key] = float(value)
        elif isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
            metrics[key] = [float(v) for v in value]
    append_audit(paths.audit, "evaluation_replied", {"task": task, "metrics": sorted(metrics)})
    # The site id labels the numbers at the coordinator; it is the consortium's name for the
    # site (node.yaml), never anything about a patient.
    reply = RecordDict({"metrics": metrics, "site": ConfigRecord({"site": config.site})})
    return Message(reply, reply_to=msg)
