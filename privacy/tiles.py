"""Exact nearest-neighbour search over image windows, pruned by tile statistics.

The shift / mirror / rotation metric compares every real slice with hundreds of variants of
each candidate (486 by default: 81 shifts x mirror x 3 rotations). :class:`privacy.search.
ExactIndex` projects every variant on principal axes and bounds every (variant, reference)
pair with a 272-term GEMM: about 1.5 million bounds per candidate against 3,000 slices, which
costs a third of a sampling step. This index bounds the same pairs far more cheaply, because
each variant is a *window of a source image* (:class:`privacy.metrics.Windows`): the bound's
coordinates of all windows come from two prefix sums per source, and a coarse-to-fine cascade
of bounds leaves the fine levels, the float32 filter and the exact float64 distances to a few
pairs.

**The bound.** Split an ``h x w`` window into square tiles of side ``b`` (``b`` divides ``h``
and ``w``; ``n = b^2`` pixels each). For a window ``x`` let ``S1_j``, ``S2_j`` be the sum and the
sum of squares of tile ``j``, and the tile-statistics vector::

    A(x) = [S1_1 / b, ..., S1_m / b,  rho_1, ..., rho_m],   rho_j = sqrt(S2_j - S1_j^2 / n)

(``S1_j / b`` is the coordinate of ``x`` on the unit vector of tile ``j``; ``rho_j`` the norm
of the rest of ``x`` on that tile). The unit tile vectors are orthonormal, so by the argument
of :mod:`privacy.search` (Pythagoras, then the reverse triangle inequality on each tile's
remainder) ``|A(v) - A(r)| <= |v - r|`` for every pair. Tile sides from coarse to fine give a
cascade: a pair is dropped as soon as one level proves it no closer than the current limit.

**Cheap for windows.** With float64 prefix sums ``P1``, ``P2`` of a source and of its square,
every ``S1_j``, ``S2_j`` of every window is four lookups (box sums), so the statistics of all
486 variants cost about as much as one pass over the candidate.

**Floating point.** The statistics are computed in float64 from float32 (or float16) inputs,
exact in float64. For a source of ``H x W`` pixels with total energy ``E = sum x^2`` and
``kappa = (4 (H + W) + b^2 + 8) u`` (``u = 2^-53``), the two cumulative sums and the four-term
box sum (or, for a source that is its own window, a direct sum of ``b^2`` terms) give ``S2`` to
within ``e2 = kappa E`` and ``S1`` to within ``e1 = kappa sqrt(H W E)`` (Higham, 4.2).
Since ``|S1_j| <= b sqrt(E)``, ``rho_j^2`` is off by at most
``e2 + 2 sqrt(E) e1 / b + e1^2 / b^2 + 6 u E``, hence ``rho_j`` by the square root of that,
and the coordinate ``S1_j / b`` by ``e1 / b + u sqrt(E)``; over the ``m`` tiles the computed
vector ``a(x)`` is within ``delta(x)`` (:func:`_delta`, doubled for margin) of ``A(x)``.
Then ``|v - r| >= L - D`` with ``L = |a(v) - a(r)|``, ``D = delta(v) + delta(r)``, so
``|v - r|^2 >= L^2 - 2 D (|a(v)| + |a(r)|)`` (also when ``L < D``: then the right side is
negative). ``L^2`` is evaluated as one float32 GEMM of augmented rows over ``d + 4 <= 1028``
terms (``d = 2 m``), with the slack folded in::

    [a(v), beta_v, 1, |a(v)|^2 - beta_v^2] . [-2 a(r), -2 beta_r, |a(r)|^2 - beta_r^2, 1]
        = L^2 - (beta_v + beta_r)^2,     beta_x = sqrt(EPS) |a(x)| + delta(x) / sqrt(EPS)

with ``EPS = 2e-4``. The GEMM (and the rounding of its inputs to float32) errs by at most
``c ((|a(v)| + |a(r)|)^2 + (beta_v + beta_r)^2)``, ``c = gamma32_1028 + 2^-23 < 6.3e-5``;
``(beta_v + beta_r)^2 = EPS A^2 + 2 A D + D^2 / EPS`` with ``A = |a(v)| + |a(r)|`` exceeds
that error plus ``2 A D`` (the quadratic ``(EPS (1 - c) - c) A^2 - 2 c A D + (1 - c) D^2 / EPS``
has a negative discriminant), so the computed value never exceeds ``|v - r|^2``. Property
tests compare every result with brute force (``tests/test_privacy_tiles.py``).

**Projected first level.** Most references are far from every variant, and the first
level's GEMM over ``d + 3`` terms for every (variant, reference) pair was half of the search.
With ``P`` the ``d x p`` principal axes of the references' first-level vectors (float64,
orthonormalised; ``eta`` bounds ``|P^T P - I|_2``) the index first bounds every pair by the
``p + 1``-vector ``b(x) = [P^T a(x), |a(x) - P P^T a(x)|]``. For an exactly orthonormal ``Q``
the map ``b_Q`` is a contraction (Pythagoras and the reverse triangle inequality again);
``P = Q S`` with ``|S - I| <= eta`` moves each part of ``b`` by at most ``eta |a|``, so
``|b_P - b_Q| <= 2 eta |a|``; the float64 products and norms that compute ``b`` err by less
than ``16 (d + p) (p + 1) u |a|``. So ``|b(v) - b(r)| <= |v - r| + D_b`` with
``delta_b(x) = delta(x) + (4 eta + 16 (d + p) (p + 1) u) |a(x)|``, and the same augmented
GEMM (now over ``p + 4`` terms) gives a safe bound. Only references with a pair below the
limit get the full first level, then the cascade.

**The search.** Per block of queries and chunk of references: the coarsest level for every
(variant, reference) pair; the limit ``U`` is the query's current k-th best exact distance
(seeded, when no cap is given, by exact distances of the few references of smallest bound),
or the ``cap``. Finer levels run only on references with a surviving pair; what survives the
finest level gets its proven float32 GEMM interval (:func:`privacy.search.gemm_interval`), and
the pairs it cannot decide their exact float64 distances (the formula brute force uses).
With ``cap``, the search answers "the k nearest references closer than ``cap``": references
at or beyond it are proven so and reported as ``inf`` / ``-1``, which is all a threshold
decision needs and prunes far more.

What this module must never do: skip a pair without a proven bound, or read files.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from privacy.errors import GuardError
from privacy.metrics import Windows
from privacy.search import (
    EPS_SQ,
    Fetch,
    Nearest,
    TopK,
    as_feature_matrix,
    evaluate_query_pairs,
    exact_sq_norms,
    gemm_interval,
    kept_sq_norms,
    spot_rows,
)

__all__ = [
    "TileIndex", "tile_sizes", "tile_statistics", "MAX_TILES", "TILES_VERSION", "PROJECTION_DIMS",
]

MAX_TILES = 500  # tiles per level: keeps the GEMM at d + 4 <= 1004 terms
PROJECTION_DIMS = 16  # principal axes of the projected first level (0: none)
_U64 = 2.0**-53
_SEED_REFS = 8
_STATS_QUERIES = 16  # queries whose tile statistics are computed together, at most
_STATS_ENTRIES = 1 << 21  # source pixels of those queries, at most (float64 sums of each)
TILES_VERSION = 3  # of TileIndex.state (3: the rows' squared norms kept)


def tile_sizes(h: int, w: int, per_side: tuple[int, ...] = (7, 14)) -> tuple[int, ...]:
    """Tile sides for an ``h x w`` window, coarse to fine: for each wanted number of tiles
    per side, the common divisor of ``h`` and ``w`` (at least 2) nearest ``h / n``, with at
    most :data:`MAX_TILES` tiles. Empty when ``h`` and ``w`` share no divisor above 1."""
    divisors = [d for d in range(2, min(h, w) + 1) if h % d == 0 and w % d == 0]
    divisors = [d for d in divisors if (h // d) * (w // d) <= MAX_TILES]
    out: list[int] = []
    for n in per_side:
        if not divisors:
            break
        best = min(divisors, key=lambda d: (abs(h / d - n), -d))
        if best not in out:
            out.append(best)
    return tuple(sorted(out, reverse=True))


def _prefix(sources: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 prefix sums of ``sources`` [..., H, W] and of their squares, zero-padded.

    The same sums as ``cumsum`` down the rows then along them (sequential adds in that
    order), with the row pass as one vectorised add per row: numpy's cumsum across rows of
    a large array is several times slower."""
    x = np.asarray(sources, dtype=np.float64)
    shape = (*x.shape[:-2], x.shape[-2] + 1, x.shape[-1] + 1)
    p1 = np.zeros(shape)
    p2 = np.zeros(shape)
    np.multiply(x, x, out=p2[..., 1:, 1:])
    p1[..., 1:, 1:] = x
    for p in (p1, p2):
        for i in range(2, shape[-2]):
            np.add(p[..., i, 1:], p[..., i - 1, 1:], out=p[..., i, 1:])
        np.cumsum(p[..., 1:, 1:], axis=-1, out=p[..., 1:, 1:])
    return p1, p2


def _box(p: np.ndarray, b: int) -> np.ndarray:
    """Sums of every ``b x b`` box of the image whose prefix sums are ``p``: [..., H-b+1, W-b+1]."""
    out: np.ndarray = p[..., b:, b:] - p[..., :-b, b:] - p[..., b:, :-b] + p[..., :-b, :-b]
    return out


def _delta(energy: np.ndarray, h: int, w: int, b: int, m: int) -> np.ndarray:
    """Bound on ``|a(x) - A(x)|`` for windows of a source of ``h x w`` pixels and energy E
    (module docstring, "Floating point"), doubled for margin."""
    e = np.maximum(np.asarray(energy, dtype=np.float64), 0.0)
    kappa = (4.0 * (h + w) + b * b + 8.0) * _U64
    e1 = kappa * np.sqrt(h * w * e)
    e2 = kappa * e
    rho = e2 + 2.0 * np.sqrt(e) * e1 / b + (e1 / b) ** 2 + 6.0 * _U64 * e
    coord = e1 / b + _U64 * np.sqrt(e)
    out: np.ndarray = 2.0 * np.sqrt(m * (coord**2 + rho)) + 1e-300
    return out


def tile_statistics(
    windows: Windows, sizes: tuple[int, ...]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per tile side: (a [Q, T, 2m] float64 tile-statistics vectors of every variant,
    delta [Q, T] the bound on their error)."""
    sources, offsets = windows.sources, windows.offsets
    h, w = windows.shape
    q, g, hs, ws = sources.shape
    t = offsets.shape[0]
    if (hs, ws) == (h, w) and t == 1:  # each source is its one window: sum tiles directly
        x = np.asarray(sources[:, 0], dtype=np.float64)
        x2 = x * x
        energy = np.einsum("qij->q", x2)[:, None]
        out = []
        for b in sizes:
            ny, nx = h // b, w // b
            s1 = x.reshape(q, ny, b, nx, b).sum(axis=(2, 4)).reshape(q, 1, ny * nx)
            s2 = x2.reshape(q, ny, b, nx, b).sum(axis=(2, 4)).reshape(q, 1, ny * nx)
            out.append(_finish(s1, s2, b, _delta(energy, hs, ws, b, ny * nx)))
        return out
    block = _BlockStats(windows, sizes)
    return [block.stats(level, slice(None), slice(None)) for level in range(len(sizes))]


def _finish(
    s1: np.ndarray, s2: np.ndarray, b: int, delta: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(a, delta) from the tile sums ``s1`` and sums of squares ``s2`` [Q, T, m]. ``s2`` is
    overwritten: the arrays here are large, and each fresh one costs page faults."""
    m = s1.shape[-1]
    a = np.empty((*s1.shape[:-1], 2 * m))
    square = np.multiply(s1, s1, out=a[..., m:])
    square /= float(b * b)
    rho2 = s2
    rho2 -= square  # s2 - s1 * s1 / n, as before
    np.maximum(rho2, 0.0, out=rho2)
    np.sqrt(rho2, out=a[..., m:])
    np.divide(s1, float(b), out=a[..., :m])
    return a, delta


def _left(a: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """float32 rows ``[a, beta, 1, |a|^2 - beta^2]`` (module docstring)."""
    norm2 = np.einsum("...i,...i->...", a, a)
    beta = math.sqrt(EPS_SQ) * np.sqrt(norm2) + delta / math.sqrt(EPS_SQ)
    out = np.empty((*a.shape[:-1], a.shape[-1] + 3), dtype=np.float32)
    out[..., :-3] = a
    out[..., -3] = beta
    out[..., -2] = 1.0
    out[..., -1] = norm2 - beta * beta
    return out


def _right(a: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """float32 columns ``[-2 a, -2 beta, |a|^2 - beta^2, 1]`` as a [d + 3, N] matrix."""
    norm2 = np.einsum("ij,ij->i", a, a)
    beta = math.sqrt(EPS_SQ) * np.sqrt(norm2) + delta / math.sqrt(EPS_SQ)
    out = np.empty((a.shape[1] + 3, a.shape[0]), dtype=np.float32)
    out[:-3] = -2.0 * a.T
    out[-3] = -2.0 * beta
    out[-2] = norm2 - beta * beta
    out[-1] = 1.0
    return out


def _prune(lb: np.ndarray, limit: float) -> tuple[float, np.ndarray]:
    """Per reference (column of ``lb`` [T, N]): whether a variant's bound is below ``limit``
    (rounded up to float32), and the least bound of the references that are not."""
    bound32 = np.nextafter(np.float32(limit), np.float32(np.inf))
    per_ref = lb.min(axis=0)
    live = per_ref < bound32
    low = float(per_ref[~live].min()) if not live.all() else math.inf
    return low, live


class _Projection:
    """``b(x) = [P^T a, |a - P P^T a|]`` and its error bound (module docstring, "Projected
    first level")."""

    def __init__(self, axes: np.ndarray) -> None:
        self.axes = np.ascontiguousarray(axes, dtype=np.float64)
        d, dims = self.axes.shape
        gap = self.axes.T @ self.axes - np.eye(dims)
        eta = float(np.sqrt(np.sum(gap * gap))) + 4.0 * d * dims * _U64
        self.slack = 4.0 * eta + 16.0 * (d + dims) * (dims + 1) * _U64

    @classmethod
    def fit(cls, a: np.ndarray, dims: int) -> _Projection:
        """The ``dims`` principal axes of the rows of ``a`` [N, d] (float64)."""
        centred = a - a.mean(axis=0)
        _, vectors = np.linalg.eigh(centred.T @ centred)
        axes, _ = np.linalg.qr(vectors[:, ::-1][:, :dims])
        return cls(axes)

    def __call__(self, a: np.ndarray, delta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(b [..., dims + 1], delta_b) of first-level vectors ``a`` [..., d] and ``delta``."""
        flat = a.reshape(-1, a.shape[-1])  # one GEMM, not one per leading index
        dims = self.axes.shape[1]
        out = np.empty((flat.shape[0], dims + 1))
        coords = np.matmul(flat, self.axes, out=out[:, :dims])
        rest = coords @ self.axes.T
        np.subtract(flat, rest, out=rest)
        out[:, dims] = np.sqrt(np.einsum("ij,ij->i", rest, rest))
        norm = np.sqrt(np.einsum("ij,ij->i", flat, flat)).reshape(a.shape[:-1])
        return out.reshape(*a.shape[:-1], dims + 1), delta + self.slack * norm


class _BlockStats:
    """Box sums of a block of queries' sources, turned into GEMM rows on demand.

    Level 0 needs every variant; the finer levels only the variants that still have a live
    pair, so their statistics are gathered per query and per variant when asked for.
    """

    def __init__(self, windows: Windows, sizes: tuple[int, ...]) -> None:
        sources, offsets = windows.sources, windows.offsets
        h, w = windows.shape
        q, g_all, hs, ws = sources.shape
        # Sources that are the exact mirror of another (checked here, whatever the hint says)
        # are not summed: a box of a mirror is the mirrored box of its original, the same
        # pixels summed by the same four-term formula over the same source energy, so the
        # error bound of the module docstring holds unchanged.
        origin = np.arange(g_all)
        hint = windows.mirror_of if windows.mirror_of is not None else ()
        for g, g0 in enumerate(hint if len(hint) == g_all else ()):
            if (0 <= g0 < g_all and g0 != g and hint[g0] < 0
                    and np.array_equal(sources[:, g], sources[:, g0, :, ::-1])):
                origin[g] = g0
        own = np.flatnonzero(origin == np.arange(g_all))
        compact = np.zeros(g_all, dtype=np.int64)
        compact[own] = np.arange(own.size)
        mirrored = origin != np.arange(g_all)
        p1, p2 = _prefix(sources[:, own] if own.size < g_all else sources)
        energy = p2[:, :, -1, -1][:, compact[origin]]  # [Q, G]
        self.sizes = sizes
        self.sums: list[tuple[np.ndarray, np.ndarray]] = []
        self.flat: list[np.ndarray] = []  # per level: [T, m] positions in the box sums
        self.delta: list[np.ndarray] = []  # per level: [Q, T]
        group = offsets[:, 0]
        for b in sizes:
            ny, nx = h // b, w // b
            hb, wb = hs - b + 1, ws - b + 1
            self.sums.append((_box(p1, b).reshape(q, -1), _box(p2, b).reshape(q, -1)))
            iy = offsets[:, 1, None, None] + b * np.arange(ny)[None, :, None]
            ix = offsets[:, 2, None, None] + b * np.arange(nx)[None, None, :]
            ix = np.where(mirrored[group][:, None, None], wb - 1 - ix, ix)
            self.flat.append((compact[origin[group]][:, None, None] * (hb * wb) + iy * wb + ix)
                             .reshape(offsets.shape[0], ny * nx))
            self.delta.append(_delta(energy, hs, ws, b, ny * nx)[:, group])

    def stats(self, level: int, rows: np.ndarray | slice, ts: np.ndarray | slice
              ) -> tuple[np.ndarray, np.ndarray]:
        """(a [len(rows), len(ts), 2m], delta) of queries ``rows`` and variants ``ts``."""
        b1, b2 = self.sums[level]
        idx = self.flat[level][ts]
        s1 = b1[rows][:, idx]
        s2 = b2[rows][:, idx]
        return _finish(s1, s2, self.sizes[level], self.delta[level][rows][:, ts])

    def left(self, level: int, rows: np.ndarray | slice, ts: np.ndarray | slice) -> np.ndarray:
        return _left(*self.stats(level, rows, ts))


class TileIndex:
    """Reference windows [N, h * w] plus their tile statistics; exact k-NN of window queries.

    ``sizes``: tile sides, coarse to fine (default :func:`tile_sizes`); each must divide both
    window sides and give at most :data:`MAX_TILES` tiles.
    """

    def __init__(
        self,
        features: np.ndarray,
        shape: tuple[int, int],
        sizes: tuple[int, ...] | None = None,
        chunk_rows: int = 256,
        projection_dims: int = PROJECTION_DIMS,
    ) -> None:
        feats, sizes = self._setup(features, shape, sizes, chunk_rows)
        self.sq_norms = exact_sq_norms(feats)
        n, (h, w) = self.n, self.shape
        self.right = [np.empty((2 * (h // b) * (w // b) + 3, n), dtype=np.float32) for b in sizes]
        d0 = self.right[0].shape[0] - 3
        dims = min(int(projection_dims), d0 // 2)
        #: The projected first level (module docstring), or None where the first level is
        #: already short; ``right_projected`` holds its GEMM columns.
        self.projection: _Projection | None = None
        if dims >= 2:
            sample = np.unique(np.linspace(0, n - 1, min(n, 8192)).astype(np.int64))
            self.projection = _Projection.fit(self._statistics(sample)[0][0], dims)
        self.right_projected = (
            np.empty((dims + 4, n), dtype=np.float32) if self.projection is not None else None
        )
        for start in range(0, n, chunk_rows):
            stop = min(n, start + chunk_rows)
            for level, block in self._right_columns(np.arange(start, stop)).items():
                if level < 0:
                    assert self.right_projected is not None
                    self.right_projected[:, start:stop] = block
                else:
                    self.right[level][:, start:stop] = block

    def _setup(
        self, features: np.ndarray, shape: tuple[int, int], sizes: tuple[int, ...] | None,
        chunk_rows: int,
    ) -> tuple[np.ndarray, tuple[int, ...]]:
        """Check and keep the features (their squared norms are set by the caller)."""
        feats = as_feature_matrix(features, "reference")
        n, f = feats.shape
        h, w = int(shape[0]), int(shape[1])
        if n == 0:
            raise GuardError("the reference is empty", "reference", 2)
        if h * w != f:
            raise GuardError(f"windows of {h}x{w} do not match {f} features", "reference", 2)
        self.sizes = tuple(int(b) for b in sizes) if sizes is not None else tile_sizes(h, w)
        if not self.sizes:
            raise GuardError(f"no tile side divides a {h}x{w} window", "reference", 2)
        for b in self.sizes:
            if b < 1 or h % b or w % b or (h // b) * (w // b) > MAX_TILES:
                raise GuardError(f"tile side {b} does not fit a {h}x{w} window", "reference", 2)
        self.features, self.n, self.dim, self.shape = feats, n, f, (h, w)
        self.chunk_rows = chunk_rows
        return feats, self.sizes

    def _statistics(self, rows: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        h, w = self.shape
        zero = np.zeros((1, 3), dtype=np.int64)
        win = Windows(self.features[rows].reshape(rows.size, 1, h, w), zero, (h, w))
        return [(a[:, 0], delta[:, 0]) for a, delta in tile_statistics(win, self.sizes)]

    def _right_columns(self, rows: np.ndarray) -> dict[int, np.ndarray]:
        """Per level, the GEMM columns [2m + 3, len(rows)] of the references ``rows``; level
        -1 is the projected first level, where there is one."""
        stats = self._statistics(rows)
        out = {level: _right(a, delta) for level, (a, delta) in enumerate(stats)}
        if self.projection is not None:
            out[-1] = _right(*self.projection(*stats[0]))
        return out

    def state(self) -> dict[str, np.ndarray]:
        """The costly part of building the index (its GEMM columns), for a cache kept by the
        caller; :meth:`from_state` rebuilds the index from the same features and this."""
        out = {"version": np.array(TILES_VERSION), "shape": np.array([self.n, *self.shape]),
               "sizes": np.array(self.sizes, dtype=np.int64), "sq_norms": self.sq_norms}
        out.update({f"right{level}": r for level, r in enumerate(self.right)})
        if self.projection is not None and self.right_projected is not None:
            out["axes"] = self.projection.axes
            out["right_projected"] = self.right_projected
        return out

    @classmethod
    def from_state(cls, features: np.ndarray, state: dict[str, np.ndarray],
                   chunk_rows: int = 256) -> TileIndex:
        """The index of ``features`` from :meth:`state` of an index built on the same ones.

        The caller keys the state by a digest of the features; this checks the version,
        shapes and finite values, and recomputes the columns and squared norms of 16
        references spread over the reference, refusing the state when any of them differs by
        more than rounding.
        """

        def bad(why: str) -> GuardError:
            return GuardError(f"kept tile index refused: {why}", "reference", 1)

        if int(state["version"]) != TILES_VERSION:
            raise bad(f"version {int(state['version'])}, this code writes {TILES_VERSION}")
        n, h, w = (int(v) for v in state["shape"])
        index = cls.__new__(cls)
        index._setup(features, (h, w), tuple(int(b) for b in state["sizes"]), chunk_rows)
        if index.n != n:
            raise bad(f"built for {n} references, the reference has {index.n}")
        try:
            # A pass over the whole reference in float64 otherwise (20 ms at 3,064 slices of
            # 64x64, half of loading a kept index).
            index.sq_norms = kept_sq_norms(index.features, state["sq_norms"])
        except GuardError as exc:
            raise bad(exc.what) from None
        index.right = []
        for level, b in enumerate(index.sizes):
            right = np.asarray(state[f"right{level}"])
            if right.dtype != np.float32 or right.shape != (2 * (h // b) * (w // b) + 3, n):
                raise bad(f"level {level} has shape {right.shape}")
            if not np.all(np.isfinite(right)):
                raise bad(f"level {level} holds non-finite values")
            index.right.append(right)
        index.projection, index.right_projected = None, None
        if "axes" in state:
            axes = np.asarray(state["axes"], dtype=np.float64)
            proj = np.asarray(state["right_projected"])
            d0 = index.right[0].shape[0] - 3
            if axes.ndim != 2 or axes.shape[0] != d0 or not 2 <= axes.shape[1] <= d0:
                raise bad(f"projection axes of shape {axes.shape}")
            if proj.dtype != np.float32 or proj.shape != (axes.shape[1] + 4, n):
                raise bad(f"projected level has shape {proj.shape}")
            if not (np.all(np.isfinite(axes)) and np.all(np.isfinite(proj))):
                raise bad("the projected level holds non-finite values")
            index.projection, index.right_projected = _Projection(axes), proj
        rows = spot_rows(n)
        for level, cols in index._right_columns(rows).items():
            kept = index.right_projected if level < 0 else index.right[level]
            assert kept is not None
            # BLAS may round a product of 16 rows differently from one of a whole chunk (the
            # projection's ``a @ axes``), within the order-free error bound the proof uses; a
            # state of other features differs by far more than this.
            scale = 1.0 + float(np.max(np.abs(cols)))
            if not np.allclose(cols, kept[:, rows], rtol=1e-5, atol=1e-6 * scale):
                raise bad("it was built on other features")
        return index

    def nearest(
        self,
        windows: Windows,
        k: int = 1,
        cap_sq: float = math.inf,
        block_entries: int = 1 << 21,
    ) -> Nearest:
        """Exact k nearest distinct references of each query (minimum over its variants).

        With a finite ``cap_sq`` only references at squared distance below it are searched
        for: rows of ``sq`` at or above the cap are reported as ``inf`` (index -1), and
        ``floor_sq`` holds, for every query, a proven lower bound on its nearest squared
        distance: at or above the cap whenever no reference is closer than the cap.
        """
        if tuple(windows.shape) != self.shape:
            raise GuardError(
                f"query windows of {windows.shape} do not match the reference {self.shape}",
                "queries",
                2,
            )
        q, t = windows.sources.shape[0], windows.offsets.shape[0]
        k = max(1, min(k, self.n))
        top = TopK(q, k)
        evaluated = np.zeros(q, dtype=np.int64)
        floor = np.full(q, np.inf)

        def fetch(qi: int, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            vec = windows.variant(qi, ts)
            v64 = vec.astype(np.float64)
            return vec, np.einsum("ij,ij->i", v64, v64)

        n_chunk = int(min(self.n, max(1024, block_entries // t)))
        q_block = max(1, block_entries // (t * n_chunk))
        # The tile statistics of a block of queries come from one set of numpy calls (query
        # by query they were a third of the search); the GEMMs then run on ``q_block`` of
        # them at a time. Statistics are per query, so the split changes no value.
        per_query = int(np.prod(windows.sources.shape[1:]))  # source pixels of one query
        s_block = max(q_block, min(_STATS_QUERIES, q, _STATS_ENTRIES // per_query))
        for s0 in range(0, q, s_block):
            s1 = min(q, s0 + s_block)
            part = _BlockStats(dataclasses.replace(windows, sources=windows.sources[s0:s1]),
                               self.sizes)
            a0, delta0 = part.stats(0, slice(None), slice(None))
            left0 = _left(a0, delta0)
            if self.projection is not None:
                assert self.right_projected is not None
                first, first_right = _left(*self.projection(a0, delta0)), self.right_projected
            else:
                first, first_right = left0, self.right[0]
            for q0 in range(0, s1 - s0, q_block):
                q1 = min(s1 - s0, q0 + q_block)
                for n0 in range(0, self.n, n_chunk):
                    n1 = min(self.n, n0 + n_chunk)
                    lb_first = (
                        first[q0:q1].reshape((q1 - q0) * t, -1) @ first_right[:, n0:n1]
                    ).reshape(q1 - q0, t, n1 - n0)
                    for j in range(q0, q1):
                        qi = s0 + j
                        lb = lb_first[j - q0]
                        if not math.isfinite(cap_sq):
                            self._seed(lb, qi, n0, fetch, top, evaluated)
                        limit = min(float(top.sq[qi, k - 1]), cap_sq)
                        cols = np.arange(n0, n1)
                        if first is not left0:  # the full first level on the references left
                            low, live = _prune(lb, limit)
                            floor[qi] = min(floor[qi], low)
                            cols = cols[live]
                            if cols.size == 0:
                                continue
                            lb = left0[j] @ self.right[0][:, cols]
                        low = self._cascade(lb, cols, part, j, qi, limit, fetch, top, evaluated)
                        floor[qi] = min(floor[qi], low)
        np.minimum(floor, top.sq[:, 0], out=floor)
        if math.isfinite(cap_sq):
            over = top.sq >= cap_sq
            top.sq[over] = np.inf
            top.index[over] = -1
            top.variant[over] = -1
        return Nearest(sq=top.sq, index=top.index, variant=top.variant[:, 0],
                       evaluated=evaluated, floor_sq=floor)

    def _seed(
        self, lb: np.ndarray, qi: int, n0: int, fetch: Fetch, top: TopK, evaluated: np.ndarray
    ) -> None:
        """Exact distances of the few references of smallest bound, at their best variant."""
        best_t = lb.argmin(axis=0)
        best = lb[best_t, np.arange(lb.shape[1])]
        m = min(lb.shape[1], max(_SEED_REFS, 2 * top.k))
        rs = np.argpartition(best, m - 1)[:m]
        evaluate_query_pairs(self.features, fetch, top, evaluated, qi, best_t[rs], rs + n0)

    def _cascade(
        self,
        lb: np.ndarray,
        cols: np.ndarray,
        part: _BlockStats,
        j: int,
        qi: int,
        limit: float,
        fetch: Fetch,
        top: TopK,
        evaluated: np.ndarray,
    ) -> float:
        """Finer levels on the references with a surviving pair, then the exact refinement.

        ``lb`` holds the first level's bounds [T, len(cols)] of the references ``cols``.
        Returns a lower bound on the squared distance of every pair that was not evaluated
        exactly (the evaluated ones are in ``top``).
        """
        low, live = _prune(lb, limit)
        refs = np.flatnonzero(live)
        if refs.size == 0:
            return low
        best = lb[:, refs].astype(np.float64)
        alive = best < limit
        for level in range(1, len(self.sizes)):
            rows = np.flatnonzero(alive.any(axis=1))  # variants with a live pair
            left = part.left(level, slice(j, j + 1), rows)[0]
            lbj = (left @ self.right[level][:, cols[refs]]).astype(np.float64)
            best[rows] = np.maximum(best[rows], lbj)
            alive &= best < limit
            keep = alive.any(axis=0)
            if not keep.all():
                low = min(low, float(best[:, ~keep].min()))
            refs, best, alive = refs[keep], best[:, keep], alive[:, keep]
            if refs.size == 0:
                return low
        rows_alive = alive.any(axis=1)
        if not rows_alive.all():
            low = min(low, float(best[~rows_alive].min()))
        ts = np.flatnonzero(rows_alive)
        alive, best = alive[ts], best[ts]
        vectors, vsq = fetch(qi, ts)
        rows = cols[refs]
        lo, hi = gemm_interval(
            np.asarray(vectors, dtype=np.float32)
            @ np.asarray(self.features[rows], dtype=np.float32).T,
            vsq, self.sq_norms[rows], self.dim,
        )
        np.maximum(lo, best, out=lo)
        lo_all = lo.copy()
        lo[~alive] = np.inf
        hi[~alive] = np.inf
        # Upper bound on the true k-th best: the k best so far (exact) and the best upper end
        # of every other surviving reference, each reference counted once.
        others = hi.min(axis=0)[~np.isin(rows, top.index[qi])]
        pool = np.concatenate([top.sq[qi], others])
        limit = min(limit, float(np.partition(pool, top.k - 1)[top.k - 1]))
        picked = lo <= limit
        low = min(low, float(np.where(picked, np.inf, lo_all).min()))
        ct, cr = np.nonzero(picked)
        if ct.size:
            evaluate_query_pairs(self.features, fetch, top, evaluated, qi, ts[ct], rows[cr])
        return low
