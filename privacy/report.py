"""The privacy report of a run: how far the exported images are from the site's real slices.

Three figures per metric, all computed on exact nearest-neighbour distances:

* **DCR overfitting-protection score** (DCR: distance to closest record). Let ``A`` be the
  accepted images' distances to their closest real slice and ``H`` the calibration distances
  of genuinely new patients' slices to their closest train slice. With
  ``p = P(A > H) + P(A = H) / 2`` (the Mann-Whitney probability over all pairs),
  ``score = min(1, 2 p)``. A generator whose images are as new as a new patient's scan gives
  ``p ~ 0.5`` and the best score 1.0; one whose accepted images still hug real slices gives
  ``p -> 0`` and a score near 0. (``A`` is measured against *all* real slices, ``H`` against
  train only, so the score errs on the cautious side.)
* **NNDR** (nearest-neighbour distance ratio): closest over second-closest real slice.
  Near 1, an image is no closer to one particular slice than to its runner-up; near 0, it is a
  near-copy of one slice. Reported as quantiles.
* **Per-patient exposure**: for each accepted image, the (pseudonymous) patient of its closest
  real slice; counts per patient and the largest share. One patient owning most nearest
  neighbours is the footprint of a generator fixating on that patient.

Pure numbers: the caller supplies pseudonyms, never raw identifiers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from privacy.calibrate import summarise

__all__ = ["dcr_score", "nndr", "patient_exposure", "privacy_report"]


def dcr_score(accepted: np.ndarray, new_patient: np.ndarray) -> float | None:
    """``min(1, 2 P(A > H) + P(A = H))`` over all pairs; None when either side is empty."""
    a = np.sort(np.asarray(accepted, dtype=np.float64))
    h = np.sort(np.asarray(new_patient, dtype=np.float64))
    if a.size == 0 or h.size == 0:
        return None
    below = np.searchsorted(h, a, side="left")  # H < a
    below_eq = np.searchsorted(h, a, side="right")  # H <= a
    p = (below.sum() + 0.5 * (below_eq - below).sum()) / (a.size * h.size)
    return float(min(1.0, 2.0 * p))


def nndr(nearest: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Ratio nearest / second nearest (1.0 where the second is 0 or missing)."""
    d1 = np.asarray(nearest, dtype=np.float64)
    d2 = np.asarray(second, dtype=np.float64)
    out = np.ones_like(d1)
    ok = np.isfinite(d2) & (d2 > 0)
    out[ok] = d1[ok] / d2[ok]
    return out


def patient_exposure(nearest_patients: Sequence[str]) -> dict[str, Any]:
    """Counts of accepted images per patient of their closest real slice."""
    counts = Counter(nearest_patients)
    total = sum(counts.values())
    top = counts.most_common()
    return {
        "images": total,
        "patients_touched": len(counts),
        "max_count": top[0][1] if top else 0,
        "max_share": (top[0][1] / total) if total else 0.0,
        "counts": {p: c for p, c in top},
    }


def privacy_report(
    distances: dict[str, np.ndarray],
    second: dict[str, np.ndarray],
    new_patient: dict[str, np.ndarray],
    nearest_patients: Mapping[str, Sequence[str]],
) -> dict[str, Any]:
    """Per metric: accepted distance quantiles, DCR score, NNDR quantiles, exposure."""
    out: dict[str, Any] = {}
    for name, d in distances.items():
        out[name] = {
            "accepted_to_nearest": summarise(d),
            "new_patient_to_nearest": summarise(new_patient.get(name, np.zeros(0))),
            "dcr_score": dcr_score(d, new_patient.get(name, np.zeros(0))),
            "nndr": summarise(nndr(d, second[name])) if len(d) else {},
            "patient_exposure": patient_exposure(nearest_patients.get(name, [])),
        }
    return out
