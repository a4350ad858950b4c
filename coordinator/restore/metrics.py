"""Image-quality metrics in physical units: PSNR (dB), SSIM, RMSE.

Definitions are those of scikit-image 0.2x (``skimage.metrics``), re-implemented over stacks so
that thousands of 64x64 slices are scored in one vectorised pass; the tests prove equality with
scikit-image on the same arrays.

- ``data_range`` is stated, never inferred from the images: for CT it is the width of the HU
  window (default [-1024, 3071] HU, the store's window: 4095 HU) and both images are clipped to
  the window first; for MR / PET it is the physical span of the slice's normalised [0, 1] range.
- SSIM: 7x7 uniform window, K1 = 0.01, K2 = 0.03, sample covariance, mean over the image
  without the 3-pixel border (scikit-image's defaults).
- RMSE in the image's unit (HU for CT).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "CT_WINDOW_HU",
    "MetricWindow",
    "psnr",
    "ssim",
    "rmse",
    "image_metrics",
]

CT_WINDOW_HU = (-1024.0, 3071.0)


@dataclass(frozen=True)
class MetricWindow:
    """How an image is scored: optional clip window and the PSNR / SSIM data range."""

    data_range: float | tuple[float, ...]
    clip: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if not np.all(np.asarray(self.data_range, dtype=np.float64) > 0):
            raise ValueError("data_range must be > 0")
        if self.clip is not None and not self.clip[0] < self.clip[1]:
            raise ValueError("clip must be (low, high) with low < high")

    @classmethod
    def ct(cls, window_hu: tuple[float, float] = CT_WINDOW_HU) -> MetricWindow:
        low, high = float(window_hu[0]), float(window_hu[1])
        return cls(data_range=high - low, clip=(low, high))


def _stack(x: np.ndarray) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"expects [H, W] or [N, H, W], found shape {arr.shape}")
    return arr


def _ranges(data_range: float | np.ndarray, n: int) -> np.ndarray:
    """``data_range`` as [N, 1, 1] (one value for all images, or one per image)."""
    r = np.asarray(data_range, dtype=np.float64).reshape(-1)
    if r.size == 1:
        r = np.repeat(r, n)
    if r.size != n:
        raise ValueError(f"data_range has {r.size} values for {n} images")
    if not np.all(r > 0):
        raise ValueError("data_range must be > 0")
    return r[:, None, None]


def _pair(
    test: np.ndarray, reference: np.ndarray, clip: tuple[float, float] | None
) -> tuple[np.ndarray, np.ndarray]:
    a, b = _stack(test), _stack(reference)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    if clip is not None:
        a = np.clip(a, clip[0], clip[1])
        b = np.clip(b, clip[0], clip[1])
    return a, b


def rmse(
    test: np.ndarray, reference: np.ndarray, clip: tuple[float, float] | None = None
) -> np.ndarray:
    """Per-image root-mean-square error, in the images' unit; shape [N]."""
    a, b = _pair(test, reference, clip)
    out: np.ndarray = np.sqrt(np.mean((a - b) ** 2, axis=(1, 2)))
    return out


def psnr(
    test: np.ndarray,
    reference: np.ndarray,
    data_range: float | np.ndarray,
    clip: tuple[float, float] | None = None,
) -> np.ndarray:
    """Per-image PSNR in dB, ``10 log10(data_range^2 / MSE)``; inf for identical images."""
    a, b = _pair(test, reference, clip)
    mse = np.mean((a - b) ** 2, axis=(1, 2))
    ranges = _ranges(data_range, a.shape[0])[:, 0, 0]
    with np.errstate(divide="ignore"):
        out: np.ndarray = 10.0 * np.log10(ranges**2 / mse)
    return out


def ssim(
    test: np.ndarray,
    reference: np.ndarray,
    data_range: float | np.ndarray,
    clip: tuple[float, float] | None = None,
    win_size: int = 7,
) -> np.ndarray:
    """Per-image mean SSIM (scikit-image's default definition); shape [N]."""
    from scipy.ndimage import uniform_filter

    a, b = _pair(test, reference, clip)
    if win_size % 2 == 0 or win_size < 3:
        raise ValueError("win_size must be odd and >= 3")
    if min(a.shape[1:]) < win_size:
        raise ValueError(f"images smaller than the {win_size}x{win_size} SSIM window")
    k1, k2 = 0.01, 0.03
    size = (1, win_size, win_size)  # filter within each image only
    n_pixels = win_size * win_size
    cov_norm = n_pixels / (n_pixels - 1.0)
    ux = uniform_filter(a, size=size)
    uy = uniform_filter(b, size=size)
    uxx = uniform_filter(a * a, size=size)
    uyy = uniform_filter(b * b, size=size)
    uxy = uniform_filter(a * b, size=size)
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    ranges = _ranges(data_range, a.shape[0])
    c1 = (k1 * ranges) ** 2
    c2 = (k2 * ranges) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    pad = (win_size - 1) // 2
    out: np.ndarray = s[:, pad:-pad, pad:-pad].mean(axis=(1, 2))
    return out


def image_metrics(
    test: np.ndarray, reference: np.ndarray, window: MetricWindow
) -> dict[str, np.ndarray]:
    """PSNR (dB), SSIM and RMSE per image, each an array [N] of float64."""
    return {
        "psnr_db": psnr(test, reference, np.asarray(window.data_range), window.clip),
        "ssim": ssim(test, reference, np.asarray(window.data_range), window.clip),
        "rmse": rmse(test, reference, window.clip),
    }
