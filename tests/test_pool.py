"""Pooling (contract D): memory-mappable images, per-image index, manifest of bundles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from roundkit import answer_by_file, make_coordinator, make_site

from coordinator.intake import receive_bundle_dir
from coordinator.pool import build_pool, load_pool, write_pool
from coordinator.rounds import open_round
from protocols.bundle import load_bundle_images, verify_bundle
from protocols.errors import OperationError, UsageError


def _desc(site: str, digest: str) -> dict:
    return {"site": site, "bundle_digest": digest, "modality": "CT", "unit": "HU"}


def test_pool_from_arrays_is_memory_mappable_with_one_index_line_per_image(tmp_path: Path) -> None:
    a = np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4)
    b = -np.ones((3, 4, 4), dtype=np.float32)
    dest = write_pool(tmp_path / "pool", "r-1", [(_desc("site-a", "d1"), a),
                                                 (_desc("site-b", "d2"), b)])
    images, index, manifest = load_pool(dest)
    assert isinstance(images, np.memmap) and images.dtype == np.float32
    assert np.array_equal(images[:2], a) and np.array_equal(images[2:], b)
    assert [(i["site"], i["bundle_digest"], i["index_in_bundle"]) for i in index] == [
        ("site-a", "d1", 0), ("site-a", "d1", 1), ("site-b", "d2", 0), ("site-b", "d2", 1),
        ("site-b", "d2", 2)]
    assert manifest["counts"] == {"total": 5, "by_site": {"site-a": 2, "site-b": 3}}
    assert [b["bundle_digest"] for b in manifest["bundles"]] == ["d1", "d2"]


def test_pool_refuses_bundles_of_different_image_sizes(tmp_path: Path) -> None:
    with pytest.raises(OperationError, match="different sizes"):
        write_pool(tmp_path / "pool", "r-1", [
            (_desc("a", "d1"), np.zeros((1, 4, 4), np.float32)),
            (_desc("b", "d2"), np.zeros((1, 8, 8), np.float32))])
    assert not (tmp_path / "pool").exists()
    assert list(tmp_path.iterdir()) == []


def test_rewriting_a_pool_replaces_it_whole(tmp_path: Path) -> None:
    write_pool(tmp_path / "pool", "r-1", [(_desc("a", "d1"), np.zeros((4, 4, 4), np.float32))])
    write_pool(tmp_path / "pool", "r-1", [(_desc("a", "d2"), np.ones((1, 4, 4), np.float32))])
    images, index, manifest = load_pool(tmp_path / "pool")
    assert images.shape == (1, 4, 4) and len(index) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["pool"]


@settings(max_examples=20, deadline=None)
@given(counts=st.lists(st.integers(0, 4), min_size=1, max_size=4))
def test_pool_holds_exactly_the_images_given_in_order(counts: list[int]) -> None:
    import tempfile

    rng = np.random.default_rng(0)
    sources = [(_desc(f"s{i}", f"d{i}"), rng.normal(size=(n, 3, 3)).astype(np.float32))
               for i, n in enumerate(counts)]
    with tempfile.TemporaryDirectory() as tmp:
        images, index, manifest = load_pool(write_pool(Path(tmp) / "p", "r", sources))
        expected = np.concatenate([s for _, s in sources])
        assert np.array_equal(np.asarray(images), expected)
        assert [i["site"] for i in index] == [d["site"] for d, s in sources for _ in s]
        assert manifest["counts"]["total"] == sum(counts)


def test_round_pool_holds_exactly_the_verified_bundles_images(tmp_path: Path) -> None:
    coord = make_coordinator(tmp_path)
    sites = [make_site(tmp_path, n, coord) for n in ("site-a", "site-b", "site-c")]
    handle = open_round(coord, "CT", 64, 3)
    folders = [answer_by_file(s, handle.request_bytes(), tmp_path / "drop") for s in sites]
    # site-c's bundle is altered after signing: rejected, so it must never reach the pool
    npy = folders[2] / "images.npy"
    raw = bytearray(npy.read_bytes())
    raw[-1] ^= 0xFF
    npy.write_bytes(bytes(raw))
    results = [receive_bundle_dir(coord, f) for f in folders]
    assert [r.accepted for r in results] == [True, True, False]
    images, index, manifest = load_pool(build_pool(coord, handle.round_id))
    trust_dirs = [coord.bundles / r.digest for r in results[:2]]
    from coordinator.home import load_trust

    expected = np.concatenate([
        load_bundle_images(verify_bundle(d, load_trust(coord))) for d in trust_dirs])
    assert np.array_equal(np.asarray(images), expected)
    assert {i["site"] for i in index} == {"site-a", "site-b"}
    assert sorted(b["bundle_digest"] for b in manifest["bundles"]) == sorted(
        r.digest for r in results[:2])
    assert manifest["round"] == handle.round_id


def test_pool_of_a_round_without_verified_bundles_is_refused(tmp_path: Path) -> None:
    coord = make_coordinator(tmp_path)
    make_site(tmp_path, "site-a", coord)
    handle = open_round(coord, "CT", 64, 3)
    with pytest.raises(UsageError, match="no verified bundle"):
        build_pool(coord, handle.round_id)


def test_pool_refuses_a_stored_bundle_changed_after_intake(tmp_path: Path) -> None:
    from protocols.errors import VerificationError

    coord = make_coordinator(tmp_path)
    site = make_site(tmp_path, "site-a", coord)
    handle = open_round(coord, "CT", 64, 2)
    result = receive_bundle_dir(coord, answer_by_file(site, handle.request_bytes(),
                                                      tmp_path / "drop"))
    npy = coord.bundles / result.digest / "images.npy"
    raw = bytearray(npy.read_bytes())
    raw[-1] ^= 0xFF
    npy.write_bytes(bytes(raw))
    with pytest.raises(VerificationError, match="does not match its sha256"):
        build_pool(coord, handle.round_id)
    assert not (coord.pools / handle.round_id).exists()


def test_pool_refuses_non_images_and_non_finite_values_and_writes_nothing(tmp_path: Path) -> None:
    bad = {"bundle images are not [N, H, W]": np.zeros((4, 4), np.float32),
           "bundle images hold non-finite values": np.full((1, 4, 4), np.inf, np.float32)}
    for message, images in bad.items():
        with pytest.raises(OperationError, match=message.replace("[", r"\[")):
            write_pool(tmp_path / "pool", "r-1", [(_desc("a", "d1"), images)])
        assert list(tmp_path.iterdir()) == []


def test_a_pool_whose_parts_disagree_is_refused_on_load(tmp_path: Path) -> None:
    dest = write_pool(tmp_path / "pool", "r-1",
                      [(_desc("a", "d1"), np.zeros((3, 4, 4), np.float32))])
    lines = (dest / "index.jsonl").read_text().splitlines()
    (dest / "index.jsonl").write_text("\n".join(lines[:2]) + "\n")  # one index line lost
    with pytest.raises(OperationError, match="images, index and manifest disagree"):
        load_pool(dest)
    with pytest.raises(UsageError, match="not a pool folder"):
        load_pool(tmp_path)
