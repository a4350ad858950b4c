"""Exact nearest-neighbour search that prunes only by proven lower bounds.

Invariant 4 of the architecture: an accepted image's *exact* nearest-neighbour distance is at
or above the threshold under every metric. This module computes that distance exactly while
touching as few reference rows as it can; BLAS does the heavy lifting, but a reference is
skipped only when a lower bound, made conservative against floating-point error, proves it
cannot be (one of) the nearest.

**What "exact" means.** The distance of a query variant ``v`` to a reference row ``r`` is
:func:`exact_sq_distances`: the float64 sum of squared float64 differences of the stored values
(float16 / float32 inputs are exactly representable in float64). Brute force
(:func:`brute_force_nearest`) and the index both use that one function, row by row, so they
agree bit for bit; no decision rests on a GEMM expansion ``|a|^2 + |b|^2 - 2ab``.

**The lower bound.** Let ``mu`` be a mean vector and ``P`` (k x F) a matrix with orthonormal
rows (the top principal axes of a sample of the reference). For ``x = v - mu`` write
``p(x) = P x`` and ``e(x) = x - P^T P x``, and define the augmented vector
``a(x) = [p(x), |e(x)|]`` in k + 1 dimensions. Then for every pair::

    |v - r|^2 = |P(v - r)|^2 + |e(v) - e(r)|^2          (Pythagoras: P^T P is an orthogonal
                                                          projector, e(.) its complement)
             >= |p(v) - p(r)|^2 + (|e(v)| - |e(r)|)^2    (reverse triangle inequality)
              = |a(v) - a(r)|^2 =: LB^2.

With ``k = 0`` this is the norm bound ``| |v - mu| - |r - mu| | <= |v - r|``; with ``k = F`` it
is the distance itself. **Floating point.** ``LB^2`` is computed in float64 by GEMM. Each
rounding step (the projection, the residual, the orthonormality of ``P`` from the SVD, the
expansion ``|a|^2 + |b|^2 - 2 a.b``) perturbs ``LB^2`` by at most ``c * u * (|v-mu| + |r-mu|)^2``
with ``u = 2^-53`` and ``c <= 8 (F + k)`` (standard bounds ``gamma_n = n u / (1 - n u)`` for
dot products of length ``n``, Higham, *Accuracy and Stability of Numerical Algorithms*, 3.1).
For ``F <= 2^21`` that is below ``2e-9 (|v-mu| + |r-mu|)^2``; we subtract the larger slack
``EPS_SQ = 1e-8`` times that, so the *safe* bound
``LB_safe^2 = LB^2_computed - EPS_SQ (|v-mu| + |r-mu|)^2`` never exceeds the true ``|v - r|^2``.

**The search.** For each query (all its variants), candidate pairs are visited in increasing
order of ``LB_safe^2``; each visited pair gets its exact distance; the k best distinct
references are kept; a pair is skipped only when ``LB_safe^2 >= `` the current k-th best exact
squared distance, which proves it cannot enter the k best. The result equals brute force.

What this module must never do: use an approximate index to skip a reference, or read files.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from privacy.errors import GuardError

__all__ = [
    "EPS_SQ",
    "ExactIndex",
    "Nearest",
    "exact_sq_distances",
    "exact_pair_sq_distances",
    "brute_force_nearest",
]

EPS_SQ = 1e-8
MAX_DIM = 1 << 21
_EXACT_ROWS = 4096


def exact_sq_distances(v: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Exact squared distances from one vector to each row (float64, row by row).

    The value for a row depends only on that row and ``v`` (numpy reduces each row of a
    C-contiguous array on its own), so any subset of rows gives the same numbers.
    """
    diff = np.asarray(rows, dtype=np.float64) - np.asarray(v, dtype=np.float64)[None, :]
    out: np.ndarray = np.sum(diff * diff, axis=1)
    return out


def exact_pair_sq_distances(
    variants: np.ndarray, vrows: np.ndarray, features: np.ndarray, frows: np.ndarray
) -> np.ndarray:
    """Exact squared distances of pairs (variants[vrows[i]], features[frows[i]]).

    Row ``i`` is reduced on its own, exactly as :func:`exact_sq_distances` reduces it.
    """
    diff = np.asarray(features[frows], dtype=np.float64) - np.asarray(
        variants[vrows], dtype=np.float64
    )
    out: np.ndarray = np.sum(diff * diff, axis=1)
    return out


@dataclass
class Nearest:
    """The k nearest distinct references of each query, exactly.

    ``sq`` [Q, k]: exact squared feature distances (inf where fewer than k references);
    ``index`` [Q, k]: reference rows (-1 where none); ``variant`` [Q]: the query variant that
    achieved the nearest; ``evaluated`` [Q]: exact pair evaluations spent (brute force:
    T x N).
    """

    sq: np.ndarray
    index: np.ndarray
    variant: np.ndarray
    evaluated: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def distances(self, scale: float = 1.0) -> np.ndarray:
        out: np.ndarray = np.sqrt(self.sq) * scale
        return out


class _TopK:
    """The k smallest squared distances over distinct references, ties broken by index."""

    __slots__ = ("k", "items")

    def __init__(self, k: int) -> None:
        self.k = k
        self.items: list[tuple[float, int, int]] = []  # (sq, ref, variant), sorted

    def bound(self) -> float:
        return self.items[-1][0] if len(self.items) >= self.k else float("inf")

    def offer(self, sq: float, ref: int, variant: int) -> None:
        for i, (old_sq, old_ref, _) in enumerate(self.items):
            if old_ref == ref:
                if sq < old_sq:
                    self.items[i] = (sq, ref, variant)
                    self.items.sort()
                return
        if len(self.items) < self.k or (sq, ref) < (self.items[-1][0], self.items[-1][1]):
            self.items.append((sq, ref, variant))
            self.items.sort()
            del self.items[self.k :]


def _as_matrix(features: np.ndarray, where: str) -> np.ndarray:
    arr = np.asarray(features)
    if arr.ndim != 2:
        raise GuardError(f"expected a [N, F] matrix, found {arr.shape}", where, 2)
    if arr.dtype not in (np.float16, np.float32, np.float64):
        arr = arr.astype(np.float32)
    if arr.shape[1] > MAX_DIM:
        raise GuardError(f"feature dimension {arr.shape[1]} above {MAX_DIM}", where, 2)
    return np.ascontiguousarray(arr)


class ExactIndex:
    """Reference rows plus their augmented projections; answers exact k-NN queries.

    ``n_components``: principal axes kept (``k``); when the feature dimension is at most that,
    the identity basis is used (the bound is then the distance itself, up to the slack).
    ``sample_size`` rows (seeded) estimate the mean and the axes; the bound is valid for any
    orthonormal ``P`` and ``mu``, so the sample only changes speed, never the result.
    """

    def __init__(
        self,
        features: np.ndarray,
        n_components: int = 64,
        sample_size: int = 2048,
        seed: int = 0,
        chunk_rows: int = 16384,
    ) -> None:
        feats = _as_matrix(features, "reference")
        n, f = feats.shape
        if n == 0:
            raise GuardError("the reference is empty", "reference", 2)
        self.features = feats
        self.n, self.dim = n, f
        rng = np.random.default_rng(seed)
        take = np.sort(rng.choice(n, size=min(n, sample_size), replace=False))
        sample = feats[take].astype(np.float64)
        self.mean = sample.mean(axis=0)
        if f <= n_components:
            self.basis = np.eye(f, dtype=np.float64)
        else:
            k = max(0, min(n_components, sample.shape[0] - 1))
            if k == 0:
                self.basis = np.zeros((0, f), dtype=np.float64)
            else:
                _, _, vt = np.linalg.svd(sample - self.mean, full_matrices=False)
                self.basis = np.ascontiguousarray(vt[:k])
        self.chunk_rows = chunk_rows
        aug = np.empty((n, self.basis.shape[0] + 1), dtype=np.float64)
        norms = np.empty(n, dtype=np.float64)
        for start in range(0, n, chunk_rows):
            stop = min(n, start + chunk_rows)
            aug[start:stop], norms[start:stop] = self._augment(feats[start:stop])
        self.aug = aug
        self.aug_sq = np.sum(aug * aug, axis=1)
        self.norms = norms

    @property
    def n_components(self) -> int:
        return int(self.basis.shape[0])

    def _augment(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """([p(x), |e(x)|], |x|) for x = row - mu, in float64."""
        x = np.asarray(rows, dtype=np.float64) - self.mean[None, :]
        p = x @ self.basis.T
        resid = x - p @ self.basis
        out = np.empty((x.shape[0], p.shape[1] + 1), dtype=np.float64)
        out[:, :-1] = p
        out[:, -1] = np.sqrt(np.sum(resid * resid, axis=1))
        return out, np.sqrt(np.sum(x * x, axis=1))

    def nearest(self, variants: np.ndarray, k: int = 1, block_entries: int = 1 << 22) -> Nearest:
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
        flat = var.reshape(q * t, self.dim)
        aug_v = np.empty((q * t, self.aug.shape[1]), dtype=np.float64)
        norm_v = np.empty(q * t, dtype=np.float64)
        for start in range(0, q * t, self.chunk_rows):
            stop = min(q * t, start + self.chunk_rows)
            aug_v[start:stop], norm_v[start:stop] = self._augment(flat[start:stop])
        aug_v_sq = np.sum(aug_v * aug_v, axis=1)
        tops = [_TopK(k) for _ in range(q)]
        evaluated = np.zeros(q, dtype=np.int64)
        n_chunk = min(self.n, max(1024, block_entries // t))
        q_block = max(1, block_entries // (t * n_chunk))
        for q0 in range(0, q, q_block):
            q1 = min(q, q0 + q_block)
            rows = slice(q0 * t, q1 * t)
            for n0 in range(0, self.n, n_chunk):
                n1 = min(self.n, n0 + n_chunk)
                lb = aug_v_sq[rows, None] + self.aug_sq[None, n0:n1]
                lb -= 2.0 * (aug_v[rows] @ self.aug[n0:n1].T)
                slack = norm_v[rows, None] + self.norms[None, n0:n1]
                lb -= EPS_SQ * slack * slack
                for qi in range(q0, q1):
                    block = lb[(qi - q0) * t : (qi - q0 + 1) * t]
                    evaluated[qi] += self._visit(tops[qi], var[qi], block, n0)
        sq = np.full((q, k), np.inf)
        index = np.full((q, k), -1, dtype=np.int64)
        variant = np.full(q, -1, dtype=np.int64)
        for qi, top in enumerate(tops):
            for j, (s, r, v) in enumerate(top.items):
                sq[qi, j], index[qi, j] = s, r
                if j == 0:
                    variant[qi] = v
        return Nearest(sq=sq, index=index, variant=variant, evaluated=evaluated)

    def _visit(self, top: _TopK, var: np.ndarray, safe_lb: np.ndarray, offset: int) -> int:
        """Evaluate, in increasing bound order, every pair whose safe bound beats the k-th."""
        t, nc = safe_lb.shape
        flat_lb = safe_lb.ravel()
        cand = np.flatnonzero(flat_lb < top.bound())
        if cand.size == 0:
            return 0
        cand = cand[np.argsort(flat_lb[cand], kind="stable")]
        done, pos, step = 0, 0, 8
        while pos < cand.size:
            batch = cand[pos : pos + step]
            pos += step
            step = min(step * 2, 512)
            bound = top.bound()
            batch = batch[flat_lb[batch] < bound]
            if batch.size == 0:
                break  # sorted: every later pair has a bound at least as large
            ts, rs = np.divmod(batch, nc)
            rs = rs + offset
            sq = exact_pair_sq_distances(var, ts, self.features, rs)
            done += batch.size
            bound = top.bound()
            for s, r, tv in zip(sq.tolist(), rs.tolist(), ts.tolist(), strict=True):
                if s < bound or len(top.items) < top.k:
                    top.offer(s, r, tv)
                    bound = top.bound()
        return done


def brute_force_nearest(variants: np.ndarray, features: np.ndarray, k: int = 1) -> Nearest:
    """The definition: every variant against every reference row, exactly (tests, bench)."""
    feats = _as_matrix(features, "reference")
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
            d = np.empty(n)
            for start in range(0, n, _EXACT_ROWS):
                d[start : start + _EXACT_ROWS] = exact_sq_distances(
                    var[qi, tv], feats[start : start + _EXACT_ROWS]
                )
            better = d < best
            best[better] = d[better]
            best_t[better] = tv
        order = np.lexsort((np.arange(n), best))[:k]
        sq[qi, : order.size] = best[order]
        index[qi, : order.size] = order
        variant[qi] = best_t[order[0]]
    return Nearest(sq=sq, index=index, variant=variant, evaluated=np.full(q, t * n))
