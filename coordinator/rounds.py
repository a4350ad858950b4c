"""Pooling rounds on the coordinator: open, per-site state on disk, status.

A round lives in ``<home>/rounds/<round-id>/``: ``request.dsse.json`` (the signed request every
site receives) and ``state.json`` (the round and each site's state, rewritten atomically under
a lock, so the Flower server app and a ``receive`` from the command line can work on one round
at once and a restarted coordinator resumes from what is on disk).

Site states: asked -> generating -> awaiting_approval -> received -> verified, or refused /
rejected / dropped, each with a reason. A verified or refused site is final for the round.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.config import CoordinatorPaths, load_coordinator_config
from protocols.audit import append_audit
from protocols.errors import UsageError
from protocols.files import atomic_write_bytes, atomic_write_json
from protocols.keys import load_signing_key
from protocols.rounds import MODALITIES, RoundRequest, new_round_id, sign_request

__all__ = [
    "SITE_STATES",
    "FINAL_SITE_STATES",
    "RoundHandle",
    "open_round",
    "load_round",
    "list_rounds",
    "set_site_state",
    "close_round",
    "update_round",
    "round_lock",
    "round_summary",
]

SITE_STATES = (
    "asked", "refused", "generating", "awaiting_approval", "received", "verified", "rejected",
    "dropped",
)
FINAL_SITE_STATES = frozenset({"verified", "refused"})
# Which state may follow which. A rejected or dropped site may still deliver (a bundle damaged
# in transit may be sent again; a late site may drop its bundle by hand).
_NEXT: dict[str, frozenset[str]] = {
    "asked": frozenset(SITE_STATES) - {"asked"},
    "generating": frozenset(SITE_STATES) - {"asked", "generating"},
    "awaiting_approval": frozenset(SITE_STATES) - {"asked", "awaiting_approval"},
    "received": frozenset({"verified", "rejected", "dropped"}),
    "rejected": frozenset({"received", "verified", "rejected", "generating",
                           "awaiting_approval", "dropped"}),
    "dropped": frozenset({"received", "verified", "rejected", "generating",
                          "awaiting_approval", "refused"}),
    "verified": frozenset(),
    "refused": frozenset(),
}


@dataclass(frozen=True)
class RoundHandle:
    """Paths and the signed request of one round."""

    root: Path
    round_id: str

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def request_file(self) -> Path:
        return self.root / "request.dsse.json"

    def state(self) -> dict[str, Any]:
        return _read_state(self.state_file)

    def request_bytes(self) -> bytes:
        return self.request_file.read_bytes()


def _read_state(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError("round has no state file", str(path)) from None
    return data


@contextlib.contextmanager
def round_lock(handle: RoundHandle) -> Iterator[None]:
    """Exclusive lock on one round's state (read-modify-write)."""
    lock_path = handle.root / ".lock"
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def open_round(
    paths: CoordinatorPaths,
    modality: str,
    image_size: int,
    count: int,
    sites: list[str] | None = None,
    now: float | None = None,
) -> RoundHandle:
    """Create a round: id, fresh nonce, the signed request, every asked site in state 'asked'."""
    from coordinator.home import load_coordinator_policy, load_trust, site_keys

    if modality not in MODALITIES:
        raise UsageError(f"modality must be one of {', '.join(MODALITIES)}", "--modality")
    if image_size not in (64, 128, 256, 512):
        raise UsageError("size must be 64, 128, 256 or 512", "--size")
    if count <= 0:
        raise UsageError("count must be positive", "--count")
    config = load_coordinator_config(paths)
    trusted = site_keys(load_trust(paths))
    if sites is None:
        sites = sorted(trusted)
    if not sites:
        raise UsageError("no sites to ask: add sites with trust add", str(paths.trust))
    unknown = [s for s in sites if s not in trusted]
    if unknown:
        raise UsageError(f"sites not in the trust store: {', '.join(unknown)}", "--sites")
    if len(set(sites)) != len(sites):
        raise UsageError("a site is named twice", "--sites")
    policy = load_coordinator_policy(paths)
    moment = time.time() if now is None else now
    key = load_signing_key(paths.coordinator_key)
    round_id = new_round_id(moment)
    request = RoundRequest(
        round_id=round_id,
        nonce=secrets.token_hex(32),
        modality=modality,
        image_size=image_size,
        count=count,
        sites=tuple(sites),
        created=moment,
        expires=moment + config.rounds.request_ttl_hours * 3600.0,
        coordinator_keyid=key.public.keyid,
        minimums=_policy_minimums(policy, modality),
    )
    handle = RoundHandle(paths.rounds / round_id, round_id)
    handle.root.mkdir(parents=True, exist_ok=False)
    atomic_write_bytes(handle.request_file, sign_request(request, key))
    state = {
        "round_id": round_id,
        "nonce": request.nonce,
        "modality": modality,
        "image_size": image_size,
        "count": count,
        "request_sha256": request.digest,
        "status": "open",
        "created": moment,
        "expires": request.expires,
        "sites": {s: {"state": "asked", "reason": "", "since": moment, "history": []}
                  for s in sites},
        "timings_s": {},
    }
    atomic_write_json(handle.state_file, state)
    append_audit(paths.audit, "round_open", {
        "round": round_id, "modality": modality, "image_size": image_size, "count": count,
        "sites": list(sites), "request_sha256": request.digest,
    })
    return handle


def _policy_minimums(policy: Any, modality: str) -> dict[str, Any]:
    thresholds = dict(getattr(policy, "min_thresholds", {}) or {}).get(modality, {})
    return {
        "required_reviewer_signatures": int(getattr(policy, "required_reviewer_signatures", 1)),
        "min_thresholds": dict(thresholds),
        "min_canary_catch_rate": dict(getattr(policy, "min_canary_catch_rate", {}) or {}),
        "max_bundle_bytes": int(getattr(policy, "max_bundle_bytes", 0)),
        "max_images": int(getattr(policy, "max_images", 0)),
    }


def load_round(paths: CoordinatorPaths, round_id: str) -> RoundHandle:
    if not round_id or "/" in round_id or round_id.startswith("."):
        raise UsageError("malformed round id", round_id)
    handle = RoundHandle(paths.rounds / round_id, round_id)
    if not handle.state_file.exists():
        raise UsageError(f"no such round {round_id}", str(paths.rounds))
    return handle


def list_rounds(paths: CoordinatorPaths) -> list[RoundHandle]:
    if not paths.rounds.is_dir():
        return []
    return [RoundHandle(p, p.name) for p in sorted(paths.rounds.iterdir())
            if (p / "state.json").exists()]


def set_site_state(
    paths: CoordinatorPaths,
    handle: RoundHandle,
    site: str,
    new_state: str,
    reason: str = "",
    **extra: Any,
) -> dict[str, Any]:
    """Move ``site`` to ``new_state`` (checked against the state machine); audited."""
    if new_state not in SITE_STATES:
        raise ValueError(f"unknown site state {new_state!r}")
    with round_lock(handle):
        state = handle.state()
        entry = state["sites"].get(site)
        if entry is None:
            raise UsageError(f"site {site!r} was not asked in round {handle.round_id}")
        old = entry["state"]
        if old == new_state and not reason and not extra:
            return state
        if new_state != old and new_state not in _NEXT[old]:
            raise UsageError(f"site {site} cannot go from {old} to {new_state}",
                             handle.round_id)
        moment = time.time()
        entry["history"].append({"state": old, "reason": entry.get("reason", ""),
                                 "until": moment})
        entry.update({"state": new_state, "reason": reason, "since": moment, **extra})
        atomic_write_json(handle.state_file, state)
    append_audit(paths.audit, "round_site_state", {
        "round": handle.round_id, "site": site, "from": old, "to": new_state, "reason": reason,
    })
    return state


def update_round(handle: RoundHandle, **fields: Any) -> dict[str, Any]:
    with round_lock(handle):
        state = handle.state()
        for key, value in fields.items():
            if isinstance(value, dict) and isinstance(state.get(key), dict):
                state[key].update(value)
            else:
                state[key] = value
        atomic_write_json(handle.state_file, state)
    return state


def close_round(paths: CoordinatorPaths, handle: RoundHandle) -> None:
    update_round(handle, status="closed", closed=time.time())
    append_audit(paths.audit, "round_close", {"round": handle.round_id})


def round_summary(handle: RoundHandle) -> dict[str, Any]:
    state = handle.state()
    sites = {
        s: {k: v for k, v in e.items() if k != "history"} for s, e in state["sites"].items()
    }
    return {
        "round": state["round_id"],
        "status": state["status"],
        "modality": state["modality"],
        "image_size": state["image_size"],
        "count": state["count"],
        "created": state["created"],
        "sites": sites,
        "timings_s": state.get("timings_s", {}),
        "site_timings_s": state.get("site_timings_s", {}),
        "wire_bytes": int(state.get("wire_bytes", 0)),
    }
