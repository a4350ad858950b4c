"""PNG / JPEG / NIfTI sources: bit depths, colour, patient rules, labels, NIfTI planes."""

from __future__ import annotations

import io
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from node.config import NodePaths, load_node_config
from node.errors import IngestError
from node.ingest import ingest_sources
from node.ingest.dicom import Skipped
from node.ingest.images import read_image
from node.ingest.nifti import read_nifti
from node.store import Store


def _blob(side: int = 40, peak: int = 200) -> np.ndarray:
    yy, xx = np.mgrid[:side, :side]
    img = np.where((yy - side / 2) ** 2 + (xx - side / 2) ** 2 < (side / 3) ** 2, peak, 0)
    return (img * (0.5 + 0.5 * xx / side)).astype(np.int64)


def _png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)
    return path


def _bytes(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _ingest(home: Path, sources: list[Path], **kwargs: object):
    paths = NodePaths(home)
    return ingest_sources(paths, load_node_config(paths), sources, progress=False, **kwargs)


# ---- reading ---------------------------------------------------------------------------------


def test_8_bit_png_is_read_as_is() -> None:
    array = _blob().astype(np.uint8)
    out = read_image(_bytes(Image.fromarray(array), "PNG"))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, array)


def test_16_bit_png_keeps_16_bit_values() -> None:
    array = (_blob(peak=60000)).astype(np.uint16)
    out = read_image(_bytes(Image.fromarray(array), "PNG"))
    assert out.dtype == np.uint16 and int(out.max()) > 255
    np.testing.assert_array_equal(out, array)


def test_grey_jpeg_is_read() -> None:
    array = _blob().astype(np.uint8)
    out = read_image(_bytes(Image.fromarray(array), "JPEG"))
    assert out.shape == array.shape
    assert np.abs(out.astype(int) - array).mean() < 6


def test_rgb_png_with_equal_channels_is_converted() -> None:
    grey = _blob().astype(np.uint8)
    rgb = np.stack([grey] * 3, axis=-1)
    np.testing.assert_array_equal(read_image(_bytes(Image.fromarray(rgb), "PNG")), grey)


def test_colour_png_is_skipped_as_colour() -> None:
    rgb = np.stack([_blob(), _blob() // 2, _blob() // 3], axis=-1).astype(np.uint8)
    with pytest.raises(Skipped, match="^colour image$"):
        read_image(_bytes(Image.fromarray(rgb), "PNG"))


def test_truncated_jpeg_is_skipped_as_corrupt() -> None:
    data = _bytes(Image.fromarray(_blob().astype(np.uint8)), "JPEG")
    with pytest.raises(Skipped, match="^corrupt or truncated"):
        read_image(data[: len(data) // 2])


def _volume() -> tuple[nib.Nifti1Image, np.ndarray]:
    # 6 (x, left->right) x 8 (y, posterior->anterior) x 5 (z, inferior->superior), RAS+.
    data = np.zeros((6, 8, 5), dtype=np.float32)
    data[5, 7, 4] = 9.0  # right, anterior, superior corner
    affine = np.diag([1.0, 2.0, 3.0, 1.0])
    return nib.Nifti1Image(data, affine), data


def test_nifti_axial_slices_are_laid_out_like_dicom() -> None:
    image, _ = _volume()
    slices = read_nifti(image.to_bytes(), "axial")
    assert len(slices) == 5
    top = slices[4]
    assert top.values.shape == (8, 6) and top.spacing_mm == (2.0, 1.0)
    # Anterior is up (row 0) and the patient's right is on the image left (column 0).
    assert top.values[0, 0] == 9.0
    assert [s.position for s in slices] == [0.0, 3.0, 6.0, 9.0, 12.0]


@pytest.mark.parametrize(("plane", "count", "shape"), [("sagittal", 6, (5, 8)),
                                                       ("coronal", 8, (5, 6))])
def test_nifti_is_cut_along_the_plane_axis(plane: str, count: int, shape: tuple[int, int]) -> None:
    image, _ = _volume()
    slices = read_nifti(image.to_bytes(), plane)
    assert len(slices) == count
    assert slices[-1].values.shape == shape
    assert slices[-1].values[0].max() == 9.0  # head up


def test_gzipped_nifti_is_read(tmp_path: Path) -> None:
    image, _ = _volume()
    nib.save(image, tmp_path / "v.nii.gz")
    assert len(read_nifti((tmp_path / "v.nii.gz").read_bytes(), "axial")) == 5


# ---- through the pipeline: patient rules -----------------------------------------------------


def _image_tree(root: Path) -> None:
    for k, (patient, n) in enumerate((("p01", 3), ("p02", 2))):
        for i in range(n):
            pixels = (_blob() + 5 * i + 20 * k).astype(np.uint8)  # every file distinct
            _png(root / patient / f"img_{patient}_{i}.png", pixels)


def test_folder_rule_takes_the_parent_folder_as_patient(node_home: Path, tmp_path: Path) -> None:
    _image_tree(tmp_path / "src")
    summary = _ingest(node_home, [tmp_path / "src"], modality="MR")
    assert (summary.slices, summary.patients, summary.series) == (5, 2, 2)
    assert summary.by_modality == {"MR": 5}
    assert summary.units == {"pixel value": 5}
    assert any("carry no orientation" in n for n in summary.notes)


def test_pattern_rule_takes_the_group(node_home: Path, tmp_path: Path) -> None:
    folder = tmp_path / "flat"
    for i, name in enumerate(("A1_0.png", "A1_1.png", "B7_0.png", "junk.png")):
        _png(folder / name, (_blob() + i).astype(np.uint8))
    summary = _ingest(node_home, [folder], modality="MR", patient_rule=r"pattern:^([A-Z]\d)_")
    assert (summary.slices, summary.patients) == (3, 2)
    assert summary.skipped == {"patient pattern does not match": 1}


def test_csv_rule_gives_patients_and_labels(node_home: Path, tmp_path: Path) -> None:
    folder = tmp_path / "set"
    for cls, numbers in (("glioma", (1, 2, 3)), ("meningioma", (4, 5))):
        for n in numbers:
            _png(folder / cls / f"{n}.png", (_blob() + n).astype(np.uint8))
    rows = ["file,patient_id,label", "glioma/1.png,100,glioma", "glioma/2.png,100,glioma",
            "glioma/3.png,MR7B,glioma", "meningioma/4.png,200,meningioma"]
    (folder / "patients.csv").write_text("\n".join(rows) + "\n")
    summary = _ingest(node_home, [folder], modality="MR",
                      patient_rule=f"csv:{folder / 'patients.csv'}")
    # patients.csv itself is not counted as a source file; 5.png has no row.
    assert summary.files == 5
    assert (summary.slices, summary.patients) == (4, 3)
    assert summary.skipped == {"not in patients CSV": 1}
    with Store(node_home / "store") as store:
        labels = sorted(r.label or "" for r in store.records())
        positions = sorted(r.position for r in store.records())
    assert labels == ["glioma", "glioma", "glioma", "meningioma"]
    assert positions == [1.0, 2.0, 3.0, 4.0]


def test_csv_rule_with_missing_column_is_a_usage_error(node_home: Path, tmp_path: Path) -> None:
    _image_tree(tmp_path / "src")
    (tmp_path / "p.csv").write_text("name,patient\nx,1\n")
    with pytest.raises(IngestError, match="no column 'file'"):
        _ingest(node_home, [tmp_path / "src"], modality="MR",
                patient_rule=f"csv:{tmp_path / 'p.csv'}")
    with pytest.raises(IngestError, match="does not exist"):
        _ingest(node_home, [tmp_path / "src"], modality="MR",
                patient_rule=f"csv:{tmp_path / 'none.csv'}")


def test_images_without_modality_are_refused(node_home: Path, tmp_path: Path) -> None:
    _image_tree(tmp_path / "src")
    summary = _ingest(node_home, [tmp_path / "src"])
    assert summary.slices == 0
    assert summary.skipped == {"image file without --modality": 5}
    assert "PNG/JPEG/NIfTI files need --modality CT|MR|PT" in summary.notes


def test_colour_images_in_a_folder_are_skipped_not_fatal(node_home: Path, tmp_path: Path) -> None:
    _image_tree(tmp_path / "src")
    rgb = np.stack([_blob(), _blob() // 2, _blob() // 3], axis=-1).astype(np.uint8)
    _png(tmp_path / "src" / "p01" / "photo.png", rgb)
    summary = _ingest(node_home, [tmp_path / "src"], modality="MR")
    assert summary.slices == 5 and summary.skipped == {"colour image": 1}


def test_nifti_volume_is_ingested_along_the_store_plane(node_home: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = rng.uniform(0, 100, size=(20, 24, 6)).astype(np.float32)
    (tmp_path / "vols" / "case7").mkdir(parents=True)
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.5, 1.0])),
             tmp_path / "vols" / "case7" / "t1.nii.gz")
    summary = _ingest(node_home, [tmp_path / "vols"], modality="MR")
    assert (summary.slices, summary.patients, summary.series) == (6, 1, 1)
    assert summary.split["method"] == "slabs (single patient)"
    again = _ingest(node_home, [tmp_path / "vols"], modality="MR", plane="sagittal")
    assert again.slices_added == 20  # the same volume cut the other way: new slices


def test_sixteen_bit_png_folder_is_normalised_to_unit_range(node_home: Path,
                                                           tmp_path: Path) -> None:
    for i in range(3):
        _png(tmp_path / "s" / "p" / f"{i}.png", (_blob(peak=50000) + 100 * i).astype(np.uint16))
    summary = _ingest(node_home, [tmp_path / "s"], modality="PT")
    assert summary.slices == 3
    with Store(node_home / "store") as store:
        pixels, records = store.images("train") if summary.split["slices_train"] else (
            store.images("holdout"))
        assert pixels.min() >= 0.0 and pixels.max() <= 1.0 and pixels.max() > 0.9
        assert all(r.scale > 255 for r in records)  # 16-bit range kept in the mapping


def test_patient_merge_joins_ids_differing_by_a_trailing_letter(node_home: Path,
                                                                tmp_path: Path) -> None:
    folder = tmp_path / "set"
    for n in range(4):
        _png(folder / "glioma" / f"{n}.png", (_blob() + n).astype(np.uint8))
    rows = ["file,patient_id,label", "glioma/0.png,MR040240,glioma",
            "glioma/1.png,MR040240B,glioma", "glioma/2.png,MR040240C,glioma",
            "glioma/3.png,100360,glioma"]
    (folder / "patients.csv").write_text("\n".join(rows) + "\n")
    rule = f"csv:{folder / 'patients.csv'}"
    separate = _ingest(node_home, [folder], modality="MR", patient_rule=rule)
    assert separate.patients == 4
    merged_home = tmp_path / "merged"
    from node.home import init_home

    init_home(merged_home, "m")
    merged = _ingest(merged_home, [folder], modality="MR", patient_rule=rule,
                     patient_merge=r"^(MR\d+)[A-Z]$")
    assert merged.patients == 2
    with pytest.raises(IngestError, match="needs a group"):
        _ingest(merged_home, [folder], modality="MR", patient_rule=rule, patient_merge="MR")


@pytest.mark.parametrize(
    ("rule", "label", "merge", "message", "where"),
    [
        ("folder", "grade", None, "--label-column needs a csv: patient rule", "--label-column"),
        ("pattern:^(\\w+)/", "grade", None, "--label-column needs a csv: patient rule",
         "--label-column"),
        ("pattern:^((\\w+)/", None, None, "bad patient pattern", "--patient-rule"),
        ("pattern:^\\w+/", None, None, "the patient pattern needs a group", "--patient-rule"),
        ("by-name", None, None, "unknown patient rule 'by-name'", "--patient-rule"),
        ("folder", None, "^(MR\\d+", "bad merge pattern", "--patient-merge"),
        ("folder", None, "^MR\\d+$", "the merge pattern needs a group", "--patient-merge"),
    ],
)
def test_bad_patient_rules_are_refused_naming_the_option(
    rule: str, label: str | None, merge: str | None, message: str, where: str
) -> None:
    from node.ingest.pipeline import parse_patient_rule

    with pytest.raises(IngestError) as err:
        parse_patient_rule(rule, label, merge)
    assert err.value.what.startswith(message) and err.value.where == where


def test_patients_csv_with_a_missing_label_column_or_bad_bytes_is_refused(tmp_path: Path) -> None:
    from node.ingest.pipeline import parse_patient_rule

    table = tmp_path / "patients.csv"
    table.write_text("file,patient_id\na.png,p1\n")
    with pytest.raises(IngestError, match="patients CSV has no column 'grade'"):
        parse_patient_rule(f"csv:{table}", "grade")
    table.write_bytes(b"file,patient_id\n\xff\xfe\xfa.png,p1\n")
    with pytest.raises(IngestError, match="cannot read patients CSV: UnicodeDecodeError"):
        parse_patient_rule(f"csv:{table}")
    # Rows without a file or a patient are skipped, not guessed.
    table.write_text("file,patient_id,label\na.png,,x\n,p2,y\nb.png,p3,\n")
    rule = parse_patient_rule(f"csv:{table}")
    assert rule.table == {(tmp_path / "b.png").resolve(): ("p3", None)}


def test_csv_that_names_none_of_the_images_says_where_paths_are_read(
    node_home: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "set"
    for n in (1, 2):
        _png(folder / "glioma" / f"{n}.png", (_blob() + n).astype(np.uint8))
    elsewhere = tmp_path / "lists"
    elsewhere.mkdir()
    # Written for a CSV kept beside the images, but kept in another folder.
    (elsewhere / "patients.csv").write_text("file,patient_id\nglioma/1.png,100\nglioma/2.png,100\n")
    with pytest.raises(IngestError, match="names none of the 2 image file") as caught:
        _ingest(node_home, [folder], modality="MR",
                patient_rule=f"csv:{elsewhere / 'patients.csv'}")
    message = str(caught.value)
    assert str(elsewhere.resolve()) in message and "absolute paths" in message
    assert str((elsewhere / "glioma" / "1.png").resolve()) in message  # what the CSV named
    with Store(node_home / "store") as store:
        assert store.count() == 0
    # The same CSV beside the images works.
    (folder / "patients.csv").write_text((elsewhere / "patients.csv").read_text())
    summary = _ingest(node_home, [folder], modality="MR",
                      patient_rule=f"csv:{folder / 'patients.csv'}")
    assert summary.slices == 2


def test_pattern_that_matches_none_of_the_images_says_what_it_is_searched_in(
    node_home: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "flat"
    for name in ("A1_0.png", "B7_0.png"):
        _png(folder / name, _blob().astype(np.uint8))
    with pytest.raises(IngestError, match="finds a patient in none of the 2 image file") as caught:
        _ingest(node_home, [folder], modality="MR", patient_rule=r"pattern:^patient-(\d+)/")
    assert "'A1_0.png'" in str(caught.value)  # the relative path the pattern was tried on
    with Store(node_home / "store") as store:
        assert store.count() == 0
