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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from privacy.errors import GuardError
from privacy.metrics import Metric, check_images
from privacy.search import DENSE_ENTRIES, ExactIndex, Nearest, index_layout
from privacy.tiles import TileIndex, tile_sizes

__all__ = ["Guard", "Screening", "metric_nearest", "blas_threads"]

_QUERY_BLOCK_ENTRIES = 1 << 22  # float32 entries of query variants held at once


def blas_threads() -> int:
    """Threads BLAS would use (``OMP_NUM_THREADS`` and friends), at least 1."""
    from threadpoolctl import threadpool_info

    counts = [int(i.get("num_threads") or 1) for i in threadpool_info()
              if i.get("user_api") == "blas"]
    return max([1, *counts])


def metric_nearest(
    metric: Metric, index: ExactIndex, images: np.ndarray, k: int = 2
) -> Nearest:
    """Exact k nearest references of ``images`` under ``metric`` (queries in blocks)."""
    arr = check_images(images)
    per_image = metric.n_variants() * arr.shape[1] * arr.shape[2]
    block = max(1, _QUERY_BLOCK_ENTRIES // per_image)
    parts = [
        index.nearest(metric.query_variants(arr[start : start + block]), k=k)
        for start in range(0, arr.shape[0], block)
    ]
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
    ) -> None:
        """``index_factory(feature_space, features, layout)``, when given, supplies each exact
        index (a cache of them, say); it must return an index of exactly those features.
        ``features_factory(metric, reference)``, when given, supplies each metric's reference
        features (a cache of :attr:`Metric.costly_features` ones, say); it must return exactly
        ``metric.reference_features(reference)``. ``tile_factory(metric, features,
        window_shape)``, when given, supplies each tile index (kept between runs, say).
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
            if features_factory is None:
                return m.reference_features(ref)
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
                    # A small reference: one GEMM per batch beats any projection, and there is
                    # nothing to build or keep.
                    self.indexes[m.feature_space] = ExactIndex.dense(feats)
                    continue
                if index_factory is not None:
                    index = index_factory(m.feature_space, feats, layout)
                else:
                    index = ExactIndex(feats, seed=seed, **layout)
                if (index.n, index.dim) != feats.shape:
                    raise GuardError(f"index of {m.feature_space} does not match", "guard", 1)
                self.indexes[m.feature_space] = index

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

    def _search_all(self, arr: np.ndarray) -> dict[str, Nearest]:
        """Every metric's search of ``arr``. The capped tile searches come first and run in
        :attr:`workers` threads, each over its own candidates with one BLAS thread: most of
        their time is numpy outside BLAS, and a multi-threaded BLAS call leaves a helper
        thread spinning for a while, which slowed a search that followed it by a third. Each
        candidate's search is independent of the others, so the split changes no result. The
        dense one-variant searches follow, with BLAS's own threads: one GEMM of the batch
        against the reference, which two threads of their own would each read whole."""
        tiled = [m for m in self.metrics if self.bounded(m)]
        split = np.array_split(np.arange(arr.shape[0]), max(1, min(self.workers, arr.shape[0])))
        out: dict[str, Nearest] = {}
        if len(split) > 1 and tiled:
            from concurrent.futures import ThreadPoolExecutor

            from threadpoolctl import threadpool_limits

            with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(len(split)) as pool:
                for m in tiled:
                    found = list(pool.map(lambda rows, m=m: self.decide(m, arr[rows]), split))
                    out[m.name] = Nearest.concat(found, 2)
        for m in self.metrics:
            if m.name not in out:
                out[m.name] = self.decide(m, arr) if self.bounded(m) else self.nearest(m, arr, 2)
        return out

    def screen(self, images: np.ndarray) -> Screening:
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
        found = self._search_all(arr)
        for m in self.metrics:
            scale = m.scale(self.image_shape)
            res = found[m.name]
            d = res.distances(scale)
            if self.bounded(m):
                bounded.append(m.name)
                d[:, 0] = np.where(np.isfinite(d[:, 0]), d[:, 0], np.sqrt(res.floor_sq) * scale)
            distances[m.name] = d[:, 0]
            second[m.name] = d[:, 1] if d.shape[1] > 1 else np.full(q, np.inf)
            rows[m.name] = res.index[:, 0]
            evaluated[m.name] = int(res.evaluated.sum())
            brute[m.name] = q * m.n_variants() * self.n_reference
            for i in np.flatnonzero(d[:, 0] < self.thresholds[m.name]).tolist():
                failed[i].append(m.name)
        accepted = np.asarray([not f for f in failed], dtype=bool)
        return Screening(accepted, distances, second, rows, failed, evaluated, brute,
                         tuple(bounded))
