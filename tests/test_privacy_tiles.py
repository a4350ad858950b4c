"""privacy.tiles: the tile-statistics cascade equals brute force, capped or not."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from privacy.errors import GuardError
from privacy.guard import Guard
from privacy.metrics import ContrastRMSE, PixelRMSE, ShiftFlipDistance, Windows, rotate_images
from privacy.search import brute_force_nearest
from privacy.tiles import TileIndex, _left, tile_sizes, tile_statistics


def _check(index: TileIndex, windows: Windows, ref_feats: np.ndarray, k: int,
           cap_sq: float) -> None:
    got = index.nearest(windows, k=k, cap_sq=cap_sq)
    want = brute_force_nearest(windows.variants(), ref_feats, k=k)
    expect = np.where(want.sq < cap_sq, want.sq, np.inf)
    np.testing.assert_array_equal(got.sq, expect)
    for qi in range(expect.shape[0]):
        for j in range(expect.shape[1]):
            if np.isfinite(expect[qi, j]) and np.sum(want.sq[qi] == want.sq[qi, j]) == 1:
                assert got.index[qi, j] == want.index[qi, j]
            if not np.isfinite(expect[qi, j]):
                assert got.index[qi, j] == -1
    # The floor is a lower bound on the nearest distance, and proves the cap where nothing is
    # closer than it.
    assert np.all(got.floor_sq <= want.sq[:, 0])
    far = ~np.isfinite(got.sq[:, 0])
    assert np.all(got.floor_sq[far] >= cap_sq)


@st.composite
def window_problems(draw):  # type: ignore[no-untyped-def]
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    size = draw(st.sampled_from([8, 12, 16]))
    shift = draw(st.integers(0, 2))
    n = draw(st.integers(1, 40))
    q = draw(st.integers(1, 5))
    kind = draw(st.sampled_from(["uniform", "blocks", "offset", "duplicates"]))
    if kind == "blocks":
        ref = np.kron(rng.random((n, size // 4, size // 4)), np.ones((1, 4, 4)))
    elif kind == "offset":  # large constant, tiny texture: the prefix sums cancel
        ref = 1000.0 + rng.normal(0, 1e-3, (n, size, size))
    else:
        ref = rng.random((n, size, size))
    dtype = draw(st.sampled_from([np.float16, np.float32]))
    ref = ref.astype(dtype).astype(np.float32)
    noise = 0.0 if kind == "duplicates" else draw(st.sampled_from([0.0, 1e-4, 0.05, 0.5]))
    pick = rng.integers(0, n, q)
    cand = ref[pick] + rng.normal(0, noise, (q, size, size)).astype(np.float32)
    if draw(st.booleans()):
        cand = np.roll(cand, int(rng.integers(-shift, shift + 1)), axis=2)
    rotations = draw(st.sampled_from([(0.0,), (0.0, -4.0, 4.0)]))
    metric = ShiftFlipDistance(shift, mirror=draw(st.booleans()), rotations_deg=rotations)
    k = draw(st.integers(1, 3))
    capped = draw(st.sampled_from(["none", "median", "tiny"]))
    dims = draw(st.sampled_from([0, 2, 16]))  # projected first level: none, short, default
    return ref, cand.astype(np.float32), metric, k, capped, dims


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(window_problems())
def test_tile_search_equals_brute_force_on_random_windows(problem) -> None:  # type: ignore[no-untyped-def]
    ref, cand, metric, k, capped, dims = problem
    feats = metric.reference_features(ref)
    windows = metric.windows(cand)
    if not tile_sizes(*windows.shape):
        pytest.skip("no tile side for this window")
    index = TileIndex(feats, windows.shape, projection_dims=dims)
    assert (index.projection is not None) == (min(dims, (index.right[0].shape[0] - 3) // 2) >= 2)
    # A kept state gives the same index (the projection included).
    index = TileIndex.from_state(feats, index.state())
    want = brute_force_nearest(windows.variants(), feats, k=1)
    cap = {"none": math.inf, "median": float(np.median(want.sq[:, 0])) * 1.0001,
           "tiny": 1e-12}[capped]
    _check(index, windows, feats, k, cap)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([1.0, 1e3]), st.sampled_from([8, 12, 16]))
def test_safe_tile_bound_never_exceeds_the_exact_distance(seed: int, scale: float,
                                                          size: int) -> None:
    rng = np.random.default_rng(seed)
    base = rng.random((1, size, size)) * scale
    ref = (base + rng.normal(0, 1e-3 * scale, (30, size, size))).astype(np.float32)
    cand = (base + rng.normal(0, 1e-3 * scale, (3, size, size))).astype(np.float32)
    metric = ShiftFlipDistance(2, rotations_deg=(0.0, -3.0, 3.0))
    feats = metric.reference_features(ref)
    windows = metric.windows(cand)
    index = TileIndex(feats, windows.shape)
    exact = np.stack([
        ((windows.variants()[q].astype(np.float64)[:, None, :]
          - feats.astype(np.float64)[None]) ** 2).sum(-1) for q in range(3)
    ])
    for level, (a, delta) in enumerate(tile_statistics(windows, index.sizes)):
        bound = (_left(a, delta) @ index.right[level]).astype(np.float64)
        assert np.all(bound <= exact)
        if level == 0:  # the projected first level bounds the same pairs, more loosely
            assert index.projection is not None and index.right_projected is not None
            projected = _left(*index.projection(a, delta)) @ index.right_projected
            assert np.all(projected.astype(np.float64) <= exact)
            assert np.all(projected <= bound + 1e-3 * np.abs(bound).max())
    # And the bound is not vacuous: it is positive for pairs of clearly different windows.
    far = TileIndex(metric.reference_features(rng.random((5, size, size)).astype(np.float32)),
                    windows.shape)
    a, delta = tile_statistics(metric.windows(np.zeros((1, size, size), np.float32)),
                               far.sizes)[0]
    assert np.all(_left(a, delta)[0] @ far.right[0] > 0)


def test_the_tile_statistics_of_every_window_match_a_direct_computation() -> None:
    rng = np.random.default_rng(3)
    images = rng.random((2, 16, 16)).astype(np.float32)
    metric = ShiftFlipDistance(2, rotations_deg=(0.0, -5.0, 5.0))
    windows = metric.windows(images)
    assert windows.mirror_of == (-1, -1, -1, 0, 2, 1)  # mirrors' sums come from the originals
    variants = windows.variants().astype(np.float64).reshape(2, -1, 12, 12)
    for (a, _), b in zip(tile_statistics(windows, (6, 4, 3)), (6, 4, 3), strict=True):
        n = 12 // b
        tiles = variants.reshape(2, -1, n, b, n, b)
        s1 = tiles.sum(axis=(3, 5)).reshape(2, -1, n * n)
        rho = np.sqrt(((tiles - tiles.mean(axis=(3, 5), keepdims=True)) ** 2)
                      .sum(axis=(3, 5)).reshape(2, -1, n * n))
        np.testing.assert_allclose(a[..., : n * n], s1 / b, rtol=0, atol=1e-9)
        np.testing.assert_allclose(a[..., n * n :], rho, rtol=0, atol=1e-6)


def test_mirrored_sources_are_exact_mirrors_and_a_false_hint_is_not_trusted() -> None:
    rng = np.random.default_rng(4)
    images = rng.random((3, 16, 16)).astype(np.float32)
    metric = ShiftFlipDistance(2, rotations_deg=(0.0, -4.0, 4.0))
    windows = metric.windows(images)
    assert windows.mirror_of is not None
    for g, g0 in enumerate(windows.mirror_of):
        if g0 >= 0:
            assert np.array_equal(windows.sources[:, g], windows.sources[:, g0, :, ::-1])
    # Mirrored then rotated by a is the mirror of the rotation by -a (up to interpolation
    # rounding): the metric compares the same transforms as before.
    for (mirrored, angle, _, _), (g, _, _) in zip(metric.transforms(), windows.offsets,
                                                    strict=True):
        if mirrored and angle:
            direct = rotate_images(images[:, :, ::-1], angle)
            np.testing.assert_allclose(windows.sources[:, g], direct, atol=1e-5)
    sizes = (6, 4, 3)
    plain = Windows(windows.sources, windows.offsets, windows.shape)  # no hint: sum each
    for (a, delta), (a0, delta0) in zip(tile_statistics(windows, sizes),
                                        tile_statistics(plain, sizes), strict=True):
        np.testing.assert_allclose(a, a0, rtol=0, atol=1e-9)
        np.testing.assert_allclose(delta, delta0, rtol=1e-12)  # energy: another sum order
    # A hint that is not true (source 1 is no mirror of source 0), or of the wrong length, is
    # checked and ignored.
    for hint in ((-1, 0, *windows.mirror_of[2:]), (*windows.mirror_of, 0)):
        wrong = Windows(windows.sources, windows.offsets, windows.shape, hint)
        for (a, _), (a0, _) in zip(tile_statistics(wrong, sizes),
                                   tile_statistics(plain, sizes), strict=True):
            np.testing.assert_allclose(a, a0, rtol=0, atol=1e-9)


@pytest.mark.parametrize("metric", [PixelRMSE(), ContrastRMSE()])
def test_single_variant_metrics_search_exactly_too(metric) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(5)
    ref = rng.random((50, 16, 16)).astype(np.float32)
    cand = (ref[:6] + rng.normal(0, 0.05, (6, 16, 16))).astype(np.float32)
    feats = metric.reference_features(ref)
    index = TileIndex(feats, (16, 16))
    _check(index, metric.windows(cand), feats, 2, math.inf)


def test_tile_sizes_divide_the_window_and_go_coarse_to_fine() -> None:
    assert tile_sizes(56, 56) == (8, 4)
    assert tile_sizes(64, 64) == (8, 4)
    assert tile_sizes(120, 120) == (20, 8)
    assert tile_sizes(7, 7) == (7,)
    assert tile_sizes(13, 7) == ()
    for h in range(2, 130):
        for b in tile_sizes(h, h):
            assert h % b == 0 and (h // b) ** 2 <= 500


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(GuardError, match="do not match"):
        TileIndex(np.zeros((3, 10), np.float32), (4, 4))
    with pytest.raises(GuardError, match="empty"):
        TileIndex(np.zeros((0, 16), np.float32), (4, 4))
    with pytest.raises(GuardError, match="does not fit"):
        TileIndex(np.zeros((3, 16), np.float32), (4, 4), sizes=(3,))
    index = TileIndex(np.zeros((3, 16), np.float32), (4, 4))
    with pytest.raises(GuardError, match="do not match"):
        index.nearest(ShiftFlipDistance(1).windows(np.zeros((1, 8, 8), np.float32)))


def test_guard_decides_the_shift_metric_with_bounds_at_or_above_the_threshold() -> None:
    rng = np.random.default_rng(11)
    ref = np.kron(rng.random((40, 4, 4)), np.ones((1, 4, 4))).astype(np.float32)
    copies = np.roll(ref[:4], 1, axis=2)  # shifted copies: distance 0 under the shift metric
    fresh = np.kron(rng.random((6, 4, 4)), np.ones((1, 4, 4))).astype(np.float32)
    cand = np.concatenate([copies, fresh])
    metric = ShiftFlipDistance(2)
    feats = metric.reference_features(ref)
    truth = brute_force_nearest(metric.query_variants(cand), feats, k=2)
    scale = metric.scale((16, 16))
    d1 = np.sqrt(truth.sq[:, 0]) * scale
    thr = float(np.sort(d1)[5]) * 0.999  # some fresh images below, some above
    guard = Guard([metric], ref, {"shift_flip": thr}, workers=1)
    screening = guard.screen(cand)
    assert screening.bounded == ("shift_flip",)
    # Searching in threads (one BLAS thread each) decides and bounds exactly as one thread.
    for workers in (2, 3, 64):
        threaded = Guard([metric], ref, {"shift_flip": thr}, workers=workers).screen(cand)
        np.testing.assert_array_equal(threaded.accepted, screening.accepted)
        np.testing.assert_array_equal(threaded.distances["shift_flip"],
                                      screening.distances["shift_flip"])
        np.testing.assert_array_equal(threaded.nearest_row["shift_flip"],
                                      screening.nearest_row["shift_flip"])
    np.testing.assert_array_equal(screening.accepted, d1 >= thr)
    got = screening.distances["shift_flip"]
    below = d1 < thr
    assert below[:4].all()  # the shifted copies are caught
    np.testing.assert_array_equal(got[below], d1[below])  # exact where rejected
    assert np.all(got[~below] >= thr) and np.all(got[~below] <= d1[~below])  # proven bounds
    assert np.all(screening.nearest_row["shift_flip"][~below] == -1)
    # The uncapped search of the same guard gives the exact distances.
    np.testing.assert_array_equal(guard.nearest(metric, cand, k=2).sq, truth.sq)


@pytest.mark.parametrize("cap", [math.inf, 0.5])
def test_tile_search_over_several_reference_chunks_equals_brute_force(cap: float) -> None:
    # More than 1,024 references with a small block budget: the search runs chunk by chunk,
    # carrying each query's k best (and its limit) from one chunk to the next.
    rng = np.random.default_rng(21)
    ref = np.kron(rng.random((2600, 2, 2)), np.ones((1, 4, 4))).astype(np.float32)
    cand = (ref[rng.integers(0, 2600, 5)] + rng.normal(0, 0.05, (5, 8, 8))).astype(np.float32)
    metric = ShiftFlipDistance(1)
    feats = metric.reference_features(ref)
    windows = metric.windows(cand)
    index = TileIndex(feats, windows.shape)
    got = index.nearest(windows, k=2, cap_sq=cap, block_entries=1 << 10)
    want = brute_force_nearest(windows.variants(), feats, k=2)
    np.testing.assert_array_equal(got.sq, np.where(want.sq < cap, want.sq, np.inf))
    assert np.all(got.floor_sq <= want.sq[:, 0])


@pytest.mark.parametrize("cap", [math.inf, 0.5])
def test_tile_search_in_several_blocks_of_query_statistics_equals_brute_force(
    cap: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The tile statistics of the queries are computed a block at a time (and the GEMMs on
    # fewer queries at once): with blocks of 3 and 7 queries over 20, every value is the
    # same as in one block, and equal to brute force.
    import privacy.tiles as tiles

    rng = np.random.default_rng(22)
    ref = rng.random((300, 12, 12)).astype(np.float32)
    cand = (ref[rng.integers(0, 300, 20)] + rng.normal(0, 0.03, (20, 12, 12))).astype(np.float32)
    metric = ShiftFlipDistance(2)
    feats = metric.reference_features(ref)
    windows = metric.windows(cand)
    index = TileIndex(feats, windows.shape)
    monkeypatch.setattr(tiles, "_STATS_QUERIES", 20)  # one block of all 20
    whole = index.nearest(windows, k=2, cap_sq=cap)
    want = brute_force_nearest(windows.variants(), feats, k=2)
    np.testing.assert_array_equal(whole.sq, np.where(want.sq < cap, want.sq, np.inf))
    for block in (3, 7):
        monkeypatch.setattr(tiles, "_STATS_QUERIES", block)
        got = index.nearest(windows, k=2, cap_sq=cap, block_entries=1 << 10)
        np.testing.assert_array_equal(got.sq, whole.sq)
        np.testing.assert_array_equal(got.index, whole.index)
        np.testing.assert_array_equal(got.floor_sq, whole.floor_sq)


def test_guard_workers_default_to_the_blas_threads_and_refuse_zero() -> None:
    from privacy.guard import blas_threads

    ref = np.random.default_rng(0).random((5, 16, 16)).astype(np.float32)
    metric = ShiftFlipDistance(2)
    assert Guard([metric], ref, {"shift_flip": 0.1}).workers == blas_threads() >= 1
    with pytest.raises(GuardError, match="workers"):
        Guard([metric], ref, {"shift_flip": 0.1}, workers=0)
