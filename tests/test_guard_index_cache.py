"""node.guard.calibration: kept indexes and features serve identical inputs only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from node.guard.calibration import (
    cached_dense_index,
    cached_features,
    cached_index,
    cached_tile_index,
)
from privacy.errors import GuardError
from privacy.metrics import ContrastRMSE, EmbeddingDistance, PixelRMSE, ShiftFlipDistance
from privacy.search import ExactIndex, brute_force_nearest
from privacy.tiles import TileIndex
from protocols.files import sha256_hex

LAYOUT = {"n_components": 32, "blocks": 8, "local_axes": False}


def _problem(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ref = rng.random((300, 256)).astype(np.float32)
    var = (ref[rng.integers(0, 300, (5, 2))] + rng.normal(0, 0.02, (5, 2, 256))).astype(
        np.float32
    )
    return ref, var


def test_second_run_loads_the_kept_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref, var = _problem()
    first = cached_index(tmp_path, "pixels", ref, LAYOUT)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[0].endswith(".npz") and files[1].endswith(".sha256")

    def no_build(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the index was rebuilt instead of loaded")

    monkeypatch.setattr(ExactIndex, "__init__", no_build)
    second = cached_index(tmp_path, "pixels", ref, LAYOUT)
    np.testing.assert_array_equal(second.aug, first.aug)
    want = brute_force_nearest(var, ref, k=2)
    np.testing.assert_array_equal(second.nearest(var, k=2).sq, want.sq)


def test_changed_features_or_settings_never_reuse_an_index(tmp_path: Path) -> None:
    ref, var = _problem()
    cached_index(tmp_path, "pixels", ref, LAYOUT)
    other = ref.copy()
    other[7, 11] += 0.5  # one pixel of one slice changed
    index = cached_index(tmp_path, "pixels", other, LAYOUT)
    np.testing.assert_array_equal(index.features, other)
    np.testing.assert_array_equal(
        index.nearest(var, k=1).sq, brute_force_nearest(var, other, k=1).sq
    )
    assert len(list(tmp_path.glob("index-pixels-*.npz"))) == 1  # the stale one was removed
    cached_index(tmp_path, "pixels", other, {**LAYOUT, "local_axes": True})
    assert len(list(tmp_path.glob("index-pixels-*.npz"))) == 1


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "sidecar"])
def test_a_damaged_cache_file_is_rebuilt_not_used(tmp_path: Path, damage: str) -> None:
    ref, var = _problem(1)
    good = cached_index(tmp_path, "pixels", ref, LAYOUT)
    (path,) = tmp_path.glob("*.npz")
    blob = bytearray(path.read_bytes())
    if damage == "flip a byte":
        blob[len(blob) // 2] ^= 0xFF
        path.write_bytes(bytes(blob))
    elif damage == "truncate":
        path.write_bytes(bytes(blob[: len(blob) // 3]))
    else:
        path.with_suffix(".sha256").write_text("0" * 64 + "\n")
    again = cached_index(tmp_path, "pixels", ref, LAYOUT)
    np.testing.assert_array_equal(again.aug, good.aug)
    # Rewritten whole: the file matches its sidecar again.
    assert sha256_hex(path.read_bytes()) == path.with_suffix(".sha256").read_text().strip()
    np.testing.assert_array_equal(
        again.nearest(var, k=2).sq, brute_force_nearest(var, ref, k=2).sq
    )


# ---- cached_features: the embedding's reference features, kept between runs ----------------


def _counting_embedding(sha: str | None) -> tuple[EmbeddingDistance, list[int]]:
    calls: list[int] = []

    def embed(images: np.ndarray) -> np.ndarray:
        calls.append(images.shape[0])
        flat = images.reshape(images.shape[0], -1)
        return np.stack([flat.mean(axis=1), flat.std(axis=1) + 1.0], axis=1)

    return EmbeddingDistance(embed, {"encoder_sha256": sha}), calls


def test_embedding_features_are_kept_and_reused(tmp_path: Path) -> None:
    images = np.random.default_rng(3).random((40, 16, 16)).astype(np.float32)
    metric, calls = _counting_embedding("a" * 64)
    first = cached_features(tmp_path, "digest-1", metric, images)
    assert calls == [40]
    second = cached_features(tmp_path, "digest-1", metric, images)
    assert calls == [40]  # loaded, not recomputed
    np.testing.assert_array_equal(second, first)
    np.testing.assert_array_equal(second, metric.reference_features(images))
    assert len(list(tmp_path.glob("features-embedding-*.npy"))) == 1


@pytest.mark.parametrize("change", ["reference", "encoder"])
def test_other_reference_or_encoder_never_reuses_features(tmp_path: Path, change: str) -> None:
    images = np.random.default_rng(4).random((30, 16, 16)).astype(np.float32)
    metric, _ = _counting_embedding("a" * 64)
    cached_features(tmp_path, "digest-1", metric, images)
    other_images = images[::-1].copy()
    if change == "reference":
        other, calls = _counting_embedding("a" * 64)
        got = cached_features(tmp_path, "digest-2", other, other_images)
    else:
        other, calls = _counting_embedding("b" * 64)
        got = cached_features(tmp_path, "digest-1", other, other_images)
    assert calls == [30]
    np.testing.assert_array_equal(got, other.reference_features(other_images))
    assert len(list(tmp_path.glob("features-embedding-*.npy"))) == 1  # the stale one removed


@pytest.mark.parametrize("damage", ["flip a byte", "sidecar"])
def test_damaged_kept_features_are_recomputed(tmp_path: Path, damage: str) -> None:
    images = np.random.default_rng(5).random((20, 16, 16)).astype(np.float32)
    metric, calls = _counting_embedding("c" * 64)
    good = cached_features(tmp_path, "d", metric, images)
    (path,) = tmp_path.glob("features-*.npy")
    if damage == "flip a byte":
        blob = bytearray(path.read_bytes())
        blob[-3] ^= 0xFF
        path.write_bytes(bytes(blob))
    else:
        path.with_suffix(".sha256").write_text("0" * 64 + "\n")
    again = cached_features(tmp_path, "d", metric, images)
    assert calls == [20, 20]
    np.testing.assert_array_equal(again, good)


def test_cheap_features_and_unnamed_encoders_are_never_written(tmp_path: Path) -> None:
    images = np.random.default_rng(6).random((10, 16, 16)).astype(np.float32)
    anonymous, calls = _counting_embedding(None)  # no weights digest: nothing to key on
    for metric in (PixelRMSE(), anonymous):
        assert not metric.costly_features
        got = cached_features(tmp_path, "d", metric, images)
        np.testing.assert_array_equal(got, metric.reference_features(images))
    assert calls == [10, 10]  # computed, then once more for the comparison
    assert list(tmp_path.iterdir()) == []


# ---- cached_tile_index: the shift metric's tile statistics, kept between runs -------------


def _count_norm_rows(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """From now on, the row count of every exact squared-norm computation of an index."""
    import privacy.search as search
    import privacy.tiles as tiles

    real = search.exact_sq_norms
    counted: list[int] = []

    def counting(block: np.ndarray) -> np.ndarray:
        counted.append(len(block))
        return real(block)

    monkeypatch.setattr(search, "exact_sq_norms", counting)
    monkeypatch.setattr(tiles, "exact_sq_norms", counting)
    return counted


def _windows_problem() -> tuple[ShiftFlipDistance, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(8)
    images = rng.random((60, 20, 20)).astype(np.float32)
    metric = ShiftFlipDistance(2)
    cand = np.roll(images[:3], 1, axis=2) + rng.normal(0, 0.01, (3, 20, 20)).astype(np.float32)
    return metric, metric.reference_features(images), cand


def test_tile_index_is_kept_and_answers_like_a_fresh_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    metric, feats, cand = _windows_problem()
    first = cached_tile_index(tmp_path, "digest", metric, feats, (16, 16))
    assert len(list(tmp_path.glob("tiles-*.npz"))) == 1

    def no_build(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the tile index was rebuilt instead of loaded")

    monkeypatch.setattr(TileIndex, "__init__", no_build)
    counted = _count_norm_rows(monkeypatch)
    second = cached_tile_index(tmp_path, "digest", metric, feats, (16, 16))
    assert counted == [16]  # the norms are kept: only the spot check's rows are recomputed
    np.testing.assert_array_equal(second.sq_norms, first.sq_norms)
    for a, b in zip(first.right, second.right, strict=True):
        np.testing.assert_array_equal(a, b)
    windows = metric.windows(cand)
    want = brute_force_nearest(windows.variants(), feats, k=2)
    np.testing.assert_array_equal(second.nearest(windows, k=2).sq, want.sq)


def test_tile_index_of_another_reference_is_rebuilt(tmp_path: Path) -> None:
    metric, feats, cand = _windows_problem()
    cached_tile_index(tmp_path, "digest-1", metric, feats, (16, 16))
    other = feats[::-1].copy()
    index = cached_tile_index(tmp_path, "digest-2", metric, other, (16, 16))
    windows = metric.windows(cand)
    want = brute_force_nearest(windows.variants(), other, k=1)
    np.testing.assert_array_equal(index.nearest(windows, k=1).sq, want.sq)
    assert len(list(tmp_path.glob("tiles-*.npz"))) == 1


@pytest.mark.parametrize("damage", ["version", "shape", "nan", "norms", "other features"])
def test_tile_index_state_is_refused_when_it_does_not_fit(damage: str) -> None:
    metric, feats, _ = _windows_problem()
    state = TileIndex(feats, (16, 16)).state()
    target = feats
    if damage == "version":
        state["version"] = np.array(99)
    elif damage == "shape":
        state["right0"] = state["right0"][:, :-1]
    elif damage == "nan":
        state["right0"] = state["right0"].copy()
        state["right0"][0, 5] = np.nan
    elif damage == "norms":  # the norms of other rows (the columns still fit)
        state["sq_norms"] = state["sq_norms"] * 1.001
    else:
        target = feats + np.float32(0.5)  # every reference differs, so the sample does too
    with pytest.raises(GuardError, match="kept tile index refused"):
        TileIndex.from_state(target, state)


def test_tile_index_state_differing_by_rounding_is_kept_and_a_changed_slice_is_not() -> None:
    # BLAS may round the projection of 16 spot-check rows differently from the chunk the
    # index was built in (a CI run found a 1.4e-18 difference); that is not another reference.
    metric, feats, cand = _windows_problem()
    state = TileIndex(feats, (16, 16)).state()
    assert "right_projected" in state
    nudged = {k: v.copy() for k, v in state.items()}
    nudged["right_projected"][3, 0] = np.nextafter(nudged["right_projected"][3, 0], np.inf)
    windows = metric.windows(cand)
    index = TileIndex.from_state(feats, nudged)
    want = brute_force_nearest(windows.variants(), feats, k=1)
    np.testing.assert_array_equal(index.nearest(windows, k=1).sq, want.sq)
    changed = feats.copy()
    changed[0, 0] += np.float32(0.05)  # one pixel of the first (spot-checked) reference
    with pytest.raises(GuardError, match="kept tile index refused: .*other features"):
        TileIndex.from_state(changed, state)


def _dense_problem() -> tuple[ContrastRMSE, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(4)
    images = rng.random((70, 16, 16)).astype(np.float32)
    metric = ContrastRMSE()
    queries = metric.query_variants(images[:4] * 0.8 + 0.05)
    return metric, images, metric.reference_rows(images), queries


def test_dense_norms_are_kept_and_answer_like_a_fresh_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    metric, images, rows, queries = _dense_problem()
    first = cached_dense_index(tmp_path, "digest", metric, rows)
    assert len(list(tmp_path.glob("dense-*.npz"))) == 1
    counted = _count_norm_rows(monkeypatch)
    second = cached_dense_index(tmp_path, "digest", metric, rows)
    assert counted == [16]  # the spot check only, not every row
    np.testing.assert_array_equal(second.sq_norms, first.sq_norms)
    whole = metric.reference_features(images)
    want = brute_force_nearest(queries, whole, k=2)
    got = second.nearest(queries, k=2)
    np.testing.assert_array_equal(got.sq, want.sq)
    np.testing.assert_array_equal(got.index, want.index)


def test_dense_norms_of_another_reference_or_metric_are_not_reused(tmp_path: Path) -> None:
    metric, images, rows, _ = _dense_problem()
    cached_dense_index(tmp_path, "digest-1", metric, rows)
    other = metric.reference_rows(images[::-1].copy())
    index = cached_dense_index(tmp_path, "digest-2", metric, other)
    np.testing.assert_array_equal(index.sq_norms,
                                  ExactIndex.dense(np.asarray(other)).sq_norms)
    assert len(list(tmp_path.glob("dense-*.npz"))) == 1  # the stale one was removed
    cached_dense_index(tmp_path, "digest-2", PixelRMSE(), PixelRMSE().reference_features(images))
    assert len(list(tmp_path.glob("dense-*.npz"))) == 2  # one per feature space


@pytest.mark.parametrize("damage", ["version", "shape", "nan", "negative", "other features"])
def test_dense_state_is_refused_when_it_does_not_fit(damage: str) -> None:
    metric, images, rows, _ = _dense_problem()
    state = ExactIndex.dense(rows).state()
    target = rows
    if damage == "version":
        state["version"] = np.array(99)
    elif damage == "shape":
        state["sq_norms"] = state["sq_norms"][:-1]
    elif damage in ("nan", "negative"):
        state["sq_norms"] = state["sq_norms"].copy()
        state["sq_norms"][7] = np.nan if damage == "nan" else -1.0
    else:
        target = PixelRMSE().reference_features(images)  # same shape, other rows
    with pytest.raises(GuardError, match="cached search index refused"):
        ExactIndex.from_state(target, state)


def test_a_guard_refuses_a_dense_factory_that_does_not_fit() -> None:
    from privacy.guard import Guard

    metric, images, _, _ = _dense_problem()
    with pytest.raises(GuardError, match="index of pixels_unit_rms does not match"):
        Guard([metric], images, {"contrast_rmse": 0.1},
              dense_factory=lambda m, f: ExactIndex.dense(np.zeros((3, 256), np.float32)))
