"""Every DICOM file of pydicom's test files and of pydicom-data: stored or skipped, never a crash.

The corpus is full of conformance corner cases (no preamble, no meta, big endian, deflated,
truncated, odd sizes, every compressed syntax, SR / RT / DICOMDIR objects). Each file is
ingested on its own into a fresh store, so no file is skipped merely as a duplicate of another.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from pydicom.data import get_testdata_files

import node.ingest.pipeline as pipeline
from node.config import NodePaths, load_node_config
from node.errors import IngestError
from node.home import init_home
from node.ingest import ingest_sources
from node.store import Store


def _corpus() -> list[Path]:
    files = {Path(f).resolve() for f in get_testdata_files() if os.path.isfile(f)}
    try:
        import data_store  # the pydicom-data package

        files |= {p.resolve() for p in (Path(data_store.__file__).parent / "data").iterdir()
                  if p.is_file()}
    except ImportError:  # pragma: no cover - pydicom-data is a dev dependency
        pass
    return sorted(files)


def test_every_corpus_file_is_stored_or_skipped_with_a_reason(tmp_path: Path) -> None:
    files = _corpus()
    assert len(files) > 200
    home = tmp_path / "home"
    init_home(home, "corpus")
    paths = NodePaths(home)
    config = load_node_config(paths)
    outcomes: dict[str, str] = {}
    slowest = 0.0
    started = time.perf_counter()
    for source in files:
        shutil.rmtree(paths.store, ignore_errors=True)  # a fresh store for every file
        t0 = time.perf_counter()
        try:
            summary = ingest_sources(paths, config, [source], plane="any", progress=False)
        except IngestError as exc:
            # A single unreadable named file is a one-line usage error: also an outcome.
            assert exc.what.startswith("no image could be read"), (source.name, exc.what)
            outcomes[str(source)] = "error: " + exc.what
        else:
            assert summary.files == 1
            with Store(paths.store) as store:
                assert store.count() == summary.slices_added == summary.slices
            if summary.slices:
                outcomes[str(source)] = f"stored {summary.slices}"
            else:
                assert sum(summary.skipped.values()) >= 1, source.name
                outcomes[str(source)] = "skipped: " + ", ".join(sorted(summary.skipped))
        slowest = max(slowest, time.perf_counter() - t0)
    elapsed = time.perf_counter() - started
    assert len(outcomes) == len(files)
    by_name = {Path(k).name: v for k, v in outcomes.items()}
    # Spot checks of the expected outcome for named corner cases.
    assert by_name["CT_small.dcm"] == "stored 1"
    assert by_name["MR_small_RLE.dcm"] == "stored 1"
    assert by_name["MR_small_jpeg_ls_lossless.dcm"] == "stored 1"
    assert by_name["MR_small_bigendian.dcm"] == "stored 1"
    assert by_name["emri_small_jpeg_2k_lossless.dcm"] == "stored 10"
    assert by_name["693_J2KR.dcm"] == "stored 1"
    assert by_name["eCT_Supplemental.dcm"] == "stored 2"
    assert by_name["rtstruct.dcm"] == "skipped: non-image object (RTSTRUCT)"
    assert by_name["reportsi.dcm"] == "skipped: non-image object (SR)"
    assert by_name["SC_rgb.dcm"] == "skipped: secondary capture"
    assert by_name["US1_J2KR.dcm"] == "skipped: unsupported modality (US)"
    assert by_name["MR_truncated.dcm"].startswith("error: no image could be read")
    assert "corrupt or truncated" in by_name["MR_truncated.dcm"]
    stored = sum(1 for v in outcomes.values() if v.startswith("stored"))
    assert stored >= 40
    print(f"\ncorpus: {len(files)} files, {stored} stored, {elapsed:.1f} s,"
          f" slowest file {slowest:.2f} s")


@pytest.mark.parametrize("name", ["ExplVR_BigEndNoMeta.dcm", "no_meta.dcm", "rtplan.dump",
                                  "crayons.icc"])
def test_files_without_meta_or_not_dicom_do_not_crash(tmp_path: Path, name: str) -> None:
    from pydicom.data import get_testdata_file

    home = tmp_path / "h"
    init_home(home, "s")
    paths = NodePaths(home)
    source = Path(get_testdata_file(name))
    try:
        summary = ingest_sources(paths, load_node_config(paths), [source], progress=False)
    except IngestError as exc:
        assert exc.what.startswith("no image could be read")
    else:
        assert summary.slices == 0 and sum(summary.skipped.values()) == 1
    assert pipeline.ERROR_REASONS  # the vocabulary the error above is drawn from
