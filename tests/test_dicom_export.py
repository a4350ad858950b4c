"""DICOM export: read back by pydicom and dcmtk, validated by dicom3tools' dciodvfy."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage, MRImageStorage, SecondaryCaptureImageStorage

from node.dicom_export import read_back_physical, storage_class_for, write_dicom_files


def _ct(n: int = 3, size: int = 16) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.rint(rng.uniform(-1024, 3071, (n, size, size))).astype(np.float32)


def _write(tmp_path: Path, images: np.ndarray, modality: str, unit: str,
           spacing: float | None = 1.5, plane: str = "axial") -> list[Path]:
    return write_dicom_files(
        tmp_path / modality, images, modality=modality, unit=unit, site="site-a",
        bundle_id="site-a-20260101T000000Z-00000000", pixel_spacing_mm=spacing, plane=plane,
    )


@pytest.mark.parametrize(
    ("modality", "spacing", "plane", "expected"),
    [
        ("CT", 1.5, "axial", CTImageStorage),
        ("MR", 1.0, "sagittal", MRImageStorage),
        ("CT", None, "axial", SecondaryCaptureImageStorage),
        ("CT", 1.5, "any", SecondaryCaptureImageStorage),
        ("PT", 2.0, "axial", SecondaryCaptureImageStorage),
    ],
)
def test_storage_class_follows_modality_and_geometry(
    modality: str, spacing: float | None, plane: str, expected: str
) -> None:
    assert storage_class_for(modality, spacing, plane) == expected


def test_pydicom_reads_back_the_same_hu(tmp_path: Path) -> None:
    images = _ct()
    paths = _write(tmp_path, images, "CT", "HU")
    np.testing.assert_array_equal(read_back_physical(paths), images)
    ds = dcmread(paths[0])
    assert ds.SOPClassUID == CTImageStorage
    assert float(ds.RescaleSlope) == 1.0 and float(ds.RescaleIntercept) == 0.0
    assert ds.RescaleType == "HU"


def test_non_hu_values_come_back_within_half_a_step(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    images = rng.uniform(0, 1200, (2, 16, 16)).astype(np.float32)
    paths = _write(tmp_path, images, "MR", "a.u.")
    back = read_back_physical(paths)
    slope = float(dcmread(paths[0]).RescaleSlope)
    assert np.abs(back - images).max() <= slope / 2 + 1e-3


def test_objects_say_they_are_synthetic(tmp_path: Path) -> None:
    paths = _write(tmp_path, _ct(2), "CT", "HU")
    a, b = dcmread(paths[0]), dcmread(paths[1])
    assert str(a.PatientName) == "SYNTHETIC^site-a"
    assert a.PatientID == "SYNTHETIC"
    assert a.PatientIdentityRemoved == "YES" and a.DeidentificationMethod
    assert a.BurnedInAnnotation == "NO"
    assert a.ConversionType == "SYN"
    assert list(a.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    assert a.SOPInstanceUID != b.SOPInstanceUID
    assert a.StudyInstanceUID == b.StudyInstanceUID and a.SeriesInstanceUID == b.SeriesInstanceUID
    assert a.SOPInstanceUID.startswith("2.25.")
    assert a.file_meta.MediaStorageSOPInstanceUID == a.SOPInstanceUID


def test_uids_are_fresh_for_every_export(tmp_path: Path) -> None:
    first = dcmread(_write(tmp_path / "1", _ct(1), "CT", "HU")[0])
    second = dcmread(_write(tmp_path / "2", _ct(1), "CT", "HU")[0])
    for attr in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                 "FrameOfReferenceUID"):
        assert getattr(first, attr) != getattr(second, attr)


def test_hu_with_fractions_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="whole numbers"):
        _write(tmp_path, _ct(1) + 0.5, "CT", "HU")


@pytest.mark.skipif(shutil.which("dcmdump") is None, reason="dcmtk's dcmdump is not installed")
def test_dcmdump_reads_every_file(tmp_path: Path) -> None:
    for path in _write(tmp_path, _ct(2), "CT", "HU"):
        done = subprocess.run(["dcmdump", str(path)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "SYNTHETIC^site-a" in done.stdout
        assert "(0008,0064) CS [SYN]" in done.stdout


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools' dciodvfy missing")
@pytest.mark.parametrize(
    ("modality", "unit", "spacing"),
    [("CT", "HU", 1.5), ("MR", "a.u.", 1.0), ("PT", "SUVbw", None), ("CT", "HU", None)],
)
def test_dciodvfy_reports_no_error(
    tmp_path: Path, modality: str, unit: str, spacing: float | None
) -> None:
    images = _ct(1) if unit == "HU" else np.abs(_ct(1)) / 100.0
    (path,) = _write(tmp_path, images, modality, unit, spacing)
    done = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    output = done.stdout + done.stderr
    errors = [line for line in output.splitlines() if line.startswith("Error")]
    assert errors == [], output


def test_bundle_dicom_files_hold_the_bundle_images(node_home: Path) -> None:
    from fixtures.bundle_factory import configure, export_small, trust_of

    from protocols.bundle import load_bundle_images, verify_bundle

    paths, config, _ = configure(node_home)
    bundle = export_small(paths, config, n=3, dicom=True)
    verified = verify_bundle(bundle, trust_of(paths, config))
    files = sorted((bundle / "dicom").iterdir())
    np.testing.assert_array_equal(read_back_physical(files), load_bundle_images(verified))
    ds = dcmread(files[0])
    assert str(ds.PatientName) == "SYNTHETIC^site-a"
    assert [float(v) for v in ds.PixelSpacing] == [1.5, 1.5]
