"""The guard: several metrics, one exact index per feature space, one decision per image.

An image is accepted only when, under *every* metric, its exact nearest-neighbour distance to
the reference (every real slice of the site) is at or above that metric's threshold.

* Metrics with one variant per image (pixel RMSE, contrast RMSE, embedding) get their exact
  nearest and second-nearest distances from :class:`privacy.search.ExactIndex`, which equals
  brute force; the privacy report is computed on them.
* Metrics with many variants per image whose features are image windows (shift / mirror /
  rotation: 486 variants) are *decided* by :class:`privacy.tiles.TileIndex` with the search
  capped at the threshold: an image closer than the threshold gets its exact nearest distance;
  for every other image the guard records a proven lower bound on that distance, at or above
  the threshold (:attr:`Screening.bounded`). Computing exact distances for accepted images
  under that metric cost a third of a sampling step per image.
* ``screen(images, search_rejected=False)`` (what generate and screen runs use) searches the
  one-variant metrics first and runs the window search only on the images none of them
  rejected: the decisions are the same (an image is rejected when *any* metric finds it too
  close), and an image already rejected gets NaN under the window metric ("not searched").
  The window search is three quarters of the guard's time, and most canaries (exact,
  re-scaled, noisy and most rotated copies) are already caught by the cheaper metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from privacy.errors import GuardError
from privacy.metrics import Metric, check_images
from privacy.search import (
    DENSE_ENTRIES,
    ExactIndex,
    Nearest,
    dense_scaled_nearest,
    index_layout,
)
from privacy.tiles import TileIndex, tile_sizes

__all__ = ["Guard", "Screening", "metric_nearest", "blas_threads"]

_T = TypeVar("_T")

_QUERY_BLOCK_ENTRIES = 1 << 22  # float32 entries of query variants held at once


def blas_threads() -> int:
    """Threads BLAS would use (``OMP_NUM_THREADS`` and friends), at least 1."""
    from threadpoolctl import threadpool_info

    counts = [int(i.get("num_threads") or 1) for i in threadpool_info()
              if i.get("user_api") == "blas"]
    return max([1, *counts])


def _query_blocks(metric: Metric, arr: np.ndarray) -> list[slice]:
    """The blocks of queries whose variants are computed at once (bounded memory)."""
    per_image = metric.n_variants() * arr.shape[1] * arr.shape[2]
    block = max(1, _QUERY_BLOCK_ENTRIES // per_image)
    return [slice(start, start + block) for start in range(0, arr.shape[0], block)]


def metric_nearest(
    metric: Metric, index: ExactIndex, images: np.ndarray, k: int = 2
) -> Nearest:
    """Exact k nearest references of ``images`` under ``metric`` (queries in blocks)."""
    arr = check_images(images)
    parts = [index.nearest(metric.query_variants(arr[b]), k=k)
             for b in _query_blocks(metric, arr)]
    return Nearest.concat(parts, max(1, min(k, index.n)))


@dataclass
class Screening:
    """Decisions and exact distances for a batch of candidates."""

    accepted: np.ndarray  # bool [Q]
    distances: dict[str, np.ndarray]  # metric -> exact nearest distance [Q]
    second: dict[str, np.ndarray]  # metric -> exact second-nearest distance [Q]
    nearest_row: dict[str, np.ndarray]  # metric -> reference row of the nearest [Q]
    failed: list[list[str]]  # per candidate: metrics whose threshold it breaks
    evaluated_pairs: dict[str, int] = field(default_factory=dict)
    brute_force_pairs: dict[str, int] = field(default_factory=dict)
    #: Metrics decided by a search capped at the threshold: their ``distances`` are exact below
    #: the threshold and proven lower bounds (at or above it) elsewhere; ``second`` is inf and
    #: ``nearest_row`` -1 where no reference is closer than the threshold.
    bounded: tuple[str, ...] = ()

    def searched(self) -> dict[str, int]:
        """Per metric, how many candidates it searched: fewer than all where a screen with
        ``search_rejected=False`` left out images another metric had already rejected (their
        ``distances`` are NaN, ``second`` inf and ``nearest_row`` -1 under that metric)."""
        return {m: int(np.count_nonzero(~np.isnan(d))) for m, d in self.distances.items()}

    def rejected(self, thresholds: dict[str, float]) -> list[dict[str, object]]:
        """One entry per rejected candidate: the first failing metric (in metric order)."""
        out: list[dict[str, object]] = []
        for i, names in enumerate(self.failed):
            if names:
                m = names[0]
                out.append(
                    {
                        "index": i,
                        "metric": m,
                        "distance": float(self.distances[m][i]),
                        "threshold": float(thresholds[m]),
                        "failed": list(names),
                    }
                )
        return out


class Guard:
    """Metrics with thresholds over a fixed reference of real slices [N, S, S]."""

    def __init__(
        self,
        metrics: Sequence[Metric],
        reference: np.ndarray,
        thresholds: dict[str, float],
        n_components: int = 256,
        seed: int = 0,
        index_factory: Callable[[str, np.ndarray, dict[str, Any]], ExactIndex] | None = None,
        features_factory: Callable[[Metric, np.ndarray], np.ndarray] | None = None,
        workers: int | None = None,
        tile_factory: Callable[[Metric, np.ndarray, tuple[int, int]], TileIndex] | None = None,
        dense_factory: Callable[[Metric, np.ndarray], ExactIndex] | None = None,
    ) -> None:
        """``index_factory(feature_space, features, layout)``, when given, supplies each exact
        index (a cache of them, say); it must return an index of exactly those features.
        ``features_factory(metric, reference)``, when given, supplies the reference features
        of each :attr:`Metric.costly_features` metric (a cache of them, say); it must return
        exactly ``metric.reference_features(reference)``. Other metrics' features are
        :meth:`Metric.reference_rows` (rows made when read, where that is cheap).
        ``tile_factory(metric, features, window_shape)``, when given, supplies each tile
        index (kept between runs, say). ``dense_factory(metric, features)``, when given,
        supplies each dense index of a one-variant metric (its rows' norms kept, say); it
        must return ``ExactIndex.dense(features)`` or an equal one.
        ``workers``: threads of :meth:`screen` (default: as many as BLAS would use, i.e.
        ``OMP_NUM_THREADS``)."""
        if not metrics:
            raise GuardError("the guard needs at least one metric", "guard.metrics", 2)
        names = [m.name for m in metrics]
        if len(set(names)) != len(names):
            raise GuardError(f"duplicate metrics {names}", "guard.metrics", 2)
        missing = [n for n in names if n not in thresholds]
        if missing:
            raise GuardError(f"no threshold for {missing}", "guard.thresholds", 2)
        for n in names:
            if not thresholds[n] > 0:
                raise GuardError(f"threshold of {n} must be > 0", "guard.thresholds", 2)
        ref = np.asarray(reference)
        if ref.ndim != 3 or ref.shape[0] == 0:
            raise GuardError(f"reference must be [N, H, W], N > 0; found {ref.shape}", "guard", 2)
        if workers is not None and workers < 1:
            raise GuardError("workers must be >= 1", "guard.workers", 2)
        self.workers = workers if workers is not None else blas_threads()
        self.metrics = list(metrics)
        self.thresholds = {n: float(thresholds[n]) for n in names}
        self.image_shape = (int(ref.shape[1]), int(ref.shape[2]))
        self.n_reference = int(ref.shape[0])
        self.indexes: dict[str, ExactIndex] = {}
        self.tile_indexes: dict[str, TileIndex] = {}

        def features(m: Metric) -> np.ndarray:
            if features_factory is None or not m.costly_features:
                return m.reference_rows(ref)
            feats = np.asarray(features_factory(m, ref))
            if feats.ndim != 2 or feats.shape[0] != ref.shape[0]:
                raise GuardError(f"features of {m.name} do not match the reference", "guard", 1)
            return feats

        for m in self.metrics:
            windows = m.windows(ref[:1]) if m.n_variants() > 1 else None
            if windows is not None and tile_sizes(*windows.shape):
                if m.feature_space not in self.tile_indexes:
                    feats = features(m)
                    tiles = (TileIndex(feats, windows.shape) if tile_factory is None
                             else tile_factory(m, feats, windows.shape))
                    if (tiles.n, tiles.shape) != (feats.shape[0], windows.shape):
                        raise GuardError(f"tile index of {m.feature_space} does not match",
                                         "guard", 1)
                    self.tile_indexes[m.feature_space] = tiles
                continue
            if m.feature_space not in self.indexes:
                feats = features(m)
                layout = index_layout(m.n_variants(), n_components)
                if m.n_variants() == 1 and feats.size <= DENSE_ENTRIES:
                    # A small reference: one GEMM per batch beats any projection; only the
                    # rows' norms to build (or keep).
                    dense = (ExactIndex.dense(feats) if dense_factory is None
                             else dense_factory(m, feats))
                    if not dense.dense_only or (dense.n, dense.dim) != feats.shape:
                        raise GuardError(f"index of {m.feature_space} does not match", "guard", 1)
                    self.indexes[m.feature_space] = dense
                    continue
                if index_factory is not None:
                    index = index_factory(m.feature_space, feats, layout)
                else:
                    index = ExactIndex(feats, seed=seed, **layout)
                if (index.n, index.dim) != feats.shape:
                    raise GuardError(f"index of {m.feature_space} does not match", "guard", 1)
                self.indexes[m.feature_space] = index
        #: Metric -> the metric whose float32 GEMM its dense search reuses (its features
        #: rescale that one's, :attr:`Metric.scaled_from`; both indexes dense).
        self.rescales: dict[str, str] = {}
        one = {m.feature_space: m for m in self.metrics
               if m.n_variants() == 1 and m.feature_space in self.indexes}
        for m in self.metrics:
            base = one.get(m.scaled_from or "")
            if (m.feature_space in one and base is not None and base is not m
                    and self.indexes[m.feature_space].dense_only
                    and self.indexes[base.feature_space].dense_only
                    and base.name not in self.rescales.values()):
                self.rescales[m.name] = base.name

    def nearest(self, metric: Metric, images: np.ndarray, k: int = 2) -> Nearest:
        """Exact k nearest references under ``metric``: by :class:`ExactIndex`, or by the
        uncapped tile search for a metric the guard decides with :meth:`decide`."""
        if metric.feature_space in self.tile_indexes:
            index = self.tile_indexes[metric.feature_space]
            windows = metric.windows(check_images(images))
            assert windows is not None
            return index.nearest(windows, k=k)
        return metric_nearest(metric, self.indexes[metric.feature_space], images, k)

    def bounded(self, metric: Metric) -> bool:
        """Whether ``metric`` is decided by a search capped at its threshold."""
        return metric.feature_space in self.tile_indexes

    def decide(self, metric: Metric, images: np.ndarray) -> Nearest:
        """Nearest references closer than the threshold (k = 2), and a proven lower bound
        (``floor_sq``) on every image's nearest squared feature distance."""
        scale = metric.scale(self.image_shape)
        # Slightly above the threshold: every distance the guard would call "below the
        # threshold" after its own rounding is inside the cap, so it is found exactly.
        cap_sq = (self.thresholds[metric.name] / scale) ** 2 * (1.0 + 1e-9)
        arr = check_images(images)
        index = self.tile_indexes[metric.feature_space]
        parts = []
        for start in range(0, arr.shape[0], 64):
            windows = metric.windows(arr[start : start + 64])
            assert windows is not None
            parts.append(index.nearest(windows, k=2, cap_sq=cap_sq))
        return Nearest.concat(parts, 2)

    def _in_workers(self, arr: np.ndarray, work: Callable[[np.ndarray], _T]) -> list[_T]:
        """``work(rows)`` on :attr:`workers` contiguous shares of ``arr``'s rows, in order,
        each in its own thread with one BLAS thread: most of the searches' time is numpy
        outside BLAS, and a multi-threaded BLAS call leaves a helper thread spinning for a
        while, which slowed a search that followed it by a third. Each candidate's search is
        independent of the others, so the split changes no result."""
        split = np.array_split(np.arange(arr.shape[0]), max(1, min(self.workers, arr.shape[0])))
        if len(split) < 2:
            return [work(split[0])]
        from concurrent.futures import ThreadPoolExecutor

        from threadpoolctl import threadpool_limits

        with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(len(split)) as pool:
            return list(pool.map(work, split))

    def _search_tiled(self, tiled: list[Metric], arr: np.ndarray) -> dict[str, Nearest]:
        """The capped window searches of ``arr``, in :attr:`workers` threads."""
        parts = self._in_workers(arr, lambda rows: {m.name: self.decide(m, arr[rows])
                                                    for m in tiled})
        return {m.name: Nearest.concat([found[m.name] for found in parts], 2) for m in tiled}

    def _below(self, metric: Metric, res: Nearest) -> np.ndarray:
        """Which images ``res`` finds closer than ``metric``'s threshold (the test
        :meth:`screen` applies)."""
        d = res.distances(metric.scale(self.image_shape))[:, 0]
        below: np.ndarray = d < self.thresholds[metric.name]
        return below

    def _search_all(
        self, arr: np.ndarray, search_rejected: bool
    ) -> dict[str, tuple[Nearest, np.ndarray | None]]:
        """Every metric's search of ``arr``: per metric its result and the rows it searched
        (None: all). With ``search_rejected``, the window searches first
        (:meth:`_search_tiled`), then the dense one-variant searches with BLAS's own threads
        (one GEMM of the batch against the reference each). Without it, each of
        :attr:`workers` threads takes its share of the candidates through the one-variant
        searches and then the window search of those none of them rejected, all with one BLAS
        thread (a multi-threaded BLAS call would leave its helper spinning into the window
        searches, :meth:`_in_workers`)."""
        tiled = [m for m in self.metrics if self.bounded(m)]
        dense = [m for m in self.metrics if not self.bounded(m)]
        out: dict[str, tuple[Nearest, np.ndarray | None]] = {}
        if search_rejected or arr.shape[0] == 0:
            out.update({name: (res, None) for name, res in self._search_tiled(tiled, arr).items()})
            out.update({m.name: (self.nearest(m, arr, 2), None) for m in dense})
            return out
        # One-variant query features are computed here, in the same blocks as
        # metric_nearest (the embedding's come from a network that runs its own threads);
        # each worker then takes its own candidates through every one-variant search and the
        # window search of those none rejected, with one BLAS thread: the dense GEMMs of the
        # two workers run side by side instead of one after the other.
        feats = {m.name: np.concatenate([m.query_variants(arr[b])
                                         for b in _query_blocks(m, arr)])
                 for m in dense if m.n_variants() == 1}

        by_name = {m.name: m for m in dense}
        pairs = {base: name for name, base in self.rescales.items()}

        def part(rows: np.ndarray) -> tuple[dict[str, Nearest], np.ndarray]:
            found: dict[str, Nearest] = {}
            for m in dense:
                if m.name in self.rescales:
                    continue  # searched with the metric it rescales
                if m.name in pairs:  # one GEMM for both (privacy.search, "Rescaled rows")
                    other = by_name[pairs[m.name]]
                    found[m.name], found[other.name] = dense_scaled_nearest(
                        self.indexes[m.feature_space], feats[m.name][rows][:, 0],
                        self.indexes[other.feature_space], feats[other.name][rows][:, 0], 2)
                else:
                    found[m.name] = (self.indexes[m.feature_space].nearest(feats[m.name][rows],
                                                                           k=2)
                                     if m.name in feats else self.nearest(m, arr[rows], 2))
            rejected = np.zeros(rows.size, dtype=bool)
            for m in dense:
                rejected |= self._below(m, found[m.name])
            keep = rows[~rejected]
            for m in tiled:
                found[m.name] = self.decide(m, arr[keep])
            return found, keep

        parts = self._in_workers(arr, part)
        keep = np.concatenate([kept for _, kept in parts])
        for m in self.metrics:  # every part holds at least one candidate
            res = Nearest.concat([found[m.name] for found, _ in parts], 2)
            out[m.name] = (res, keep if self.bounded(m) else None)
        return out

    def screen(self, images: np.ndarray, *, search_rejected: bool = True) -> Screening:
        """Decide every image. ``search_rejected=False`` skips the window search of images a
        one-variant metric already rejected (same decisions; see the module docstring)."""
        arr = check_images(images, "candidates")
        if arr.shape[1:] != self.image_shape:
            raise GuardError(
                f"candidates are {arr.shape[1:]}, the reference is {self.image_shape}",
                "candidates",
                2,
            )
        q = arr.shape[0]
        distances, second, rows = {}, {}, {}
        evaluated, brute = {}, {}
        failed: list[list[str]] = [[] for _ in range(q)]
        bounded = []
        found = self._search_all(arr, search_rejected)
        for m in self.metrics:
            scale = m.scale(self.image_shape)
            res, where = found[m.name]
            d = res.distances(scale)
            if self.bounded(m):
                bounded.append(m.name)
                d[:, 0] = np.where(np.isfinite(d[:, 0]), d[:, 0], np.sqrt(res.floor_sq) * scale)
            # Images left out of a search: NaN distance ("not searched"), no second, no row.
            rows_in = np.arange(q) if where is None else where
            first, sec = np.full(q, np.nan), np.full(q, np.inf)
            row = np.full(q, -1, dtype=res.index.dtype)
            first[rows_in] = d[:, 0]
            if d.shape[1] > 1:
                sec[rows_in] = d[:, 1]
            row[rows_in] = res.index[:, 0]
            distances[m.name], second[m.name], rows[m.name] = first, sec, row
            n_searched = q if where is None else int(where.size)
            evaluated[m.name] = int(res.evaluated.sum())
            brute[m.name] = n_searched * m.n_variants() * self.n_reference
            for i in np.flatnonzero(first < self.thresholds[m.name]).tolist():
                failed[i].append(m.name)
        accepted = np.asarray([not f for f in failed], dtype=bool)
        return Screening(accepted, distances, second, rows, failed, evaluated, brute,
                         tuple(bounded))
