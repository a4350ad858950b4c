"""Probe for issue 4's CT false rejection: in which HU window does a new CT patient stay far
from the other patients?

For every CT slice of a node home, the pixel RMSE to its nearest slice of another patient, in
several display windows; the one-patient pancreatic series (the patient with most slices)
against the other patients' 1 % and 5 % quantiles, which is where the guard's default
threshold sits.

    .venv/bin/python bench/ct_window_probe.py [--home bench/out/home-ct-full]

The home is any CT node home (``bench_guard.py catch --which ct`` builds one).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WINDOWS = (("store -1024..3071", -1024.0, 3071.0), ("-1000..1000", -1000.0, 1000.0),
           ("soft tissue -160..240", -160.0, 240.0), ("lung -1350..150", -1350.0, 150.0))


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
    for name, lo, hi in WINDOWS:
        d = nearest_other_patient(np.clip((hu - lo) / (hi - lo), 0.0, 1.0), patients)
        q01, q05 = np.quantile(d[~big], [0.01, 0.05])
        print(f"{name:22s} largest patient {d[big].min():.4f}-{d[big].max():.4f}; others q01"
              f" {q01:.4f}, q05 {q05:.4f}, median {np.median(d[~big]):.4f}; largest patient's"
              f" slices below the others' q01: {np.mean(d[big] < q01):.0%}")


if __name__ == "__main__":
    main()
