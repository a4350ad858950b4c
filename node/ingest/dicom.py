"""DICOM reader: one file's bytes -> the slices we use, in physical units, or a skip reason.

Accepts Part 10 files with or without the 128-byte preamble and bare datasets (read with
``force=True`` and then checked), any transfer syntax pydicom's pixel handlers decode
(uncompressed little / big endian, RLE, JPEG lossless, JPEG-LS, JPEG 2000 through pylibjpeg),
single- and multi-frame objects (enhanced objects through their functional groups).

Physical units: CT in Hounsfield units through :func:`pydicom.pixels.apply_rescale` (the
modality LUT / RescaleSlope and RescaleIntercept, per frame where the functional groups carry
them), with PixelPaddingValue and values below air (e.g. -3024 outside the reconstruction
circle) mapped to air. PT in SUV body-weight when the header allows the decay-corrected
computation, else Bq/ml with the reason recorded. MR in the scanner's arbitrary units.

This module returns raw identifiers (PatientID, UIDs) to the caller only to be hashed there; it
never writes anything, and the source bytes are only read. Skip reasons are drawn from a fixed
vocabulary (no value read from a header reaches a reason except a validated modality code).
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np

from node.ingest.normalise import AIR_HU

__all__ = [
    "Skipped",
    "DicomFrame",
    "DicomObject",
    "open_dicom",
    "plane_of",
    "suv_body_weight_factor",
]

PLANES = ("sagittal", "coronal", "axial")  # by the dominant axis of the slice normal (x, y, z)
MODALITIES = ("CT", "MR", "PT")

# SOP classes of the images we use when the Modality tag is absent.
_IMAGE_SOP_MODALITY = {
    "1.2.840.10008.5.1.4.1.1.2": "CT",
    "1.2.840.10008.5.1.4.1.1.2.1": "CT",
    "1.2.840.10008.5.1.4.1.1.2.2": "CT",
    "1.2.840.10008.5.1.4.1.1.4": "MR",
    "1.2.840.10008.5.1.4.1.1.4.1": "MR",
    "1.2.840.10008.5.1.4.1.1.4.4": "MR",
    "1.2.840.10008.5.1.4.1.1.128": "PT",
    "1.2.840.10008.5.1.4.1.1.128.1": "PT",
    "1.2.840.10008.5.1.4.1.1.130": "PT",
}

# Objects that are not images of a patient (or not images we may learn from), by Modality.
_NON_IMAGE_MODALITIES = {
    "SR": "SR",
    "RTSTRUCT": "RTSTRUCT",
    "RTPLAN": "RTPLAN",
    "RTRECORD": "RTRECORD",
    "RTDOSE": "RTDOSE",
    "PR": "presentation state",
    "KO": "key object selection",
    "SEG": "segmentation",
    "REG": "registration",
    "DOC": "document",
    "RWV": "real world value map",
    "FID": "fiducials",
    "PLAN": "plan",
}

_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
_MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_MODALITY_CODE = re.compile(r"^[A-Z0-9_ ]{1,16}$")


class Skipped(Exception):
    """A file or frame we do not store; ``reason`` goes into the summary as is."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class DicomFrame:
    index: int
    plane: str  # axial | sagittal | coronal | unknown
    position: float
    spacing_mm: tuple[float, float] | None
    instance_uid: str  # raw SOPInstanceUID[:frame]; the caller hashes it
    rescale: Any = None  # dataset holding this frame's modality LUT / rescale


@dataclass
class DicomObject:
    """A parsed image object. Raw identifiers live here in memory only, to be hashed."""

    dataset: Any
    modality: str
    patient_id: str
    patient_fallback: str | None
    series_uid: str
    frames: list[DicomFrame]
    unit: str
    unit_note: str | None = None
    suv_factor: float = 1.0
    _stored: np.ndarray | None = field(default=None, repr=False)

    @property
    def fixed_window(self) -> bool:
        """CT in HU shares the site's fixed window; other units are scaled per slice."""
        return self.modality == "CT" and self.unit == "HU"

    def stored_values(self) -> np.ndarray:
        """All frames' stored values [F, H, W], decoded once."""
        if self._stored is None:
            self._stored = _decode(self.dataset, len(self.frames))
        return self._stored

    def values(self, index: int) -> np.ndarray:
        """Frame ``index`` in physical units, float32 [H, W]."""
        from pydicom.pixels.processing import apply_rescale

        stored = self.stored_values()[index]
        frame = self.frames[index]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                physical = np.asarray(apply_rescale(stored, frame.rescale), dtype=np.float32)
            except Exception:
                raise Skipped("corrupt or truncated (modality LUT)") from None
        if self.modality == "CT" and self.unit == "HU":
            physical = _air_for_padding(physical, stored, self.dataset)
        elif self.modality == "PT":
            physical = physical * np.float32(self.suv_factor)
        return physical


def plane_of(orientation: Any) -> tuple[str, np.ndarray | None]:
    """Plane by the dominant axis of the normal (row x column direction cosines)."""
    try:
        values = [float(v) for v in orientation]
    except (TypeError, ValueError):
        return "unknown", None
    if len(values) != 6 or not all(np.isfinite(values)):
        return "unknown", None
    normal = np.cross(np.asarray(values[:3]), np.asarray(values[3:]))
    if not np.any(normal):
        return "unknown", None
    return PLANES[int(np.argmax(np.abs(normal)))], normal


def open_dicom(data: bytes, content_digest: str) -> DicomObject:
    """Parse ``data`` as DICOM and check it is an image we use; raises :class:`Skipped`."""
    import pydicom

    preamble = len(data) >= 132 and data[128:132] == b"DICM"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
            # Touch every top-level element now so a damaged header fails here, not later.
            for _ in ds.iterall():
                pass
        except Exception:
            raise Skipped(
                "corrupt or truncated" if preamble else "not DICOM or a known image format"
            ) from None
        try:
            return _classify(ds, preamble, content_digest)
        except Skipped:
            raise
        except Exception:
            raise Skipped("corrupt or truncated (header)") from None


def _classify(ds: Any, preamble: bool, content_digest: str) -> DicomObject:
    has_pixels = any(k in ds for k in _PIXEL_KEYWORDS)
    meta = getattr(ds, "file_meta", None)
    sop_class = str(ds.get("SOPClassUID", "") or "").strip() or str(
        (meta.get("MediaStorageSOPClassUID", "") if meta is not None else "") or ""
    ).strip()
    if not sop_class and not has_pixels:
        # A Part 10 file without even a SOP class is damaged (pydicom stops quietly at a
        # truncated element); a bare byte stream without one is not DICOM at all.
        raise Skipped("corrupt or truncated" if preamble else "not DICOM or a known image format")
    raw_modality = str(ds.get("Modality", "") or "").strip().upper()
    if sop_class == _MEDIA_DIRECTORY or "DirectoryRecordSequence" in ds:
        raise Skipped("non-image object (DICOMDIR)")
    if raw_modality in _NON_IMAGE_MODALITIES:
        raise Skipped(f"non-image object ({_NON_IMAGE_MODALITIES[raw_modality]})")
    if sop_class and sop_class not in _IMAGE_SOP_MODALITY:
        kind = _non_image_kind(sop_class)
        if kind:
            raise Skipped(f"non-image object ({kind})")
    if sop_class.startswith(_SECONDARY_CAPTURE):
        raise Skipped("secondary capture")
    image_type = [str(v).upper() for v in _as_list(ds.get("ImageType"))]
    if "SCREEN SAVE" in image_type:
        raise Skipped("secondary capture")
    if not has_pixels:
        if ("Rows" in ds and "Columns" in ds) or sop_class in _IMAGE_SOP_MODALITY:
            # An image object without its pixels was cut short (pydicom stops quietly at a
            # truncated element) or stripped.
            raise Skipped("corrupt or truncated (pixel data missing)")
        raise Skipped("no pixel data")
    modality = raw_modality or _IMAGE_SOP_MODALITY.get(sop_class, "")
    if modality not in MODALITIES:
        code = modality if _MODALITY_CODE.match(modality or "") else "unknown"
        raise Skipped(f"unsupported modality ({code})")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "").upper()
    if samples != 1 or not photometric.startswith("MONOCHROME"):
        raise Skipped("colour image")
    if not int(ds.get("Rows", 0) or 0) or not int(ds.get("Columns", 0) or 0):
        raise Skipped("no pixel data")
    _ensure_transfer_syntax(ds)

    patient_id = str(ds.get("PatientID", "") or "").strip()
    fallback: str | None = None
    if not patient_id:
        # Stated fallback: the study, else the series, else the file content. Each is hashed
        # with the site secret like a PatientID; the summary counts how often it was used.
        study = str(ds.get("StudyInstanceUID", "") or "").strip()
        series = str(ds.get("SeriesInstanceUID", "") or "").strip()
        if study:
            patient_id, fallback = "study:" + study, "StudyInstanceUID"
        elif series:
            patient_id, fallback = "series:" + series, "SeriesInstanceUID"
        else:
            patient_id, fallback = "file:" + content_digest, "file digest"
    series_uid = str(ds.get("SeriesInstanceUID", "") or "").strip() or "file:" + content_digest
    sop_uid = str(ds.get("SOPInstanceUID", "") or "").strip()

    frames = _frames(ds, sop_uid, content_digest)
    unit, note, factor = "a.u.", None, 1.0
    if modality == "CT":
        unit = "HU"
    elif modality == "PT":
        factor, unit, note = suv_body_weight_factor(ds)
    return DicomObject(
        dataset=ds,
        modality=modality,
        patient_id=patient_id,
        patient_fallback=fallback,
        series_uid=series_uid,
        frames=frames,
        unit=unit,
        unit_note=note,
        suv_factor=factor,
    )


def _non_image_kind(sop_class: str) -> str | None:
    from pydicom.uid import UID

    name = UID(sop_class).name
    if name == sop_class:  # not in pydicom's dictionary
        return None
    checks = (
        ("Structured Report", "SR"),
        (" SR ", "SR"),
        ("SR Storage", "SR"),
        ("RT Structure Set", "RTSTRUCT"),
        ("Presentation State", "presentation state"),
        ("Key Object Selection", "key object selection"),
        ("Segmentation", "segmentation"),
        ("RT Plan", "RTPLAN"),
        ("RT Dose", "RTDOSE"),
        ("Waveform", "waveform"),
        ("Encapsulated", "document"),
        ("Raw Data", "raw data"),
        ("Registration", "registration"),
        ("Spectroscopy", "spectroscopy"),
        ("Document", "document"),
    )
    for needle, kind in checks:
        if needle in name:
            return kind
    return None


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, str | bytes):
        return [value]
    try:
        return list(value)
    except TypeError:
        return [value]


def _ensure_transfer_syntax(ds: Any) -> None:
    """Bare datasets have no file meta; pixel handlers need the syntax, which we read with."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import (
        ExplicitVRBigEndian,
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
    )

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = getattr(ds, "original_encoding", (True, True))
    if implicit:
        syntax = ImplicitVRLittleEndian
    else:
        syntax = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    if meta is None:
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax


def _first_item(ds: Any, keyword: str) -> Any:
    seq = ds.get(keyword) if ds is not None else None
    if seq:
        try:
            return seq[0]
        except (IndexError, TypeError):
            return None
    return None


def _group_attr(groups: list[Any], sequence: str, keyword: str) -> Any:
    """The first value of ``keyword`` inside ``sequence`` of the per-frame, then shared group."""
    for group in groups:
        item = _first_item(group, sequence)
        if item is not None and keyword in item:
            value = item.get(keyword)
            if value not in (None, ""):
                return value
    return None


def _spacing(value: Any) -> tuple[float, float] | None:
    try:
        dy, dx = (float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if dy > 0 and dx > 0 and np.isfinite(dy) and np.isfinite(dx):
        return dy, dx
    return None


def _frames(ds: Any, sop_uid: str, content_digest: str) -> list[DicomFrame]:
    from pydicom.dataset import Dataset

    try:
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        n_frames = 1
    n_frames = max(n_frames, 1)
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    base_id = sop_uid or "sha256:" + content_digest
    try:
        instance_number = float(ds.get("InstanceNumber", 0) or 0)
    except (TypeError, ValueError):
        instance_number = 0.0
    frames = []
    for index in range(n_frames):
        groups = [g for g in (per_frame[index] if index < len(per_frame) else None, shared) if g]
        orientation = _group_attr(groups, "PlaneOrientationSequence", "ImageOrientationPatient")
        if orientation is None:
            orientation = ds.get("ImageOrientationPatient")
        position_xyz = _group_attr(groups, "PlanePositionSequence", "ImagePositionPatient")
        if position_xyz is None and n_frames == 1:
            position_xyz = ds.get("ImagePositionPatient")
        plane, normal = plane_of(orientation)
        position = float(index) if n_frames > 1 else instance_number
        if normal is not None and position_xyz is not None:
            try:
                xyz = np.asarray([float(v) for v in position_xyz], dtype=np.float64)
                if xyz.shape == (3,) and np.all(np.isfinite(xyz)):
                    position = float(np.dot(xyz, normal))
            except (TypeError, ValueError):
                pass
        spacing = _spacing(_group_attr(groups, "PixelMeasuresSequence", "PixelSpacing"))
        if spacing is None:
            spacing = _spacing(ds.get("PixelSpacing"))
        # This frame's rescale: per-frame / shared Pixel Value Transformation, else the
        # top-level Modality LUT module (what apply_rescale reads from a dataset).
        slope = _group_attr(groups, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _group_attr(groups, "PixelValueTransformationSequence", "RescaleIntercept")
        rescale: Any = ds
        if slope is not None and intercept is not None:
            rescale = Dataset()
            rescale.RescaleSlope = slope
            rescale.RescaleIntercept = intercept
        uid = base_id if n_frames == 1 else f"{base_id}:{index}"
        frames.append(DicomFrame(index, plane, position, spacing, uid, rescale))
    return frames


def _decode(ds: Any, n_frames: int) -> np.ndarray:
    from pydicom.uid import UID

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            array = np.asarray(ds.pixel_array)
        except Exception:  # every handler failure is a per-file skip, never a crash
            syntax = UID(str(ds.file_meta.get("TransferSyntaxUID", "")))
            if syntax.is_transfer_syntax and not syntax.is_compressed:
                # Native pixel data only fails to decode when it is short or its group 0028
                # description is inconsistent: a damaged file, not a missing codec.
                raise Skipped("corrupt or truncated (pixel data)") from None
            name = syntax.name if syntax.is_transfer_syntax else "unknown transfer syntax"
            raise Skipped(f"decode failed ({name})") from None
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[0] != n_frames or min(array.shape) < 1:
        raise Skipped("colour image" if array.ndim == 4 else "corrupt or truncated (shape)")
    return array


def _air_for_padding(hu: np.ndarray, stored: np.ndarray, ds: Any) -> np.ndarray:
    """Padding (PixelPaddingValue [..RangeLimit], stored values) and sub-air values -> air."""
    out: np.ndarray = np.maximum(hu, np.float32(AIR_HU))
    pad = ds.get("PixelPaddingValue")
    if isinstance(pad, int | float):
        limit = ds.get("PixelPaddingRangeLimit")
        if isinstance(limit, int | float):
            lo, hi = sorted((pad, limit))
            mask = (stored >= lo) & (stored <= hi)
        else:
            mask = stored == pad
        out[mask] = AIR_HU
    return out


def _parse_dt(date: Any, time: Any) -> datetime | None:
    from pydicom.valuerep import DA, DT, TM

    try:
        if time and not date:
            # A DT value holds its own date.
            parsed = DT(str(time))
            return datetime(parsed.year, parsed.month, parsed.day, parsed.hour,
                            parsed.minute, parsed.second, parsed.microsecond)
        if not date or not time:
            return None
        day = DA(str(date))
        moment = TM(str(time))
        return datetime(day.year, day.month, day.day, moment.hour, moment.minute,
                        moment.second, moment.microsecond)
    except (ValueError, TypeError, AttributeError):
        return None


def suv_body_weight_factor(ds: Any) -> tuple[float, str, str | None]:
    """(factor, unit, reason): Bq/ml x factor = SUVbw, or factor 1 and why SUV is impossible.

    SUVbw = C(Bq/ml) x weight(g) / injected dose decayed to the reference time of the image's
    decay correction (DecayCorrection START: the series start; ADMIN: the injection itself).
    """
    units = str(ds.get("Units", "") or "").strip().upper()
    if units == "GML":
        return 1.0, "SUVbw", None
    if units != "BQML":
        return 1.0, "PET counts" if units in ("CNTS", "PROPCNTS") else "PET a.u.", (
            "Units is not BQML"
        )
    try:
        weight_kg = float(ds.get("PatientWeight") or 0)
    except (TypeError, ValueError):
        weight_kg = 0.0
    if not weight_kg > 0:
        return 1.0, "Bq/ml", "no PatientWeight"
    info = _first_item(ds, "RadiopharmaceuticalInformationSequence")
    if info is None:
        return 1.0, "Bq/ml", "no RadiopharmaceuticalInformationSequence"
    try:
        dose_bq = float(info.get("RadionuclideTotalDose") or 0)
        half_life_s = float(info.get("RadionuclideHalfLife") or 0)
    except (TypeError, ValueError):
        dose_bq, half_life_s = 0.0, 0.0
    if not dose_bq > 0:
        return 1.0, "Bq/ml", "no RadionuclideTotalDose"
    correction = str(ds.get("DecayCorrection", "") or "").strip().upper()
    if correction == "ADMIN":
        decayed = dose_bq
    elif correction == "START":
        if not half_life_s > 0:
            return 1.0, "Bq/ml", "no RadionuclideHalfLife"
        start = _parse_dt(ds.get("SeriesDate") or ds.get("AcquisitionDate"),
                          ds.get("SeriesTime") or ds.get("AcquisitionTime"))
        injected = _parse_dt(None, info.get("RadiopharmaceuticalStartDateTime"))
        if injected is None and start is not None and info.get("RadiopharmaceuticalStartTime"):
            injected = _parse_dt(start.strftime("%Y%m%d"), info.get("RadiopharmaceuticalStartTime"))
            if injected is not None and injected > start:
                injected -= timedelta(days=1)  # injected before midnight, scanned after
        if start is None or injected is None:
            return 1.0, "Bq/ml", "no series or injection time"
        elapsed_s = (start - injected).total_seconds()
        if elapsed_s < 0 or elapsed_s > 48 * 3600:
            return 1.0, "Bq/ml", "implausible injection time"
        decayed = dose_bq * 2.0 ** (-elapsed_s / half_life_s)
    else:
        return 1.0, "Bq/ml", "DecayCorrection is neither START nor ADMIN"
    return weight_kg * 1000.0 / decayed, "SUVbw", None
