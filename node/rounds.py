"""Node-side round requests: the checks a site applies before it does anything for a round,
and the durable per-round state under ``<home>/rounds/<round-id>/state.json``.

A request is answered only when every one of these holds: it is signed by the coordinator key
written in node.yaml (``policy.coordinator_key``) and by nothing else; it has not expired; it
asks this site; it asks a modality the site offers, at the store's image size, for no more
images than ``policy.max_images_per_round``; and the last round the site accepted began at
least ``policy.min_minutes_between_rounds`` ago. Refusals are audited with their reason; a
request that fails its signature check never creates anything on disk (its fields are not
trusted, not even the round id).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.config import NodeConfig, NodePaths
from protocols.errors import SynthfedError, VerificationError
from protocols.files import atomic_write_json
from protocols.keys import PublicKey, public_key_from_hex
from protocols.rounds import RoundRequest, verify_request

__all__ = [
    "RoundRefused",
    "NODE_ROUND_STATES",
    "NodeRound",
    "rounds_dir",
    "check_request",
    "load_node_round",
    "save_node_round",
    "node_round_lock",
    "list_node_rounds",
]

NODE_ROUND_STATES = (
    "accepted", "generating", "awaiting_approval", "approved", "sent", "refused", "failed",
)


class RoundRefused(SynthfedError):
    """The site will not take part in this round; ``what`` is the reason sent back."""

    exit_code = 2


@dataclass
class NodeRound:
    round_id: str
    nonce: str
    request_sha256: str
    modality: str
    count: int
    state: str
    reason: str = ""
    bundle_id: str = ""
    bundle_sha256: str = ""
    seed: int = 0
    accepted_at: float = 0.0
    updated: float = 0.0
    attempts: int = 0
    awaiting_since: float = 0.0
    history: list[dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def rounds_dir(paths: NodePaths) -> Path:
    return paths.root / "rounds"


def _round_dir(paths: NodePaths, round_id: str) -> Path:
    # round_id has already passed RoundRequest's pattern check (no slashes, no dots).
    return rounds_dir(paths) / round_id


def load_node_round(paths: NodePaths, round_id: str) -> NodeRound | None:
    path = _round_dir(paths, round_id) / "state.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return NodeRound(**data)


def save_node_round(paths: NodePaths, record: NodeRound) -> None:
    record.updated = time.time()
    atomic_write_json(_round_dir(paths, record.round_id) / "state.json", record.to_dict())


def list_node_rounds(paths: NodePaths) -> list[NodeRound]:
    root = rounds_dir(paths)
    if not root.is_dir():
        return []
    found = []
    for sub in sorted(root.iterdir()):
        if (sub / "state.json").exists():
            record = load_node_round(paths, sub.name)
            if record is not None:
                found.append(record)
    return found


@contextlib.contextmanager
def node_round_lock(paths: NodePaths, round_id: str, blocking: bool = True) -> Iterator[bool]:
    """An exclusive lock on one round; yields False when ``blocking`` is off and it is held.

    The lock dies with its process, so a daemon killed mid-generation leaves no stale lock.
    """
    folder = _round_dir(paths, round_id)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def coordinator_key(config: NodeConfig) -> PublicKey:
    text = config.policy.coordinator_key.strip()
    if not text:
        raise RoundRefused("this node has no coordinator key in node.yaml (policy.coordinator_key)")
    try:
        return public_key_from_hex(text)
    except SynthfedError as exc:
        raise RoundRefused(f"policy.coordinator_key in node.yaml is unusable: {exc.what}") from None


def verify_signed_request(config: NodeConfig, data: bytes, now: float | None = None
                          ) -> RoundRequest:
    """Signature, schema and expiry; raises RoundRefused with the reason."""
    key = coordinator_key(config)
    try:
        return verify_request(data, key, now=now)
    except VerificationError as exc:
        raise RoundRefused(f"request refused: {exc.what}") from None


def check_policy(
    paths: NodePaths, config: NodeConfig, request: RoundRequest, now: float | None = None
) -> None:
    """The site policy checks of a verified request that this node has not accepted yet."""
    policy = config.policy
    if config.site not in request.sites:
        raise RoundRefused(f"site {config.site} was not asked in this round")
    if request.modality not in policy.modalities_offered:
        raise RoundRefused(
            f"modality {request.modality} is not offered (policy.modalities_offered: "
            f"{', '.join(policy.modalities_offered) or 'none'})")
    if request.count > policy.max_images_per_round:
        raise RoundRefused(
            f"count {request.count} is over this site's cap of "
            f"{policy.max_images_per_round} images per round")
    if request.image_size != config.store.image_size:
        raise RoundRefused(
            f"image size {request.image_size} differs from this store's "
            f"{config.store.image_size}")
    moment = time.time() if now is None else now
    if policy.min_minutes_between_rounds > 0:
        accepted = [r.accepted_at for r in list_node_rounds(paths)
                    if r.accepted_at and r.round_id != request.round_id]
        if accepted:
            waited_min = (moment - max(accepted)) / 60.0
            if waited_min < policy.min_minutes_between_rounds:
                raise RoundRefused(
                    f"rate limit: the last round was accepted {waited_min:.1f} min ago, "
                    f"policy.min_minutes_between_rounds is {policy.min_minutes_between_rounds}")


def check_request(
    paths: NodePaths, config: NodeConfig, data: bytes, now: float | None = None
) -> RoundRequest:
    """Verify a request and apply the site policy (for a round not seen before)."""
    request = verify_signed_request(config, data, now)
    existing = load_node_round(paths, request.round_id)
    if existing is not None:
        if existing.nonce != request.nonce or existing.request_sha256 != request.digest:
            raise RoundRefused("a different request with this round id was answered before")
        return request
    check_policy(paths, config, request, now)
    return request
