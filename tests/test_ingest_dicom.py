"""DICOM reading and normalisation: physical units, geometry, syntaxes, frames, skip reasons."""

from __future__ import annotations

import warnings
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.pixels import apply_rescale
from pydicom.uid import JPEG2000Lossless, RLELossless

from node.ingest.dicom import Skipped, open_dicom, plane_of, suv_body_weight_factor
from node.ingest.normalise import AIR_HU, _percentiles, intensity_window, normalise_slice
from node.ingest.testing import write_dicom_slice
from protocols.files import sha256_hex


def _open(path: str | Path):
    data = Path(path).read_bytes()
    return open_dicom(data, sha256_hex(data))


def _reference_hu(path: str | Path) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path)
        return np.asarray(apply_rescale(ds.pixel_array, ds), dtype=np.float32)


def _reason(path: str | Path) -> str:
    with pytest.raises(Skipped) as info:
        obj = _open(path)
        obj.values(0)
    return info.value.reason


# ---- physical units --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("slope", "intercept", "signed"),
    [(1.0, -1024.0, True), (1.000244, -1024.0, False), (0.5, -1000.0, True), (2.0, 0.0, True)],
)
def test_hu_equals_pydicom_apply_rescale(tmp_path: Path, slope: float, intercept: float,
                                         signed: bool) -> None:
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1000, 2000, size=(24, 20))
    path = write_dicom_slice(tmp_path / "ct.dcm", hu, slope=slope, intercept=intercept,
                             signed=signed)
    ours = _open(path).values(0)
    reference = _reference_hu(path)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, np.maximum(reference, AIR_HU))


def test_hu_of_pydicom_ct_small_equals_apply_rescale_outside_padding() -> None:
    path = get_testdata_file("CT_small.dcm")
    ours = _open(path).values(0)
    reference = _reference_hu(path)
    ds = pydicom.dcmread(path)
    padding = ds.pixel_array == ds.PixelPaddingValue
    keep = ~padding & (reference >= AIR_HU)
    np.testing.assert_array_equal(ours[keep], reference[keep])
    assert np.all(ours[~keep] == AIR_HU)


def test_hu_of_real_tcga_files_equals_apply_rescale(shared_data: Path) -> None:
    # Files with slope 1.000244 and rescale values written as '001.000000E+00' strings.
    folder = shared_data / "ct" / "tcga-luad" / "dicom_dir"
    checked = 0
    for path in sorted(folder.iterdir())[:69]:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if float(ds.RescaleSlope) == 1.0 and "E" not in str(ds["RescaleSlope"].repval):
            continue
        reference = _reference_hu(path)
        np.testing.assert_array_equal(_open(path).values(0), np.maximum(reference, AIR_HU))
        checked += 1
    assert checked >= 4


def test_padding_value_and_out_of_field_values_become_air(tmp_path: Path) -> None:
    hu = np.full((16, 16), 50.0)
    hu[0, :] = 3000.0  # the padding value, although it is a valid HU number
    hu[1, :] = -3024.0  # outside the field of view
    path = write_dicom_slice(tmp_path / "pad.dcm", hu, intercept=0.0, padding_value=3000)
    values = _open(path).values(0)
    assert np.all(values[0] == AIR_HU)
    assert np.all(values[1] == AIR_HU)
    assert np.all(values[2:] == 50.0)


def _pet(tmp_path: Path, **extra: object) -> Path:
    series = datetime(2021, 3, 4, 10, 30, 0)
    injected = series - timedelta(minutes=60)
    info = Dataset()
    info.RadionuclideTotalDose = 370e6
    info.RadionuclideHalfLife = 6586.2
    info.RadiopharmaceuticalStartTime = injected.strftime("%H%M%S")
    fields: dict[str, object] = {
        "Units": "BQML",
        "DecayCorrection": "START",
        "PatientWeight": 70.0,
        "SeriesTime": series.strftime("%H%M%S"),
        "RadiopharmaceuticalInformationSequence": [info],
    }
    fields.update(extra)
    values = np.full((16, 16), 5000.0)
    values[4:12, 4:12] = 20000.0
    return write_dicom_slice(tmp_path / "pt.dcm", values, modality="PT", intercept=0.0,
                             study_date="20210304", extra=fields)


def test_pet_in_suv_body_weight_decay_corrected_to_series_start(tmp_path: Path) -> None:
    path = _pet(tmp_path)
    obj = _open(path)
    expected_factor = 70_000.0 / (370e6 * 2.0 ** (-3600.0 / 6586.2))
    assert obj.unit == "SUVbw" and obj.unit_note is None
    assert obj.suv_factor == pytest.approx(expected_factor, rel=1e-9)
    np.testing.assert_allclose(obj.values(0), _reference_hu(path) * expected_factor, rtol=1e-6)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"PatientWeight": None}, "no PatientWeight"),
        ({"DecayCorrection": "NONE"}, "DecayCorrection is neither START nor ADMIN"),
        ({"RadiopharmaceuticalInformationSequence": []},
         "no RadiopharmaceuticalInformationSequence"),
    ],
)
def test_pet_without_what_suv_needs_stays_in_bq_per_ml_with_reason(
    tmp_path: Path, change: dict[str, object], reason: str
) -> None:
    obj = _open(_pet(tmp_path, **change))
    assert (obj.unit, obj.unit_note, obj.suv_factor) == ("Bq/ml", reason, 1.0)


def test_pet_admin_decay_correction_uses_injected_dose() -> None:
    ds = Dataset()
    ds.Units = "BQML"
    ds.PatientWeight = 80
    ds.DecayCorrection = "ADMIN"
    info = Dataset()
    info.RadionuclideTotalDose = 400e6
    ds.RadiopharmaceuticalInformationSequence = [info]
    assert suv_body_weight_factor(ds) == (80_000.0 / 400e6, "SUVbw", None)


# ---- geometry ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("orientation", "plane"),
    [
        ((1, 0, 0, 0, 1, 0), "axial"),
        ((1, 0, 0, 0, 0, -1), "coronal"),
        ((0, 1, 0, 0, 0, -1), "sagittal"),
        ((0.99, 0.1, 0, -0.1, 0.97, 0.2), "axial"),  # oblique, closest to axial
        ((0.0, 0.995, -0.1, 0.0, 0.1, -0.995), "sagittal"),
        (None, "unknown"),
        ((0, 0, 0, 0, 0, 0), "unknown"),
    ],
)
def test_plane_is_the_dominant_axis_of_the_normal(orientation: object, plane: str) -> None:
    assert plane_of(orientation)[0] == plane


def test_position_is_image_position_along_the_normal(tmp_path: Path) -> None:
    path = write_dicom_slice(tmp_path / "c.dcm", orientation="coronal", position=(5, -37.5, 9))
    frame = _open(path).frames[0]
    assert frame.plane == "coronal"
    assert frame.position == pytest.approx(-37.5)  # (1,0,0) x (0,0,-1) = (0,1,0)
    assert frame.spacing_mm == (0.8, 0.8)


def test_multiframe_object_is_split_into_frames() -> None:
    obj = _open(get_testdata_file("emri_small.dcm"))
    assert len(obj.frames) == 10
    assert [f.instance_uid.rsplit(":", 1)[1] for f in obj.frames] == [str(i) for i in range(10)]
    reference = pydicom.dcmread(get_testdata_file("emri_small.dcm")).pixel_array
    for i in (0, 9):
        np.testing.assert_array_equal(obj.values(i), reference[i].astype(np.float32))


def test_enhanced_ct_frames_take_geometry_and_rescale_from_functional_groups() -> None:
    obj = _open(get_testdata_file("eCT_Supplemental.dcm"))
    assert len(obj.frames) == 2
    assert {f.plane for f in obj.frames} == {"axial"}
    assert obj.frames[0].position != obj.frames[1].position
    assert obj.frames[0].spacing_mm == pytest.approx((0.388672, 0.388672))
    ds = pydicom.dcmread(get_testdata_file("eCT_Supplemental.dcm"))
    expected = ds.pixel_array[1].astype(np.float64) * 1.0 - 1024.0
    np.testing.assert_array_equal(obj.values(1), np.maximum(expected, AIR_HU).astype(np.float32))


# ---- transfer syntaxes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_RLE.dcm",  # RLE lossless
        "MR_small_jp2klossless.dcm",  # JPEG 2000 lossless
        "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
        "MR_small_bigendian.dcm",  # explicit VR big endian
        "MR_small_implicit.dcm",
        "MR_small_expb.dcm",
    ],
)
def test_compressed_and_big_endian_syntaxes_decode_to_the_same_values(name: str) -> None:
    reference = _open(get_testdata_file("MR_small.dcm")).values(0)
    np.testing.assert_array_equal(_open(get_testdata_file(name)).values(0), reference)


@pytest.mark.parametrize("name", ["emri_small_RLE.dcm", "emri_small_jpeg_2k_lossless.dcm",
                                  "emri_small_jpeg_ls_lossless.dcm",
                                  "emri_small_big_endian.dcm"])
def test_compressed_multiframe_decodes_every_frame(name: str) -> None:
    reference = _open(get_testdata_file("emri_small.dcm"))
    obj = _open(get_testdata_file(name))
    assert len(obj.frames) == 10
    np.testing.assert_array_equal(obj.values(7), reference.values(7))


def test_jpeg_lossless_process_14_decodes(tmp_path: Path) -> None:
    # pydicom's only grey JPEG lossless sample is an NM secondary capture; relabel its header
    # as MR (pixel data untouched) so it reaches the decoder.
    source = get_testdata_file("JPEG-LL.dcm")
    ds = pydicom.dcmread(source)
    expected = ds.pixel_array.astype(np.float32)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.Modality = "MR"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.save_as(tmp_path / "ll.dcm")
    obj = _open(tmp_path / "ll.dcm")
    assert "Process 14" in ds.file_meta.TransferSyntaxUID.name
    np.testing.assert_array_equal(obj.values(0), expected.reshape(obj.values(0).shape))


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_synthetic_ct_compressed_on_write_decodes_to_the_written_hu(tmp_path: Path,
                                                                    syntax: str) -> None:
    hu = np.round(np.random.default_rng(1).uniform(-1000, 1500, size=(32, 32)))
    plain = _open(write_dicom_slice(tmp_path / "a.dcm", hu)).values(0)
    packed = _open(write_dicom_slice(tmp_path / "b.dcm", hu, transfer_syntax=syntax)).values(0)
    np.testing.assert_array_equal(packed, plain)
    np.testing.assert_array_equal(plain, hu.astype(np.float32))


def test_file_without_preamble_or_meta_is_read(tmp_path: Path) -> None:
    path = write_dicom_slice(tmp_path / "bare", preamble=False)
    assert path.read_bytes()[128:132] != b"DICM"
    obj = _open(path)
    assert obj.modality == "CT" and obj.frames[0].plane == "axial"
    assert obj.values(0).shape == (32, 32)


# ---- skip reasons ----------------------------------------------------------------------------


def test_structured_report_rtstruct_and_dicomdir_are_non_image_objects() -> None:
    assert _reason(get_testdata_file("reportsi.dcm")) == "non-image object (SR)"
    assert _reason(get_testdata_file("rtstruct.dcm")) == "non-image object (RTSTRUCT)"
    assert _reason(get_testdata_file("DICOMDIR")) == "non-image object (DICOMDIR)"


def test_presentation_state_is_a_non_image_object(tmp_path: Path) -> None:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.11.1"
    ds.SOPInstanceUID = "1.2.3.4"
    ds.Modality = "PR"
    ds.PatientID = "x"
    path = tmp_path / "ps.dcm"
    ds.save_as(path, implicit_vr=True, little_endian=True)
    assert _reason(path) == "non-image object (presentation state)"


def test_secondary_capture_is_skipped_even_when_labelled_ct(tmp_path: Path) -> None:
    path = write_dicom_slice(tmp_path / "sc.dcm",
                             extra={"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"})
    assert _reason(path) == "secondary capture"
    path = write_dicom_slice(tmp_path / "ss.dcm", extra={"ImageType": ["DERIVED", "SECONDARY",
                                                                      "SCREEN SAVE"]})
    assert _reason(path) == "secondary capture"


def test_colour_image_is_skipped(tmp_path: Path) -> None:
    path = write_dicom_slice(tmp_path / "rgb.dcm", modality="MR", intercept=0.0)
    ds = pydicom.dcmread(path)
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.save_as(path)
    assert _reason(path) == "colour image"


def test_unsupported_modality_names_its_code() -> None:
    assert _reason(get_testdata_file("US1_UNCR.dcm")) == "unsupported modality (US)"


def test_truncated_file_is_skipped_as_corrupt(tmp_path: Path) -> None:
    data = write_dicom_slice(tmp_path / "t.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) - 700])
    assert _reason(tmp_path / "cut.dcm").startswith("corrupt or truncated")
    (tmp_path / "head.dcm").write_bytes(data[:300])
    assert _reason(tmp_path / "head.dcm").startswith("corrupt or truncated")
    assert _reason(get_testdata_file("MR_truncated.dcm")).startswith("corrupt or truncated")


def test_random_bytes_are_not_dicom(tmp_path: Path) -> None:
    (tmp_path / "noise").write_bytes(np.random.default_rng(3).bytes(4000))
    assert _reason(tmp_path / "noise") == "not DICOM or a known image format"


# ---- normalisation ---------------------------------------------------------------------------


def test_ct_window_maps_linearly_and_back() -> None:
    hu = np.full((64, 64), 40.0, dtype=np.float32)
    hu[:8] = -1500.0  # clipped to the window's low end
    window = intensity_window(hu, "CT", ct_window_hu=[-1024, 3071], percentiles=[0.5, 99.5],
                              fixed_window=True)
    out = normalise_slice(hu, window, 64, (1.0, 1.0))
    assert (out.scale, out.offset) == (4095.0, -1024.0)
    physical = out.pixels.astype(np.float16).astype(np.float32) * out.scale + out.offset
    np.testing.assert_allclose(physical[8:], 40.0, atol=1.0)
    np.testing.assert_allclose(physical[:8], -1024.0, atol=1e-3)
    assert out.spacing_mm == 1.0


def test_resize_keeps_physical_aspect_and_pads_with_background() -> None:
    wide = np.ones((32, 64), dtype=np.float32)
    out = normalise_slice(wide, (0.0, 1.0), 64, (1.0, 1.0))
    assert np.all(out.pixels[16:48] == 1.0)
    assert np.all(out.pixels[:16] == 0.0) and np.all(out.pixels[48:] == 0.0)
    assert out.spacing_mm == 1.0
    # Rows twice as far apart as columns: physically square, so no padding.
    out = normalise_slice(wide, (0.0, 1.0), 64, (2.0, 1.0))
    assert np.all(out.pixels == 1.0)


def test_downsampling_averages_areas() -> None:
    checker = (np.indices((512, 512)).sum(axis=0) % 2).astype(np.float32)
    out = normalise_slice(checker, (0.0, 1.0), 64, (0.7, 0.7))
    np.testing.assert_allclose(out.pixels, 0.5, atol=1e-6)  # no aliasing
    assert out.spacing_mm == pytest.approx(512 * 0.7 / 64)


def test_percentile_window_of_constant_slice_is_none() -> None:
    flat = np.full((20, 20), 7, dtype=np.uint8)
    assert intensity_window(flat, "MR", ct_window_hu=[-1024, 3071], percentiles=[0.5, 99.5],
                            fixed_window=False) is None


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from([np.uint8, np.uint16, np.int16]),
    st.integers(min_value=65, max_value=160),
    st.floats(min_value=0.0, max_value=49.0),
    st.floats(min_value=51.0, max_value=100.0),
    st.integers(min_value=0, max_value=2**16),
)
def test_histogram_percentiles_equal_numpy(dtype: type, side: int, low: float, high: float,
                                           seed: int) -> None:
    info = np.iinfo(dtype)
    rng = np.random.default_rng(seed)
    values = rng.integers(max(info.min, -3000), min(info.max, 5000), size=(side, side),
                          dtype=np.int64).astype(dtype)
    ours = _percentiles(values, [low, high])
    np.testing.assert_allclose(ours, np.percentile(values, [low, high]), rtol=0, atol=1e-9)


def _suv_ds(series: str = "003000", date: str = "20210305", **info_fields: object) -> Dataset:
    ds = Dataset()
    ds.Units = "BQML"
    ds.PatientWeight = 70.0
    ds.DecayCorrection = "START"
    ds.SeriesDate = date
    ds.SeriesTime = series
    info = Dataset()
    info.RadionuclideTotalDose = 370e6
    info.RadionuclideHalfLife = 6586.2
    for key, value in info_fields.items():
        if value is None:
            delattr(info, key)
        else:
            setattr(info, key, value)
    ds.RadiopharmaceuticalInformationSequence = [info]
    return ds


def test_pet_injected_before_midnight_and_scanned_after_decays_one_hour() -> None:
    # Only a start *time* was recorded: 23:30, series at 00:30 the next day.
    factor, unit, reason = suv_body_weight_factor(_suv_ds(RadiopharmaceuticalStartTime="233000"))
    assert (unit, reason) == ("SUVbw", None)
    assert factor == pytest.approx(70_000.0 / (370e6 * 2.0 ** (-3600.0 / 6586.2)), rel=1e-12)
    # A full start date-time needs no guessing and gives the same factor.
    dated = suv_body_weight_factor(_suv_ds(RadiopharmaceuticalStartDateTime="20210304233000"))
    assert dated == (factor, "SUVbw", None)


@pytest.mark.parametrize(
    ("ds", "expected"),
    [
        (_suv_ds(RadiopharmaceuticalStartDateTime="20210302233000"),
         ("Bq/ml", "implausible injection time")),  # 49 hours before the series
        (_suv_ds(RadiopharmaceuticalStartDateTime="20210305013000"),
         ("Bq/ml", "implausible injection time")),  # after the series started
        (_suv_ds(series=""), ("Bq/ml", "no series or injection time")),
        (_suv_ds(), ("Bq/ml", "no series or injection time")),  # no injection time at all
        (_suv_ds(RadiopharmaceuticalStartTime="233000", RadionuclideTotalDose=None),
         ("Bq/ml", "no RadionuclideTotalDose")),
        (_suv_ds(RadiopharmaceuticalStartTime="233000", RadionuclideHalfLife=0),
         ("Bq/ml", "no RadionuclideHalfLife")),
    ],
    ids=["49-hours", "after-start", "no-series-time", "no-injection-time", "no-dose",
         "no-half-life"],
)
def test_pet_suv_refuses_what_it_cannot_decay_correct(
    ds: Dataset, expected: tuple[str, str]
) -> None:
    assert suv_body_weight_factor(ds) == (1.0, *expected)


@pytest.mark.parametrize(
    ("units", "unit", "reason"),
    [("GML", "SUVbw", None), ("CNTS", "PET counts", "Units is not BQML"),
     ("PROPCNTS", "PET counts", "Units is not BQML"), ("", "PET a.u.", "Units is not BQML")],
)
def test_pet_units_other_than_bq_per_ml(units: str, unit: str, reason: str | None) -> None:
    ds = _suv_ds(RadiopharmaceuticalStartTime="233000")
    ds.Units = units
    assert suv_body_weight_factor(ds) == (1.0, unit, reason)
