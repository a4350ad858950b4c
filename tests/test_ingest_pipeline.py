"""Ingest end to end: privacy, pseudonyms, split, idempotence, crash safety, CLI, real data."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

import node.ingest.pipeline as pipeline
from node.cli import app
from node.config import NodePaths, load_node_config
from node.errors import IngestError
from node.home import init_home
from node.ingest import ingest_sources
from node.ingest.testing import planted_identifiers, write_dicom_slice
from node.store import Store
from protocols.audit import verify_audit_log

runner = CliRunner()


def _slice_values(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[-1:1:32j, -1:1:32j]
    body = xx**2 + yy**2 < 0.7
    return np.where(body, rng.uniform(-200, 400, size=(32, 32)), -1000.0)


def _sop_uid(tag: str, patient: int, index: int) -> str:
    return f"1.2.826.0.1.3680043.99.{ord(tag)}.{patient}.{index}.7"


def _site(root: Path, patients: int = 5, slices: int = 3, tag: str = "A",
          plane: str = "axial") -> list[Path]:
    """A synthetic DICOM site; patient 0 carries planted identifiers."""
    files = []
    for p in range(patients):
        ids = planted_identifiers(f"{tag}{p}")
        for s in range(slices):
            path = root / f"patient{p}" / f"IM{s:04d}"  # no .dcm suffix on purpose
            path.parent.mkdir(parents=True, exist_ok=True)
            files.append(write_dicom_slice(
                path, _slice_values(1000 * p + s),
                patient_id=ids["PatientID"], patient_name=ids["PatientName"],
                birth_date=ids["PatientBirthDate"], institution=ids["InstitutionName"],
                study_date=ids["StudyDate"], study_uid=ids["StudyInstanceUID"],
                series_uid=ids["SeriesInstanceUID"],
                sop_uid=_sop_uid(tag, p, s), instance_number=s + 1,
                position=(0.0, 0.0, 2.5 * s), orientation=plane,
            ))
    return files


def _ingest(home: Path, sources: list[Path], **kwargs: object) -> pipeline.IngestSummary:
    paths = NodePaths(home)
    return ingest_sources(paths, load_node_config(paths), sources, progress=False, **kwargs)


def _state(home: Path) -> set[tuple[str, str, str]]:
    with Store(home / "store") as store:
        return {(r.instance_key, r.pixel_digest, r.split) for r in store.records()}


def _home_bytes(home: Path) -> dict[str, bytes]:
    return {str(p.relative_to(home)): p.read_bytes() for p in home.rglob("*") if p.is_file()}


def _assert_absent(home: Path, secrets: set[str]) -> None:
    files = _home_bytes(home)
    assert any(name.startswith("store/shards/") for name in files)
    assert "store/catalog.sqlite" in files and "audit.jsonl" in files
    for name, data in files.items():
        for secret in secrets:
            for form in {secret, secret.replace("^", " ")}:
                assert form.encode() not in data, f"{form!r} leaked into {name}"
                assert form.encode("utf-16-le") not in data, f"{form!r} leaked into {name}"


# ---- privacy (invariant 2) -------------------------------------------------------------------


def test_planted_identifiers_reach_no_file_of_the_home(node_home: Path, tmp_path: Path) -> None:
    _site(tmp_path / "src", patients=3, slices=2)
    summary = _ingest(node_home, [tmp_path / "src"])
    assert summary.slices == 6
    secrets = set()
    for p in range(3):
        ids = planted_identifiers(f"A{p}")
        secrets |= set(ids.values()) | {_sop_uid("A", p, s) for s in range(2)}
    secrets |= {str(tmp_path / "src"), "patient0"}  # source paths may name patients
    _assert_absent(node_home, secrets)


def test_real_named_mprage_headers_reach_no_file_of_the_home(shared_data: Path,
                                                             tmp_path: Path) -> None:
    source = shared_data / "mr" / "t1-mprage"
    secrets: set[str] = set()
    for path in sorted(source.iterdir()):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "InstitutionName",
                        "StudyDate", "SOPInstanceUID", "SeriesInstanceUID",
                        "StudyInstanceUID", "InstitutionAddress", "ReferringPhysicianName"):
            value = str(ds.get(keyword, "") or "").strip()
            if len(value) >= 6:
                secrets.add(value)
    assert "Upgrade Test^Rorden" in secrets and "19701112" in secrets and len(secrets) > 176
    home = tmp_path / "home"
    init_home(home, "mprage")
    summary = _ingest(home, [source], plane="sagittal")
    assert (summary.files, summary.slices, summary.patients, summary.series) == (176, 176, 1, 1)
    assert summary.by_modality == {"MR": 176}
    assert summary.split["method"] == "slabs (single patient)"
    _assert_absent(home, secrets)


def test_pseudonyms_are_stable_within_a_site_and_differ_across_sites(tmp_path: Path) -> None:
    files = _site(tmp_path / "src", patients=2, slices=2)
    homes = [tmp_path / "h1", tmp_path / "h2"]
    for home in homes:
        init_home(home, home.name)
    _ingest(homes[0], files[:2])
    _ingest(homes[0], files[2:])
    _ingest(homes[1], files)
    with Store(homes[0] / "store") as a, Store(homes[1] / "store") as b:
        ra, rb = a.records(), b.records()
    by_file_a = {r.source_digest: r for r in ra}
    by_file_b = {r.source_digest: r for r in rb}
    assert by_file_a.keys() == by_file_b.keys() and len(by_file_a) == 4
    assert len({r.patient for r in ra}) == 2  # one pseudonym per patient, across two runs
    for digest, rec in by_file_a.items():
        other = by_file_b[digest]
        assert rec.patient != other.patient
        assert rec.series != other.series and rec.instance_key != other.instance_key
        assert rec.pixel_digest == other.pixel_digest


# ---- split -----------------------------------------------------------------------------------


def test_no_patient_is_on_both_sides_of_the_split(node_home: Path, tmp_path: Path) -> None:
    _site(tmp_path / "src", patients=10, slices=2)
    summary = _ingest(node_home, [tmp_path / "src"])
    assert summary.split == {"method": "patients", "patients_train": 8, "patients_holdout": 2,
                             "slices_train": 16, "slices_holdout": 4}
    with Store(node_home / "store") as store:
        train = {r.patient for r in store.records("train")}
        holdout = {r.patient for r in store.records("holdout")}
    assert len(train) == 8 and len(holdout) == 2 and not train & holdout


def test_one_patient_site_splits_by_slabs_and_says_so(node_home: Path, tmp_path: Path) -> None:
    _site(tmp_path / "src", patients=1, slices=10)
    summary = _ingest(node_home, [tmp_path / "src"])
    assert summary.split["method"] == "slabs (single patient)"
    assert "split by slabs (single patient): train 1 patient(s) / 8 slices" in summary.human()
    with Store(node_home / "store") as store:
        holdout = sorted(r.position for r in store.records("holdout"))
        train = sorted(r.position for r in store.records("train"))
    assert holdout == [20.0, 22.5]  # the last contiguous 20 % by position
    assert max(train) < min(holdout)


# ---- idempotence and crash safety ------------------------------------------------------------


def test_reingest_adds_nothing(node_home: Path, tmp_path: Path) -> None:
    _site(tmp_path / "src", patients=3, slices=3)
    first = _ingest(node_home, [tmp_path / "src"])
    before = _state(node_home)
    shards = sorted(p.name for p in (node_home / "store" / "shards").iterdir())
    second = _ingest(node_home, [tmp_path / "src"])
    assert (first.slices_added, second.slices_added, second.already_stored) == (9, 0, 9)
    assert (second.slices, second.patients, second.series) == (9, 3, 3)
    assert second.skipped == {}
    assert _state(node_home) == before
    assert sorted(p.name for p in (node_home / "store" / "shards").iterdir()) == shards
    assert verify_audit_log(node_home / "audit.jsonl").records == 5  # init, key, policy, 2 x ingest


def test_killed_ingest_then_rerun_equals_an_uninterrupted_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _site(tmp_path / "src", patients=6, slices=4)
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    init_home(clean, "s")
    shutil.copytree(clean, killed)  # same pseudonym secret, so the same keys
    monkeypatch.setattr(pipeline, "BATCH_SLICES", 5)
    _ingest(clean, [tmp_path / "src"])

    real_add = Store.add_batch
    calls = {"n": 0}

    def dying_add(self: Store, batch: list) -> int:
        calls["n"] += 1
        if calls["n"] == 3:
            # Killed after the shard of batch 3 is on disk but before its rows commit.
            (self.shards / "0123456789abcdef01234567.npy").write_bytes(b"partial")
            raise KeyboardInterrupt
        return real_add(self, batch)

    monkeypatch.setattr(Store, "add_batch", dying_add)
    with pytest.raises(KeyboardInterrupt):
        _ingest(killed, [tmp_path / "src"])
    with Store(killed / "store") as store:
        assert store.count() == 10  # two committed batches survive
    monkeypatch.setattr(Store, "add_batch", real_add)
    rerun = _ingest(killed, [tmp_path / "src"])
    assert (rerun.slices_added, rerun.already_stored) == (14, 10)
    assert _state(killed) == _state(clean) and len(_state(clean)) == 24
    assert not (killed / "store" / "shards" / "0123456789abcdef01234567.npy").exists()


_KILLER = """
import os, signal, sys
import node.ingest.pipeline as pipeline
import node.store as store
pipeline.BATCH_SLICES = 5
real_write = store.atomic_write_bytes
calls = [0]
def write_then_die(path, data, *args, **kwargs):
    real_write(path, data, *args, **kwargs)
    calls[0] += 1
    if calls[0] == 2:  # the second shard is on disk, its rows are not committed
        os.kill(os.getpid(), signal.SIGKILL)
store.atomic_write_bytes = write_then_die
from protocols.cli_support import run_app
from node.cli import app
run_app(app, sys.argv[1:])
"""


def test_sigkilled_ingest_process_then_rerun_equals_an_uninterrupted_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import subprocess
    import sys

    _site(tmp_path / "src", patients=4, slices=4)
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    init_home(clean, "s")
    shutil.copytree(clean, killed)
    monkeypatch.setattr(pipeline, "BATCH_SLICES", 5)
    _ingest(clean, [tmp_path / "src"])
    proc = subprocess.run(
        [sys.executable, "-c", _KILLER, "ingest", str(tmp_path / "src"), "--home", str(killed),
         "--no-progress"], capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == -9, proc.stderr
    shards = list((killed / "store" / "shards").iterdir())
    with Store(killed / "store") as store:
        assert store.count() == 5 and len(shards) == 2  # one committed batch, one orphan
    rerun = _ingest(killed, [tmp_path / "src"])
    assert (rerun.slices_added, rerun.already_stored) == (11, 5)
    assert _state(killed) == _state(clean) and len(_state(clean)) == 16
    with Store(killed / "store") as store:
        used = {r.shard for r in store.records()}
    assert {p.name for p in (killed / "store" / "shards").iterdir()} == used


def test_sources_are_never_modified(node_home: Path, tmp_path: Path) -> None:
    files = _site(tmp_path / "src", patients=2, slices=2)
    (tmp_path / "src" / "notes.txt").write_text("not an image")
    before = {p: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
              for p in (tmp_path / "src").rglob("*") if p.is_file()}
    for p in files:
        p.chmod(0o444)
    _ingest(node_home, [tmp_path / "src"])
    after = {p: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
             for p in (tmp_path / "src").rglob("*") if p.is_file()}
    assert after == before


def test_one_bad_file_never_stops_the_run(node_home: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    files = _site(tmp_path / "src", patients=2, slices=3)
    data = files[0].read_bytes()
    files[0].write_bytes(data[:400])  # truncated
    (tmp_path / "src" / "garbage.bin").write_bytes(b"\x01\x02" * 900)
    real_read = pipeline._read_source_bytes

    def unreadable(path: Path) -> bytes:
        if path == files[1]:
            raise PermissionError(13, "Permission denied")
        return real_read(path)

    monkeypatch.setattr(pipeline, "_read_source_bytes", unreadable)
    summary = _ingest(node_home, [tmp_path / "src"])
    assert summary.files == 7 and summary.slices == 4
    assert summary.skipped == {"corrupt or truncated (pixel data missing)": 1,
                               "not DICOM or a known image format": 1, "unreadable": 1}


def test_other_planes_are_skipped_with_the_plane_as_reason(node_home: Path,
                                                           tmp_path: Path) -> None:
    _site(tmp_path / "ax", patients=1, slices=2, tag="X")
    _site(tmp_path / "co", patients=1, slices=3, tag="Y", plane="coronal")
    summary = _ingest(node_home, [tmp_path / "ax", tmp_path / "co"])
    assert summary.slices == 2 and summary.skipped == {"plane:coronal": 3}
    summary = _ingest(node_home, [tmp_path / "co"], plane="any")
    assert summary.slices_added == 3


def test_audit_record_holds_counts_and_no_paths(node_home: Path, tmp_path: Path) -> None:
    _site(tmp_path / "src", patients=2, slices=1)
    _ingest(node_home, [tmp_path / "src"])
    last = json.loads((node_home / "audit.jsonl").read_text().splitlines()[-1])
    assert last["event"] == "ingest"
    details = last["details"]
    assert details["slices_added"] == 2 and details["files"] == 2
    assert len(details["sources_digest"]) == 64
    assert str(tmp_path) not in json.dumps(details)


def test_missing_and_empty_sources_are_usage_errors(node_home: Path, tmp_path: Path) -> None:
    with pytest.raises(IngestError, match="source does not exist"):
        _ingest(node_home, [tmp_path / "nowhere"])
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(IngestError, match="source folder holds no files"):
        _ingest(node_home, [tmp_path / "empty"])


def test_named_file_without_read_permission_is_a_usage_error(
    node_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = _site(tmp_path / "src", patients=1, slices=1)
    files[0].chmod(0o000)  # root may still read it, so the permission check is simulated
    monkeypatch.setattr(pipeline.os, "access", lambda path, mode: False)
    with pytest.raises(IngestError, match=r"source file cannot be read \(permission denied\)"):
        _ingest(node_home, [files[0]])


# ---- command line ----------------------------------------------------------------------------


def _cli(*args: str):
    return runner.invoke(app, ["ingest", *args, "--no-progress"])


def test_cli_json_has_the_contract_keys(node_home: Path, tmp_path: Path) -> None:
    _site(tmp_path / "src", patients=3, slices=2)
    result = _cli(str(tmp_path / "src"), "--home", str(node_home), "--json")
    assert result.exit_code == 0, result.output
    obj = json.loads(result.stdout)
    assert {"files", "slices", "patients", "series", "skipped", "by_modality"} <= obj.keys()
    assert (obj["files"], obj["slices"], obj["patients"], obj["series"]) == (6, 6, 3, 3)
    assert obj["skipped"] == {} and obj["by_modality"] == {"CT": 6}
    assert obj["split"]["method"] == "patients"


def test_cli_human_summary_on_stdout(node_home: Path, tmp_path: Path) -> None:
    _site(tmp_path / "src", patients=2, slices=2)
    result = _cli(str(tmp_path / "src"), "--home", str(node_home))
    assert result.exit_code == 0
    assert result.stdout.startswith("ingested 4 files from 1 source(s)")
    assert "4 new, 0 already stored" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing"], "error: source does not exist ("),
        (["empty"], "error: source folder holds no files ("),
        (["x.dcm"], "error: no image could be read: 1 file(s) skipped, e.g. as"
                    " 'not DICOM or a known image format' ("),
        (["ok", "--plane", "oblique"], "error: unknown plane 'oblique'"),
        (["ok", "--modality", "US"], "error: unknown modality 'US'"),
    ],
)
def test_cli_error_lines(node_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                         args: list[str], message: str) -> None:
    from protocols.cli_support import run_app

    (tmp_path / "empty").mkdir()
    (tmp_path / "x.dcm").write_bytes(b"\x00\x01garbage" * 50)
    _site(tmp_path / "ok", patients=1, slices=1)
    argv = ["ingest", str(tmp_path / args[0]), *args[1:], "--home", str(node_home),
            "--no-progress"]
    with pytest.raises(SystemExit) as exited:
        run_app(app, argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert err.startswith(message) and err.count("\n") == 1 and "Traceback" not in err


# ---- the shared real data (CI has it) --------------------------------------------------------


@pytest.mark.parametrize(
    ("folder", "expected"),
    [
        ("ct/covid-ny-sbu", {"files": 62, "slices": 20, "patients": 10, "series": 20,
                             "skipped": {"plane:coronal": 22, "plane:sagittal": 20},
                             "by_modality": {"CT": 20}, "identical_pixel_instances": 0}),
        ("ct/tcga-luad", {"files": 69, "slices": 63, "patients": 32, "series": 63,
                          "skipped": {"duplicate instance": 6}, "by_modality": {"CT": 63},
                          "identical_pixel_instances": 2}),
        ("ct/pancreatic-ct-cbct-seg", {"files": 25, "slices": 25, "patients": 1, "series": 1,
                                       "skipped": {}, "by_modality": {"CT": 25},
                                       "identical_pixel_instances": 0}),
    ],
)
def test_shared_ct_folders_give_the_measured_counts(shared_data: Path, tmp_path: Path,
                                                    folder: str, expected: dict) -> None:
    home = tmp_path / "home"
    init_home(home, "s")
    summary = _ingest(home, [shared_data / folder]).to_dict()
    assert {k: summary[k] for k in expected} == expected
    with Store(home / "store") as store:
        records = store.records()
        pixels = store.load(records)
    assert {r.unit for r in records} == {"HU"}
    assert pixels.shape == (expected["slices"], 64, 64)
    assert float(pixels.min()) >= 0.0 and float(pixels.max()) <= 1.0


def test_shared_brain_tumor_jpegs_with_patients_csv(shared_data: Path, tmp_path: Path) -> None:
    # 300 JPEGs named one by one keep the test short; the full set is measured in bench/.
    import csv

    root = shared_data / "mr" / "brain-tumor-t1c"
    files = sorted((root / "meningioma").iterdir())[:300]
    with open(root / "patients.csv", newline="") as handle:
        table = {row["file"]: row["patient_id"] for row in csv.DictReader(handle)}
    expected_patients = {table[f"meningioma/{p.name}"] for p in files}
    home = tmp_path / "home"
    init_home(home, "s")
    summary = _ingest(home, files, modality="MR", patient_rule=f"csv:{root / 'patients.csv'}")
    assert (summary.files, summary.slices) == (300, 300)
    assert summary.patients == len(expected_patients) and summary.skipped == {}
    with Store(home / "store") as store:
        assert {r.label for r in store.records()} == {"meningioma"}


# ---- the repository's demo data (no ../shared needed) ----------------------------------------


def test_demo_sites_ingest_as_documented(tmp_path: Path) -> None:
    from node.demo import CT_SITES, DEMO_DATA, MR_SITES, main

    total = sum(p.stat().st_size for p in DEMO_DATA.rglob("*") if p.is_file())
    assert total < 12_000_000
    assert (DEMO_DATA / "ATTRIBUTION").is_file()
    assert main(["--workdir", str(tmp_path / "demo")]) == 0
    expected = {"site-a": (6, 3, "patients"), "site-b": (6, 6, "patients"),
                "site-c": (6, 1, "slabs (single patient)"), "site-mr": (51, 6, "patients")}
    for site in (*CT_SITES, *MR_SITES):
        with Store(tmp_path / "demo" / site.name / "store") as store:
            summary = store.summary()
            method = store.db.execute(
                "SELECT value FROM meta WHERE key = 'split_method'").fetchone()[0]
            holdout = store.count("holdout")
        assert (summary["slices"], summary["patients"], method) == expected[site.name]
        assert holdout >= 1
    # A second run wipes and re-creates the work folder; a foreign folder is refused.
    assert main(["--workdir", str(tmp_path / "demo"), "--until", "init"]) == 0
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("keep me")
    with pytest.raises(SystemExit, match="not a demo folder"):
        main(["--workdir", str(tmp_path / "mine")])
    assert (tmp_path / "mine" / "thesis.tex").exists()
