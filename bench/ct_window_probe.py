"""Probe for issue 4's CT false rejection: in which HU window does a new CT patient stay far
from the other patients?

For every CT slice of a node home, the pixel RMSE to its nearest slice of another patient, in
several display windows; the one-patient pancreatic series (the patient with most slices)
against the other patients' 1 % and 5 % quantiles, which is where the guard's default
threshold sits. Beside it, what the window costs: noise canaries made exactly as the guard makes
them in the store's space (``privacy.canaries``: Gaussian noise up to 3 % of the store's range),
then re-windowed, and whether their pixel RMSE to their own source stays below the others'
1 % quantile (caught by that metric alone). Two piecewise-linear maps that keep the whole HU
range but stretch soft tissue are measured too.

    .venv/bin/python bench/ct_window_probe.py [--home bench/out/home-ct-full]

The home is any CT node home (``bench_guard.py catch --which ct`` builds one).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WINDOWS = (("store -1024..3071", -1024.0, 3071.0), ("-1000..1000", -1000.0, 1000.0),
           ("soft tissue -160..240", -160.0, 240.0), ("lung -1350..150", -1350.0, 150.0))
# Piecewise-linear maps of the whole store range (HU knots -> [0, 1] values): soft tissue
# (-160..240 HU) stretched over 60 % resp. 50 % of the output range, nothing clipped.
PIECEWISE = (("piecewise, soft tissue 60 %", (-1024.0, -160.0, 240.0, 3071.0),
              (0.0, 0.25, 0.85, 1.0)),
             ("piecewise, soft tissue 50 %", (-1024.0, -160.0, 240.0, 3071.0),
              (0.0, 0.4, 0.9, 1.0)))
NOISE_CANARIES = 400


def nearest_other_patient(x: np.ndarray, patients: np.ndarray) -> np.ndarray:
    flat = x.reshape(len(x), -1)
    d = np.sqrt(((flat[:, None] - flat[None]) ** 2).mean(-1))
    d[patients[:, None] == patients[None]] = np.inf
    return np.asarray(d.min(axis=1))


def main() -> None:
    from node.config import NodePaths, load_node_config
    from node.store import Store

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=REPO / "bench" / "out" / "home-ct-full")
    args = parser.parse_args()
    paths = NodePaths(args.home)
    lo0, hi0 = load_node_config(paths).store.ct_window_hu
    with Store(paths.store) as store:
        parts = [store.images(split, "CT") for split in ("train", "holdout")]
    images = np.concatenate([p[0] for p in parts]).astype(np.float64)
    patients = np.array([r.patient for p in parts for r in p[1]])
    hu = images * (hi0 - lo0) + lo0
    names, counts = np.unique(patients, return_counts=True)
    big = patients == names[counts.argmax()]
    print(f"{len(images)} slices of {len(names)} patients; the largest has {big.sum()}")
    from privacy.canaries import alter

    rng = np.random.default_rng(0)
    source = rng.integers(0, len(images), size=NOISE_CANARIES)
    noisy_hu = np.stack([alter("noise", images[i].astype(np.float32), rng) for i in source]
                        ).astype(np.float64) * (hi0 - lo0) + lo0
    def window(lo: float, hi: float) -> Callable[[np.ndarray], np.ndarray]:
        return lambda h: np.clip((h - lo) / (hi - lo), 0.0, 1.0)

    def piecewise(knots: Any, values: Any) -> Callable[[np.ndarray], np.ndarray]:
        return lambda h: np.asarray(np.interp(h, knots, values))

    maps = ([(name, window(lo, hi)) for name, lo, hi in WINDOWS]
            + [(name, piecewise(k, v)) for name, k, v in PIECEWISE])
    print("| map | largest patient, nearest other patient | others q01 / q05 | others median |"
          " largest patient's slices below others' q01 | noise canaries caught by pixel RMSE"
          " at others' q01 |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for name, to_map in maps:
        mapped = to_map(hu)
        d = nearest_other_patient(mapped, patients)
        q01, q05 = np.quantile(d[~big], [0.01, 0.05])
        canary = np.sqrt(((to_map(noisy_hu) - mapped[source]) ** 2).mean(axis=(1, 2)))
        print(f"| {name} | {d[big].min():.4f}-{d[big].max():.4f} | {q01:.4f} / {q05:.4f} |"
              f" {np.median(d[~big]):.4f} | {np.mean(d[big] < q01):.0%} |"
              f" {np.mean(canary < q01):.1%} (largest {canary.max():.3f}) |")

if __name__ == "__main__":
    main()
