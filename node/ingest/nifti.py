"""NIfTI reader: one volume's bytes -> 2-D slices along the axis of the store's plane.

The volume is reoriented to the closest canonical (RAS+) orientation with nibabel, then cut
along the world axis of the plane (axial: S-I, sagittal: L-R, coronal: A-P; 'any' cuts axially)
and each slice is laid out as a DICOM viewer shows it (axial: anterior up, patient's right on
the image left; sagittal and coronal: head up), so NIfTI and DICOM slices of one store agree.
Values are the voxel values after the header's scl_slope / scl_inter. Only reads the bytes.
"""

from __future__ import annotations

import gzip
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from node.ingest.dicom import Skipped

__all__ = ["NIFTI_SUFFIXES", "NiftiSlice", "is_nifti_name", "read_nifti"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass(frozen=True)
class NiftiSlice:
    index: int
    values: np.ndarray  # float32 [H, W]
    position: float  # mm along the cut axis
    spacing_mm: tuple[float, float]


def is_nifti_name(name: str) -> bool:
    lower = name.lower()
    return lower.endswith(".nii") or lower.endswith(".nii.gz")


def read_nifti(data: bytes, plane: str) -> list[NiftiSlice]:
    """All slices of the volume along ``plane``; raises :class:`Skipped`."""
    import nibabel as nib

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
            image: nib.Nifti1Image | nib.Nifti2Image
            try:
                image = nib.Nifti1Image.from_bytes(raw)
            except Exception:
                image = nib.Nifti2Image.from_bytes(raw)
            image = nib.as_closest_canonical(image)  # type: ignore[no-untyped-call]
            volume = np.asarray(image.get_fdata(dtype=np.float32))
            header: Any = image.header
            zooms = [float(z) for z in header.get_zooms()[:3]]
            affine = np.asarray(image.affine, dtype=np.float64)
        except Exception:
            raise Skipped("corrupt or truncated") from None
    while volume.ndim > 3 and volume.shape[-1] == 1:
        volume = volume[..., 0]
    if volume.ndim == 2:
        volume = volume[..., None]
    if volume.ndim != 3:
        raise Skipped("NIfTI with more than three dimensions")
    zooms = (zooms + [1.0, 1.0, 1.0])[:3]
    zooms = [z if z > 0 and np.isfinite(z) else 1.0 for z in zooms]
    slices = []
    if plane == "sagittal":
        for i in range(volume.shape[0]):
            cut = volume[i, ::-1, ::-1].T
            slices.append(NiftiSlice(i, np.ascontiguousarray(cut), _pos(affine, 0, i),
                                     (zooms[2], zooms[1])))
    elif plane == "coronal":
        for j in range(volume.shape[1]):
            cut = volume[::-1, j, ::-1].T
            slices.append(NiftiSlice(j, np.ascontiguousarray(cut), _pos(affine, 1, j),
                                     (zooms[2], zooms[0])))
    else:
        for k in range(volume.shape[2]):
            cut = volume[::-1, ::-1, k].T
            slices.append(NiftiSlice(k, np.ascontiguousarray(cut), _pos(affine, 2, k),
                                     (zooms[1], zooms[0])))
    return slices


def _pos(affine: np.ndarray, axis: int, index: int) -> float:
    value = float(affine[axis, 3] + affine[axis, axis] * index)
    return value if np.isfinite(value) else float(index)
