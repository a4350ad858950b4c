"""Faults during a round, each named after the fault, through the real ServerApp loop
(coordinator.server_app.run_round) and the real ClientApp over an in-process grid."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from roundkit import (
    LoopbackGrid,
    answer_over_flower,
    approve_pending,
    fake_generate,
    make_coordinator,
    make_site,
)

import node.daemon
from coordinator.intake import receive_bundle_bytes
from coordinator.pool import build_pool, load_pool
from coordinator.rounds import open_round
from coordinator.server_app import run_round
from node.daemon import handle_round_request
from node.rounds import load_node_round
from protocols.audit import verify_audit_log
from protocols.keys import generate_keypair
from protocols.rounds import RoundRequest, new_round_id, sign_request

REPO = Path(__file__).resolve().parents[1]
FAST = {"node_wait_s": 1.0, "reply_timeout_s": 30.0, "poll_interval_s": 0.0}


@pytest.fixture(autouse=True)
def _fake_generator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(node.daemon, "_default_generate", fake_generate)


@pytest.fixture
def three(tmp_path: Path):  # type: ignore[no-untyped-def]
    coord = make_coordinator(tmp_path, allow_demo=True)
    sites = [make_site(tmp_path, n, coord) for n in ("site-a", "site-b", "site-c")]
    grid = LoopbackGrid([s.paths.root for s in sites])
    return coord, sites, grid


def _states(coord, round_id):  # type: ignore[no-untyped-def]
    from coordinator.rounds import load_round

    return {s: (e["state"], e["reason"])
            for s, e in load_round(coord, round_id).state()["sites"].items()}


def _events(path: Path) -> list[str]:
    import json

    return [json.loads(line)["event"] for line in path.read_text().splitlines()]


def test_site_drops_out_mid_round(three) -> None:
    coord, (a, b, c), grid = three
    grid.auto_approve = {grid.node_of(a.paths.root): a.reviewer,
                         grid.node_of(b.paths.root): b.reviewer}
    node_c = grid.node_of(c.paths.root)

    def vanish_after_first_answer(node, reply):  # type: ignore[no-untyped-def]
        if node == node_c:
            grid.drop.add(node_c)  # site-c answered "awaiting approval", then went away

    grid.tamper = vanish_after_first_answer
    handle = open_round(coord, "CT", 64, 3)
    outcome = run_round(grid, coord, handle.round_id, round_timeout_s=3.0, **FAST)
    states = _states(coord, handle.round_id)
    assert states["site-a"] == ("verified", "") and states["site-b"] == ("verified", "")
    assert states["site-c"] == ("dropped", "no bundle before the round deadline")
    assert outcome.accepted_images == 6
    images, index, _ = load_pool(build_pool(coord, handle.round_id))
    assert images.shape[0] == 6 and {i["site"] for i in index} == {"site-a", "site-b"}


def test_bundle_altered_in_transit(three) -> None:
    coord, (a, b, c), grid = three
    grid.homes = {k: v for k, v in grid.homes.items() if v == a.paths.root}
    node_a = grid.node_of(a.paths.root)
    grid.auto_approve = {node_a: a.reviewer}
    altered = []

    def flip_a_byte_once(node, reply):  # type: ignore[no-untyped-def]
        record = reply.content.config_records["synthfed"]
        if "bundle" in record and not altered:
            chunks = list(record["bundle"])
            chunks[0] = chunks[0][:600] + bytes([chunks[0][600] ^ 1]) + chunks[0][601:]
            record["bundle"] = chunks
            altered.append(node)

    grid.tamper = flip_a_byte_once
    handle = open_round(coord, "CT", 64, 3, ["site-a"])
    run_round(grid, coord, handle.round_id, round_timeout_s=30.0, **FAST)
    entry = handle.state()["sites"]["site-a"]
    assert altered == [node_a]
    assert [h["state"] for h in entry["history"]].count("rejected") == 1
    assert any(h["reason"] == "bundle bytes do not match the digest in the reply"
               for h in entry["history"])
    assert entry["state"] == "verified"  # the node sent its bundle again on the next poll


def test_bundle_from_an_unknown_site(tmp_path: Path) -> None:
    coord = make_coordinator(tmp_path, allow_demo=True)
    a = make_site(tmp_path, "site-a", coord)
    stranger = make_site(tmp_path, "site-x", coord, trusted=False)
    grid = LoopbackGrid([a.paths.root, stranger.paths.root])
    grid.auto_approve = {grid.node_of(a.paths.root): a.reviewer,
                         grid.node_of(stranger.paths.root): stranger.reviewer}
    handle = open_round(coord, "CT", 64, 2)
    outcome = run_round(grid, coord, handle.round_id, round_timeout_s=10.0, **FAST)
    assert set(outcome.sites) == {"site-a"}
    assert outcome.sites["site-a"]["state"] == "verified"
    assert "round_reply_refused" in _events(coord.audit)
    # and its bundle bytes, handed in anyway, are refused by the bundle verification itself
    from node.config import load_node_config
    from node.export import approve_bundle

    state = handle.state()
    pending = fake_generate(stranger.paths, load_node_config(stranger.paths), 2, 1,
                            state["round_id"], state["nonce"])
    approved = approve_bundle(stranger.paths, pending, stranger.reviewer)
    from protocols.rounds import pack_bundle

    result = receive_bundle_bytes(coord, pack_bundle(approved), round_id=handle.round_id)
    assert not result.accepted and "unknown key" in result.reason


def test_replayed_bundle_from_an_earlier_round(tmp_path: Path) -> None:
    coord = make_coordinator(tmp_path)
    a = make_site(tmp_path, "site-a", coord)
    first = open_round(coord, "CT", 64, 2)
    old = answer_over_flower(a, first.request_bytes())
    assert receive_bundle_bytes(coord, old.bundle, round_id=first.round_id,
                                claimed_site="site-a").accepted
    second = open_round(coord, "CT", 64, 2)
    into_second = receive_bundle_bytes(coord, old.bundle, round_id=second.round_id,
                                       claimed_site="site-a")
    assert not into_second.accepted
    assert into_second.reason == (
        f"bundle is bound to round {first.round_id}, not {second.round_id}")
    again_first = receive_bundle_bytes(coord, old.bundle, round_id=first.round_id,
                                       claimed_site="site-a")
    assert not again_first.accepted and again_first.reason.startswith("replay:")
    assert second.state()["sites"]["site-a"]["state"] == "rejected"


def test_request_signed_by_the_wrong_key(tmp_path: Path) -> None:
    coord = make_coordinator(tmp_path)
    a = make_site(tmp_path, "site-a", coord)
    impostor = generate_keypair()
    now = time.time()
    forged = RoundRequest(round_id=new_round_id(now), nonce="cd" * 32, modality="CT",
                          image_size=64, count=2, sites=("site-a",), created=now,
                          expires=now + 600, coordinator_keyid=impostor.public.keyid)
    answer = handle_round_request(a.paths, sign_request(forged, impostor),
                                  generate_fn=fake_generate)
    assert answer.reply.state == "refused"
    assert answer.reply.reason.startswith("request refused: signed by an unknown key")
    assert answer.bundle is None
    assert not (a.paths.root / "rounds").exists() or not any((a.paths.root / "rounds").iterdir())
    assert not any((a.paths.outbox / "pending").iterdir())
    assert _events(a.paths.audit)[-1] == "round_request_refused"


class _CoordinatorCrash(Exception):
    pass


def test_coordinator_restarted_mid_round_resumes_from_disk(three) -> None:
    coord, (a, b, c), grid = three
    grid.homes = {k: v for k, v in grid.homes.items() if v != c.paths.root}
    node_a = grid.node_of(a.paths.root)
    grid.auto_approve = {node_a: a.reviewer}  # site-b waits for its human reviewer
    handle = open_round(coord, "CT", 64, 2, ["site-a", "site-b"])

    def crash_on_second_poll(node, reply):  # type: ignore[no-untyped-def]
        if grid.calls >= 2:
            raise _CoordinatorCrash

    grid.tamper = crash_on_second_poll
    with pytest.raises(_CoordinatorCrash):
        run_round(grid, coord, handle.round_id, round_timeout_s=30.0, **FAST)
    states = _states(coord, handle.round_id)
    assert states["site-a"][0] == "verified" and states["site-b"][0] == "awaiting_approval"

    approve_pending(b, handle.round_id)  # the reviewer signs while the coordinator is down
    fresh = LoopbackGrid([a.paths.root, b.paths.root])
    outcome = run_round(fresh, coord, handle.round_id, round_timeout_s=30.0, **FAST)
    assert {s: e["state"] for s, e in outcome.sites.items()} == {
        "site-a": "verified", "site-b": "verified"}
    images, index, manifest = load_pool(build_pool(coord, handle.round_id))
    assert images.shape[0] == 4 and len(manifest["bundles"]) == 2
    assert verify_audit_log(coord.audit).records > 0


_KILLED_WORKER = r"""
import sys, time
sys.path.insert(0, {tests!r})
from pathlib import Path
import node.daemon
from node.config import resolve_home
from roundkit import fake_generate

def slow_generate(paths, config, count, seed, round_id, nonce, **options):
    half = paths.outbox / ".tmp-half-written"
    half.mkdir(parents=True, exist_ok=True)
    (half / "images.npy").write_bytes(b"half")
    if {after_export!r}:
        fake_generate(paths, config, count, seed, round_id, nonce)
    print("GENERATING", flush=True)
    time.sleep(60)

node.daemon.handle_round_request(resolve_home({home!r}), Path({request!r}).read_bytes(),
                                 generate_fn=slow_generate)
"""


@pytest.mark.parametrize("after_export", [False, True], ids=["before-export", "after-export"])
def test_node_daemon_killed_while_generating(tmp_path: Path, after_export: bool) -> None:
    coord = make_coordinator(tmp_path)
    a = make_site(tmp_path, "site-a", coord)
    handle = open_round(coord, "CT", 64, 2)
    request_file = tmp_path / "request.json"
    request_file.write_bytes(handle.request_bytes())
    script = _KILLED_WORKER.format(tests=str(REPO / "tests"), home=str(a.paths.root),
                                   request=str(request_file), after_export=after_export)
    worker = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert worker.stdout is not None
    assert worker.stdout.readline().strip() == b"GENERATING"
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait(timeout=30)
    record = load_node_round(a.paths, handle.round_id)
    assert record is not None and record.state == "generating"

    resumed = handle_round_request(a.paths, handle.request_bytes(), generate_fn=fake_generate)
    assert resumed.reply.state == "awaiting_approval"
    record = load_node_round(a.paths, handle.round_id)
    assert record is not None
    assert record.reason == ("adopted a finished export" if after_export else "")
    assert "round_generation_interrupted" in _events(a.paths.audit)
    assert len(list((a.paths.outbox / "pending").iterdir())) == 1
    approve_pending(a, handle.round_id)
    sent = handle_round_request(a.paths, handle.request_bytes(), generate_fn=fake_generate)
    assert sent.reply.state == "bundle" and sent.bundle is not None
    assert b"half" not in sent.bundle.split(b"\0")  # the half-written folder never leaves
    result = receive_bundle_bytes(coord, sent.bundle, round_id=handle.round_id,
                                  claimed_site="site-a")
    assert result.accepted, result.reason


def test_node_daemon_killed_between_sending_and_recording_sends_the_same_bundle(
    tmp_path: Path,
) -> None:
    from node.daemon import _move_to_sent
    from node.rounds import save_node_round

    coord = make_coordinator(tmp_path)
    a = make_site(tmp_path, "site-a", coord)
    handle = open_round(coord, "CT", 64, 2)
    first = handle_round_request(a.paths, handle.request_bytes(), generate_fn=fake_generate)
    approved = approve_pending(a, handle.round_id)
    record = load_node_round(a.paths, handle.round_id)
    assert record is not None
    record.state = "approved"
    save_node_round(a.paths, record)
    _move_to_sent(a.paths, approved)  # the kill came after the move, before the state write
    answer = handle_round_request(a.paths, handle.request_bytes(), generate_fn=fake_generate)
    assert first.reply.state == "awaiting_approval"
    assert answer.reply.state == "bundle"
    record = load_node_round(a.paths, handle.round_id)
    assert record is not None and record.state == "sent"
    assert receive_bundle_bytes(coord, answer.bundle, round_id=handle.round_id,
                                claimed_site="site-a").accepted


def test_site_without_a_trained_generator_fails_and_the_round_records_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from node.errors import TrainingError

    def no_generator(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise TrainingError("no trained generator in this home; run synthfed-node train")

    monkeypatch.setattr(node.daemon, "_default_generate", no_generator)
    coord = make_coordinator(tmp_path)
    a = make_site(tmp_path, "site-a", coord)
    grid = LoopbackGrid([a.paths.root])
    handle = open_round(coord, "CT", 64, 2)
    run_round(grid, coord, handle.round_id, round_timeout_s=10.0, **FAST)
    assert _states(coord, handle.round_id)["site-a"] == (
        "dropped",
        "site failed: generation failed: no trained generator in this home; "
        "run synthfed-node train")
    assert "round_generation_error" in _events(a.paths.audit)


def test_site_whose_node_connects_late_still_delivers(tmp_path: Path) -> None:
    coord = make_coordinator(tmp_path, allow_demo=True)
    a, b = (make_site(tmp_path, n, coord) for n in ("site-a", "site-b"))
    grid = LoopbackGrid([a.paths.root, b.paths.root])
    node_a, node_b = grid.node_of(a.paths.root), grid.node_of(b.paths.root)
    grid.auto_approve = {node_a: a.reviewer, node_b: b.reviewer}
    late = grid.homes.pop(node_b)

    def connect_b_after_first_poll(node, reply):  # type: ignore[no-untyped-def]
        grid.homes[node_b] = late

    grid.tamper = connect_b_after_first_poll
    handle = open_round(coord, "CT", 64, 2)
    outcome = run_round(grid, coord, handle.round_id, round_timeout_s=20.0, **FAST)
    assert {s: e["state"] for s, e in outcome.sites.items()} == {
        "site-a": "verified", "site-b": "verified"}


def test_same_round_id_under_another_nonce_is_refused_by_the_node(tmp_path: Path) -> None:
    # A validly signed request may not reuse a round id the node has answered with another
    # nonce (a replay, or a coordinator confused after a restore): the node keeps its record.
    import dataclasses
    import json

    from protocols.keys import load_signing_key
    from protocols.rounds import verify_request

    coord = make_coordinator(tmp_path)
    a = make_site(tmp_path, "site-a", coord)
    handle = open_round(coord, "CT", 64, 2)
    first = handle_round_request(a.paths, handle.request_bytes(), generate_fn=fake_generate)
    assert first.reply.state == "awaiting_approval"
    key = load_signing_key(coord.coordinator_key)
    original = verify_request(handle.request_bytes(), key.public)
    other = dataclasses.replace(original, nonce="ab" * 16)
    answer = handle_round_request(a.paths, sign_request(other, key), generate_fn=fake_generate)
    assert answer.reply.state == "refused"
    assert answer.reply.reason == "a different request with this round id was answered before"
    record = load_node_round(a.paths, handle.round_id)
    assert record is not None and record.nonce == original.nonce
    assert record.state == "awaiting_approval"
    last = json.loads(a.paths.audit.read_text().splitlines()[-1])
    assert last["event"] == "round_request_refused"


def test_a_round_whose_generation_was_killed_three_times_fails(tmp_path: Path) -> None:
    coord = make_coordinator(tmp_path)
    a = make_site(tmp_path, "site-a", coord)
    handle = open_round(coord, "CT", 64, 2)

    def must_not_run(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("a fourth generation must not start")

    calls = 0

    def interrupted(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        record = load_node_round(a.paths, handle.round_id)
        assert record is not None and record.state == "generating"
        raise KeyboardInterrupt  # the worker dies here; its record says "generating"

    for _ in range(3):
        with pytest.raises(KeyboardInterrupt):
            handle_round_request(a.paths, handle.request_bytes(), generate_fn=interrupted)
    assert calls == 3
    answer = handle_round_request(a.paths, handle.request_bytes(), generate_fn=must_not_run)
    assert (answer.reply.state, answer.reply.reason) == (
        "failed", "generation was interrupted three times")
    record = load_node_round(a.paths, handle.round_id)
    assert record is not None and record.state == "failed" and record.attempts == 3
    again = handle_round_request(a.paths, handle.request_bytes(), generate_fn=must_not_run)
    assert again.reply.state == "failed"  # a failed round stays failed


@pytest.mark.parametrize("removed", ["pending", "approved"])
def test_a_bundle_removed_from_the_outbox_fails_the_round(tmp_path: Path, removed: str) -> None:
    import shutil

    coord = make_coordinator(tmp_path)
    a = make_site(tmp_path, "site-a", coord)
    handle = open_round(coord, "CT", 64, 2)
    first = handle_round_request(a.paths, handle.request_bytes(), generate_fn=fake_generate)
    assert first.reply.state == "awaiting_approval"
    if removed == "pending":
        record = load_node_round(a.paths, handle.round_id)
        assert record is not None
        shutil.rmtree(a.paths.outbox / "pending" / record.bundle_id)
        reason = "the pending bundle was removed before approval"
    else:
        approved = approve_pending(a, handle.round_id)
        assert handle_round_request(a.paths, handle.request_bytes(),
                                    generate_fn=fake_generate).reply.state == "bundle"
        record = load_node_round(a.paths, handle.round_id)
        assert record is not None and record.state == "sent"
        shutil.rmtree(a.paths.outbox / "sent" / approved.name)
        reason = "the approved bundle left the outbox"
    answer = handle_round_request(a.paths, handle.request_bytes(), generate_fn=fake_generate)
    assert (answer.reply.state, answer.reply.reason) == ("failed", reason)
    assert answer.bundle is None


def test_a_second_worker_on_the_same_round_answers_generating(tmp_path: Path) -> None:
    from node.rounds import node_round_lock

    coord = make_coordinator(tmp_path)
    a = make_site(tmp_path, "site-a", coord)
    handle = open_round(coord, "CT", 64, 2)
    with node_round_lock(a.paths, handle.round_id) as held:
        assert held
        answer = handle_round_request(a.paths, handle.request_bytes(),
                                      generate_fn=fake_generate)
    assert (answer.reply.state, answer.reply.reason) == (
        "generating", "another worker of this node is on this round")
    assert load_node_round(a.paths, handle.round_id) is None  # the other worker owns it
