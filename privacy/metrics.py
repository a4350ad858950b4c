"""Distance metrics of the guard, each a small class behind one interface.

Every metric is a distance between 2-D images in the store's normalised [0, 1] space at the
guard's resolution, written in one form so that one exact search serves them all::

    d(q, r) = scale * min_t || V_t(q) - F(r) ||_2

``F`` maps a reference image to a feature vector (``reference_features``), ``V_t`` maps a
query to its ``t``-th variant (``query_variants``, shape [Q, T, F]). An image is rejected when
*any* metric finds a real slice closer than that metric's threshold.

* :class:`PixelRMSE` -- ``F = V = flatten``, one variant, ``scale = 1/sqrt(H*W)``: the
  root-mean-square pixel difference.
* :class:`ShiftFlipDistance` -- template matching with a margin ``s = max_shift_px``: the
  reference's central window ``r[s:H-s, s:W-s]`` is compared (RMSE) with every equally sized
  window ``q'[s+dy : H-s+dy, s+dx : W-s+dx]`` of the query ``q' = q`` or its horizontal mirror
  ``q' = q[:, ::-1]``, optionally rotated about its centre by each angle of
  ``rotations_deg`` (bilinear, :func:`rotate_images`), for every integer
  ``|dy|, |dx| <= s``; the distance is the minimum over all these variants.
  Every variant lies wholly inside the query, so no fill value is ever compared: a copy of a
  real slice moved by up to ``s`` pixels (whatever fills its uncovered border) and/or mirrored
  is at distance exactly 0 from its original. The reference feature is fixed (the central
  window) and each variant is a vector of the same length, so the distance is an exact
  Euclidean distance in that space and the lower bounds of :mod:`privacy.search` hold for it.
  The outer ``s`` pixels of the reference are not compared by this metric (the pixel RMSE
  still compares the whole image).
* :class:`EmbeddingDistance` -- Euclidean distance between L2-normalised embeddings of a
  learned encoder (:mod:`privacy.encoder`), trained at the site so that altered copies land next
  to their originals. Distances lie in [0, 2].

What this module must never do: read files or know where the reference comes from.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from privacy.errors import GuardError

__all__ = [
    "Metric",
    "Windows",
    "PixelRMSE",
    "ContrastRMSE",
    "ShiftFlipDistance",
    "EmbeddingDistance",
    "check_images",
    "rotate_images",
    "ZERO_RMS",
]

FloatArray = NDArray[np.floating]

#: :class:`ContrastRMSE` leaves rows whose root-mean-square is at most this unscaled.
ZERO_RMS = 1e-12


def check_images(images: np.ndarray, where: str = "images") -> np.ndarray:
    """A float32 [N, H, W] view of ``images``; refuses other ranks and non-finite values."""
    arr = np.asarray(images)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise GuardError(f"expected images of shape [N, H, W], found {arr.shape}", where, 2)
    arr = arr.astype(np.float32, copy=False)
    if not np.all(np.isfinite(arr)):
        raise GuardError("images hold NaN or infinite values", where, 2)
    return arr


def _rotation_weights(h: int, w: int, degrees: float) -> tuple[np.ndarray, np.ndarray]:
    """Flat source indices [4, h * w] and float32 weights [4, h * w] of scipy.ndimage.rotate
    (``reshape=False``, ``order=1``, ``mode="nearest"``) on an ``h x w`` grid, in closed form.

    scipy maps output pixel ``o`` to the input point ``c + M (o - c)``, ``c`` the grid centre
    and ``M = [[cos, sin], [-sin, cos]]`` over (row, column); ``mode="nearest"`` with linear
    interpolation is the same as clamping that point to the grid. Computed here so the guard
    does not import scipy.ndimage (a third of a second in a ``screen`` process; a generate run
    imports it with MONAI anyway); a test holds the result to scipy's own rotation.
    """
    theta = math.radians(degrees)
    cos, sin = math.cos(theta), math.sin(theta)
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    dy, dx = np.meshgrid(np.arange(h, dtype=np.float64) - cy,
                         np.arange(w, dtype=np.float64) - cx, indexing="ij")
    y = np.clip(cy + cos * dy + sin * dx, 0.0, h - 1.0).ravel()
    x = np.clip(cx - sin * dy + cos * dx, 0.0, w - 1.0).ravel()
    y0 = np.minimum(np.floor(y), h - 2).astype(np.int64) if h > 1 else np.zeros(y.size, np.int64)
    x0 = np.minimum(np.floor(x), w - 2).astype(np.int64) if w > 1 else np.zeros(x.size, np.int64)
    fy, fx = y - y0, x - x0
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    index = np.stack([y0 * w + x0, y0 * w + x1, y1 * w + x0, y1 * w + x1])
    weight = np.stack([(1 - fy) * (1 - fx), (1 - fy) * fx, fy * (1 - fx), fy * fx])
    return index, weight.astype(np.float32)


_rotation_table = functools.lru_cache(maxsize=32)(_rotation_weights)


def rotate_images(images: np.ndarray, degrees: float, *, keep_table: bool = True) -> np.ndarray:
    """[N, H, W] float32 rotated about the centre: bilinear, edge values outside (the
    interpolation of scipy.ndimage.rotate). The table is kept per grid and angle unless
    ``keep_table`` is false (one-off angles, such as a canary's random one)."""
    arr = np.asarray(images, dtype=np.float32)
    n, h, w = arr.shape
    table = _rotation_table if keep_table else _rotation_weights
    index, weight = table(h, w, float(degrees))
    flat = arr.reshape(n, h * w)
    out = flat[:, index[0]] * weight[0]
    for j in range(1, 4):
        out += flat[:, index[j]] * weight[j]
    result: np.ndarray = out.reshape(n, h, w)
    return result


@dataclass(frozen=True)
class Windows:
    """Query variants as equally sized windows of a few source images per query.

    Variant ``t`` of query ``q`` is ``sources[q, g, oy : oy + h, ox : ox + w].ravel()`` with
    ``(g, oy, ox) = offsets[t]`` and ``(h, w) = shape``: what :mod:`privacy.tiles` reads to
    bound all of a query's variants from a few prefix sums.
    """

    sources: np.ndarray  # float32 [Q, G, H, W]
    offsets: np.ndarray  # int64 [T, 3]: (source, top row, left column) of each variant
    shape: tuple[int, int]  # (h, w) of every window
    #: Per source: the source it is the exact horizontal mirror of (``sources[:, g] ==
    #: sources[:, mirror_of[g], :, ::-1]``), or -1. A hint only: :mod:`privacy.tiles` checks
    #: it, then reads a mirror's box sums from its original's instead of summing it again.
    mirror_of: tuple[int, ...] | None = None

    def variants(self) -> np.ndarray:
        """[Q, T, h * w] float32: every variant of every query (the metric's query_variants)."""
        q = self.sources.shape[0]
        h, w = self.shape
        out = np.empty((q, self.offsets.shape[0], h * w), dtype=np.float32)
        for t, (g, oy, ox) in enumerate(self.offsets.tolist()):
            out[:, t] = self.sources[:, g, oy : oy + h, ox : ox + w].reshape(q, -1)
        return out

    def variant(self, q: int, ts: np.ndarray) -> np.ndarray:
        """[len(ts), h * w] float32: the variants ``ts`` of query ``q``."""
        h, w = self.shape
        view = np.lib.stride_tricks.sliding_window_view(self.sources[q], (h, w), axis=(1, 2))
        g, oy, ox = self.offsets[np.asarray(ts, dtype=np.int64)].T
        out: np.ndarray = view[g, oy, ox].reshape(len(g), h * w)
        return out


class Metric(ABC):
    """One guard metric: ``d(q, r) = scale * min_t ||V_t(q) - F(r)||``."""

    name: str = ""
    #: Metrics with the same feature space share one reference index.
    feature_space: str = "pixels"
    #: The feature space whose rows this metric's features rescale, row by row, as
    #: :class:`ContrastRMSE` does (None: no such relation); the guard then derives this
    #: metric's dot products from that space's (:func:`privacy.search.scaled_gemm_interval`).
    scaled_from: str | None = None

    @property
    def costly_features(self) -> bool:
        """Whether reference features cost enough to be worth keeping between runs (a
        network's output, say); :meth:`describe` must then name all they depend on."""
        return False

    @abstractmethod
    def scale(self, image_shape: tuple[int, int]) -> float:
        """Factor from Euclidean feature distance to this metric's distance."""

    @abstractmethod
    def reference_features(self, images: np.ndarray) -> np.ndarray:
        """[N, F] features of reference images (float16/32 kept, others float32)."""

    def reference_rows(self, images: np.ndarray) -> np.ndarray:
        """:meth:`reference_features`, or where each row is cheap to make from its image
        alone, a :class:`privacy.search.DerivedRows` of them made when read (the guard reads
        few rows of those)."""
        return self.reference_features(images)

    @abstractmethod
    def query_variants(self, images: np.ndarray) -> np.ndarray:
        """[Q, T, F] variants of query images; the distance is the minimum over them."""

    def n_variants(self) -> int:
        return 1

    def windows(self, images: np.ndarray) -> Windows | None:
        """The query variants as windows of source images, for metrics whose features are
        image windows (None otherwise); ``windows(x).variants()`` equals
        ``query_variants(x)``."""
        return None

    def distance(self, query: np.ndarray, reference: np.ndarray) -> float:
        """The definition, computed directly in float64 for one pair (tests, documentation)."""
        q = check_images(query)
        r = check_images(reference)
        variants = self.query_variants(q)[0].astype(np.float64)
        feat = self.reference_features(r)[0].astype(np.float64)
        diff = variants - feat[None, :]
        sq = np.sum(diff * diff, axis=1)
        return float(np.sqrt(sq.min()) * self.scale((q.shape[1], q.shape[2])))

    def describe(self) -> dict[str, object]:
        return {"name": self.name}


class PixelRMSE(Metric):
    """Root-mean-square difference of normalised pixel values."""

    name = "pixel_rmse"

    def scale(self, image_shape: tuple[int, int]) -> float:
        return 1.0 / math.sqrt(image_shape[0] * image_shape[1])

    def reference_features(self, images: np.ndarray) -> np.ndarray:
        arr = np.asarray(images)
        if arr.dtype not in (np.float16, np.float32):
            arr = arr.astype(np.float32)
        return arr.reshape(arr.shape[0], -1)

    def query_variants(self, images: np.ndarray) -> np.ndarray:
        arr = check_images(images)
        return arr.reshape(arr.shape[0], 1, -1)

    def windows(self, images: np.ndarray) -> Windows:
        arr = check_images(images)
        return Windows(arr[:, None], np.zeros((1, 3), dtype=np.int64), (arr.shape[1], arr.shape[2]))


class ContrastRMSE(Metric):
    """RMSE after scaling each image to unit root-mean-square intensity.

    An intensity-rescaled copy ``a * x`` (any ``a > 0``) has exactly the features of ``x``, so
    its distance is 0 whatever the factor: the guard catches re-contrasted copies without a
    grid over factors. It is still a Euclidean distance between fixed features, so the exact
    search and its lower bounds apply unchanged. An all-black image keeps zero features.
    """

    name = "contrast_rmse"
    feature_space = "pixels_unit_rms"
    #: Each feature row is the float32 pixel row ``x`` divided by its root-mean-square ``rms``
    #: (float64 quotient, rounded to float32), or ``x`` itself where ``rms <= ZERO_RMS``.
    scaled_from = "pixels"

    def scale(self, image_shape: tuple[int, int]) -> float:
        return 1.0 / math.sqrt(image_shape[0] * image_shape[1])

    @staticmethod
    def _unit_rms(arr: np.ndarray, chunk: int = 256) -> np.ndarray:
        flat = arr.reshape(arr.shape[0], -1)
        out = np.empty(flat.shape, dtype=np.float32)
        for start in range(0, flat.shape[0], chunk):  # rows are independent: chunks stay in cache
            part = flat[start : start + chunk].astype(np.float32)
            rms = np.sqrt(np.mean(part.astype(np.float64) ** 2, axis=1, keepdims=True))
            out[start : start + chunk] = part / np.where(rms > ZERO_RMS, rms, 1.0)
        return out

    def reference_features(self, images: np.ndarray) -> np.ndarray:
        return self._unit_rms(np.asarray(images))

    def reference_rows(self, images: np.ndarray) -> np.ndarray:
        from privacy.search import DerivedRows

        arr = np.asarray(images)
        return DerivedRows(arr, self._unit_rms, int(np.prod(arr.shape[1:])),  # type: ignore[return-value]
                           np.float32)

    def query_variants(self, images: np.ndarray) -> np.ndarray:
        arr = check_images(images)
        return self._unit_rms(arr).reshape(arr.shape[0], 1, -1)

    def windows(self, images: np.ndarray) -> Windows:
        arr = check_images(images)
        src = self._unit_rms(arr).reshape(arr.shape[0], 1, arr.shape[1], arr.shape[2])
        return Windows(src, np.zeros((1, 3), dtype=np.int64), (arr.shape[1], arr.shape[2]))


class ShiftFlipDistance(Metric):
    """Minimum window RMSE over integer shifts, the mirror and a few small rotations."""

    name = "shift_flip"

    def __init__(
        self,
        max_shift_px: int = 4,
        mirror: bool = True,
        rotations_deg: tuple[float, ...] | list[float] = (0.0,),
    ) -> None:
        if max_shift_px < 0:
            raise GuardError("max_shift_px must be >= 0", "guard.max_shift_px", 2)
        angles = sorted({float(a) for a in rotations_deg} | {0.0}, key=lambda a: (abs(a), a))
        if any(abs(a) > 45.0 for a in angles):
            raise GuardError("rotations must be within 45 degrees", "guard.rotations_deg", 2)
        self.max_shift_px = int(max_shift_px)
        self.mirror = bool(mirror)
        self.rotations_deg = tuple(angles)
        self.feature_space = f"pixels_window{self.max_shift_px}"

    def transforms(self) -> list[tuple[bool, float, int, int]]:
        """(mirrored, rotation in degrees, dy, dx) of every variant; the identity first."""
        s = self.max_shift_px
        shifts = sorted(
            ((dy, dx) for dy in range(-s, s + 1) for dx in range(-s, s + 1)),
            key=lambda t: (abs(t[0]) + abs(t[1]), t),
        )
        flips = (False, True) if self.mirror else (False,)
        return [(m, a, dy, dx) for m in flips for a in self.rotations_deg for dy, dx in shifts]

    def n_variants(self) -> int:
        return len(self.transforms())

    def _window(self, image_shape: tuple[int, ...]) -> tuple[int, int]:
        h, w = int(image_shape[-2]), int(image_shape[-1])
        s = self.max_shift_px
        if h <= 2 * s or w <= 2 * s:
            raise GuardError(
                f"images of {h}x{w} are too small for max_shift_px {s}", "guard.max_shift_px", 2
            )
        return h - 2 * s, w - 2 * s

    def scale(self, image_shape: tuple[int, int]) -> float:
        wh, ww = self._window(image_shape)
        return 1.0 / math.sqrt(wh * ww)

    def reference_features(self, images: np.ndarray) -> np.ndarray:
        arr = np.asarray(images)
        if arr.dtype not in (np.float16, np.float32):
            arr = arr.astype(np.float32)
        wh, ww = self._window(arr.shape)
        s = self.max_shift_px
        return np.ascontiguousarray(arr[:, s : s + wh, s : s + ww]).reshape(arr.shape[0], -1)

    def reference_rows(self, images: np.ndarray) -> np.ndarray:
        from privacy.search import DerivedRows

        arr = np.asarray(images)
        wh, ww = self._window(arr.shape)
        dtype = arr.dtype if arr.dtype in (np.float16, np.float32) else np.float32
        return DerivedRows(arr, self.reference_features, wh * ww, dtype)  # type: ignore[return-value]

    def windows(self, images: np.ndarray) -> Windows:
        arr = check_images(images)
        wh, ww = self._window(arr.shape)
        s = self.max_shift_px
        groups: dict[tuple[bool, float], int] = {}
        offsets = []
        for m, a, dy, dx in self.transforms():
            g = groups.setdefault((m, a), len(groups))
            offsets.append((g, s + dy, s + dx))
        sources = np.empty((arr.shape[0], len(groups), *arr.shape[1:]), dtype=np.float32)
        mirror_of = [-1] * len(groups)
        for (m, a), g in groups.items():
            if m and (False, -a) in groups:
                # Mirrored, then rotated by a: the mirror of the image rotated by -a (the same
                # transform; each rotation is interpolated once, and the tile search sums
                # these sources' boxes only once, Windows.mirror_of).
                mirror_of[g] = groups[(False, -a)]
                continue
            src = arr[:, :, ::-1] if m else arr
            sources[:, g] = rotate_images(src, a) if a else src
        for g, g0 in enumerate(mirror_of):
            if g0 >= 0:
                sources[:, g] = sources[:, g0, :, ::-1]
        return Windows(sources, np.asarray(offsets, dtype=np.int64), (wh, ww),
                       tuple(mirror_of))

    def query_variants(self, images: np.ndarray) -> np.ndarray:
        return self.windows(images).variants()

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "max_shift_px": self.max_shift_px,
            "mirror": self.mirror,
            "rotations_deg": list(self.rotations_deg),
            "compared": "central window of the reference vs shifted windows of the query "
            "(mirrored, rotated; mirrored and rotated by a = the mirror of the rotation by -a)",
        }


class EmbeddingDistance(Metric):
    """Euclidean distance between L2-normalised embeddings of a site-trained encoder.

    ``embed`` maps float32 [N, H, W] images to [N, E] embeddings (see
    :func:`privacy.encoder.embed_images`); they are renormalised here in float64 so the
    metric does not depend on how the encoder normalised them.
    """

    name = "embedding"
    feature_space = "embedding"

    def __init__(
        self, embed: Callable[[np.ndarray], np.ndarray], info: dict[str, object] | None = None
    ) -> None:
        self.embed = embed
        self.info = dict(info or {})

    def scale(self, image_shape: tuple[int, int]) -> float:
        return 1.0

    @property
    def costly_features(self) -> bool:
        """Worth keeping only when :meth:`describe` names the encoder's weights."""
        return bool(self.info.get("encoder_sha256"))

    def _embed(self, images: np.ndarray) -> np.ndarray:
        arr = check_images(images)
        emb = np.asarray(self.embed(arr), dtype=np.float64)
        if emb.ndim != 2 or emb.shape[0] != arr.shape[0]:
            raise GuardError(f"encoder returned shape {emb.shape}", "embedding", 1)
        norms = np.linalg.norm(emb, axis=1, keepdims=True)
        out: np.ndarray = emb / np.maximum(norms, 1e-12)
        return out

    def reference_features(self, images: np.ndarray) -> np.ndarray:
        return self._embed(images)

    def query_variants(self, images: np.ndarray) -> np.ndarray:
        return self._embed(images)[:, None, :]

    def describe(self) -> dict[str, object]:
        return {"name": self.name, **self.info}
