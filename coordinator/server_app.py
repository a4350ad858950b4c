"""The coordinator's Flower ``ServerApp``: one pooling round over the Message API.

:func:`run_round` sends the round's signed request to every connected SuperNode as a
``query.round`` message and keeps polling those whose site is still generating or awaiting
approval, until every asked site is final (verified or refused) or the round's deadline passes.
A bundle in a reply goes through :mod:`coordinator.intake` (the same verification as a file
drop). The state on disk is the only memory: a restarted coordinator simply runs the round
again and skips the sites already verified. Sites that never deliver are recorded as dropped.

In a deployment (``flwr run``) the app reads ``coordinator-home`` and ``round-id`` from the run
config; ``simulate`` builds the same app with :func:`make_server_app`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from coordinator.config import CoordinatorPaths, load_coordinator_config, resolve_coordinator_home
from coordinator.home import load_trust, site_keys
from coordinator.intake import receive_bundle_bytes
from coordinator.rounds import load_round, set_site_state, update_round
from protocols.audit import append_audit
from protocols.errors import SynthfedError, VerificationError
from protocols.rounds import join_chunks, verify_reply

__all__ = ["RoundOutcome", "run_round", "make_server_app", "app"]

MAX_DELIVERY_TRIES = 3


@dataclass
class RoundOutcome:
    round_id: str
    sites: dict[str, dict[str, Any]]
    timings_s: dict[str, float] = field(default_factory=dict)
    wire_bytes: int = 0
    accepted_images: int = 0


def _wait_for_nodes(grid: Grid, want: int, wait_s: float) -> list[int]:
    deadline = time.monotonic() + wait_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= want or time.monotonic() >= deadline:
            return nodes
        time.sleep(0.5)


def run_round(
    grid: Grid,
    paths: CoordinatorPaths,
    round_id: str,
    *,
    node_wait_s: float = 60.0,
    reply_timeout_s: float | None = None,
    poll_interval_s: float | None = None,
    round_timeout_s: float | None = None,
) -> RoundOutcome:
    config = load_coordinator_config(paths)
    reply_timeout_s = reply_timeout_s or config.rounds.reply_timeout_s
    poll_interval_s = config.rounds.poll_interval_s if poll_interval_s is None else poll_interval_s
    round_timeout_s = round_timeout_s or config.rounds.round_timeout_minutes * 60.0
    handle = load_round(paths, round_id)
    request = handle.request_bytes()
    keys = site_keys(load_trust(paths))
    asked = set(handle.state()["sites"])
    started = time.monotonic()
    deadline = started + round_timeout_s
    append_audit(paths.audit, "round_run", {"round": round_id, "transport": "flower"})

    nodes = _wait_for_nodes(grid, len(asked), node_wait_s)
    active = set(nodes)
    node_site: dict[int, str] = {}
    tries: dict[int, int] = {}
    wire_bytes = 0
    transfer_s = 0.0  # Flower's share of each poll: its wall time minus the nodes' handlers
    verify_s = 0.0
    site_timings: dict[str, dict[str, float]] = {}

    def final(site: str) -> bool:
        return handle.state()["sites"][site]["state"] in ("verified", "refused")

    seen = set(nodes)
    while time.monotonic() < deadline:
        if all(final(s) for s in asked):
            break
        for node in grid.get_node_ids():  # a site whose SuperNode connects late joins here
            if node not in seen:
                seen.add(node)
                active.add(node)
        if not active:
            unheard = [s for s in asked if not final(s) and s not in node_site.values()]
            if not unheard:
                break  # every asked site has answered for good; nobody left to wait for
            time.sleep(max(poll_interval_s, 0.5))
            continue
        messages = [
            Message(RecordDict({"synthfed": ConfigRecord({"request": request})}),
                    dst_node_id=node, message_type="query.round", group_id=round_id)
            for node in sorted(active)
        ]
        t_sent = time.monotonic()
        replies = list(grid.send_and_receive(
            messages, timeout=min(reply_timeout_s, max(1.0, deadline - time.monotonic()))))
        t_back = time.monotonic()
        handlers_s = 0.0
        answered: set[int] = set()
        for reply in replies:
            node = reply.metadata.src_node_id
            answered.add(node)
            if reply.has_error():
                tries[node] = tries.get(node, 0) + 1
                site = node_site.get(node)
                reason = f"node error: {reply.error.reason}"[:300]
                append_audit(paths.audit, "round_node_error",
                             {"round": round_id, "site": site or "", "reason": reason})
                if tries[node] >= MAX_DELIVERY_TRIES:
                    active.discard(node)
                    if site and not final(site):
                        set_site_state(paths, handle, site, "dropped", reason)
                continue
            record = reply.content.config_records.get("synthfed")
            try:
                envelope = record.get("reply") if record is not None else None
                if not isinstance(envelope, bytes):
                    raise VerificationError("reply carries no signed status", "round reply")
                status = verify_reply(envelope, keys)
            except SynthfedError as exc:
                append_audit(paths.audit, "round_reply_refused",
                             {"round": round_id, "reason": exc.what})
                tries[node] = tries.get(node, 0) + 1
                if tries[node] >= MAX_DELIVERY_TRIES:
                    active.discard(node)
                continue
            site = status.site
            node_site[node] = site
            if site not in asked:
                active.discard(node)  # a connected site this round did not ask
                continue
            if status.state != "refused" and (
                status.round_id != round_id or status.nonce != handle.state()["nonce"]
            ):
                append_audit(paths.audit, "round_reply_refused",
                             {"round": round_id, "site": site, "reason": "wrong round"})
                continue
            entry = handle.state()["sites"][site]
            handlers_s += status.timings_s.get("handler", 0.0)
            timing = site_timings.setdefault(site, {})
            for key in ("generate", "approve", "review_wait", "pack"):
                if key in status.timings_s:
                    timing[key] = round(timing.get(key, 0.0) + status.timings_s[key], 4)
            if status.state == "refused":
                if entry["state"] not in ("verified", "refused"):
                    set_site_state(paths, handle, site, "refused", status.reason)
                active.discard(node)
            elif status.state == "failed":
                if entry["state"] != "verified":
                    set_site_state(paths, handle, site, "dropped",
                                   f"site failed: {status.reason}")
                active.discard(node)
            elif status.state in ("generating", "awaiting_approval"):
                if entry["state"] not in ("verified", "refused", status.state):
                    set_site_state(paths, handle, site, status.state, status.reason)
            elif status.state == "bundle":
                if entry["state"] == "verified" and entry.get("bundle_digest") == \
                        status.bundle_sha256:
                    active.discard(node)  # already have it (e.g. after a coordinator restart)
                    continue
                raw_chunks = record.get("bundle") if record is not None else None
                chunks = [c for c in raw_chunks if isinstance(c, bytes)] if isinstance(
                    raw_chunks, list) else None
                size = len(envelope) + sum(len(c) for c in chunks or [])
                wire_bytes += size
                timing["bundle_wire_bytes"] = size
                try:
                    if not chunks:
                        raise VerificationError("bundle reply without bundle bytes", "transfer")
                    data = join_chunks(chunks, status.archive_sha256)
                except VerificationError as exc:
                    set_site_state(paths, handle, site, "rejected", exc.what)
                    data = b""
                if data:
                    if entry["state"] not in ("received", "verified"):
                        set_site_state(paths, handle, site, "received", "", via="flower",
                                       wire_bytes=size)
                    result = receive_bundle_bytes(paths, data, round_id=round_id,
                                                  claimed_site=site)
                    verify_s += result.verify_s
                    timing["verify"] = round(result.verify_s, 4)
                    if result.accepted:
                        active.discard(node)
                        continue
                tries[node] = tries.get(node, 0) + 1
                if tries[node] >= MAX_DELIVERY_TRIES:
                    active.discard(node)
        transfer_s += max(0.0, (t_back - t_sent) - handlers_s)
        for node in active - answered:
            # No answer in time: a site that drops out is recorded and polled until deadline.
            site = node_site.get(node)
            append_audit(paths.audit, "round_no_answer", {"round": round_id, "site": site or ""})
        if active and not all(final(s) for s in asked):
            time.sleep(poll_interval_s)

    state = handle.state()
    for site, entry in state["sites"].items():
        if entry["state"] not in ("verified", "refused", "rejected", "dropped"):
            reason = ("no bundle before the round deadline" if entry["state"] != "asked"
                      else "the site never answered")
            set_site_state(paths, handle, site, "dropped", reason)
    elapsed = time.monotonic() - started
    timings = {
        "round_wall": round(elapsed, 4),
        "generate_sum_sites": round(sum(t.get("generate", 0.0) for t in site_timings.values()), 4),
        "review_wait_max_site": round(
            max((t.get("review_wait", 0.0) for t in site_timings.values()), default=0.0), 4),
        "transfer": round(transfer_s, 4),
        "verify": round(verify_s, 4),
    }
    state = update_round(handle, timings_s=timings, wire_bytes=wire_bytes,
                         site_timings_s=site_timings)
    accepted = sum(int(e.get("n_images", 0)) for e in state["sites"].values()
                   if e["state"] == "verified")
    append_audit(paths.audit, "round_run_done", {"round": round_id, "accepted_images": accepted})
    return RoundOutcome(round_id, state["sites"], timings, wire_bytes, accepted)


def make_server_app(home: Path, round_id: str, **options: Any) -> ServerApp:
    """A ServerApp bound to one coordinator home and round (simulation, tests)."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        paths = resolve_coordinator_home(home)
        outcome = run_round(grid, paths, round_id, **options)
        context.state.config_records["synthfed"] = ConfigRecord(
            {"round": outcome.round_id, "accepted_images": outcome.accepted_images})

    return server


app = ServerApp()


@app.main()
def deployed_main(grid: Grid, context: Context) -> None:
    """``flwr run``: the run config names the coordinator home and the round."""
    paths = resolve_coordinator_home(str(context.run_config["coordinator-home"]))
    run_round(grid, paths, str(context.run_config["round-id"]),
              node_wait_s=float(context.run_config.get("node-wait-s", 60.0)))
