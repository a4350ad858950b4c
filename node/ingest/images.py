"""PNG / JPEG / TIFF reader: one file's bytes -> a greyscale slice, or a skip reason.

8-bit and 16-bit greyscale are read as they are. A colour-typed image is accepted only when it
is grey in fact (R = G = B; for lossy JPEG within 2 grey levels, since chroma rounding makes
exact equality rare) and is otherwise skipped as colour. Plain images carry no units and no
orientation: values are "pixel value" units and the plane cannot be checked (the summary says
so). Only reads the bytes it is given.
"""

from __future__ import annotations

import io
import warnings

import numpy as np

from node.ingest.dicom import Skipped

__all__ = ["IMAGE_SUFFIXES", "is_image_bytes", "read_image"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")

_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*")
_JPEG_GREY_TOLERANCE = 2


def is_image_bytes(head: bytes) -> bool:
    return any(head.startswith(m) for m in _MAGIC)


def read_image(data: bytes) -> np.ndarray:
    """Greyscale pixels [H, W] (uint8, uint16, int32 or float32); raises :class:`Skipped`."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                fmt = image.format or ""
                mode = image.mode
                if mode in ("L", "I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
                    array = np.asarray(image)
                elif mode == "1":
                    array = np.asarray(image.convert("L"))
                elif mode == "LA":
                    array = np.asarray(image)[..., 0]
                else:
                    rgb = np.asarray(image.convert("RGB")).astype(np.int16)
                    array = _grey_or_skip(rgb, fmt)
        except Skipped:
            raise
        except Exception:
            raise Skipped("corrupt or truncated") from None
    if array.ndim != 2 or min(array.shape) < 1:
        raise Skipped("corrupt or truncated (shape)")
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("="))
    return array


def _grey_or_skip(rgb: np.ndarray, fmt: str) -> np.ndarray:
    spread = int(np.max(rgb.max(axis=-1) - rgb.min(axis=-1))) if rgb.size else 0
    tolerance = _JPEG_GREY_TOLERANCE if fmt == "JPEG" else 0
    if spread > tolerance:
        raise Skipped("colour image")
    if spread == 0:
        first: np.ndarray = rgb[..., 0].astype(np.uint8)
        return first
    grey: np.ndarray = np.rint(rgb.mean(axis=-1)).astype(np.uint8)
    return grey
