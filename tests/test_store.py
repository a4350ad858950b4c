"""The site store: crash-safe batches, dedupe, orphan shards, patient / slab split, reading."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.errors import StoreError
from node.store import NewSlice, Store


def _slice(i: int, patient: str = "p-1", series: str = "s-1", size: int = 8,
           position: float | None = None, modality: str = "CT") -> NewSlice:
    rng = np.random.default_rng(i)
    return NewSlice(
        modality=modality, patient=patient, series=series,
        position=float(i if position is None else position), source_digest=f"d{i}",
        instance_key=f"i-{i}", pixels=rng.uniform(0, 1, size=(size, size)).astype(np.float32),
        unit="HU", scale=4095.0, offset=-1024.0, spacing_mm=1.5,
    )


def test_batch_round_trips_through_float16(tmp_path: Path) -> None:
    batch = [_slice(i) for i in range(3)]
    with Store(tmp_path) as store:
        assert store.add_batch(batch) == 3
        pixels, records = store.images("train")
    assert [r.instance_key for r in records] == ["i-0", "i-1", "i-2"]
    expected = np.stack([s.pixels for s in batch]).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(pixels, expected)
    assert {(r.unit, r.scale, r.offset, r.spacing_mm) for r in records} == {
        ("HU", 4095.0, -1024.0, 1.5)}


def test_reading_gathers_from_several_shards_in_any_order(tmp_path: Path) -> None:
    # Batches land in separate shards; records sorted by patient interleave them, and a
    # subset reads rows out of order. Each slice must come back exactly, wherever it sits.
    batches = [[_slice(10 * b + i, patient=f"p-{(b + i) % 3}") for i in range(4)]
               for b in range(3)]
    want = {s.instance_key: s.pixels.astype(np.float16).astype(np.float32)
            for batch in batches for s in batch}
    with Store(tmp_path) as store:
        for batch in batches:
            store.add_batch(batch)
        records = store.records()
        assert len({r.shard for r in records}) == 3
        for recs in (records, records[::-2], [records[5], records[0], records[5]]):
            got = store.load(recs)
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, np.stack([want[r.instance_key] for r in recs]))


def test_float16_pixels_widen_exactly_with_numpy_or_torch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    import torch

    from node.store import _widen_half

    # Every float16 value (subnormals, infinities, NaNs, both zeros), large enough to take
    # torch's path when torch is loaded.
    every = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    half = np.tile(every, 2).reshape(8, 128, 128)
    want = half.astype(np.float32)
    nan = np.isnan(want)

    def check(got: np.ndarray) -> None:
        assert got.dtype == np.float32 and np.array_equal(np.isnan(got), nan)
        # Bit for bit (the sign of zero too); a NaN stays a NaN (torch quiets its payload).
        np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))

    assert "torch" in sys.modules and torch is sys.modules["torch"]
    check(_widen_half(half))
    monkeypatch.delitem(sys.modules, "torch")  # a command that never loaded torch
    check(_widen_half(half))


def test_known_instances_are_not_added_again(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        assert store.add_batch([_slice(0), _slice(1), _slice(1)]) == 2
        assert store.add_batch([_slice(1), _slice(2)]) == 1
        assert store.add_batch([_slice(2)]) == 0
        assert store.count() == 3
    assert len(list((tmp_path / "shards").iterdir())) == 2  # an all-known batch writes nothing


def test_a_batch_of_mixed_sizes_is_refused(tmp_path: Path) -> None:
    with Store(tmp_path) as store, pytest.raises(StoreError, match="one 2-D size"):
        store.add_batch([_slice(0, size=8), _slice(1, size=16)])


def test_orphan_shards_of_a_killed_ingest_are_removed(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        store.add_batch([_slice(0)])
        kept = {p.name for p in store.shards.iterdir()}
        (store.shards / "deadbeef.npy").write_bytes(b"x")
        (store.shards / ".tmp-123").write_bytes(b"x")
        assert store.remove_orphan_shards() == 2
        assert {p.name for p in store.shards.iterdir()} == kept
        assert store.load(store.records()).shape == (1, 8, 8)


def test_empty_store_refuses_split_and_size(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        with pytest.raises(StoreError, match="empty"):
            store.assign_split(0.2, str)
        with pytest.raises(StoreError, match="empty"):
            store.image_size()


@settings(max_examples=30, deadline=None)
@given(
    n_patients=st.integers(min_value=2, max_value=25),
    fraction=st.floats(min_value=0.05, max_value=0.6),
    seed=st.integers(min_value=0, max_value=3),
)
def test_patient_split_never_puts_a_patient_on_both_sides(n_patients: int, fraction: float,
                                                          seed: int) -> None:
    with tempfile.TemporaryDirectory() as tmp, Store(tmp) as store:
        batch = [_slice(10 * p + k, patient=f"p-{p}", series=f"s-{p}")
                 for p in range(n_patients) for k in range(2)]
        store.add_batch(batch)
        summary = store.assign_split(fraction, lambda p: f"{seed}:{p}"[::-1])
        train = {r.patient for r in store.records("train")}
        holdout = {r.patient for r in store.records("holdout")}
    expected_hold = min(max(round(fraction * n_patients), 1), n_patients - 1)
    assert not train & holdout
    assert len(holdout) == expected_hold and len(train) == n_patients - expected_hold
    assert summary.method == "patients"
    assert (summary.patients_holdout, summary.slices_holdout) == (expected_hold,
                                                                  2 * expected_hold)


def test_split_is_the_same_for_the_same_rank_and_changes_with_it(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        store.add_batch([_slice(p, patient=f"p-{p}") for p in range(20)])
        store.assign_split(0.2, lambda p: p)
        first = store.split_digest("holdout")
        store.assign_split(0.2, lambda p: p)
        assert store.split_digest("holdout") == first
        store.assign_split(0.2, lambda p: f"{99 - int(p[2:]):03d}")
        assert store.split_digest("holdout") != first


def test_single_patient_splits_by_the_last_contiguous_slab(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        store.add_batch([_slice(i, position=100.0 - 3 * i) for i in range(10)])
        summary = store.assign_split(0.2, str)
        holdout = sorted(r.position for r in store.records("holdout"))
        train = sorted(r.position for r in store.records("train"))
    assert summary.method == "slabs (single patient)"
    assert (summary.slices_train, summary.slices_holdout) == (8, 2)
    assert holdout == [97.0, 100.0] and max(train) < min(holdout)


def test_physical_mapping_is_the_median_of_train_slices(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        items = []
        for i, (scale, offset) in enumerate([(100.0, 0.0), (200.0, 10.0), (300.0, 20.0)]):
            base = _slice(i, patient=f"p-{i}", modality="MR")
            items.append(NewSlice(**{**base.__dict__, "scale": scale, "offset": offset,
                                     "unit": "a.u."}))
        store.add_batch(items)
        assert store.physical_mapping("MR") == (200.0, 10.0, "a.u.")
        with pytest.raises(StoreError, match="no train slices of modality PT"):
            store.physical_mapping("PT")
        assert store.modalities() == {"MR": 3}
        assert store.image_size() == 8
