"""Degradations that make the restoration tasks: CT low dose, MR / PET low resolution.

Pure functions over arrays in physical units (HU for CT). Every site and every arm of the
comparison degrades its images with exactly these functions and the same seeds, so a restored
image can be paired with the same degraded input everywhere.

CT low dose is simulated in the projection domain (as Shi et al. and the low-dose CT literature
do, e.g. Zeng et al., Med. Phys. 42 (2015)): HU -> linear attenuation (mu = mu_water * (1 +
HU / 1000)), parallel-beam forward projection (scikit-image ``radon``) scaled by the pixel size to
line integrals, Poisson counts at ``photons_per_ray`` incident photons, the log transform back to
line integrals, filtered back-projection (``iradon``, ramp filter) and back to HU. The same
pipeline without noise is *not* the reference: the reference is the original slice, so a
network learns to remove both the noise and the few-view FBP streaks.

Super-resolution inputs are made by decimation (optionally anti-aliased by a Gaussian prefilter)
and brought back to the original grid by cubic interpolation (scikit-image ``resize`` order 3),
for networks that work on the full grid (SRCNN, the EDSR-style net here).

This module never writes a file; caching is an in-memory map from (image digest, seed, config).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

__all__ = [
    "LowDoseConfig",
    "SRConfig",
    "DegradationConfig",
    "MU_WATER_PER_MM",
    "hu_to_mu",
    "mu_to_hu",
    "simulate_low_dose_ct",
    "decimate",
    "upsample_cubic",
    "sr_input",
    "degrade",
    "degrade_batch",
    "image_seed",
    "clear_cache",
]

# Linear attenuation of water at about 70 keV effective energy, per mm (0.192 / cm).
MU_WATER_PER_MM = 0.0192

Task = Literal["denoise", "sr"]


@dataclass(frozen=True)
class LowDoseConfig:
    """Projection-domain low-dose CT simulation."""

    photons_per_ray: float = 1e4
    n_angles: int = 96
    field_of_view_mm: float = 350.0
    mu_water_per_mm: float = MU_WATER_PER_MM

    def __post_init__(self) -> None:
        if not self.photons_per_ray > 0:
            raise ValueError("photons_per_ray must be > 0")
        if self.n_angles < 2:
            raise ValueError("n_angles must be >= 2")
        if not self.field_of_view_mm > 0:
            raise ValueError("field_of_view_mm must be > 0")
        if not self.mu_water_per_mm > 0:
            raise ValueError("mu_water_per_mm must be > 0")


@dataclass(frozen=True)
class SRConfig:
    """Decimation by ``factor`` then cubic upsampling back to the grid."""

    factor: int = 4
    anti_alias: bool = True

    def __post_init__(self) -> None:
        if self.factor not in (2, 3, 4, 8):
            raise ValueError("factor must be one of 2, 3, 4, 8")


@dataclass(frozen=True)
class DegradationConfig:
    """What a task's degradation is; recorded in every model file and evaluation reply."""

    task: Task = "denoise"
    low_dose: LowDoseConfig = LowDoseConfig()
    sr: SRConfig = SRConfig()

    def __post_init__(self) -> None:
        if self.task not in ("denoise", "sr"):
            raise ValueError(f"task must be 'denoise' or 'sr', not {self.task!r}")

    def to_dict(self) -> dict[str, Any]:
        """The config of the task's own degradation only (plain types, JSON-able)."""
        if self.task == "denoise":
            return {"task": "denoise", "low_dose": asdict(self.low_dose)}
        return {"task": "sr", "sr": asdict(self.sr)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DegradationConfig:
        task = data.get("task", "denoise")
        unknown = set(data) - {"task", "low_dose", "sr"}
        if unknown:
            raise ValueError(f"unknown degradation keys {sorted(unknown)}")
        return cls(
            task=task,
            low_dose=LowDoseConfig(**data.get("low_dose", {})),
            sr=SRConfig(**data.get("sr", {})),
        )


def hu_to_mu(hu: np.ndarray, mu_water: float = MU_WATER_PER_MM) -> np.ndarray:
    """HU -> linear attenuation per mm; below air (-1000 HU) is clipped to 0 (no negative mu)."""
    return np.maximum(mu_water * (1.0 + np.asarray(hu, dtype=np.float64) / 1000.0), 0.0)


def mu_to_hu(mu: np.ndarray, mu_water: float = MU_WATER_PER_MM) -> np.ndarray:
    return (np.asarray(mu, dtype=np.float64) / mu_water - 1.0) * 1000.0


def simulate_low_dose_ct(
    image_hu: np.ndarray,
    rng: np.random.Generator,
    config: LowDoseConfig = LowDoseConfig(),
    pixel_size_mm: float | None = None,
) -> np.ndarray:
    """One low-dose reconstruction of a square HU slice (float32 HU, same shape).

    ``pixel_size_mm`` defaults to ``field_of_view_mm / size``: the line integrals, hence the
    photon statistics, depend on the physical path length.
    """
    from skimage.transform import iradon, radon

    image = np.asarray(image_hu, dtype=np.float64)
    if image.ndim != 2 or image.shape[0] != image.shape[1]:
        raise ValueError(f"expects a square 2-D slice, found shape {image.shape}")
    size = image.shape[0]
    pixel_mm = pixel_size_mm if pixel_size_mm is not None else config.field_of_view_mm / size
    theta = np.linspace(0.0, 180.0, config.n_angles, endpoint=False)
    mu = hu_to_mu(image, config.mu_water_per_mm)
    # circle=False: the whole square is projected (CT slices have content in the corners).
    line_integrals = radon(mu, theta=theta, circle=False) * pixel_mm  # type: ignore[no-untyped-call]
    expected = config.photons_per_ray * np.exp(-line_integrals)
    counts = rng.poisson(expected).astype(np.float64)
    # A ray with zero detected photons has an infinite line integral; clamp at one photon, as
    # scanners do with their lowest-signal correction.
    counts = np.maximum(counts, 1.0)
    noisy = np.log(config.photons_per_ray / counts) / pixel_mm
    recon = iradon(  # type: ignore[no-untyped-call]
        noisy, theta=theta, output_size=size, circle=False, filter_name="ramp"
    )
    return mu_to_hu(recon, config.mu_water_per_mm).astype(np.float32)


def decimate(image: np.ndarray, factor: int, anti_alias: bool = True) -> np.ndarray:
    """Image at 1/factor resolution (linear resampling; Gaussian prefilter if anti-aliased)."""
    from skimage.transform import resize

    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 2:
        raise ValueError(f"expects a 2-D image, found shape {image.shape}")
    h, w = image.shape
    if h % factor or w % factor:
        raise ValueError(f"image shape {image.shape} is not divisible by factor {factor}")
    low = resize(  # type: ignore[no-untyped-call]
        image, (h // factor, w // factor), order=1, mode="reflect",
        anti_aliasing=anti_alias, preserve_range=True,
    )
    return np.asarray(low, dtype=np.float32)


def upsample_cubic(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Cubic (order 3 spline) interpolation back to ``shape``."""
    from skimage.transform import resize

    up = resize(  # type: ignore[no-untyped-call]
        np.asarray(image, dtype=np.float64), shape, order=3, mode="reflect",
        anti_aliasing=False, preserve_range=True,
    )
    return np.asarray(up, dtype=np.float32)


def sr_input(image: np.ndarray, config: SRConfig = SRConfig()) -> np.ndarray:
    """The super-resolution network input: decimated, then cubic-upsampled to the grid."""
    low = decimate(image, config.factor, config.anti_alias)
    return upsample_cubic(low, (image.shape[0], image.shape[1]))


def image_seed(image: np.ndarray, seed: int) -> np.random.SeedSequence:
    """Noise seed of one image: the base seed and the image's content digest.

    The same image gets the same noise wherever it sits in a batch, at every site and in every
    arm, so per-image results pair exactly.
    """
    digest = hashlib.sha256(np.ascontiguousarray(image, dtype=np.float32).tobytes()).digest()
    return np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int.from_bytes(digest[:8], "little")])


_CACHE: OrderedDict[tuple[str, int, str], np.ndarray] = OrderedDict()
_CACHE_MAX = 20000


def clear_cache() -> None:
    _CACHE.clear()


def _config_key(config: DegradationConfig) -> str:
    return repr(sorted(config.to_dict().items()))


def degrade(
    image: np.ndarray, config: DegradationConfig, seed: int = 0, cache: bool = True
) -> np.ndarray:
    """The degraded network input of one physical-unit image for ``config.task``."""
    image = np.ascontiguousarray(image, dtype=np.float32)
    key = (hashlib.sha256(image.tobytes()).hexdigest(), int(seed), _config_key(config))
    if cache and key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key].copy()
    if config.task == "denoise":
        rng = np.random.default_rng(image_seed(image, seed))
        out = simulate_low_dose_ct(image, rng, config.low_dose)
    else:
        out = sr_input(image, config.sr)
    if cache:
        _CACHE[key] = out
        if len(_CACHE) > _CACHE_MAX:
            _CACHE.popitem(last=False)
        out = out.copy()
    return out


def degrade_batch(
    images: np.ndarray, config: DegradationConfig, seed: int = 0, cache: bool = True
) -> np.ndarray:
    """:func:`degrade` over a stack [N, H, W] (float32)."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 3:
        raise ValueError(f"expects a stack [N, H, W], found shape {images.shape}")
    out = np.empty_like(images)
    for i in range(images.shape[0]):
        out[i] = degrade(images[i], config, seed, cache)
    return out
