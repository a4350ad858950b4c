"""Exact nearest-neighbour search that prunes only by proven lower bounds.

Invariant 4 of the architecture: an accepted image's *exact* nearest-neighbour distance is at
or above the threshold under every metric. This module computes that distance exactly while
touching as few reference rows as it can; BLAS does the heavy lifting, but a reference is
skipped only when a lower bound, made conservative against floating-point error, proves it
cannot be (one of) the nearest.

**What "exact" means.** The distance of a query variant ``v`` to a reference row ``r`` is the
float64 sum of squared float64 differences of the stored values (:func:`exact_sq_distances`;
float16 / float32 inputs are exactly representable in float64), each row reduced on its own.
Brute force (:func:`brute_force_nearest`) and the index use that one formula, so they agree
bit for bit; no decision ever rests on a GEMM expansion ``|a|^2 + |b|^2 - 2ab``.

**The lower bound.** Let ``mu`` be a mean vector and ``P`` (k x F) a matrix with orthonormal
rows (principal axes of a sample of the reference; the bound holds for *any* orthonormal
``P``, so the sample only changes speed, never results). Split the coordinates into disjoint
blocks ``B_1 .. B_m`` (contiguous runs of the feature vector: bands of image rows). For
``x = v - mu`` write ``p(x) = P x``, ``e(x) = x - P^T P x`` with ``e_j(x)`` its restriction to
block ``j``, and the augmented vector ``a(x) = [p(x), |e_1(x)|, ..., |e_m(x)|]``. Then for
every pair::

    |v - r|^2 = |P(v - r)|^2 + |e(v) - e(r)|^2             (Pythagoras: P^T P is an orthogonal
                                                             projector and e(.) its complement)
              = |p(v) - p(r)|^2 + sum_j |e_j(v) - e_j(r)|^2  (the blocks partition coordinates)
             >= |p(v) - p(r)|^2 + sum_j (|e_j(v)| - |e_j(r)|)^2   (reverse triangle inequality)
              = |a(v) - a(r)|^2 =: LB^2.

With ``k = 0`` and one block this is the norm bound ``| |v-mu| - |r-mu| | <= |v - r|``; with
``P = I`` (used when F <= k) it is the distance itself. ``P`` comes in one of two layouts:

- *global axes*: ``k`` principal axes of the whole vector (the tightest bound for a given
  ``k`` on whole images; projecting costs ``2 F k`` products per vector);
- *block-local axes*: ``P`` block-diagonal over the blocks, ``k / m`` principal axes of each
  block (``P_j``, orthonormal rows, so ``P`` has orthonormal rows too and the bound above holds
  unchanged). Projecting costs ``2 F k / m``, so it pays where each query brings hundreds of
  variants (the shift / mirror / rotation metric: 486 per image) and the projection of the
  queries, not the reference scan, dominates. A trial on 120 MR queries x 486 variants against
  2,438 real slices: 7.4 s with 256 global axes and 64 blocks, 3.7 s with 16 blocks of 16
  local axes, same distances. For one variant per query global axes are faster (pixel RMSE,
  64 queries against 100k references: 0.8 s against 1.7 s). :func:`index_layout` picks.

**Floating point.** ``p`` and the residual ``e = x - P^T p`` are computed in float64 (error
per vector at most ``2 sqrt(k) gamma_F |x|``, ``gamma_n = n u / (1 - n u)``, ``u = 2^-53``;
Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., 3.1; block-local axes only
shorten the sums; below ``1e-8 |x|`` for ``F <= 2^21``, ``k <= 512``), the augmented vectors
are stored in float32 (relative error ``2^-24``) and ``LB^2`` is evaluated by a float32 GEMM
expansion over ``d = k + m <= 1024`` terms (error at most
``gamma32_{d+2} (|a(v)| + |a(r)|)^2 < 6.2e-5 (...)^2``). With ``|a(x)| <= |x| (1 + 1e-6)``
all of these together move ``LB^2`` by less than ``1e-4 (|v - mu| + |r - mu|)^2``. The search
therefore uses the *safe* bound ``LB_safe^2 = LB^2_computed - EPS_SQ (|v-mu| + |r-mu|)^2``
with ``EPS_SQ = 2e-4``, which never exceeds the true ``|v - r|^2``.

**The search.** For a block of queries (every variant of each) against a chunk of references:
``LB_safe^2`` by one GEMM; for each query the ``m`` references of smallest bound are evaluated
exactly, which gives an upper bound ``U`` on its k-th nearest distance (with the k best found
in earlier chunks); every pair with ``LB_safe^2 < U`` goes on to the float32 filter below,
every other pair is skipped -- proven not closer than ``U``. Candidates are filtered in waves,
smallest bounds first, and ``U`` is tightened after each wave. The k best distinct references
(minimum over a reference's variants) are kept. The distances equal brute force's bit for
bit; on an exact tie between two references the index reported may be either.

**The float32 filter.** Pairs that survive the bound are not all evaluated exactly. For one
query, the dot products of its candidate variants with its candidate references come from
one float32 GEMM (variants are float32 and references float16 / float32, so the inputs are
exact in float32; float64 inputs are rounded, which adds ``3u`` to the coefficient below).
Whatever order the BLAS sums in, ``|fl(v.r) - v.r| <= gamma32_F |v|.|r|
<= gamma32_F |v| |r|`` (Higham, eq. 3.5, and Cauchy-Schwarz), ``gamma32_F = F u / (1 - F u)``,
``u = 2^-24``. With ``|v|^2`` and ``|r|^2`` computed in float64 (relative error at most
``gamma64_F``; the combination adds a few float64 roundings), each pair's true squared distance
lies within ``approx +- (2 gamma32_F + s) |v| |r| + s (|v|^2 + |r|^2)`` of
``approx = |v|^2 + |r|^2 - 2 fl(v.r)``, with ``s = 2 (F + 4) 2^-53 >= gamma64_{F+4}``.
The k-th smallest of the current k best (exact) and of the upper ends of this chunk's other
references (each reference counted once) bounds the true k-th best distance from above; only
pairs whose lower end is at or below it are evaluated exactly, in float64.

**Rescaled rows.** The contrast metric's features are the pixel rows rescaled: ``c(x) =
fl32(x / rho(x))`` elementwise, ``rho`` the row's root-mean-square (``x`` itself where it is at
most ``ZERO_RMS``). Its dense search can reuse the pixel metric's float32 GEMM ``D = fl(x.r)``
instead of a second one over the same reference (:func:`dense_scaled_nearest`). With
``rho'`` the root-mean-square from the float64 squared norm (within ``drho = 2 (F + 8) u64``
of the metric's own, relatively), every element is ``c_i = (x_i / rho'(x)) (1 + theta_i)``,
``|theta_i| <= eta = u32 + 2 u64 + 1.01 drho``, so ``|c(x).c(r) - x.r / (rho'(x) rho'(r))| <=
(2 eta + eta^2) |x| |r| / (rho'(x) rho'(r))``; the GEMM adds ``gamma32_F |x| |r|`` and the
float64 rescaling of ``D`` a few ``u64``. The squared distance ``|c(x)|^2 + |c(r)|^2 - 2
c(x).c(r)`` then lies within :func:`scaled_gemm_interval`'s bounds (norms as in the float32
filter). A row whose ``rho'`` lies within a factor 2 of ``ZERO_RMS`` (which rule the metric
applied is then unsure) gets an unbounded interval, so its pairs are evaluated exactly.

What this module must never do: use an approximate index to skip a reference, or read files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from privacy.errors import GuardError

__all__ = [
    "EPS_SQ",
    "SEARCH_VERSION",
    "index_layout",
    "ExactIndex",
    "Nearest",
    "exact_sq_distances",
    "exact_pair_sq_distances",
    "brute_force_nearest",
    "as_feature_matrix",
    "TopK",
    "Fetch",
    "gemm_interval",
    "kept_sq_norms",
    "DENSE_ENTRIES",
    "exact_sq_norms",
    "evaluate_query_pairs",
    "scaled_gemm_interval",
    "dense_scaled_nearest",
    "DerivedRows",
    "spot_rows",
]

EPS_SQ = 2e-4
SEARCH_VERSION = 2  # layout of ExactIndex.state(); bump when the augmented vectors change
MAX_DIM = 1 << 21
MAX_COMPONENTS = 512
MAX_BLOCKS = 512
DENSE_ENTRIES = 1 << 26  # one-variant queries go dense up to this many reference entries
_SEED_REFS = 8
_U32 = 2.0**-24  # unit roundoff of float32
_U64 = 2.0**-53  # unit roundoff of float64


_EXACT_BLOCK = 1 << 16  # float64 entries of one block of pair differences (512 KiB)


def _sq_row_sums(n: int, f: int, fill: Callable[[slice, np.ndarray], None]) -> np.ndarray:
    """``out[i] = sum_j d[i, j]^2`` in float64 for rows ``d[i]`` that ``fill(rows, buffer)``
    writes into a float64 buffer, a few rows at a time.

    Every row is squared and reduced on its own by the same numpy calls, whatever block it
    falls in, so the result of a row does not depend on the others: the index and brute force
    agree bit for bit. The buffer is small and reused: the differences of thousands of pairs
    made at once were several fresh arrays of 36-72 MiB, and the page faults of touching them
    cost five times the arithmetic (0.27 s of a 0.33 s step in a process's first screening)."""
    out = np.empty(n, dtype=np.float64)
    step = max(1, min(n, _EXACT_BLOCK // max(1, f)))
    buf = np.empty((step, f), dtype=np.float64)
    for start in range(0, n, step):
        stop = min(n, start + step)
        block = buf[: stop - start]
        fill(slice(start, stop), block)
        np.multiply(block, block, out=block)
        np.sum(block, axis=1, out=out[start:stop])
    return out


def exact_sq_distances(v: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Exact squared distances from one vector to each row (float64, each row on its own)."""
    r = np.asarray(rows)
    v64 = np.asarray(v, dtype=np.float64)

    def fill(sl: slice, block: np.ndarray) -> None:
        block[...] = r[sl]
        block -= v64[None, :]

    return _sq_row_sums(r.shape[0], r.shape[1], fill)


def exact_sq_norms(rows: np.ndarray) -> np.ndarray:
    """Exact float64 squared norms of the rows (blocks of 256 rows stay in cache)."""
    out = np.empty(rows.shape[0], dtype=np.float64)
    for start in range(0, rows.shape[0], 256):
        block = np.asarray(rows[start : start + 256], dtype=np.float64)
        out[start : start + 256] = np.einsum("ij,ij->i", block, block)
    return out


def spot_rows(n: int, count: int = 16) -> np.ndarray:
    """``count`` rows spread evenly over ``n`` (all of them when fewer): the rows a kept
    index's state is re-checked on before use."""
    return np.unique(np.linspace(0, n - 1, min(n, count)).astype(np.int64))


def kept_sq_norms(features: np.ndarray, sq_norms: np.ndarray) -> np.ndarray:
    """``sq_norms`` kept for ``features`` [N, F], after checking shape, finite values and the
    norms of 16 rows spread over the reference (recomputed; they may differ by rounding, well
    within the error the intervals allow for norms, and from other features by far more)."""
    norms = np.asarray(sq_norms)
    n, f = features.shape
    if norms.dtype != np.float64 or norms.shape != (n,):
        raise GuardError(f"kept norms of shape {norms.shape} / {norms.dtype}", "reference", 1)
    if not np.all(np.isfinite(norms)) or np.any(norms < 0):
        raise GuardError("kept norms hold negative or non-finite values", "reference", 1)
    rows = spot_rows(n)
    fresh = exact_sq_norms(features[rows])
    if not np.allclose(norms[rows], fresh, rtol=4.0 * (f + 4) * _U64, atol=1e-300):
        raise GuardError("kept norms belong to other features", "reference", 1)
    return norms


def exact_pair_sq_distances(
    variants: np.ndarray, vrows: np.ndarray, features: np.ndarray, frows: np.ndarray
) -> np.ndarray:
    """Exact squared distances of the pairs ``(variants[vrows[i]], features[frows[i]])``.

    Row ``i`` is reduced on its own, with the same formula as :func:`exact_sq_distances`.
    """
    vr, fr = np.asarray(vrows), np.asarray(frows)

    def fill(sl: slice, block: np.ndarray) -> None:
        block[...] = features[fr[sl]]
        block -= variants[vr[sl]]

    return _sq_row_sums(fr.size, features.shape[1], fill)


@dataclass
class Nearest:
    """The k nearest distinct references of each query, exactly.

    ``sq`` [Q, k]: exact squared feature distances (inf where fewer than k references);
    ``index`` [Q, k]: reference rows (-1 where none); ``variant`` [Q]: the query variant that
    achieved the nearest; ``evaluated`` [Q]: exact pair evaluations spent (brute force spends
    T x N per query); ``floor_sq`` [Q]: a proven lower bound on the nearest squared distance
    (filled by searches capped at a limit, :class:`privacy.tiles.TileIndex`; empty otherwise).
    """

    sq: np.ndarray
    index: np.ndarray
    variant: np.ndarray
    evaluated: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    floor_sq: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def distances(self, scale: float = 1.0) -> np.ndarray:
        out: np.ndarray = np.sqrt(self.sq) * scale
        return out

    @classmethod
    def concat(cls, parts: list[Nearest], k: int) -> Nearest:
        """The results of consecutive blocks of queries as one (k columns when empty)."""
        if not parts:
            return cls(sq=np.zeros((0, k)), index=np.zeros((0, k), dtype=np.int64),
                       variant=np.zeros(0, dtype=np.int64),
                       evaluated=np.zeros(0, dtype=np.int64), floor_sq=np.zeros(0))
        return cls(
            sq=np.concatenate([p.sq for p in parts]),
            index=np.concatenate([p.index for p in parts]),
            variant=np.concatenate([p.variant for p in parts]),
            evaluated=np.concatenate([p.evaluated for p in parts]),
            floor_sq=np.concatenate([p.floor_sq for p in parts]),
        )


class DerivedRows:
    """A reference feature matrix [N, F] whose rows are made when they are read:
    ``make(source[rows])`` for an integer array or a slice of rows, each row from its own
    source row alone, so any subset gives the rows of the whole matrix bit for bit.

    The searches read only a few rows of a feature space (the exact distances of candidate
    pairs) plus their norms, computed a block at a time; making every row at once was a fresh
    array of tens of MiB per run (the window crops, the contrast features), whose page faults
    cost more than the arithmetic. ``np.asarray`` makes the whole matrix."""

    ndim = 2

    def __init__(self, source: np.ndarray, make: Callable[[np.ndarray], np.ndarray], dim: int,
                 dtype: Any) -> None:
        self.source = source
        self.make = make
        self.shape = (int(source.shape[0]), int(dim))
        self.dtype = np.dtype(dtype)
        self.size = self.shape[0] * self.shape[1]

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: Any) -> np.ndarray:
        out = np.asarray(self.make(self.source[rows]))
        if out.ndim != 2 or out.shape[1] != self.shape[1] or out.dtype != self.dtype:
            raise GuardError(f"derived rows of shape {out.shape} / {out.dtype}", "reference", 1)
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self[slice(None)]
        return whole if dtype is None else whole.astype(dtype)


def as_feature_matrix(features: np.ndarray, where: str) -> np.ndarray:
    if isinstance(features, DerivedRows):
        if features.shape[1] > MAX_DIM:
            raise GuardError(f"feature dimension {features.shape[1]} above {MAX_DIM}", where, 2)
        return features  # rows on demand, read like an array
    arr = np.asarray(features)
    if arr.ndim != 2:
        raise GuardError(f"expected a [N, F] matrix, found {arr.shape}", where, 2)
    if arr.dtype not in (np.float16, np.float32, np.float64):
        arr = arr.astype(np.float32)
    if arr.shape[1] > MAX_DIM:
        raise GuardError(f"feature dimension {arr.shape[1]} above {MAX_DIM}", where, 2)
    return np.ascontiguousarray(arr)


def _principal_axes(sample: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k orthonormal rows spanning (approximately) the top principal axes of ``sample``.

    Randomised range finder with two power iterations (Halko et al., SIAM Review 2011); the
    result is re-orthonormalised by QR, since the bound needs orthonormal rows, not the exact
    principal axes.
    """
    m, f = sample.shape
    k = max(0, min(k, m - 1, f))
    if k == 0:
        return np.zeros((0, f), dtype=np.float64)
    width = min(f, m, k + 10)
    y = sample @ rng.standard_normal((f, width))
    for _ in range(2):
        y, _ = np.linalg.qr(y)
        y = sample @ (sample.T @ y)
    qm, _ = np.linalg.qr(y)
    _, _, vt = np.linalg.svd(qm.T @ sample, full_matrices=False)
    q, _ = np.linalg.qr(vt[:k].T)
    basis: np.ndarray = np.ascontiguousarray(q.T)
    return basis


def _rank_in_groups(groups: np.ndarray) -> np.ndarray:
    """Position of each element within its run of equal values (``groups`` sorted)."""
    if groups.size == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.ones(groups.size, dtype=bool)
    starts[1:] = groups[1:] != groups[:-1]
    group_start = np.maximum.accumulate(np.where(starts, np.arange(groups.size), 0))
    out: np.ndarray = np.arange(groups.size) - group_start
    return out


class TopK:
    """Running k best distinct references per query (squared distance, index, variant)."""

    def __init__(self, q: int, k: int) -> None:
        self.k = k
        self.sq = np.full((q, k), np.inf)
        self.index = np.full((q, k), -1, dtype=np.int64)
        self.variant = np.full((q, k), -1, dtype=np.int64)

    def kth(self, rows: np.ndarray) -> np.ndarray:
        out: np.ndarray = self.sq[rows, self.k - 1]
        return out

    def merge(self, qs: np.ndarray, rs: np.ndarray, ts: np.ndarray, sq: np.ndarray) -> None:
        if qs.size == 0:
            return
        have = np.isfinite(self.sq)
        hq = np.nonzero(have)[0]
        qs = np.concatenate([qs, hq])
        rs = np.concatenate([rs, self.index[have]])
        ts = np.concatenate([ts, self.variant[have]])
        sq = np.concatenate([sq, self.sq[have]])
        # Minimum per (query, reference), smallest variant on ties.
        order = np.lexsort((ts, sq, rs, qs))
        qs, rs, ts, sq = qs[order], rs[order], ts[order], sq[order]
        first = np.ones(qs.size, dtype=bool)
        first[1:] = (qs[1:] != qs[:-1]) | (rs[1:] != rs[:-1])
        qs, rs, ts, sq = qs[first], rs[first], ts[first], sq[first]
        # k smallest per query, ties broken by reference index.
        order = np.lexsort((rs, sq, qs))
        qs, rs, ts, sq = qs[order], rs[order], ts[order], sq[order]
        rank = _rank_in_groups(qs)
        keep = rank < self.k
        qs, rs, ts, sq, rank = qs[keep], rs[keep], ts[keep], sq[keep], rank[keep]
        touched = np.unique(qs)
        self.sq[touched] = np.inf
        self.index[touched] = -1
        self.variant[touched] = -1
        self.sq[qs, rank] = sq
        self.index[qs, rank] = rs
        self.variant[qs, rank] = ts


def index_layout(n_variants: int, n_components: int = 256) -> dict[str, Any]:
    """ExactIndex parameters for queries of ``n_variants`` variants each (speed only).

    Many variants per query: block-local axes (16 blocks), cheap to project. One or a few:
    global axes with 64 residual blocks, the tighter bound per reference.
    """
    if n_variants > 8:
        return {"n_components": n_components, "blocks": 16, "local_axes": True}
    return {"n_components": n_components, "blocks": 64, "local_axes": False}


class ExactIndex:
    """Reference rows plus their augmented projections; answers exact k-NN queries.

    ``n_components``: principal axes kept (``k``, at most 512); global axes of the whole
    vector, or with ``local_axes`` spread evenly over the ``blocks`` (each block gets at most
    its width and at most ``sample_size - 1`` axes; a block no wider than its share uses the
    identity). With global axes, when the feature dimension is at most ``k`` the identity
    basis is used. ``blocks``: the residual blocks. ``sample_size`` rows (seeded) estimate the
    mean and the axes.
    """

    def __init__(
        self,
        features: np.ndarray,
        n_components: int = 256,
        sample_size: int = 2048,
        seed: int = 0,
        chunk_rows: int = 8192,
        blocks: int = 64,
        local_axes: bool = False,
    ) -> None:
        feats = as_feature_matrix(features, "reference")
        n, f = feats.shape
        if n == 0:
            raise GuardError("the reference is empty", "reference", 2)
        if not 0 <= n_components <= MAX_COMPONENTS:
            raise GuardError(f"n_components must be in 0..{MAX_COMPONENTS}", "reference", 2)
        if not 1 <= blocks <= MAX_BLOCKS:
            raise GuardError(f"blocks must be in 1..{MAX_BLOCKS}", "reference", 2)
        self.features = feats
        self.n, self.dim = n, f
        m = min(blocks, f)
        self.bounds = np.linspace(0, f, m + 1).round().astype(np.int64)
        rng = np.random.default_rng(seed)
        take = np.sort(rng.choice(n, size=min(n, sample_size), replace=False))
        sample = feats[take].astype(np.float64)
        self.mean = sample.mean(axis=0)
        centred = sample - self.mean
        # Axis groups: (start, stop) column ranges, each with its orthonormal rows.
        if local_axes:
            self.group_bounds = self.bounds.copy()
            share = np.full(m, n_components // m) + (np.arange(m) < n_components % m)
        else:
            self.group_bounds = np.array([0, f], dtype=np.int64)
            share = np.array([n_components])
        self.bases: list[np.ndarray] = []
        for j in range(self.group_bounds.size - 1):
            lo, hi = int(self.group_bounds[j]), int(self.group_bounds[j + 1])
            kj = int(share[j])
            if hi - lo <= kj:
                self.bases.append(np.eye(hi - lo, dtype=np.float64))
            else:
                self.bases.append(_principal_axes(centred[:, lo:hi], kj, rng))
        self.chunk_rows = chunk_rows
        aug = np.empty((n, self.n_components + m), dtype=np.float32)
        norms = np.empty(n, dtype=np.float64)
        for start in range(0, n, chunk_rows):
            stop = min(n, start + chunk_rows)
            aug[start:stop], norms[start:stop] = self._augment(feats[start:stop])
        self._set_projection(aug, norms.astype(np.float32))

    @classmethod
    def dense(cls, features: np.ndarray, sq_norms: np.ndarray | None = None) -> ExactIndex:
        """An index without projection: every query by the dense path (one float32 GEMM with
        proven intervals, then float64), the fastest exact search for a small reference.
        Refused above ``2^26`` reference entries, where it would hold too much at once.
        ``sq_norms``: the rows' float64 squared norms kept from an earlier build (checked on
        16 rows spread over the reference; computed when not given)."""
        feats = as_feature_matrix(features, "reference")
        if feats.shape[0] == 0:
            raise GuardError("the reference is empty", "reference", 2)
        if feats.size > DENSE_ENTRIES:
            raise GuardError(f"{feats.shape} is too large for a dense index", "reference", 2)
        self = cls.__new__(cls)
        self.features, (self.n, self.dim) = feats, feats.shape
        self.bases = []
        self.dense_only = True
        self.chunk_rows = 8192
        self.sq_norms = (exact_sq_norms(feats) if sq_norms is None
                         else kept_sq_norms(feats, sq_norms))
        self._features32 = None
        return self

    #: Built by :meth:`dense`: no projection, every query by the dense path.
    dense_only = False

    def state(self) -> dict[str, np.ndarray]:
        """The costly part of building the index, for a cache kept by the caller.

        :meth:`from_state` rebuilds the index from the same features and this state without
        projecting the reference again.
        """
        if self.dense_only:  # only the rows' squared norms, a pass over the whole reference
            return {"version": np.array(SEARCH_VERSION), "dense": np.array(1),
                    "shape": np.array([self.n, self.dim]), "sq_norms": self.sq_norms}
        return {
            "version": np.array(SEARCH_VERSION),
            "shape": np.array([self.n, self.dim]),
            "mean": self.mean,
            "bounds": self.bounds,
            "group_bounds": self.group_bounds,
            "basis_rows": np.array([b.shape[0] for b in self.bases], dtype=np.int64),
            "bases": np.concatenate([b.ravel() for b in self.bases]),
            "aug": self.aug,
            "norms": self.norms,
        }

    @classmethod
    def from_state(
        cls, features: np.ndarray, state: dict[str, np.ndarray], chunk_rows: int = 8192
    ) -> ExactIndex:
        """The index of ``features`` from :meth:`state` of an index built on the same features.

        The caller must make sure the state belongs to these features (a digest of both); this
        checks everything that can be checked cheaply -- version, shapes, finite values and
        orthonormal axes, on which the lower bound rests -- and refuses the state otherwise.
        """
        feats = as_feature_matrix(features, "reference")
        n, f = feats.shape

        def bad(why: str) -> GuardError:
            return GuardError(f"cached search index refused: {why}", "reference", 1)

        if int(state["version"]) != SEARCH_VERSION:
            raise bad(f"version {int(state['version'])}, this code writes {SEARCH_VERSION}")
        if [int(v) for v in state["shape"]] != [n, f]:
            raise bad(f"built for {list(state['shape'])}, the reference is {[n, f]}")
        if "dense" in state:
            try:
                return cls.dense(feats, sq_norms=state["sq_norms"])
            except GuardError as exc:
                raise bad(exc.what) from None
        bounds = np.asarray(state["bounds"], dtype=np.int64)
        groups = np.asarray(state["group_bounds"], dtype=np.int64)
        rows = np.asarray(state["basis_rows"], dtype=np.int64)
        m = bounds.size - 1
        for cut in (bounds, groups):
            if cut.size < 2 or cut[0] != 0 or cut[-1] != f or np.any(np.diff(cut) <= 0):
                raise bad("block bounds do not partition the features")
        widths = np.diff(groups)
        flat = np.asarray(state["bases"], dtype=np.float64)
        if rows.size != widths.size or np.any(rows < 0) or flat.size != int(np.sum(rows * widths)):
            raise bad("axes do not match their column groups")
        k = int(rows.sum())
        aug = np.asarray(state["aug"], dtype=np.float32)
        norms = np.asarray(state["norms"], dtype=np.float32)
        mean = np.asarray(state["mean"], dtype=np.float64)
        if aug.shape != (n, k + m) or norms.shape != (n,) or mean.shape != (f,):
            raise bad("projected reference has the wrong shape")
        if not (np.all(np.isfinite(aug)) and np.all(np.isfinite(norms))
                and np.all(np.isfinite(flat)) and np.all(np.isfinite(mean))):
            raise bad("non-finite values")
        bases, pos = [], 0
        for kj, wj in zip(rows.tolist(), widths.tolist(), strict=True):
            basis = flat[pos : pos + kj * wj].reshape(kj, wj)
            pos += kj * wj
            if kj and np.max(np.abs(basis @ basis.T - np.eye(kj))) > 1e-9:
                raise bad("axes are not orthonormal")
            bases.append(basis)
        self = cls.__new__(cls)
        self.features, self.n, self.dim = feats, n, f
        self.bounds, self.group_bounds, self.bases, self.mean = bounds, groups, bases, mean
        self.chunk_rows = chunk_rows
        self._set_projection(aug, norms)
        return self

    def _set_projection(self, aug: np.ndarray, norms: np.ndarray) -> None:
        """Keep the projected reference and derive what the search reads with it."""
        self.aug, self.norms = aug, norms
        self._features32: np.ndarray | None = None
        self.aug_sq = np.sum(aug.astype(np.float64) ** 2, axis=1).astype(np.float32)
        self.sq_norms = exact_sq_norms(self.features)  # exact |r|^2 of the stored rows

    @property
    def n_components(self) -> int:
        return int(sum(b.shape[0] for b in self.bases))

    def _augment(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(float32 [p(x), |e_1(x)|..|e_m(x)|], float64 |x|) for x = row - mu, in float64."""
        x = np.asarray(rows, dtype=np.float64) - self.mean[None, :]
        k = self.n_components
        out = np.empty((x.shape[0], k + self.bounds.size - 1), dtype=np.float32)
        resid = np.empty_like(x)
        col = 0
        for j, basis in enumerate(self.bases):
            lo, hi = self.group_bounds[j], self.group_bounds[j + 1]
            p = x[:, lo:hi] @ basis.T
            resid[:, lo:hi] = x[:, lo:hi] - p @ basis
            out[:, col : col + basis.shape[0]] = p
            col += basis.shape[0]
        resid *= resid
        out[:, k:] = np.sqrt(np.add.reduceat(resid, self.bounds[:-1], axis=1))
        return out, np.sqrt(np.einsum("ij,ij->i", x, x))

    def nearest(self, variants: np.ndarray, k: int = 1, block_entries: int = 1 << 23) -> Nearest:
        """Exact k nearest distinct references of each query; ``variants`` is [Q, T, F]."""
        var = np.asarray(variants)
        if var.ndim == 2:
            var = var[:, None, :]
        if var.ndim != 3 or var.shape[2] != self.dim:
            raise GuardError(
                f"queries of shape {var.shape} do not match the reference dimension {self.dim}",
                "queries",
                2,
            )
        q, t, _ = var.shape
        k = max(1, min(k, self.n))
        if self.dense_only or (t == 1 and self.n * self.dim <= DENSE_ENTRIES):
            return self._dense(var, k)
        flat = var.reshape(q * t, self.dim)
        aug_v = np.empty((q * t, self.aug.shape[1]), dtype=np.float32)
        norm_v = np.empty(q * t, dtype=np.float64)
        for start in range(0, q * t, self.chunk_rows):
            stop = min(q * t, start + self.chunk_rows)
            aug_v[start:stop], norm_v[start:stop] = self._augment(flat[start:stop])
        aug_v_sq = np.sum(aug_v.astype(np.float64) ** 2, axis=1).astype(np.float32)
        var_sq = np.einsum("ij,ij->i", flat, flat, dtype=np.float64).reshape(q, t)
        norm_v32 = norm_v.astype(np.float32)

        def fetch(qi: int, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return var[qi, ts], var_sq[qi, ts]

        top = TopK(q, k)
        evaluated = np.zeros(q, dtype=np.int64)
        n_chunk = int(min(self.n, max(1024, block_entries // t)))
        q_block = max(1, block_entries // (t * n_chunk))
        for q0 in range(0, q, q_block):
            q1 = min(q, q0 + q_block)
            qb = q1 - q0
            rows = slice(q0 * t, q1 * t)
            for n0 in range(0, self.n, n_chunk):
                n1 = min(self.n, n0 + n_chunk)
                lb = aug_v[rows] @ self.aug[n0:n1].T
                lb *= -2.0
                lb += aug_v_sq[rows, None]
                lb += self.aug_sq[None, n0:n1]
                slack = norm_v32[rows, None] + self.norms[None, n0:n1]
                slack *= slack
                slack *= EPS_SQ
                lb -= slack
                del slack
                lb3 = lb.reshape(qb, t, n1 - n0)
                # Seed: the m references of smallest bound, at their best-bound variant.
                m = min(n1 - n0, max(_SEED_REFS, 2 * k))
                best_t = lb3.argmin(axis=1)  # [qb, nc]
                best_lb = np.take_along_axis(lb3, best_t[:, None, :], axis=1)[:, 0]
                seed_r = np.argpartition(best_lb, m - 1, axis=1)[:, :m]
                sq_ = np.repeat(np.arange(q0, q1), m)
                sr = seed_r.ravel()
                st = best_t[np.repeat(np.arange(qb), m), sr]
                self._evaluate(var, top, evaluated, sq_, st, sr + n0)
                bound = top.kth(np.arange(q0, q1)).astype(np.float64)
                bound32 = np.nextafter(bound.astype(np.float32), np.float32(np.inf))
                cq, ct, cr = np.nonzero(lb3 < bound32[:, None, None])
                vals = lb3[cq, ct, cr].astype(np.float64)
                keep = vals < bound[cq]  # exact filter (the float32 bound was rounded up)
                cq, ct, cr, vals = cq[keep], ct[keep], cr[keep], vals[keep]
                _refine_pairs(self.features, self.sq_norms, fetch, top, evaluated,
                             cq + q0, ct, cr + n0, vals)
        return Nearest(
            sq=top.sq, index=top.index, variant=top.variant[:, 0], evaluated=evaluated
        )

    def _dense(self, var: np.ndarray, k: int) -> Nearest:
        """Every (variant, reference) pair by one float32 GEMM with its proven interval
        (:func:`gemm_interval`), then exact float64 distances for the pairs whose interval
        reaches down to their query's k-th smallest upper end over distinct references (the
        true k-th best distance lies at or below it)."""
        q, t, _ = var.shape
        flat = var.reshape(q * t, self.dim)
        vsq = np.einsum("ij,ij->i", flat, flat, dtype=np.float64)
        top = TopK(q, k)
        evaluated = np.zeros(q, dtype=np.int64)
        for q0, q1 in self._dense_steps(q, t):
            dots = self._dense_dots(flat[q0 * t : q1 * t])

            def interval(a: int, b: int, dots: np.ndarray = dots, q0: int = q0
                         ) -> tuple[np.ndarray, np.ndarray]:
                return gemm_interval(dots[a * t : b * t], vsq[(q0 + a) * t : (q0 + b) * t],
                                     self.sq_norms, self.dim)

            self._dense_pick(flat, t, q0, q1, interval, top, evaluated)
        return Nearest(sq=top.sq, index=top.index, variant=top.variant[:, 0], evaluated=evaluated)

    def _dense_steps(self, q: int, t: int) -> list[tuple[int, int]]:
        """Blocks of queries whose GEMM with the whole reference is held at once."""
        step = max(1, (1 << 22) // (self.n * t))
        return [(q0, min(q, q0 + step)) for q0 in range(0, q, step)]

    def _dense_dots(self, rows: np.ndarray) -> np.ndarray:
        """The float32 GEMM of query rows with every reference row."""
        if self._features32 is None:
            self._features32 = np.asarray(self.features, dtype=np.float32)
        dots: np.ndarray = np.asarray(rows, dtype=np.float32) @ self._features32.T
        return dots

    def _dense_pick(
        self,
        flat: np.ndarray,
        t: int,
        q0: int,
        q1: int,
        interval: Callable[[int, int], tuple[np.ndarray, np.ndarray]],
        top: TopK,
        evaluated: np.ndarray,
    ) -> None:
        """Exact distances of the pairs of queries ``q0 .. q1`` (rows of ``flat``, ``t``
        variants each) whose interval (``interval(a, b)``: the bounds of queries ``q0 + a ..
        q0 + b`` against every reference) reaches down to their query's k-th smallest upper
        end over distinct references, merged into ``top``."""
        k = top.k
        # The float64 intervals a few queries at a time: whole, they were fresh arrays
        # of tens of MiB, and touching them cost five times their arithmetic.
        sub = max(1, (1 << 17) // (self.n * t))
        picked = []
        for a in range(0, q1 - q0, sub):
            b = min(q1 - q0, a + sub)
            lo, hi = interval(a, b)
            per_ref = hi.reshape(b - a, t, self.n).min(axis=1)
            upper = np.partition(per_ref, k - 1, axis=1)[:, k - 1]
            found = np.nonzero(lo.reshape(b - a, t, self.n) <= upper[:, None, None])
            picked.append((found[0] + a, found[1], found[2]))
        cq, ct, cr = (np.concatenate(c) for c in zip(*picked, strict=True))
        sq = exact_pair_sq_distances(flat, (cq + q0) * t + ct, self.features, cr)
        top.merge(cq + q0, cr, ct, sq)
        evaluated[q0:q1] += np.bincount(cq, minlength=q1 - q0)

    def _evaluate(
        self,
        var: np.ndarray,
        top: TopK,
        evaluated: np.ndarray,
        qs: np.ndarray,
        ts: np.ndarray,
        rs: np.ndarray,
    ) -> None:
        t = var.shape[1]
        flat = var.reshape(-1, var.shape[2])
        sq = exact_pair_sq_distances(flat, qs * t + ts, self.features, rs)
        top.merge(qs, rs, ts, sq)
        np.add.at(evaluated, qs, 1)


Fetch = Callable[[int, np.ndarray], tuple[np.ndarray, np.ndarray]]


def gemm_interval(
    dots: np.ndarray, vsq: np.ndarray, rsq: np.ndarray, f: int
) -> tuple[np.ndarray, np.ndarray]:
    """Proven bounds (lo, hi) on the squared distances of every (variant, reference) pair.

    ``dots`` [V, R]: the float32 GEMM of the variants and the references (inputs float32 or
    float16, or float64 rounded to float32); ``vsq`` [V], ``rsq`` [R]: exact float64 squared
    norms; ``f``: the feature dimension (module docstring, "The float32 filter").
    """
    # gamma32_F, plus 3u for float64 inputs rounded to float32 on the way into the GEMM.
    gamma = f * _U32 / (1.0 - f * _U32) + 3.0 * _U32
    # The float64 norms |v|^2, |r|^2 (sums of F exact products) and their combination.
    slack64 = 2.0 * (f + 4) * _U64
    approx = vsq[:, None] + rsq[None, :] - 2.0 * dots.astype(np.float64)
    err = ((2.0 * gamma + slack64) * np.sqrt(vsq[:, None] * rsq[None, :])
           + slack64 * (vsq[:, None] + rsq[None, :]))
    return approx - err, approx + err


def scaled_gemm_interval(
    dots: np.ndarray,
    xsq: np.ndarray,
    rsq: np.ndarray,
    csq_x: np.ndarray,
    csq_r: np.ndarray,
    f: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Proven bounds (lo, hi) on the squared distances of rescaled rows ``c(x)``, ``c(r)``
    from the float32 GEMM ``dots`` [V, R] of the rows ``x`` and ``r`` themselves (module
    docstring, "Rescaled rows"). ``c(x)`` is ``x`` divided by its root-mean-square (a float64
    quotient rounded to float32), or ``x`` where that is at most ``ZERO_RMS``
    (:class:`privacy.metrics.ContrastRMSE`). ``xsq`` [V], ``rsq`` [R]: float64 squared norms of
    the rows; ``csq_x``, ``csq_r``: those of their rescalings; ``f``: the row length.
    Pairs with a row whose root-mean-square is too near ``ZERO_RMS`` to tell which rule
    applies get (-inf, inf)."""
    from privacy.metrics import ZERO_RMS

    gamma = f * _U32 / (1.0 - f * _U32) + 3.0 * _U32  # as gemm_interval
    # The divisor from the float64 squared norm differs from the metric's own root-mean-square
    # (another float64 sum of the same squares) by less than drho, relatively.
    drho = 2.0 * (f + 8) * _U64
    eta = _U32 + 2.0 * _U64 + 1.01 * drho  # per element of c: quotient, rounding, divisor
    coef = gamma + 2.0 * eta + eta * eta + 5.0 * _U64
    slack64 = 2.0 * (f + 4) * _U64

    def divisors(sq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rms = np.sqrt(sq / f)
        div = np.where(rms > 2.0 * ZERO_RMS, rms, 1.0)
        unsure = (rms >= 0.5 * ZERO_RMS) & (rms <= 2.0 * ZERO_RMS)
        return div, unsure

    dx, ux = divisors(xsq)
    dr, ur = divisors(rsq)
    scale = 1.0 / (dx[:, None] * dr[None, :])
    dotc = dots.astype(np.float64) * scale
    approx = csq_x[:, None] + csq_r[None, :] - 2.0 * dotc
    # |x| |r| / (div_x div_r), rounded up for the norms' own error.
    prod = np.sqrt(xsq[:, None] * rsq[None, :]) * scale * (1.0 + 4.0 * (f + 8) * _U64)
    err = (2.0 * coef * prod + slack64 * (csq_x[:, None] + csq_r[None, :])
           + 2.0 * slack64 * np.abs(dotc) + 1e-30 * (1.0 + csq_x[:, None] + csq_r[None, :]))
    lo, hi = approx - err, approx + err
    unsure = ux[:, None] | ur[None, :]
    if unsure.any():
        lo[unsure], hi[unsure] = -np.inf, np.inf
    return lo, hi


def dense_scaled_nearest(
    base: ExactIndex, x: np.ndarray, scaled: ExactIndex, c: np.ndarray, k: int = 2
) -> tuple[Nearest, Nearest]:
    """Exact k nearest references of the queries ``x`` [Q, F] in ``base`` and of their
    rescalings ``c`` [Q, F] in ``scaled``, from one float32 GEMM of ``x`` with ``base``'s
    rows: ``scaled`` must hold the rescalings of ``base``'s rows (:func:`scaled_gemm_interval`;
    the contrast metric's features are its pixel rows rescaled), both dense indexes. The
    results equal ``base.nearest(x, k)`` and ``scaled.nearest(c, k)``: each pair's interval is
    proven, and every pair that may be among the k best is evaluated exactly (float64)."""
    xq = np.asarray(x)
    cq = np.asarray(c)
    if not (base.dense_only and scaled.dense_only):
        raise GuardError("a shared GEMM needs two dense indexes", "reference", 1)
    if (base.n, base.dim) != (scaled.n, scaled.dim) or xq.shape != cq.shape \
            or xq.ndim != 2 or xq.shape[1] != base.dim:
        raise GuardError(f"queries {xq.shape} / {cq.shape} do not match the references",
                         "queries", 2)
    q = xq.shape[0]
    k = max(1, min(k, base.n))
    xsq = np.einsum("ij,ij->i", xq, xq, dtype=np.float64)
    csq = np.einsum("ij,ij->i", cq, cq, dtype=np.float64)
    tops = (TopK(q, k), TopK(q, k))
    evaluated = (np.zeros(q, dtype=np.int64), np.zeros(q, dtype=np.int64))
    for q0, q1 in base._dense_steps(q, 1):
        dots = base._dense_dots(xq[q0:q1])

        def plain(a: int, b: int, dots: np.ndarray = dots, q0: int = q0
                  ) -> tuple[np.ndarray, np.ndarray]:
            return gemm_interval(dots[a:b], xsq[q0 + a : q0 + b], base.sq_norms, base.dim)

        def rescaled(a: int, b: int, dots: np.ndarray = dots, q0: int = q0
                     ) -> tuple[np.ndarray, np.ndarray]:
            return scaled_gemm_interval(dots[a:b], xsq[q0 + a : q0 + b], base.sq_norms,
                                        csq[q0 + a : q0 + b], scaled.sq_norms, base.dim)

        base._dense_pick(xq, 1, q0, q1, plain, tops[0], evaluated[0])
        scaled._dense_pick(cq, 1, q0, q1, rescaled, tops[1], evaluated[1])
    return tuple(  # type: ignore[return-value]
        Nearest(sq=top.sq, index=top.index, variant=top.variant[:, 0], evaluated=ev)
        for top, ev in zip(tops, evaluated, strict=True)
    )


def _refine_pairs(
    features: np.ndarray,
    sq_norms: np.ndarray,
    fetch: Fetch,
    top: TopK,
    evaluated: np.ndarray,
    cq: np.ndarray,
    ct: np.ndarray,
    cr: np.ndarray,
    lb: np.ndarray,
) -> None:
    """Exact k-best update of ``top`` from the candidate pairs ``(cq, ct, cr)``.

    ``fetch(query, variants)`` returns those variants of one query exactly as stored
    ([len, F], float16/32/64) and their exact float64 squared norms; ``features`` are the
    reference rows and ``sq_norms`` their exact float64 squared norms. ``lb``: each pair's safe
    lower bound on its squared distance.

    Per query, candidates are taken in waves of increasing bound; one float32 GEMM per wave
    gives each pair's distance to within a proven interval (module docstring, "The float32
    filter") and tightens an upper bound on the k-th best distance, which drops later
    candidates whose lower bound is above it. At the end only pairs whose interval reaches down
    to that upper bound are evaluated exactly (float64); every other pair is proven not among
    the k best.
    """
    if cq.size == 0:
        return
    order = np.lexsort((lb, cq))
    cq, ct, cr, lb = cq[order], ct[order], cr[order], lb[order]
    starts = np.flatnonzero(np.r_[True, cq[1:] != cq[:-1]])
    ends = np.r_[starts[1:], cq.size]
    for a, b in zip(starts, ends, strict=True):
        qi = int(cq[a])
        qt, qr, qlb = ct[a:b], cr[a:b], lb[a:b]
        in_top = top.index[qi]
        limit = float(top.sq[qi, top.k - 1])
        ref_ids = np.zeros(0, dtype=np.int64)  # references seen, with their best upper end
        ref_hi = np.zeros(0)
        pend_t, pend_r, pend_lo = [], [], []
        done, wave = 0, 64
        while done < qt.size:
            stop = min(qt.size, done + wave)
            wt, wr = qt[done:stop], qr[done:stop]
            keep = qlb[done:stop] <= limit
            wt, wr = wt[keep], wr[keep]
            done, wave = stop, wave * 4
            if wt.size == 0:
                break  # bounds are sorted: every later pair is above the limit too
            ts, t_inv = np.unique(wt, return_inverse=True)
            rs, r_inv = np.unique(wr, return_inverse=True)
            vectors, vsq = fetch(qi, ts)
            vm = np.asarray(vectors, dtype=np.float32)
            rm = np.asarray(features[rs], dtype=np.float32)
            lo, hi = gemm_interval(vm @ rm.T, vsq, sq_norms[rs], features.shape[1])
            lo, hi = lo[t_inv, r_inv], hi[t_inv, r_inv]
            # Upper bound on the true k-th best: the k best so far (exact) and the best
            # upper end of every other reference seen, each reference counted once.
            ref_ids = np.concatenate([ref_ids, wr])
            ref_hi = np.concatenate([ref_hi, hi])
            uniq, inv = np.unique(ref_ids, return_inverse=True)
            best = np.full(uniq.size, np.inf)
            np.minimum.at(best, inv, ref_hi)
            ref_ids, ref_hi = uniq, best
            pool = np.concatenate([top.sq[qi], best[~np.isin(uniq, in_top)]])
            limit = min(limit, float(np.partition(pool, top.k - 1)[top.k - 1]))
            pend_t.append(wt)
            pend_r.append(wr)
            pend_lo.append(lo)
        if not pend_t:
            continue
        pt, pr, plo = np.concatenate(pend_t), np.concatenate(pend_r), np.concatenate(pend_lo)
        pick = plo <= limit
        if pick.any():
            evaluate_query_pairs(features, fetch, top, evaluated, qi, pt[pick], pr[pick])


def evaluate_query_pairs(
    features: np.ndarray,
    fetch: Fetch,
    top: TopK,
    evaluated: np.ndarray,
    qi: int,
    ts: np.ndarray,
    rs: np.ndarray,
) -> None:
    """Exact squared distances of the pairs ``(variant ts[i] of query qi, reference rs[i])``."""
    uts, inv = np.unique(ts, return_inverse=True)
    vectors, _ = fetch(qi, uts)
    sq = exact_pair_sq_distances(vectors, inv, features, rs)
    top.merge(np.full(ts.size, qi, dtype=np.int64), rs, ts, sq)
    evaluated[qi] += ts.size


def brute_force_nearest(variants: np.ndarray, features: np.ndarray, k: int = 1) -> Nearest:
    """The definition: every variant against every reference row, exactly (tests, bench)."""
    feats = as_feature_matrix(features, "reference")
    var = np.asarray(variants)
    if var.ndim == 2:
        var = var[:, None, :]
    q, t, _ = var.shape
    n = feats.shape[0]
    k = max(1, min(k, n))
    sq = np.full((q, k), np.inf)
    index = np.full((q, k), -1, dtype=np.int64)
    variant = np.full(q, -1, dtype=np.int64)
    for qi in range(q):
        best = np.full(n, np.inf)
        best_t = np.zeros(n, dtype=np.int64)
        for tv in range(t):
            d = exact_sq_distances(var[qi, tv], feats)
            better = d < best
            best[better] = d[better]
            best_t[better] = tv
        order = np.lexsort((np.arange(n), best))[:k]
        sq[qi, : order.size] = best[order]
        index[qi, : order.size] = order
        variant[qi] = best_t[order[0]]
    return Nearest(sq=sq, index=index, variant=variant, evaluated=np.full(q, t * n))
