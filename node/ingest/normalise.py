"""Normalisation of physical-unit slices onto the model grid.

A slice arrives in physical units (CT: Hounsfield units; MR / images: scanner units; PT: SUV or
Bq/ml) at its own matrix and pixel spacing, and leaves as float32 [S, S] in [0, 1] with the
linear mapping back (``physical = stored * scale + offset``) and the pixel spacing of the model
grid. CT uses the site's fixed HU window, so every CT slice shares one mapping; MR, PT and
plain images use per-slice percentiles (their units are not comparable between scans).

Geometry keeps the physical aspect ratio: the slice is resized so its longer physical side
fills the grid, then padded to a square with background (0 after windowing, i.e. air for CT).
Downsampling averages areas (MONAI ``Resize(mode="area")``: the exact box filter for integer
factors such as 512 -> 64, so the mean intensity is kept and no aliasing is introduced);
upsampling is bilinear. This module never reads or writes files.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

__all__ = [
    "Normalised",
    "EMPTY_LEVEL",
    "AIR_HU",
    "intensity_window",
    "normalise_slice",
    "nonzero_fraction",
]

# Normalised values at or below this level count as background for the empty-slice test:
# for CT with the default window it is about -940 HU (air is -1000), for percentile-scaled
# slices the darkest 2 % of the slice's own range.
EMPTY_LEVEL = 0.02

# Air in Hounsfield units; padding and out-of-field values (e.g. -3024) are mapped to it.
AIR_HU = -1024.0


@dataclass(frozen=True)
class Normalised:
    pixels: np.ndarray  # float32 [S, S] in [0, 1]
    scale: float
    offset: float
    spacing_mm: float | None
    nonzero_fraction: float


def intensity_window(
    values: np.ndarray,
    modality: str,
    *,
    ct_window_hu: tuple[float, float] | list[float],
    percentiles: tuple[float, float] | list[float],
    fixed_window: bool,
) -> tuple[float, float] | None:
    """(low, high) physical values mapped to 0 and 1, or None for a constant slice.

    ``fixed_window`` is true for CT in Hounsfield units: the site's window, the same for every
    slice. Otherwise the slice's own percentiles.
    """
    if fixed_window:
        low, high = float(ct_window_hu[0]), float(ct_window_hu[1])
        return low, high
    low, high = (float(v) for v in _percentiles(values, percentiles))
    if not np.isfinite(low) or not np.isfinite(high) or high <= low:
        return None
    return low, high


def _percentiles(values: np.ndarray, q: tuple[float, float] | list[float]) -> np.ndarray:
    if values.dtype.kind in "ui" and values.dtype.itemsize <= 2 and values.size > 4096:
        # Integer images (8 / 16-bit PNG and JPEG): exact np.percentile ('linear') values from
        # a histogram, several times faster than sorting a 512 x 512 slice.
        flat = values.ravel()
        if values.dtype.kind == "u":
            base = 0
            counts = np.bincount(flat)
        else:
            base = int(flat.min())
            counts = np.bincount(flat.astype(np.int64) - base)
        cumulative = np.cumsum(counts)
        n = flat.size
        out = []
        for p in q:
            rank = p / 100.0 * (n - 1)
            lo_rank = int(np.floor(rank))
            hi_rank = min(lo_rank + 1, n - 1)
            lo_val = int(np.searchsorted(cumulative, lo_rank, side="right")) + base
            hi_val = int(np.searchsorted(cumulative, hi_rank, side="right")) + base
            out.append(lo_val + (hi_val - lo_val) * (rank - lo_rank))
        return np.asarray(out, dtype=np.float64)
    finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values
    if finite.size == 0:
        return np.asarray([np.nan, np.nan])
    return np.asarray(np.percentile(finite, list(q)), dtype=np.float64)


@lru_cache(maxsize=32)
def _scaler(low: float, high: float) -> Any:
    from monai.transforms.intensity.array import ScaleIntensityRange

    return ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)


@lru_cache(maxsize=64)
def _resizer(height: int, width: int, mode: str) -> Any:
    from monai.transforms.spatial.array import Resize

    # anti_aliasing smooths before a bilinear downsample; 'area' is already a box filter.
    return Resize(
        spatial_size=(height, width), mode=mode, anti_aliasing=(mode != "area")
    )


def nonzero_fraction(scaled: np.ndarray) -> float:
    return float(np.count_nonzero(scaled > EMPTY_LEVEL)) / float(scaled.size)


def normalise_slice(
    values: np.ndarray,
    window: tuple[float, float],
    size: int,
    spacing_mm: tuple[float, float] | None,
) -> Normalised:
    """Window ``values`` [H, W] to [0, 1] and put it on the ``size`` x ``size`` grid.

    ``spacing_mm`` is (row spacing, column spacing) of the source pixels when known; the
    result's ``spacing_mm`` is then the (isotropic) pixel spacing of the model grid.
    """
    if values.ndim != 2 or min(values.shape) < 1:
        raise ValueError(f"expected a 2-D slice, got shape {values.shape}")
    low, high = window
    source = values.astype(np.float32, copy=False)
    if values.dtype.kind == "f" and not np.isfinite(source).all():
        source = np.nan_to_num(source, nan=low, posinf=high, neginf=low)
    scaled = np.asarray(_scaler(low, high)(source), dtype=np.float32)
    fraction = nonzero_fraction(scaled)
    h, w = scaled.shape
    dy, dx = spacing_mm if spacing_mm else (1.0, 1.0)
    extent_h, extent_w = h * dy, w * dx
    side = max(extent_h, extent_w)
    th = max(1, min(size, round(size * extent_h / side)))
    tw = max(1, min(size, round(size * extent_w / side)))
    if (th, tw) != (h, w):
        mode = "area" if th <= h and tw <= w else "bilinear"
        resized = np.asarray(_resizer(th, tw, mode)(scaled[None]), dtype=np.float32)[0]
    else:
        resized = scaled
    out = np.zeros((size, size), dtype=np.float32)
    top, left = (size - th) // 2, (size - tw) // 2
    out[top : top + th, left : left + tw] = np.clip(resized, 0.0, 1.0)
    grid_spacing = side / size if spacing_mm else None
    return Normalised(
        pixels=out,
        scale=high - low,
        offset=low,
        spacing_mm=grid_spacing,
        nonzero_fraction=fraction,
    )
