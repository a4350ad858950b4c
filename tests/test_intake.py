"""Bundle intake: file drop and Flower bytes run the same verification; attacks are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from roundkit import answer_by_file, answer_over_flower, make_coordinator, make_site

from coordinator.intake import receive_bundle_bytes, receive_bundle_dir
from coordinator.rounds import close_round, open_round
from protocols.audit import verify_audit_log


@pytest.fixture
def world(tmp_path: Path):  # type: ignore[no-untyped-def]
    coord = make_coordinator(tmp_path)
    a = make_site(tmp_path, "site-a", coord)
    b = make_site(tmp_path, "site-b", coord)
    handle = open_round(coord, "CT", 64, 3)
    return coord, a, b, handle


def _site_state(handle, site):  # type: ignore[no-untyped-def]
    entry = handle.state()["sites"][site]
    return entry["state"], entry["reason"]


def test_dropped_bundle_is_verified_and_recorded(world, tmp_path: Path) -> None:
    coord, a, _, handle = world
    folder = answer_by_file(a, handle.request_bytes(), tmp_path / "drop")
    result = receive_bundle_dir(coord, folder)
    assert result.accepted, result.reason
    assert (result.site, result.round_id, result.n_images) == ("site-a", handle.round_id, 3)
    assert _site_state(handle, "site-a") == ("verified", "")
    assert (coord.bundles / result.digest / "manifest.dsse.json").is_file()
    assert (coord.received / f"{result.digest}.json").is_file()
    assert verify_audit_log(coord.audit).records > 0


def test_flower_bytes_and_file_drop_reach_the_same_verdict(world, tmp_path: Path) -> None:
    coord, a, b, handle = world
    answer = answer_over_flower(a, handle.request_bytes())
    by_flower = receive_bundle_bytes(coord, answer.bundle, round_id=handle.round_id,
                                     claimed_site="site-a")
    by_file = receive_bundle_dir(coord, answer_by_file(b, handle.request_bytes(),
                                                       tmp_path / "drop"))
    assert by_flower.accepted and by_file.accepted
    assert _site_state(handle, "site-a")[0] == _site_state(handle, "site-b")[0] == "verified"


def test_bundle_altered_after_signing_is_rejected(world, tmp_path: Path) -> None:
    coord, a, _, handle = world
    folder = answer_by_file(a, handle.request_bytes(), tmp_path / "drop")
    images = np.load(folder / "images.npy")
    images[0, 0, 0] += 1
    np.save(folder / "images.npy", images)
    result = receive_bundle_dir(coord, folder)
    assert not result.accepted
    assert "does not match its sha256" in result.reason
    assert not any(coord.bundles.iterdir())
    assert any((coord.inbox / "rejected").iterdir())


def test_bundle_from_a_site_not_in_the_trust_store_is_rejected(world, tmp_path: Path) -> None:
    from roundkit import fake_generate

    from node.config import load_node_config
    from node.export import approve_bundle, send_bundle

    coord, _, _, handle = world
    stranger = make_site(tmp_path, "site-x", None)
    state = handle.state()
    # A well-formed bundle bound to the real round id and nonce, signed by untrusted keys.
    pending = fake_generate(stranger.paths, load_node_config(stranger.paths), 3, 0,
                            state["round_id"], state["nonce"])
    approved = approve_bundle(stranger.paths, pending, stranger.reviewer)
    result = receive_bundle_dir(coord, send_bundle(stranger.paths, approved, tmp_path / "drop"))
    assert not result.accepted
    assert "unknown key" in result.reason
    assert not any(coord.bundles.iterdir())


def test_replayed_bundle_is_refused(world, tmp_path: Path) -> None:
    coord, a, _, handle = world
    folder = answer_by_file(a, handle.request_bytes(), tmp_path / "drop")
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    assert receive_bundle_dir(coord, folder).accepted
    result = receive_bundle_dir(coord, copy)
    assert not result.accepted
    assert result.reason.startswith("replay: bundle")
    assert _site_state(handle, "site-a") == ("verified", "")


def test_bundle_for_a_closed_round_is_rejected(world, tmp_path: Path) -> None:
    coord, a, _, handle = world
    folder = answer_by_file(a, handle.request_bytes(), tmp_path / "drop")
    close_round(coord, handle)
    result = receive_bundle_dir(coord, folder)
    assert not result.accepted
    assert "is closed" in result.reason


def test_bundle_with_an_extra_file_is_rejected(world, tmp_path: Path) -> None:
    coord, a, _, handle = world
    folder = answer_by_file(a, handle.request_bytes(), tmp_path / "drop")
    (folder / "notes.txt").write_text("hello")
    result = receive_bundle_dir(coord, folder)
    assert not result.accepted
    assert "not listed in the manifest" in result.reason


def test_bundle_holding_a_symlink_is_rejected_before_verification(world, tmp_path: Path) -> None:
    coord, a, _, handle = world
    folder = answer_by_file(a, handle.request_bytes(), tmp_path / "drop")
    (folder / "link").symlink_to("/etc/passwd")
    result = receive_bundle_dir(coord, folder)
    assert not result.accepted
    assert "symbolic link" in result.reason


def test_flower_bytes_that_are_not_an_archive_are_rejected(world) -> None:
    coord, _, _, handle = world
    result = receive_bundle_bytes(coord, b"not a tar at all" * 10, round_id=handle.round_id,
                                  claimed_site="site-a")
    assert not result.accepted
    assert _site_state(handle, "site-a")[0] == "rejected"


def test_bundle_delivered_under_another_sites_name_is_rejected(world) -> None:
    coord, a, _, handle = world
    answer = answer_over_flower(a, handle.request_bytes())
    result = receive_bundle_bytes(coord, answer.bundle, round_id=handle.round_id,
                                  claimed_site="site-b")
    assert not result.accepted
    assert "signed by site site-a but was delivered as site-b" in result.reason
    assert json.loads(json.dumps(result.to_dict()))["accepted"] is False
