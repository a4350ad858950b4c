"""Canaries: altered copies of real training slices planted among the candidates of every run.

A canary is a copy a memorising generator could have produced. The guard must reject it; the
catch rate per alteration is the guard's self-test, and a run fails when any copy of the kinds
in :data:`MUST_CATCH` passes. Canaries are never exported: callers keep their positions and drop
them before anything else sees the accepted set.

Alterations (normalised [0, 1] images; results are clipped to [0, 1]):

* ``exact``      -- the slice itself;
* ``shift``      -- content moved by an integer (dy, dx), ``1 <= max(|dy|, |dx|) <= 4``, the
  uncovered border filled with the slice's minimum (background), *not* by the edge replication
  the shift metric uses, so the test is not rigged;
* ``mirror``     -- horizontal mirror;
* ``intensity``  -- multiplied by a factor drawn uniformly from [0.9, 1.1];
* ``noise``      -- Gaussian noise of standard deviation drawn uniformly up to 3 % of the range;
* ``rotation``   -- rotated about the centre by up to 5 degrees (bilinear, edge values);
* ``combination`` -- two to four of shift, mirror, intensity, noise and rotation together.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from privacy.metrics import rotate_images

__all__ = ["ALTERATIONS", "MUST_CATCH", "Canaries", "make_canaries", "alter", "catch_rates"]

ALTERATIONS = ("exact", "shift", "mirror", "intensity", "noise", "rotation", "combination")
MUST_CATCH = ("exact", "shift", "mirror", "intensity")

MAX_SHIFT_PX = 4
INTENSITY_RANGE = (0.9, 1.1)
MAX_NOISE_SIGMA = 0.03
MAX_ROTATION_DEG = 5.0


@dataclass
class Canaries:
    images: np.ndarray  # float32 [M, S, S]
    kinds: list[str]  # alteration of each canary
    source: np.ndarray  # int64 [M]: row of the slice it was made from


def _shift_fill(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    h, w = image.shape
    out = np.full_like(image, image.min())
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[yd, xd] = image[ys, xs]
    return out


def _rotate(image: np.ndarray, degrees: float) -> np.ndarray:
    out: np.ndarray = rotate_images(image[None], degrees, keep_table=False)[0]
    return out


def _one(kind: str, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if kind == "exact":
        return image.copy()
    if kind == "shift":
        while True:
            dy, dx = (int(v) for v in rng.integers(-MAX_SHIFT_PX, MAX_SHIFT_PX + 1, size=2))
            if (dy, dx) != (0, 0):
                return _shift_fill(image, dy, dx)
    if kind == "mirror":
        return image[:, ::-1].copy()
    if kind == "intensity":
        return image * np.float32(rng.uniform(*INTENSITY_RANGE))
    if kind == "noise":
        sigma = rng.uniform(0.0, MAX_NOISE_SIGMA)
        return image + rng.normal(0.0, sigma, size=image.shape).astype(np.float32)
    if kind == "rotation":
        return _rotate(image, float(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG)))
    if kind == "combination":
        parts = ["shift", "mirror", "intensity", "noise", "rotation"]
        chosen = sorted(rng.choice(len(parts), size=int(rng.integers(2, 5)), replace=False))
        out = image
        # Geometry first, then intensity, then noise: the order a generator's artefacts take.
        for i in chosen:
            out = _one(parts[i], out, rng)
        return out
    raise ValueError(f"unknown alteration {kind!r}")


def alter(kind: str, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One canary of ``kind`` made from ``image`` [S, S] in [0, 1]."""
    out = _one(kind, np.asarray(image, dtype=np.float32), rng)
    clipped: np.ndarray = np.clip(out, 0.0, 1.0).astype(np.float32)
    return clipped


def make_canaries(
    train: np.ndarray,
    per_alteration: int,
    rng: np.random.Generator,
    kinds: tuple[str, ...] = ALTERATIONS,
    rows: np.ndarray | None = None,
) -> Canaries:
    """``per_alteration`` canaries of each kind from random rows of ``train`` [N, S, S].

    ``rows``, when given, names the rows of ``train`` to draw from (the same canaries as
    ``make_canaries(train[rows], ...)`` without copying every one of those rows); ``source``
    then counts within ``rows``."""
    n = train.shape[0] if rows is None else len(rows)
    images, labels, source = [], [], []
    for kind in kinds:
        picks = rng.integers(0, n, size=per_alteration)
        for row in picks.tolist():
            image = train[row] if rows is None else train[int(rows[row])]
            images.append(alter(kind, image, rng))
            labels.append(kind)
            source.append(row)
    size = train.shape[1:]
    stack = np.stack(images) if images else np.zeros((0, *size), dtype=np.float32)
    return Canaries(stack.astype(np.float32), labels, np.asarray(source, dtype=np.int64))


def catch_rates(kinds: list[str], rejected: np.ndarray) -> dict[str, dict[str, float | int]]:
    """Per alteration: planted, caught and the catch rate (caught / planted)."""
    out: dict[str, dict[str, float | int]] = {}
    rej = np.asarray(rejected, dtype=bool)
    for kind in dict.fromkeys(kinds):
        mask = np.asarray([k == kind for k in kinds])
        planted = int(mask.sum())
        caught = int(rej[mask].sum())
        out[kind] = {"planted": planted, "caught": caught, "rate": caught / planted}
    return out
