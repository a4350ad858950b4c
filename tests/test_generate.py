"""node.guard.run: guarded generation (contract B) with an injected sampler, and export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from node.config import NodePaths, load_node_config
from node.guard.calibration import prepare_guard
from node.guard.run import _CANARY_STREAM, generate, generate_and_screen
from node.store import Store
from privacy.canaries import Canaries, make_canaries
from privacy.errors import GuardError
from tests.test_screen import calibrated_home, phantoms  # noqa: F401 (fixture)


@pytest.fixture
def home(calibrated_home: Path, tmp_path: Path) -> NodePaths:  # noqa: F811 (fixture)
    shutil.copytree(calibrated_home, tmp_path / "home")
    return NodePaths(tmp_path / "home")


class Recorder:
    """A sampler that makes new phantoms, or copies of real slices for ``copy_share``."""

    def __init__(self, paths: NodePaths, copy_share: float = 0.0) -> None:
        with Store(paths.store) as store:
            self.real = store.load(store.records(split="train"))
        self.copy_share = copy_share
        self.outputs: list[np.ndarray] = []

    def __call__(self, n: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        out = phantoms(n, seed % 100000 + 1000)
        copies = rng.random(n) < self.copy_share
        out[copies] = self.real[rng.integers(0, len(self.real), int(copies.sum()))]
        self.outputs.append(out)
        return out


def test_generate_and_screen_accepts_the_count_far_from_every_real_slice(home: NodePaths) -> None:
    config = load_node_config(home)
    run = generate_and_screen(home, config, 6, seed=3, sampler=Recorder(home), progress=False)
    assert run.images_normalised.shape == (6, 32, 32)
    np.testing.assert_allclose(run.images_physical, run.images_normalised * 4095.0 - 1024.0,
                               rtol=1e-6, atol=1e-3)
    assert run.modality == "CT" and run.unit == "HU" and run.complete
    for metric, threshold in run.report["thresholds"].items():
        assert np.all(run.distances[metric] >= threshold)
        assert run.distances[metric].shape == (6,)
    report = run.report
    assert report["exported"] == 6 and report["candidates_tried"] >= 6
    assert (report["copying_warning"] is None) == (report["acceptance_rate"] >= 0.5)
    assert set(report["canary_catch_rates"]) >= {"exact", "shift", "mirror", "intensity"}
    assert "counts" not in json.dumps(report["privacy"])  # per-patient counts stay local
    # The shift metric is decided at its threshold: lower bounds, kept out of the privacy
    # report (computed on exact distances only); the other metrics are exact.
    assert report["distance_kind"]["shift_flip"] == "lower_bound"
    assert {k for k, v in report["distance_kind"].items() if v == "exact"} == (
        set(report["thresholds"]) - {"shift_flip"})
    assert set(report["privacy"]) == set(report["thresholds"]) - {"shift_flip"}
    assert run.run_dir is not None
    local = json.loads((run.run_dir / "report.json").read_text())
    assert "patient_exposure_counts" in local
    # the figure's time is recorded beside sampling and guard (it is part of the guard's run)
    assert set(local["timing_s"]) == {"sampling", "guard", "report_figure"}
    assert 0.0 <= local["timing_s"]["report_figure"] < 5.0
    assert (run.run_dir / "distances.png").exists() and (run.run_dir / "report.html").exists()
    last = json.loads(home.audit.read_text().splitlines()[-1])
    assert last["event"] == "generate" and last["details"]["accepted"] == 6


def test_a_run_uses_small_pages_and_restores_numpy_setting(
    home: NodePaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    from numpy._core import multiarray

    from node.guard.run import small_pages

    setter = multiarray._set_madvise_hugepage  # type: ignore[attr-defined]  # returns the old one
    seen: list[bool] = []

    def sampler(n: int, seed: int) -> np.ndarray:
        seen.append(bool(setter(False)))
        return Recorder(home)(n, seed)

    monkeypatch.delenv("NUMPY_MADVISE_HUGEPAGE", raising=False)
    before = setter(True)
    try:
        generate_and_screen(home, load_node_config(home), 3, seed=9, sampler=sampler,
                            progress=False)
        assert seen and not any(seen)  # no huge-page advice while the run samples
        assert setter(True) is True  # restored afterwards
        monkeypatch.setenv("NUMPY_MADVISE_HUGEPAGE", "1")  # the user's choice wins
        with small_pages():
            assert setter(True) is True
    finally:
        setter(before)


def test_a_run_keeps_existing_objects_out_of_full_collections_and_restores(
    home: NodePaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gc

    from node.guard.run import frozen_heap

    frozen: list[int] = []

    def sampler(n: int, seed: int) -> np.ndarray:
        frozen.append(gc.get_freeze_count())
        return Recorder(home)(n, seed)

    monkeypatch.delenv("SYNTHFED_GC_FREEZE", raising=False)
    assert gc.get_freeze_count() == 0
    generate_and_screen(home, load_node_config(home), 3, seed=9, sampler=sampler,
                        progress=False)
    assert frozen and min(frozen) > 1000  # the imported modules' objects, at least
    assert gc.get_freeze_count() == 0  # unfrozen afterwards
    with frozen_heap(), frozen_heap():  # nested: only the outermost end unfreezes
        pass
    assert gc.get_freeze_count() == 0
    with frozen_heap():
        with frozen_heap():
            pass
        assert gc.get_freeze_count() > 0
    monkeypatch.setenv("SYNTHFED_GC_FREEZE", "0")  # the user's choice wins
    frozen.clear()
    generate_and_screen(home, load_node_config(home), 3, seed=9, sampler=sampler,
                        progress=False)
    assert frozen == [0] * len(frozen) and frozen


def test_canaries_are_never_exported(home: NodePaths) -> None:
    config = load_node_config(home)
    sampler = Recorder(home)
    run = generate_and_screen(home, config, 8, seed=4, sampler=sampler, progress=False)
    produced = np.concatenate(sampler.outputs)
    # Rebuild the run's canaries (same seed, same stream) and look for them in the export.
    state = prepare_guard(home, config)
    rows = state.reference.rows(modality="CT", split="train")
    rng = np.random.default_rng(np.random.SeedSequence([4, _CANARY_STREAM]))
    canaries = make_canaries(state.reference.images[rows], config.guard.canaries_per_alteration,
                             rng)
    for img in run.images_normalised:
        assert any(np.array_equal(img, p) for p in produced)
        assert not any(np.array_equal(img, c) for c in canaries.images)


def test_a_generator_that_copies_is_reported_and_capped(home: NodePaths) -> None:
    config = load_node_config(home)
    run = generate_and_screen(home, config, 10, seed=5, max_tries=40,
                              sampler=Recorder(home, copy_share=0.8), progress=False)
    report = run.report
    assert report["candidates_tried"] <= 40
    assert report["acceptance_rate"] < 0.5
    assert "copies too much" in report["copying_warning"]
    assert report["rejected_by_metric"]["pixel_rmse"] >= 1
    # Copies a one-variant metric rejected are left out of the window search (same decision);
    # every other candidate is searched by every metric.
    assert run.run_dir is not None
    local = json.loads((run.run_dir / "report.json").read_text())
    caught = sum(1 for r in local["rejected"] if set(r["failed"]) - {"shift_flip"})
    assert caught >= 1
    searched = {m: v["images_searched"] for m, v in report["search"].items()}
    assert searched["shift_flip"] == report["candidates_tried"] - caught
    assert all(searched[m] == report["candidates_tried"] for m in searched if m != "shift_flip")


def test_a_generator_that_only_copies_exports_nothing(home: NodePaths) -> None:
    config = load_node_config(home)
    with pytest.raises(GuardError, match="no candidate passed the guard"):
        generate(home, config, 3, seed=6, max_tries=8, sampler=Recorder(home, copy_share=1.0),
                 progress=False)
    assert list((home.outbox / "pending").iterdir()) == []


def test_a_copy_canary_that_passes_fails_the_run(
    home: NodePaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    def far_canaries(train, per, rng, kinds=None, rows=None):  # type: ignore[no-untyped-def]
        return Canaries(phantoms(per, 4242), ["shift"] * per, np.zeros(per, dtype=np.int64))

    monkeypatch.setattr("node.guard.run.make_canaries", far_canaries)
    with pytest.raises(GuardError, match="canary self-test failed"):
        generate(home, load_node_config(home), 3, seed=7, sampler=Recorder(home),
                 progress=False)
    assert list((home.outbox / "pending").iterdir()) == []


def test_generate_exports_a_pending_bundle(home: NodePaths) -> None:
    bundle = generate(home, load_node_config(home), 4, seed=8, sampler=Recorder(home),
                      progress=False)
    assert bundle.parent == home.outbox / "pending"
    assert bundle.is_dir()


def test_same_seed_gives_the_same_images_and_decisions(home: NodePaths) -> None:
    config = load_node_config(home)
    a = generate_and_screen(home, config, 4, seed=9, sampler=Recorder(home), progress=False)
    b = generate_and_screen(home, config, 4, seed=9, sampler=Recorder(home), progress=False)
    np.testing.assert_array_equal(a.images_normalised, b.images_normalised)
    assert a.report["canary_catch_rates"] == b.report["canary_catch_rates"]


def test_cli_generate_without_a_trained_generator_fails_with_one_line(
    home: NodePaths, capsys: pytest.CaptureFixture[str]
) -> None:
    from node.cli import app
    from protocols.cli_support import run_app

    with pytest.raises(SystemExit) as done:
        run_app(app, ["generate", "--count", "2", "--home", str(home.root)])
    assert done.value.code in (1, 2)
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
