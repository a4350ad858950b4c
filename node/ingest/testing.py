"""Synthetic DICOM objects for tests and examples (CI has no patient data).

Writes small, valid CT / MR / PT slices with chosen identifiers (so tests can plant names,
dates and UIDs and prove they never reach a node home), geometry, rescale and transfer syntax.
Never used by ingest itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["write_dicom_slice", "planted_identifiers", "ORIENTATION"]

ORIENTATION = {
    "axial": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    "coronal": (1.0, 0.0, 0.0, 0.0, 0.0, -1.0),
    "sagittal": (0.0, 1.0, 0.0, 0.0, 0.0, -1.0),
}

_SOP_CLASS = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "PT": "1.2.840.10008.5.1.4.1.1.128",
}


def planted_identifiers(tag: str = "A") -> dict[str, str]:
    """Distinctive identifiers that must never appear in a node home."""
    number = "".join(str(ord(c)) for c in tag)
    return {
        "PatientName": f"Plantedname{tag}^Secretperson",
        "PatientID": f"PLANTED-PID-{tag}-778899",
        "PatientBirthDate": "19230417",
        "InstitutionName": f"Planted Institution {tag} of Nowhere",
        "StudyDate": "19990909",
        "StudyInstanceUID": f"1.2.826.0.1.3680043.99.{number}.1",
        "SeriesInstanceUID": f"1.2.826.0.1.3680043.99.{number}.2",
    }


def write_dicom_slice(
    path: str | Path,
    values: np.ndarray | None = None,
    *,
    modality: str = "CT",
    patient_id: str | None = "PAT-0001",
    patient_name: str = "Test^Patient",
    birth_date: str = "19700101",
    institution: str = "Test Hospital",
    study_date: str = "20200101",
    study_uid: str = "1.2.826.0.1.3680043.10.1",
    series_uid: str = "1.2.826.0.1.3680043.10.2",
    sop_uid: str | None = None,
    instance_number: int = 1,
    position: Sequence[float] = (0.0, 0.0, 0.0),
    orientation: Sequence[float] | str = "axial",
    pixel_spacing: Sequence[float] | None = (0.8, 0.8),
    slope: float = 1.0,
    intercept: float = -1024.0,
    signed: bool = True,
    photometric: str = "MONOCHROME2",
    transfer_syntax: str | None = None,
    preamble: bool = True,
    padding_value: int | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write one slice; ``values`` are physical (HU for CT) and stored through the rescale."""
    from pydicom import dcmwrite
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    path = Path(path)
    if values is None:
        yy, xx = np.mgrid[-1:1:32j, -1:1:32j]
        values = np.where(xx**2 + yy**2 < 0.6, 40.0 + 200.0 * xx, -1000.0)
    stored = np.rint((np.asarray(values, dtype=np.float64) - intercept) / slope)
    dtype = np.int16 if signed else np.uint16
    info = np.iinfo(dtype)
    stored = np.clip(stored, info.min, info.max).astype(dtype)

    sop_class = _SOP_CLASS.get(modality, "1.2.840.10008.5.1.4.1.1.2")
    sop_uid = sop_uid or generate_uid()
    syntax = transfer_syntax or ExplicitVRLittleEndian
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.Modality = modality
    ds.PatientName = patient_name
    if patient_id is not None:
        ds.PatientID = patient_id
    ds.PatientBirthDate = birth_date
    ds.InstitutionName = institution
    ds.StudyDate = study_date
    ds.SeriesDate = study_date
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.InstanceNumber = instance_number
    if orientation is not None:
        iop = ORIENTATION[orientation] if isinstance(orientation, str) else orientation
        ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.ImagePositionPatient = [float(v) for v in position]
    if pixel_spacing is not None:
        ds.PixelSpacing = [float(v) for v in pixel_spacing]
    if modality in ("CT", "PT") or slope != 1.0 or intercept != 0.0:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
    if padding_value is not None:
        ds.PixelPaddingValue = padding_value
    ds.set_pixel_data(stored, photometric, 16, generate_instance_uid=False)
    ds.PhotometricInterpretation = photometric
    for key, value in (extra or {}).items():
        setattr(ds, key, value)
    if syntax != ExplicitVRLittleEndian:
        ds.compress(syntax, generate_instance_uid=False)
    if preamble:
        ds.preamble = b"\x00" * 128
        dcmwrite(path, ds, enforce_file_format=True)
    else:
        # A bare dataset: no preamble, no 'DICM', no file meta (old ACR-NEMA style files).
        del ds.file_meta
        dcmwrite(path, ds, implicit_vr=True, little_endian=True)
    return path
