"""privacy.search: the pruned exact search equals brute force, decision by decision."""

from __future__ import annotations

from unittest.mock import patch

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from privacy import search
from privacy.errors import GuardError
from privacy.guard import Guard
from privacy.metrics import ZERO_RMS, ContrastRMSE, PixelRMSE, ShiftFlipDistance
from privacy.search import (
    EPS_SQ,
    ExactIndex,
    brute_force_nearest,
    dense_scaled_nearest,
    exact_pair_sq_distances,
    exact_sq_distances,
    exact_sq_norms,
    scaled_gemm_interval,
)


def _assert_same(a, b) -> None:  # type: ignore[no-untyped-def]
    np.testing.assert_array_equal(a.sq, b.sq)
    # Indices must agree wherever the distance is not tied with another reference.
    for qi in range(a.sq.shape[0]):
        for j in range(a.sq.shape[1]):
            if np.sum(b.sq[qi] == b.sq[qi, j]) == 1:
                assert a.index[qi, j] == b.index[qi, j]


@st.composite
def problems(draw):  # type: ignore[no-untyped-def]
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    n = draw(st.integers(1, 80))
    f = draw(st.integers(1, 40))
    q = draw(st.integers(1, 6))
    t = draw(st.integers(1, 3))
    kind = draw(st.sampled_from(["uniform", "clustered", "duplicates"]))
    dtype = draw(st.sampled_from([np.float16, np.float32]))
    if kind == "uniform":
        ref = rng.random((n, f))
    else:
        centres = rng.random((max(1, n // 8), f))
        ref = centres[rng.integers(0, len(centres), n)] + rng.normal(0, 0.02, (n, f))
    ref = ref.astype(dtype)
    pick = rng.integers(0, n, size=(q, t))
    noise = 0.0 if kind == "duplicates" else draw(st.sampled_from([0.0, 1e-3, 0.05, 0.5]))
    var = ref[pick].astype(np.float32) + rng.normal(0, noise, (q, t, f)).astype(np.float32)
    k = draw(st.integers(1, 3))
    comps = draw(st.integers(0, f + 2))
    blocks = draw(st.integers(1, 8))
    local = draw(st.booleans())
    return ref, var, k, comps, blocks, local


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_pruned_search_equals_brute_force_on_random_data(problem) -> None:  # type: ignore[no-untyped-def]
    ref, var, k, comps, blocks, local = problem
    index = ExactIndex(ref, n_components=comps, sample_size=32, blocks=blocks, local_axes=local)
    want = brute_force_nearest(var, ref, k=k)
    # One-variant queries against a small reference take the dense GEMM path; with it
    # switched off they take the pruned path that large references use. Both must be exact.
    for dense in (True, False):
        with patch.object(search, "DENSE_ENTRIES", search.DENSE_ENTRIES if dense else -1):
            got = index.nearest(var, k=k, block_entries=1 << 10)
        _assert_same(got, want)
        # Every accept / reject decision at any threshold equals brute force's.
        for threshold in np.unique(want.sq[:, 0]).tolist() + [0.0, 1e-3, 0.5]:
            np.testing.assert_array_equal(got.sq[:, 0] >= threshold, want.sq[:, 0] >= threshold)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 60), st.integers(1, 300))
def test_safe_lower_bound_never_exceeds_the_exact_distance(seed: int, n: int, f: int) -> None:
    rng = np.random.default_rng(seed)
    scale = rng.choice([1e-3, 1.0, 1e3])
    ref = (rng.random((n, f)) * scale).astype(np.float32)
    q = (ref[: min(n, 5)] + rng.normal(0, 1e-4 * scale, (min(n, 5), f))).astype(np.float32)
    index = ExactIndex(ref, n_components=int(rng.integers(0, 20)), sample_size=16,
                       blocks=int(rng.integers(1, 40)), local_axes=bool(rng.integers(0, 2)))
    aug_q, norm_q = index._augment(q)
    lb = (
        np.sum(aug_q.astype(np.float64) ** 2, 1)[:, None]
        + index.aug_sq[None, :].astype(np.float64)
        - 2 * aug_q.astype(np.float64) @ index.aug.T.astype(np.float64)
        - EPS_SQ * (norm_q[:, None] + index.norms[None, :].astype(np.float64)) ** 2
    )
    exact = np.stack([exact_sq_distances(v, ref) for v in q])
    assert np.all(lb <= exact)


def test_exact_distance_of_a_row_does_not_depend_on_the_other_rows() -> None:
    rng = np.random.default_rng(0)
    ref = rng.random((300, 1000)).astype(np.float32)
    v = rng.random(1000).astype(np.float32)
    full = exact_sq_distances(v, ref)
    rows = np.array([299, 3, 150, 3, 0])
    np.testing.assert_array_equal(exact_sq_distances(v, ref[rows]), full[rows])
    pairs = exact_pair_sq_distances(v[None, :], np.zeros(5, dtype=np.int64), ref, rows)
    np.testing.assert_array_equal(pairs, full[rows])
    # Reduced in small blocks of rows (65 here), each row equals the definition computed
    # over the whole matrix at once, bit for bit.
    whole = np.sum((ref.astype(np.float64) - v.astype(np.float64)) ** 2, axis=1)
    np.testing.assert_array_equal(full, whole)
    half = ref.astype(np.float16)
    np.testing.assert_array_equal(
        exact_sq_distances(v, half),
        np.sum((half.astype(np.float64) - v.astype(np.float64)) ** 2, axis=1),
    )


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([1e-7, 1e-6, 1e-5, 1e-3]),
       st.sampled_from([np.float16, np.float32, np.float64]))
def test_float32_filter_keeps_exactness_on_near_ties(seed: int, spread: float, dtype) -> None:  # type: ignore[no-untyped-def]
    # References that differ by far less than the float32 GEMM's rounding at F = 4096: the
    # filter's intervals overlap, so the decision must fall back to float64 and still equal
    # brute force bit for bit.
    rng = np.random.default_rng(seed)
    base = rng.random(4096)
    ref = (base[None, :] + rng.normal(0, spread, (300, 4096))).astype(dtype)
    var = (base[None, None, :] + rng.normal(0, spread, (3, 2, 4096))).astype(dtype)
    k = int(rng.integers(1, 4))
    index = ExactIndex(ref, n_components=16, blocks=8, local_axes=bool(seed % 2))
    for t in (2, 1):  # two variants: the pruned path; one: the dense path
        got = index.nearest(var[:, :t], k=k)
        _assert_same(got, brute_force_nearest(var[:, :t], ref, k=k))


def test_pruning_skips_most_references_on_structured_data() -> None:
    rng = np.random.default_rng(1)
    centres = rng.random((50, 256))
    ref = (centres[rng.integers(0, 50, 2000)] + rng.normal(0, 0.05, (2000, 256))).astype(
        np.float32
    )
    q = (centres[:10] + rng.normal(0, 0.05, (10, 256))).astype(np.float32)
    got = ExactIndex(ref, n_components=32).nearest(q[:, None, :], k=2)
    want = brute_force_nearest(q[:, None, :], ref, k=2)
    _assert_same(got, want)
    assert got.evaluated.sum() < 0.2 * want.evaluated.sum()


def _brute_decisions(metrics, reference, images, thresholds):  # type: ignore[no-untyped-def]
    accepted = np.ones(images.shape[0], dtype=bool)
    for m in metrics:
        near = brute_force_nearest(m.query_variants(images), m.reference_features(reference))
        d = near.distances(m.scale(images.shape[1:]))[:, 0]
        accepted &= d >= thresholds[m.name]
    return accepted


def _assert_skipping_keeps_decisions(guard, images, full, brute):  # type: ignore[no-untyped-def]
    """``screen(search_rejected=False)`` decides like brute force and the full screen; it
    leaves out of the window search exactly the images a one-variant metric rejected; one
    worker or several, the same result."""
    runs = []
    for workers in (1, 3):
        guard.workers = workers
        runs.append(guard.screen(images, search_rejected=False))
    quick = runs[0]
    for m in quick.distances:
        np.testing.assert_array_equal(runs[1].distances[m], quick.distances[m])
        np.testing.assert_array_equal(runs[1].nearest_row[m], quick.nearest_row[m])
    np.testing.assert_array_equal(quick.accepted, brute)
    np.testing.assert_array_equal(quick.accepted, full.accepted)
    windowed = [m for m in guard.metrics if guard.bounded(m)]
    dense = [m for m in guard.metrics if not guard.bounded(m)]
    caught = np.zeros(images.shape[0], dtype=bool)
    for m in dense:
        np.testing.assert_array_equal(quick.distances[m.name], full.distances[m.name])
        caught |= full.distances[m.name] < guard.thresholds[m.name]
    for m in windowed:
        d = quick.distances[m.name]
        np.testing.assert_array_equal(np.isnan(d), caught)
        np.testing.assert_array_equal(d[~caught], full.distances[m.name][~caught])
        assert quick.searched()[m.name] == int((~caught).sum())
    assert all(np.all(np.isfinite(d[quick.accepted])) for d in quick.distances.values())


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(0.01, 0.3))
def test_guard_decisions_equal_brute_force_on_random_images(seed: int, thr: float) -> None:
    rng = np.random.default_rng(seed)
    base = rng.random((30, 4, 4))
    ref = np.kron(base, np.ones((1, 4, 4))).astype(np.float32)
    cand = ref[rng.integers(0, 30, 12)] + rng.normal(0, 0.1, (12, 16, 16)).astype(np.float32)
    cand = np.clip(cand, 0, 1)
    metrics = [PixelRMSE(), ContrastRMSE(), ShiftFlipDistance(2)]
    thresholds = {"pixel_rmse": thr, "contrast_rmse": thr * 1.5, "shift_flip": thr * 0.8}
    guard = Guard(metrics, ref, thresholds, n_components=8)
    assert guard.rescales == {"contrast_rmse": "pixel_rmse"}  # one GEMM for both
    screening = guard.screen(cand)
    brute = _brute_decisions(metrics, ref, cand, thresholds)
    np.testing.assert_array_equal(screening.accepted, brute)
    _assert_skipping_keeps_decisions(guard, cand, screening, brute)


@pytest.fixture(scope="module")
def real_slices(tmp_path_factory):  # type: ignore[no-untyped-def]
    from tests.conftest import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is absent (CI has it)")
    from node.config import load_node_config
    from node.home import init_home
    from node.ingest.pipeline import ingest_sources
    from node.store import Store

    home = tmp_path_factory.mktemp("real") / "home"
    paths = init_home(home, "site-real")
    config = load_node_config(paths)
    ingest_sources(paths, config, [SHARED_DATA / "ct" / "tcga-luad"], progress=False)
    with Store(paths.store) as store:
        images = store.load(store.records())
    return images


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_guard_decisions_equal_brute_force_on_real_slices(real_slices, seed: int) -> None:  # type: ignore[no-untyped-def]
    from privacy.canaries import ALTERATIONS, alter

    rng = np.random.default_rng(seed)
    n = real_slices.shape[0]
    order = rng.permutation(n)
    ref, rest = real_slices[order[:40]], real_slices[order[40:]]
    cand = [alter(str(rng.choice(ALTERATIONS)), ref[int(rng.integers(0, 40))], rng)
            for _ in range(4)]
    cand += [rest[i] for i in range(min(4, len(rest)))]
    images = np.stack(cand)
    metrics = [PixelRMSE(), ContrastRMSE(), ShiftFlipDistance(2)]
    # Thresholds in the middle of the candidates' distances make both outcomes happen.
    thresholds = {}
    for m in metrics[:2]:
        near = brute_force_nearest(m.query_variants(images), m.reference_features(ref))
        thresholds[m.name] = float(np.median(np.sqrt(near.sq[:, 0]) / 64))
    thresholds["shift_flip"] = thresholds["pixel_rmse"] * 0.8
    guard = Guard(metrics, ref, thresholds, n_components=16)
    assert guard.rescales == {"contrast_rmse": "pixel_rmse"}
    screening = guard.screen(images)
    brute = _brute_decisions(metrics, ref, images, thresholds)
    np.testing.assert_array_equal(screening.accepted, brute)
    _assert_skipping_keeps_decisions(guard, images, screening, brute)


def test_index_rebuilt_from_its_state_answers_like_a_fresh_one() -> None:
    rng = np.random.default_rng(3)
    ref = rng.random((400, 300)).astype(np.float32)
    var = (ref[rng.integers(0, 400, (6, 3))] + rng.normal(0, 0.05, (6, 3, 300))).astype(
        np.float32
    )
    fresh = ExactIndex(ref, n_components=40, blocks=5, local_axes=True)
    again = ExactIndex.from_state(ref, fresh.state())
    np.testing.assert_array_equal(again.aug, fresh.aug)
    _assert_same(again.nearest(var, k=2), brute_force_nearest(var, ref, k=2))


@pytest.mark.parametrize("damage", ["axes", "shape", "version", "bounds", "nan"])
def test_a_damaged_index_state_is_refused(damage: str) -> None:
    from privacy.errors import GuardError

    rng = np.random.default_rng(4)
    ref = rng.random((200, 120)).astype(np.float32)
    state = ExactIndex(ref, n_components=24, blocks=4).state()
    if damage == "axes":
        state["bases"] = state["bases"] * 1.01  # no longer orthonormal: the bound would break
    elif damage == "shape":
        ref = ref[:-1]
    elif damage == "version":
        state["version"] = np.array(1)
    elif damage == "bounds":
        state["bounds"] = state["bounds"][::-1].copy()
    else:
        state["aug"] = state["aug"].copy()
        state["aug"][0, 0] = np.nan
    with pytest.raises(GuardError, match="cached search index refused"):
        ExactIndex.from_state(ref, state)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_dense_index_equals_brute_force_for_any_number_of_variants(problem) -> None:  # type: ignore[no-untyped-def]
    ref, var, k, *_ = problem
    index = ExactIndex.dense(ref)
    _assert_same(index.nearest(var, k=k), brute_force_nearest(var, ref, k=k))
    kept = ExactIndex.from_state(ref, index.state())  # a dense index keeps its norms
    assert kept.dense_only
    np.testing.assert_array_equal(kept.sq_norms, index.sq_norms)
    _assert_same(kept.nearest(var, k=k), brute_force_nearest(var, ref, k=k))


def test_dense_index_refuses_a_large_reference() -> None:
    with patch.object(search, "DENSE_ENTRIES", 10), pytest.raises(GuardError, match="too large"):
        ExactIndex.dense(np.zeros((3, 4), dtype=np.float32))


def _rescaling_problem(seed: int, n: int, f: int, dtype):  # type: ignore[no-untyped-def]
    """Rows, queries among them re-scaled or slightly altered copies (distances near 0,
    where the expansion cancels most), all-black rows and rows whose root-mean-square sits
    at ``ZERO_RMS`` and near it (which rule applies is decided by rounding)."""
    rng = np.random.default_rng(seed)
    ref = (rng.random((n, f)) ** rng.uniform(0.5, 3.0, (n, 1))).astype(dtype)
    ref[0] = 0.0
    ref[1] = ZERO_RMS * rng.uniform(0.3, 3.0)
    picks = rng.integers(0, n, 9)
    x = ref[picks].astype(np.float64) * rng.uniform(0.5, 2.0, (9, 1))
    x[3:6] += rng.normal(0, 1e-6, (3, f))
    x = np.concatenate([x, rng.random((3, f)), np.zeros((1, f)),
                        np.full((1, f), ZERO_RMS * 1.0000001)]).astype(np.float32)
    return ref, x


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(3, 40), st.sampled_from([16, 257, 4096]),
       st.sampled_from([np.float16, np.float32]))
def test_rescaled_interval_holds_every_exact_contrast_distance(seed, n, f, dtype) -> None:  # type: ignore[no-untyped-def]
    ref, x = _rescaling_problem(seed, n, f, dtype)
    contrast = ContrastRMSE()
    cx = contrast._unit_rms(x)
    cr = contrast._unit_rms(ref)
    x32, r32 = x.astype(np.float32), ref.astype(np.float32)
    lo, hi = scaled_gemm_interval(x32 @ r32.T, exact_sq_norms(x32), exact_sq_norms(r32),
                                  exact_sq_norms(cx), exact_sq_norms(cr), f)
    exact = np.stack([exact_sq_distances(row, cr) for row in cx])
    assert np.all(lo <= exact) and np.all(exact <= hi)
    finite = np.isfinite(hi)
    # Not vacuous: rows far from ZERO_RMS get bounded intervals, narrow next to the
    # features' own scale (|c|^2 = f).
    def regular(rows: np.ndarray) -> np.ndarray:
        rms = np.sqrt(np.mean(rows.astype(np.float64) ** 2, axis=1))
        return (rms > 1e-9) | (rms == 0)

    assert finite[np.ix_(regular(x32), regular(r32))].all()
    assert np.all(hi[finite] - lo[finite] <= 1e-2 * f + 1e-3)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(3, 40), st.sampled_from([16, 257, 4096]),
       st.sampled_from([np.float16, np.float32]), st.integers(1, 3))
def test_shared_gemm_search_equals_brute_force_for_both_metrics(seed, n, f, dtype, k) -> None:  # type: ignore[no-untyped-def]
    ref, x = _rescaling_problem(seed, n, f, dtype)
    contrast = ContrastRMSE()
    cx, cr = contrast._unit_rms(x), contrast._unit_rms(ref)
    pixels, scaled = ExactIndex.dense(ref), ExactIndex.dense(cr)
    got_x, got_c = dense_scaled_nearest(pixels, x, scaled, cx, k=k)
    _assert_same(got_x, brute_force_nearest(x[:, None], ref, k=k))
    _assert_same(got_c, brute_force_nearest(cx[:, None], cr, k=k))
    _assert_same(got_c, scaled.nearest(cx[:, None], k=k))
    assert got_c.evaluated.sum() < x.shape[0] * n or n <= 3  # the filter did prune


def test_shared_gemm_refuses_indexes_that_do_not_match() -> None:
    ref = np.random.default_rng(0).random((5, 8)).astype(np.float32)
    c = ContrastRMSE()._unit_rms(ref)
    with pytest.raises(GuardError, match="do not match"):
        dense_scaled_nearest(ExactIndex.dense(ref), ref[:, :4], ExactIndex.dense(c), c[:, :4])
    with pytest.raises(GuardError, match="two dense indexes"):
        dense_scaled_nearest(ExactIndex(ref, n_components=2), ref, ExactIndex.dense(c), c)


def test_derived_rows_equal_the_whole_feature_matrix_bit_for_bit(real_slices) -> None:  # type: ignore[no-untyped-def]
    from privacy.search import DerivedRows

    rng = np.random.default_rng(5)
    for metric in (ContrastRMSE(), ShiftFlipDistance(4)):
        for images in (real_slices, real_slices.astype(np.float16),
                       rng.random((37, 24, 24)) * 1e-13):
            whole = metric.reference_features(images)
            rows = metric.reference_rows(images)
            assert isinstance(rows, DerivedRows) and rows.shape == whole.shape
            assert rows.dtype == whole.dtype
            for size in (1, 2, 7, len(images)):
                pick = rng.choice(len(images), size=size, replace=False)
                np.testing.assert_array_equal(rows[pick], whole[pick])
            np.testing.assert_array_equal(rows[3:9], whole[3:9])
            np.testing.assert_array_equal(np.asarray(rows), whole)
            np.testing.assert_array_equal(exact_sq_norms(rows), exact_sq_norms(whole))


def test_guard_on_derived_rows_gives_brute_force_distances(real_slices) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(8)
    order = rng.permutation(real_slices.shape[0])
    ref, cand = real_slices[order[:50]], real_slices[order[50:58]]
    cand = np.concatenate([cand, ref[:3] * 0.9, ref[3:5] + 0.01]).astype(np.float32)
    metrics = [PixelRMSE(), ContrastRMSE(), ShiftFlipDistance(2)]
    guard = Guard(metrics, ref, {"pixel_rmse": 0.05, "contrast_rmse": 0.1, "shift_flip": 0.05})
    screening = guard.screen(cand)
    for m in metrics[:2]:
        want = brute_force_nearest(m.query_variants(cand), m.reference_features(ref), k=2)
        np.testing.assert_array_equal(screening.distances[m.name],
                                      want.distances(m.scale(cand.shape[1:]))[:, 0])
        np.testing.assert_array_equal(screening.nearest_row[m.name], want.index[:, 0])
    assert not screening.accepted[-5:].any()  # the re-scaled and shifted-intensity copies
