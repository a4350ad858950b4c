"""Calibration of the guard's thresholds from the site's own data, one metric at a time.

The question a threshold answers: *how close does a genuinely new patient come to the site's
real slices?* For each metric we measure the exact distance from every query slice to its
nearest reference slice where query and reference never share a patient, and take the
``quantile`` of those distances (the order statistic ``d_(j)``, ``j = floor(q (n - 1))``) as
the threshold. With the default quantile 0.01 a new patient's slice falls below one metric's
threshold with probability at most ``(j + 1) / (n + 1)`` -- about 1 % for a few hundred
calibration slices, at most ~3 % over three metrics, inside a 5 % false-rejection budget --
while copies (exact, shifted, mirrored, re-contrasted) sit far below. With few calibration
slices (n = 15 for the CT development set) the bound is ``1 / (n + 1)`` per metric: a small
site cannot calibrate finely, and the figure is recorded so the reviewer sees it.

Folds (:func:`make_folds` decides; each is (query rows, reference rows)):

* ``holdout``: the site's split; the holdout patients in up to ``k`` groups, each group's
  slices against every slice of the other patients (train and the other groups). The guard
  screens a new image against *all* of the site's slices, so the calibration's reference is
  nearly as large (before 2026-12-07 it was the train slices only, a fifth smaller: new
  patients' nearest distances came out larger than the guard meets, and the nested
  false-rejection figures of ``bench_guard.py frr`` were higher, 5.4 % against 5.0 % on MR);
* ``leave-patients-out``: no holdout split but several patients: patients in ``k`` groups,
  each group against all the others;
* ``leave-slab-out``: one patient: each series cut into ``k`` contiguous slabs by position,
  each slab against the rest minus ``gap`` slices either side of it, so the distances are not
  those of immediate neighbours. One patient cannot tell us how close a *new* patient comes;
  such thresholds are lower (less protective), and the site floor matters most there.

Also recorded: distances between neighbouring slices of one series (what "a slice the model
has never seen but is one step from a real one" looks like), for the manifest.

A computed threshold below the site's floor is refused (:class:`GuardError`), never clamped;
so is a threshold of zero (a query slice duplicates a reference slice). Pure arrays in,
numbers out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from privacy.errors import GuardError
from privacy.guard import metric_nearest
from privacy.metrics import Metric
from privacy.search import ExactIndex, index_layout

__all__ = [
    "Fold",
    "MetricCalibration",
    "Calibration",
    "make_folds",
    "threshold_from_distances",
    "expected_false_rejection",
    "calibrate_thresholds",
    "summarise",
]

QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5)


@dataclass(frozen=True)
class Fold:
    queries: np.ndarray  # int rows of the pooled images
    reference: np.ndarray


def summarise(values: np.ndarray) -> dict[str, float]:
    """min, 1 %, 5 %, 25 %, median and max of ``values`` (empty: {})."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {}
    out = {f"q{int(q * 100):02d}": float(np.quantile(v, q)) for q in QUANTILES}
    out["min"] = out.pop("q00")
    out["max"] = float(v.max())
    out["n"] = float(v.size)
    return out


def _patient_group_folds(patients: Sequence[str], queried: list[str], k: int) -> list[Fold]:
    """The patients ``queried`` in up to ``k`` groups; each group's slices against every slice
    of the other patients (queried or not)."""
    pat = np.asarray(patients)
    rows = np.arange(len(patients))
    kk = min(k, len(queried))
    folds = []
    for group in (queried[i::kk] for i in range(kk)):
        mask = np.isin(pat, group)
        folds.append(Fold(rows[mask], rows[~mask]))
    return folds


def make_folds(
    patients: Sequence[str],
    splits: Sequence[str],
    series: Sequence[str],
    positions: Sequence[float],
    k: int = 5,
    gap: int = 2,
) -> tuple[str, list[Fold]]:
    """Choose the calibration method for a pool of slices and return (method, folds)."""
    n = len(patients)
    rows = np.arange(n)
    split = np.asarray(splits)
    unique_patients = sorted(set(patients))
    hold, train = rows[split == "holdout"], rows[split == "train"]
    holdout_patients = {patients[i] for i in hold.tolist()}
    train_patients = {patients[i] for i in train.tolist()}
    if hold.size and train.size and not holdout_patients & train_patients:
        # Holdout patients in up to k groups, each against every slice of the other patients
        # (train and the other groups): the guard screens a new patient against all of the
        # site's slices, so its calibration reference is nearly as large. Against the train
        # slices alone (a fifth fewer) new patients' nearest distances came out larger than
        # the guard then meets, and more new patients were rejected than the quantile says.
        return "holdout", _patient_group_folds(patients, sorted(holdout_patients), max(1, k))
    if len(unique_patients) >= 2:
        return "leave-patients-out", _patient_group_folds(patients, unique_patients, k)
    folds = []
    by_series: dict[str, list[int]] = {}
    for i, s in enumerate(series):
        by_series.setdefault(s, []).append(i)
    for members in by_series.values():
        ordered = sorted(members, key=lambda i: (positions[i], i))
        m = len(ordered)
        if m < 3:
            continue
        kk = min(k, m)
        bounds = np.linspace(0, m, kk + 1).round().astype(int)
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            if b <= a:
                continue
            query = ordered[a:b]
            excluded = set(ordered[max(0, a - gap) : min(m, b + gap)])
            ref = [i for i in rows.tolist() if i not in excluded]
            if ref:
                folds.append(Fold(np.asarray(query), np.asarray(ref)))
    if not folds:
        raise GuardError(
            "too few slices to calibrate (one patient needs a series of at least 3 slices)",
            "calibration",
            2,
        )
    return "leave-slab-out", folds


def expected_false_rejection(n: int, quantile: float) -> float:
    """Upper bound (j + 1) / (n + 1) on a new slice's chance to fall below d_(j)."""
    if n <= 0:
        return 1.0
    j = int(np.floor(quantile * (n - 1)))
    return (j + 1) / (n + 1)


def threshold_from_distances(
    metric: str, distances: np.ndarray, quantile: float, floor: float | None
) -> float:
    """The ``quantile`` of new-patient distances; refused (never clamped) below ``floor``."""
    d = np.asarray(distances, dtype=np.float64)
    d = d[np.isfinite(d)]
    if d.size == 0:
        raise GuardError(f"no calibration distances for {metric}", "calibration", 2)
    if not 0.0 <= quantile < 1.0:
        raise GuardError("threshold_quantile must be in [0, 1)", "guard.threshold_quantile", 2)
    # The order statistic d_(j), j = floor(q (n - 1)) (numpy's "lower"): an observed new-patient
    # distance. For a new slice exchangeable with the calibration slices,
    # P(d_new < d_(j)) <= (j + 1) / (n + 1) (the conformal rank argument), recorded as
    # ``expected_false_rejection``.
    threshold = float(np.quantile(d, quantile, method="lower"))
    if not threshold > 0.0:
        raise GuardError(
            f"calibrated {metric} threshold is 0: a calibration slice duplicates a reference "
            "slice of another patient; deduplicate the store or set a higher quantile",
            "calibration",
            2,
        )
    if floor is not None and threshold < floor:
        raise GuardError(
            f"calibrated {metric} threshold {threshold:.6g} is below the site floor {floor:.6g};"
            " refusing (thresholds are never clamped)",
            f"policy.guard_floor.{metric}",
            2,
        )
    return threshold


@dataclass
class MetricCalibration:
    metric: str
    threshold: float
    quantile: float
    floor: float | None
    new_patient: dict[str, float]
    neighbour: dict[str, float]
    metric_config: dict[str, object]
    expected_false_rejection: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "threshold": self.threshold,
            "quantile": self.quantile,
            "floor": self.floor,
            "new_patient_to_nearest": self.new_patient,
            "neighbouring_slices": self.neighbour,
            "metric_config": self.metric_config,
            "expected_false_rejection": self.expected_false_rejection,
        }


@dataclass
class Calibration:
    method: str
    n_queries: int
    folds: int
    metrics: dict[str, MetricCalibration]
    distances: dict[str, np.ndarray] = field(repr=False)  # new-patient distances per metric

    @property
    def thresholds(self) -> dict[str, float]:
        return {name: c.threshold for name, c in self.metrics.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "n_queries": self.n_queries,
            "folds": self.folds,
            "thresholds": self.thresholds,
            "metrics": {name: c.to_dict() for name, c in self.metrics.items()},
        }


def calibrate_thresholds(
    metrics: Sequence[Metric],
    images: np.ndarray,
    folds: Sequence[Fold],
    method: str,
    quantile: float,
    floors: dict[str, float] | None = None,
    neighbour_pairs: np.ndarray | None = None,
    n_components: int = 256,
    seed: int = 0,
) -> Calibration:
    """Thresholds per metric from exact nearest distances over ``folds`` of ``images``.

    ``images``: float32 [N, S, S]; ``neighbour_pairs``: int [P, 2] rows of neighbouring slices.
    """
    floors = dict(floors or {})
    unknown = sorted(set(floors) - {m.name for m in metrics})
    if unknown:
        raise GuardError(f"site floor for unknown metrics {unknown}", "policy.guard_floor", 2)
    arr = np.asarray(images, dtype=np.float32)
    shape = (int(arr.shape[1]), int(arr.shape[2]))
    result: dict[str, MetricCalibration] = {}
    all_d: dict[str, np.ndarray] = {}
    n_queries = int(sum(f.queries.size for f in folds))
    features: dict[str, np.ndarray] = {}
    for metric in metrics:
        if metric.feature_space not in features:
            features[metric.feature_space] = metric.reference_features(arr)
        feats = features[metric.feature_space]
        parts = []
        for fold in folds:
            layout = index_layout(metric.n_variants(), n_components)
            index = ExactIndex(feats[fold.reference], seed=seed, **layout)
            near = metric_nearest(metric, index, arr[fold.queries], k=1)
            parts.append(near.distances(metric.scale(shape))[:, 0])
        d = np.concatenate(parts) if parts else np.zeros(0)
        neighbour = np.zeros(0)
        if neighbour_pairs is not None and len(neighbour_pairs):
            neighbour = np.asarray(
                [metric.distance(arr[a], arr[b]) for a, b in np.asarray(neighbour_pairs)]
            )
        floor = floors.get(metric.name)
        threshold = threshold_from_distances(metric.name, d, quantile, floor)
        all_d[metric.name] = d
        result[metric.name] = MetricCalibration(
            metric=metric.name,
            threshold=threshold,
            quantile=quantile,
            floor=floor,
            new_patient=summarise(d),
            neighbour=summarise(neighbour),
            metric_config=metric.describe(),
            expected_false_rejection=expected_false_rejection(d.size, quantile),
        )
    return Calibration(method, n_queries, len(folds), result, all_d)
