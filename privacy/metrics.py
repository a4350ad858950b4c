"""Distance metrics of the guard, each a small class behind one interface.

Every metric is a distance between 2-D images in the store's normalised [0, 1] space at the
guard's resolution, written in one form so that one exact search serves them all::

    d(q, r) = scale * min_t || V_t(q) - F(r) ||_2

``F`` maps a reference image to a feature vector (``reference_features``), ``V_t`` maps a
query to its ``t``-th variant (``query_variants``, shape [Q, T, F]). An image is rejected when
*any* metric finds a real slice closer than that metric's threshold.

* :class:`PixelRMSE` -- ``F = V = flatten``, one variant, ``scale = 1/sqrt(H*W)``: the
  root-mean-square pixel difference.
* :class:`ShiftFlipDistance` -- the minimum of the pixel RMSE over the query mirrored or not
  (horizontal mirror, ``q[:, ::-1]``) and then shifted by every integer ``(dy, dx)`` with
  ``|dx|, |dy| <= max_shift_px``. A shift moves the image content by (dy, dx) and fills the
  uncovered border by *edge replication* (``numpy.pad(mode="edge")`` then crop), so every
  variant is a full H x W image and the distance stays an exact Euclidean distance in the full
  space -- which is what makes the lower bounds of :mod:`privacy.search` valid for it. A copy
  of a real slice moved by ``(dy, dx)`` differs from the variant shifted back by ``(-dy, -dx)``
  only in a border strip ``|dy|`` and ``|dx|`` pixels wide.
* :class:`EmbeddingDistance` -- Euclidean distance between L2-normalised embeddings of a
  learned encoder (:mod:`privacy.encoder`), trained at the site so that altered copies land next
  to their originals. Distances lie in [0, 2].

What this module must never do: read files or know where the reference comes from.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable

import numpy as np
from numpy.typing import NDArray

from privacy.errors import GuardError

__all__ = [
    "Metric",
    "PixelRMSE",
    "ShiftFlipDistance",
    "EmbeddingDistance",
    "shift_edge",
    "check_images",
]

FloatArray = NDArray[np.floating]


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


def shift_edge(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Move the content of [N, H, W] images by (dy, dx) pixels, filling by edge replication.

    ``out[i, y, x] = images[i, clip(y - dy), clip(x - dx)]`` with indices clipped to the grid.
    """
    n, h, w = images.shape
    ys = np.clip(np.arange(h) - dy, 0, h - 1)
    xs = np.clip(np.arange(w) - dx, 0, w - 1)
    return images[:, ys][:, :, xs]


class Metric(ABC):
    """One guard metric: ``d(q, r) = scale * min_t ||V_t(q) - F(r)||``."""

    name: str = ""
    #: Metrics with the same feature space share one reference index.
    feature_space: str = "pixels"

    @abstractmethod
    def scale(self, image_shape: tuple[int, int]) -> float:
        """Factor from Euclidean feature distance to this metric's distance."""

    @abstractmethod
    def reference_features(self, images: np.ndarray) -> np.ndarray:
        """[N, F] features of reference images (float16/32 kept, others float32)."""

    @abstractmethod
    def query_variants(self, images: np.ndarray) -> np.ndarray:
        """[Q, T, F] variants of query images; the distance is the minimum over them."""

    def n_variants(self) -> int:
        return 1

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


class ShiftFlipDistance(Metric):
    """Minimum pixel RMSE over integer shifts (edge-replicated) and the horizontal mirror."""

    name = "shift_flip"

    def __init__(self, max_shift_px: int = 4, mirror: bool = True) -> None:
        if max_shift_px < 0:
            raise GuardError("max_shift_px must be >= 0", "guard.max_shift_px", 2)
        self.max_shift_px = int(max_shift_px)
        self.mirror = bool(mirror)

    def transforms(self) -> list[tuple[bool, int, int]]:
        """(mirrored, dy, dx) of every variant; the identity comes first."""
        s = self.max_shift_px
        shifts = sorted(
            ((dy, dx) for dy in range(-s, s + 1) for dx in range(-s, s + 1)),
            key=lambda t: (abs(t[0]) + abs(t[1]), t),
        )
        flips = (False, True) if self.mirror else (False,)
        return [(m, dy, dx) for m in flips for dy, dx in shifts]

    def n_variants(self) -> int:
        return len(self.transforms())

    def scale(self, image_shape: tuple[int, int]) -> float:
        return 1.0 / math.sqrt(image_shape[0] * image_shape[1])

    def reference_features(self, images: np.ndarray) -> np.ndarray:
        return PixelRMSE().reference_features(images)

    def query_variants(self, images: np.ndarray) -> np.ndarray:
        arr = check_images(images)
        n = arr.shape[0]
        out = np.empty((n, self.n_variants(), arr.shape[1] * arr.shape[2]), dtype=np.float32)
        mirrored = arr[:, :, ::-1]
        for t, (m, dy, dx) in enumerate(self.transforms()):
            out[:, t] = shift_edge(mirrored if m else arr, dy, dx).reshape(n, -1)
        return out

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "max_shift_px": self.max_shift_px,
            "mirror": self.mirror,
            "fill": "edge replication",
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
