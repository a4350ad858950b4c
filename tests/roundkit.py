"""Helpers shared by the round tests: coordinator and node homes wired to each other, and a
fast stand-in for contract B's ``generate`` (random images through the real export)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from coordinator.config import CoordinatorPaths
from coordinator.home import init_coordinator_home, policy_set, trust_add
from node.config import NodeConfig, NodePaths
from node.home import init_home
from protocols.keys import SigningKey, generate_keypair, load_public_key, write_keypair


@dataclass
class Site:
    name: str
    paths: NodePaths
    reviewer: SigningKey
    reviewer_file: Path


def make_coordinator(root: Path, allow_demo: bool = False) -> CoordinatorPaths:
    paths = init_coordinator_home(root / "coordinator")
    if allow_demo:
        policy = root / "policy.json"
        policy.write_text('{"required_reviewer_signatures": 1, "allow_demo_auto_approved": true}')
        policy_set(paths, policy)
    return paths


def set_node_policy(paths: NodePaths, **policy: object) -> None:
    data = yaml.safe_load(paths.config.read_text())
    data["policy"].update(policy)
    paths.config.write_text(yaml.safe_dump(data))


def make_site(root: Path, name: str, coordinator: CoordinatorPaths | None,
              trusted: bool = True, coordinator_key_hex: str | None = None,
              **policy: object) -> Site:
    paths = init_home(root / name, name)
    reviewer = generate_keypair()
    reviewer_file = root / f"{name}-reviewer.ed25519"
    write_keypair(reviewer, reviewer_file, root / f"{name}-reviewer.pub")
    key_hex = coordinator_key_hex
    if key_hex is None and coordinator is not None:
        key_hex = load_public_key(coordinator.coordinator_pub).hex
    set_node_policy(paths, coordinator_key=key_hex or "", reviewer_keys=[reviewer.public.hex],
                    **policy)
    if coordinator is not None and trusted:
        trust_add(coordinator, name, load_public_key(paths.site_pub), [reviewer.public])
    return Site(name, paths, reviewer, reviewer_file)


def fake_generate(paths: NodePaths, config: NodeConfig, count: int, seed: int, round_id: str,
                  nonce: str, *, modality: str | None = None,
                  demo_auto_approved: bool = False) -> Path:
    """Random CT-like images exported for real (signed, bound to the round); no model."""
    from node.export import export_bundle

    rng = np.random.default_rng(seed)
    size = config.store.image_size
    images = rng.uniform(-1000.0, 1000.0, size=(count, size, size)).astype(np.float32)
    distances = {"rmse": np.full(count, 0.5), "shift": np.full(count, 0.4)}
    guard = {"thresholds": {"rmse": 0.1, "shift": 0.1},
             "canary_catch_rates": {"shifted": 1.0, "mirrored": 1.0}}
    generator = {"architecture": "fake", "preset": "test"}
    return export_bundle(paths, config, images, modality="CT", unit="HU", distances=distances,
                         guard=guard, generator=generator, round_id=round_id, nonce=nonce,
                         dicom=False, demo_auto_approved=demo_auto_approved or None)


class LoopbackGrid:
    """An in-process stand-in for Flower's Grid: each node id runs the real ClientApp on its
    own home. ``drop`` names nodes that never answer; ``tamper(node, reply)`` may alter a
    reply in transit. Used to inject faults; the real engines are tested in test_simulation
    and test_deployment."""

    def __init__(self, homes: list[Path]) -> None:
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.run_id = 1
        TaskIdentity.node_id = 0
        TaskIdentity.task_id = 1
        self.homes = {1000 + i: Path(h) for i, h in enumerate(homes)}
        self.drop: set[int] = set()
        self.tamper = None
        self.auto_approve: dict[int, SigningKey] = {}
        self.calls = 0

    def get_node_ids(self) -> list[int]:
        return sorted(self.homes)

    def node_of(self, home: Path) -> int:
        return next(n for n, h in self.homes.items() if h == Path(home))

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        from flwr.app import Context, Error, Message, RecordDict

        import node.client_app as client_app

        self.calls += 1
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node in self.drop:
                continue
            ctx = Context(run_id=1, node_id=node, node_config={"home": str(self.homes[node])},
                          state=RecordDict(), run_config={})
            key = self.auto_approve.get(node)
            original = client_app._auto_approve_key
            client_app._auto_approve_key = lambda _p, key=key: key  # type: ignore[assignment]
            try:
                reply = client_app.app(msg, ctx)
            except Exception as exc:  # a ClientApp exception reaches the server as an Error
                reply = Message(Error(code=1, reason=f"{type(exc).__name__}: {exc}"),
                                reply_to=msg)
            finally:
                client_app._auto_approve_key = original  # type: ignore[assignment]
            reply.metadata.__dict__["_src_node_id"] = node  # what the SuperLink sets
            if self.tamper is not None:
                reply = self.tamper(node, reply) or reply
            replies.append(reply)
        return replies


def approve_pending(site: Site, round_id: str) -> Path:
    """What the site's reviewer does with ``synthfed-node approve``."""
    from node.export import approve_bundle
    from node.rounds import load_node_round

    record = load_node_round(site.paths, round_id)
    assert record is not None and record.state == "awaiting_approval", record
    return approve_bundle(site.paths, site.paths.outbox / "pending" / record.bundle_id,
                          site.reviewer)


def answer_over_flower(site: Site, request: bytes):  # type: ignore[no-untyped-def]
    """Generate (fake), approve as the reviewer, and return the daemon's bundle reply."""
    from node.daemon import handle_round_request

    first = handle_round_request(site.paths, request, generate_fn=fake_generate)
    assert first.reply.state == "awaiting_approval", first.reply
    round_id = first.reply.round_id
    approve_pending(site, round_id)
    answer = handle_round_request(site.paths, request, generate_fn=fake_generate)
    assert answer.reply.state == "bundle", answer.reply
    return answer


def answer_by_file(site: Site, request: bytes, drop: Path) -> Path:
    """Generate (fake), approve, then ``synthfed-node send --to drop``; returns the folder."""
    from node.daemon import handle_round_request
    from node.export import send_bundle

    first = handle_round_request(site.paths, request, generate_fn=fake_generate)
    approved = approve_pending(site, first.reply.round_id)
    return send_bundle(site.paths, approved, drop)
