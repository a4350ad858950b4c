"""node.guard.screen and ``synthfed-node screen``: any candidate set, the site's exact guard."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from node.config import NodePaths, load_node_config
from node.guard.calibration import prepare_guard
from node.guard.screen import screen_candidates
from node.store import NewSlice, Store
from privacy.canaries import Canaries
from privacy.errors import GuardError

SIZE = 32


def phantoms(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    out = np.empty((n, SIZE, SIZE), dtype=np.float32)
    for i in range(n):
        img = 0.3 * ((yy - 16) ** 2 + (xx - 16) ** 2 < 13**2)
        for _ in range(4):
            cy, cx = rng.uniform(8, 24, 2)
            r = rng.uniform(2, 5)
            img = img + rng.uniform(0.2, 0.6) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / r**2)
        out[i] = np.clip(img, 0, 1)
    return out


def make_guard_home(home: Path) -> NodePaths:
    """A node home whose store holds 12 CT 'patients' of 4 phantom slices, split 9 / 3."""
    paths = NodePaths(home)
    images = phantoms(48, 11)
    batch = [
        NewSlice(
            modality="CT", patient=f"patient{i // 4:02d}", series=f"series{i // 4:02d}",
            position=float(i % 4), source_digest=f"src{i}", instance_key=f"key{i}",
            pixels=images[i], unit="HU", scale=4095.0, offset=-1024.0, spacing_mm=1.5,
        )
        for i in range(48)
    ]
    with Store(paths.store) as store:
        store.add_batch(batch)
        store.assign_split(0.25, lambda p: hashlib.sha256(p.encode()).hexdigest())
    doc = yaml.safe_load(paths.config.read_text())
    doc["guard"].update(
        {"encoder_steps": 15, "encoder_batch_size": 16, "canaries_per_alteration": 3,
         "neighbour_pairs": 5, "pca_components": 16, "rotations_deg": [0.0]}
    )
    paths.config.write_text(yaml.safe_dump(doc))
    return paths


@pytest.fixture(scope="module")
def calibrated_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One home calibrated once (encoder trained); tests work on copies of it."""
    from node.home import init_home

    home = tmp_path_factory.mktemp("template") / "home"
    init_home(home, "site-a")
    paths = make_guard_home(home)
    prepare_guard(paths, load_node_config(paths))
    return home


@pytest.fixture
def guard_home(calibrated_home: Path, tmp_path: Path) -> NodePaths:
    import shutil

    shutil.copytree(calibrated_home, tmp_path / "home")
    return NodePaths(tmp_path / "home")


def _candidates(paths: NodePaths) -> np.ndarray:
    with Store(paths.store) as store:
        real = store.load(store.records())
    shifted = np.zeros_like(real[3])
    shifted[:, 2:] = real[3][:, :-2]
    return np.concatenate([real[:1], shifted[None], phantoms(3, 99)])


def test_screen_rejects_copies_and_writes_accepted_and_report(
    guard_home: NodePaths, tmp_path: Path
) -> None:
    cands = _candidates(guard_home)
    np.savez(tmp_path / "c.npz", images=cands)
    out = tmp_path / "out"
    config = load_node_config(guard_home)
    doc = screen_candidates(guard_home, config, tmp_path / "c.npz", out, normalized=True,
                            progress=False)
    report = json.loads((out / "report.json").read_text())
    assert report["candidates"] == 5
    rejected = {r["index"]: r for r in report["rejected"]}
    assert 0 in rejected and 1 in rejected
    assert rejected[1]["metric"] in ("shift_flip", "embedding")
    for entry in report["rejected"]:
        assert set(entry) >= {"index", "metric", "distance", "threshold"}
        assert entry["distance"] < entry["threshold"]
        assert entry["threshold"] == report["thresholds"][entry["metric"]]
    assert sorted(report["accepted"] + list(rejected)) == [0, 1, 2, 3, 4]
    with np.load(out / "accepted.npz") as acc:
        assert acc["indices"].tolist() == report["accepted"]
        np.testing.assert_allclose(acc["images"], cands[report["accepted"]], atol=1e-6)
    assert (out / "distances.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<img" in (out / "report.html").read_text()
    assert set(report["canary_catch_rates"]) == {
        "exact", "shift", "mirror", "intensity", "noise", "rotation", "combination"
    }
    assert doc["accepted"] == report["accepted"]
    events = [json.loads(line)["event"] for line in guard_home.audit.read_text().splitlines()]
    assert events[-1] == "screen"


def test_physical_units_give_the_same_decisions_as_normalised(
    guard_home: NodePaths, tmp_path: Path
) -> None:
    cands = _candidates(guard_home)
    np.save(tmp_path / "hu.npy", cands * 4095.0 - 1024.0)
    np.savez(tmp_path / "n.npz", images=cands)
    config = load_node_config(guard_home)
    a = screen_candidates(guard_home, config, tmp_path / "hu.npy", tmp_path / "a",
                          progress=False)
    b = screen_candidates(guard_home, config, tmp_path / "n.npz", tmp_path / "b",
                          normalized=True, progress=False)
    assert a["accepted"] == b["accepted"]


def test_png_folder_and_other_sizes_are_resampled_onto_the_store_grid(
    guard_home: NodePaths, tmp_path: Path
) -> None:
    from PIL import Image

    folder = tmp_path / "png"
    folder.mkdir()
    big = np.kron(_candidates(guard_home), np.ones((1, 2, 2)))  # 64 x 64
    for i, img in enumerate(big):
        Image.fromarray((img * 255).astype(np.uint8)).save(folder / f"{i:02d}.png")
    config = load_node_config(guard_home)
    doc = screen_candidates(guard_home, config, folder, tmp_path / "o", progress=False)
    # Picture files carry display values: per-slice percentiles, as ingest maps them.
    assert doc["candidates"] == 5
    assert len(doc["accepted"]) + len(doc["rejected"]) == 5
    with np.load(tmp_path / "o" / "accepted.npz") as acc:
        assert acc["images"].shape[1:] == (SIZE, SIZE)


def test_calibration_is_saved_and_reused(guard_home: NodePaths) -> None:
    config = load_node_config(guard_home)
    path = guard_home.guard / "calibration.json"
    stamp = path.stat().st_mtime_ns
    first = prepare_guard(guard_home, config)
    assert path.stat().st_mtime_ns == stamp
    doc = json.loads(path.read_text())
    assert doc["modalities"]["CT"]["method"] == "holdout"
    assert (guard_home.guard / "encoder.npz").exists()
    assert json.loads((guard_home.guard / "encoder.json").read_text())["config"]["steps"] == 15
    second = prepare_guard(guard_home, config)
    assert second.thresholds("CT") == first.thresholds("CT")
    assert path.stat().st_mtime_ns == stamp


def test_encoder_weights_that_do_not_match_their_sha256_are_retrained(
    guard_home: NodePaths,
) -> None:
    config = load_node_config(guard_home)
    weights = guard_home.guard / "encoder.npz"
    good = weights.read_bytes()
    weights.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    prepare_guard(guard_home, config)
    meta = json.loads((guard_home.guard / "encoder.json").read_text())
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == meta["weights_sha256"]


def test_threshold_below_the_site_floor_refuses_to_screen(
    guard_home: NodePaths, tmp_path: Path
) -> None:
    paths = guard_home
    doc = yaml.safe_load(paths.config.read_text())
    doc["policy"]["guard_floor"] = {"pixel_rmse": 5.0}
    paths.config.write_text(yaml.safe_dump(doc))
    (paths.guard / "calibration.json").unlink()
    np.savez(tmp_path / "c.npz", images=phantoms(2, 5))
    with pytest.raises(GuardError, match="below the site floor") as info:
        screen_candidates(paths, load_node_config(paths), tmp_path / "c.npz", tmp_path / "o",
                          normalized=True, progress=False)
    assert info.value.exit_code == 2
    assert not (paths.guard / "calibration.json").exists()


def test_a_copy_canary_that_passes_fails_the_screen(
    guard_home: NodePaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def far_canaries(train, per, rng, kinds=None, rows=None):  # type: ignore[no-untyped-def]
        # "exact copies" that are not copies at all: they pass, and the run must fail.
        imgs = phantoms(per, 12345)
        return Canaries(imgs, ["exact"] * per, np.zeros(per, dtype=np.int64))

    monkeypatch.setattr("node.guard.run.make_canaries", far_canaries)
    np.savez(tmp_path / "c.npz", images=phantoms(2, 5))
    with pytest.raises(GuardError, match="canary self-test failed"):
        screen_candidates(guard_home, load_node_config(guard_home), tmp_path / "c.npz",
                          tmp_path / "o", normalized=True, progress=False)
    assert not (tmp_path / "o" / "accepted.npz").exists()
    assert json.loads((tmp_path / "o" / "report.json").read_text())["canaries"]["failed"] == [
        "exact"
    ]


def test_cli_screen_prints_json_and_fails_with_exit_2_on_a_missing_file(
    guard_home: NodePaths, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from node.cli import app
    from protocols.cli_support import run_app

    np.savez(tmp_path / "c.npz", images=_candidates(guard_home))
    args = ["screen", str(tmp_path / "c.npz"), "--home", str(guard_home.root), "--out",
            str(tmp_path / "o"), "--normalized", "--json"]
    with pytest.raises(SystemExit) as done:
        run_app(app, args)
    assert done.value.code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["candidates"] == 5 and out["rejected"] >= 2
    # Without --json the console states the canary self-test, alteration by alteration.
    with pytest.raises(SystemExit) as done:
        run_app(app, args[:-1] + ["--seed", "1"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    line = next(x for x in text.splitlines() if x.startswith("canary self-test: "))
    planted = json.loads((tmp_path / "o" / "report.json").read_text())["canary_catch_rates"]
    total = sum(v["planted"] for v in planted.values())
    assert f"{total} of {total} planted copies caught" in line
    for kind, v in planted.items():
        assert f"{kind} {v['caught']}/{v['planted']}" in line
    with pytest.raises(SystemExit) as done:
        run_app(app, ["screen", str(tmp_path / "missing.npz"), "--home", str(guard_home.root),
                      "--out", str(tmp_path / "o2")])
    assert done.value.code == 2
    assert capsys.readouterr().err.startswith("error: candidates not found")


def test_dicom_folder_candidates_are_read_in_hu_and_copies_are_caught(
    guard_home: NodePaths, tmp_path: Path
) -> None:
    # Candidates from another generator delivered as CT DICOM (HU, rescale slope and
    # intercept): a DICOM copy of a real slice, a shifted copy and three new images. The
    # guard reads them exactly as ingest would and decides as on the same arrays in .npz.
    from node.dicom_export import write_dicom_files

    hu = np.round(_candidates(guard_home) * 4095.0 - 1024.0)  # DICOM CT holds whole HU
    cands = ((hu + 1024.0) / 4095.0).astype(np.float32)
    write_dicom_files(tmp_path / "dcm", hu.astype(np.float32), modality="CT", unit="HU",
                      site="elsewhere", bundle_id="b", pixel_spacing_mm=1.5)
    config = load_node_config(guard_home)
    doc = screen_candidates(guard_home, config, tmp_path / "dcm", tmp_path / "o",
                            progress=False)
    np.savez(tmp_path / "c.npz", images=cands)
    same = screen_candidates(guard_home, config, tmp_path / "c.npz", tmp_path / "o2",
                             normalized=True, progress=False)
    assert doc["candidates"] == 5
    assert doc["accepted"] == same["accepted"]
    assert {r["index"] for r in doc["rejected"]} >= {0, 1}  # the copy and the shifted copy
    with np.load(tmp_path / "o" / "accepted.npz") as acc:
        assert acc["images"].shape == (len(doc["accepted"]), SIZE, SIZE)


def _bad_candidates(case: str, d: Path) -> Path:
    """Write one kind of bad candidate input under ``d``; return what to screen."""
    if case == "npz-unreadable":
        (d / "c.npz").write_bytes(b"not an archive")
        return d / "c.npz"
    if case == "npz-no-images":
        np.savez(d / "c.npz", pictures=np.zeros((2, 8, 8)))
        return d / "c.npz"
    if case == "npz-object-member":  # pickled data inside a valid archive: never unpickled
        ragged = np.empty(2, dtype=object)
        ragged[0], ragged[1] = np.zeros((4, 4)), np.zeros((3, 3))
        np.savez(d / "c.npz", images=ragged)
        return d / "c.npz"
    if case == "npz-truncated":
        np.savez(d / "c.npz", images=np.zeros((2, 8, 8)))
        (d / "c.npz").write_bytes((d / "c.npz").read_bytes()[:100])
        return d / "c.npz"
    arrays = {"npy-4d": np.zeros((2, 2, 8, 8)), "npy-empty": np.zeros((0, 8, 8)),
              "npy-text": np.array([[["a"]]]), "npy-nan": np.full((1, 8, 8), np.nan)}
    if case in arrays:
        np.save(d / "c.npy", arrays[case])
        return d / "c.npy"
    if case == "other-file":
        (d / "c.txt").write_text("x")
        return d / "c.txt"
    folder = d / case
    folder.mkdir()
    if case == "bad-png":
        (folder / "a.png").write_bytes(b"\x89PNG bad")
    elif case == "bad-dicom":
        (folder / "a.dcm").write_bytes(b"DICM? no")
    return folder


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("npz-unreadable", "cannot read candidates: not a NumPy .npz or .npy file"),
        ("npz-object-member", "cannot read candidates: Object arrays cannot be loaded"),
        ("npz-truncated", "cannot read candidates"),
        ("npz-no-images", "the .npz has no array named 'images'"),
        ("npy-4d", "expected numeric images [N, H, W], found (2, 2, 8, 8)"),
        ("npy-empty", "expected numeric images [N, H, W], found (0, 8, 8)"),
        ("npy-text", "expected numeric images [N, H, W]"),
        ("npy-nan", "candidates hold NaN or infinite values"),
        ("other-file", "candidates must be a .npz, a .npy or a folder"),
        ("empty-folder", "no candidate images in the folder"),
        ("bad-png", "unreadable image"),
        ("bad-dicom", "unreadable DICOM"),
    ],
)
def test_bad_candidates_are_refused_with_exit_2_and_write_nothing(
    guard_home: NodePaths, tmp_path: Path, case: str, message: str
) -> None:
    source = _bad_candidates(case, tmp_path)
    config = load_node_config(guard_home)
    with pytest.raises(GuardError) as err:
        screen_candidates(guard_home, config, source, tmp_path / "o", progress=False)
    assert err.value.exit_code == 2
    assert err.value.what.startswith(message)
    assert not (tmp_path / "o" / "accepted.npz").exists()


def test_a_constant_candidate_is_screened_as_all_background(
    guard_home: NodePaths, tmp_path: Path
) -> None:
    np.save(tmp_path / "c.npy", np.full((1, 20, 20), 300.0, dtype=np.float32))
    config = load_node_config(guard_home)
    doc = screen_candidates(guard_home, config, tmp_path / "c.npy", tmp_path / "o",
                            progress=False)
    assert doc["candidates"] == 1
