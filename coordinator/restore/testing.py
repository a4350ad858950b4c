"""Small node homes of generated phantom slices, for tests and examples of the restoration code.

The slices are generated in code (no patient data): CT discs of water with bone and fat inserts in
air, or MR-like smooth blobs. They go into a real node store through its public API (``NewSlice``,
``add_batch``, ``assign_split``), so the evaluation reads them exactly as it reads ingested data.
Never used by the production code paths.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

__all__ = ["phantom_slices", "make_site_home", "stand_in_synthetic"]


def phantom_slices(
    n: int, size: int = 32, modality: str = "CT", seed: int = 0
) -> np.ndarray:
    """``n`` phantom slices in physical units (HU for CT, arbitrary intensity for MR)."""
    rng = np.random.default_rng(seed)
    yy, xx = (np.mgrid[:size, :size] - (size - 1) / 2) / size
    out = np.empty((n, size, size), np.float32)
    for i in range(n):
        r = 0.35 + 0.08 * rng.random()
        cx, cy = 0.1 * rng.standard_normal(2)
        body = (xx - cx * 0.3) ** 2 + (yy - cy * 0.3) ** 2 < r**2
        if modality == "CT":
            image = np.full((size, size), -1000.0)
            image[body] = 40.0
            image[(xx - cx) ** 2 + (yy - cy) ** 2 < (0.08 + 0.04 * rng.random()) ** 2] = 900.0
            image[(xx + cx) ** 2 + (yy + 0.15) ** 2 < 0.07**2] = -100.0
            image[body] += rng.normal(0, 8, int(body.sum()))
        else:
            image = np.zeros((size, size))
            image[body] = 300.0 + 200.0 * np.cos(6 * xx[body] + i) * np.sin(5 * yy[body])
            image += rng.normal(0, 3, image.shape)
            image = np.maximum(image, 0.0)
        out[i] = image
    return out


def make_site_home(
    root: Path,
    site: str,
    modality: str = "CT",
    patients: int = 4,
    slices_per_patient: int = 3,
    size: int = 32,
    seed: int = 0,
    holdout_fraction: float = 0.25,
) -> Path:
    """A node home whose store holds phantom slices, split by patient."""
    from node.home import init_home
    from node.pseudonym import Pseudonymiser
    from node.store import NewSlice, Store

    home = Path(root) / site
    paths = init_home(home, site)
    pseudo = Pseudonymiser.from_file(paths.pseudonym_secret)
    images = phantom_slices(patients * slices_per_patient, size, modality, seed)
    batch = []
    for i, image in enumerate(images):
        if modality == "CT":
            low, high = -1024.0, 3071.0
            unit = "HU"
        else:
            low, high = float(np.percentile(image, 0.5)), float(np.percentile(image, 99.5))
            unit = "a.u."
        normalised = np.clip((image - low) / (high - low), 0.0, 1.0).astype(np.float32)
        patient = pseudo.patient(f"{site}-patient-{i // slices_per_patient}")
        digest = hashlib.sha256(image.tobytes()).hexdigest()
        batch.append(NewSlice(
            modality=modality, patient=patient, series=pseudo.series(f"{site}-s{patient}"),
            position=float(i % slices_per_patient), source_digest=digest,
            instance_key=pseudo.instance(f"{site}-{i}"), pixels=normalised, unit=unit,
            scale=high - low, offset=low,
        ))
    with Store(paths.store) as store:
        store.add_batch(batch)
        store.assign_split(holdout_fraction, lambda p: pseudo.rank(0, p))
    return home


def stand_in_synthetic(modality: str = "CT", seed: int = 99):  # type: ignore[no-untyped-def]
    """A stand-in for arm S in tests: new phantom slices, NOT guarded synthetic data."""

    def source(site, count, sampling_seed):  # type: ignore[no-untyped-def]
        size = int(site.train.shape[1])
        images = phantom_slices(count, size, modality, seed + sampling_seed + len(site.name))
        return images, {"source": "stand-in phantoms (test only)", "accepted": count}

    return source
