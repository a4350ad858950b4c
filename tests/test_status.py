"""synthfed-node status: every part of a home read on its own, damage reported, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from node.cli import app
from node.config import NodePaths
from node.store import NewSlice, Store
from protocols.cli_support import run_app
from tests.test_generator_sampling import SIZE, phantoms, trained  # noqa: F401 (fixture)
from tests.test_screen import calibrated_home  # noqa: F401 (fixture)


def _status(home: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as done:
        run_app(app, ["status", "--home", str(home), *extra])
    out = capsys.readouterr()
    return int(done.value.code or 0), out.out, out.err


def _json(home: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    code, out, _ = _status(home, capsys, "--json")
    assert code == 0
    doc: dict[str, Any] = json.loads(out)
    return doc


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_status_of_a_fresh_home(node_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = _tree(node_home)
    doc = _json(node_home, capsys)
    assert doc["site"] == "site-a" and len(doc["site_keyid"]) == 64
    assert doc["store"]["slices"] == 0 and doc["store"]["image_size"] is None
    assert doc["generator"] == {"state": "none", "next": "synthfed-node train"}
    assert doc["guard"]["state"] == "not calibrated"
    assert doc["outbox"] == {"pending": 0, "approved": 0, "sent": 0}
    assert doc["audit"]["state"] == "intact" and doc["audit"]["records"] >= 1
    code, out, err = _status(node_home, capsys)
    assert code == 0 and err == ""
    for line in ("store: empty", "generator: none", "guard: not calibrated",
                 "outbox: pending 0, approved 0, sent 0", "audit log: intact"):
        assert line in out
    assert _tree(node_home) == before  # status writes nothing, not even to the audit log


def test_status_says_when_the_calibration_no_longer_matches_the_store(
    calibrated_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],  # noqa: F811
) -> None:
    home = NodePaths(tmp_path / "home")
    shutil.copytree(calibrated_home, home.root)
    before = _tree(home.root)
    doc = _json(home.root, capsys)
    assert _tree(home.root) == before  # reading the store and the calibration changes nothing
    kept = json.loads((home.guard / "calibration.json").read_text(encoding="utf-8"))
    assert doc["guard"]["state"] == "calibrated" and "next" not in doc["guard"]
    assert doc["guard"]["reference_slices"] == doc["store"]["slices"] > 0
    assert doc["guard"]["thresholds"] == {m: e["thresholds"]
                                          for m, e in kept["modalities"].items()}
    with Store(home.store) as store:  # a new patient arrives
        size = store.image_size()
        store.add_batch([NewSlice(modality="MR", patient="late", series="L", position=0.0,
                                  source_digest="late", instance_key="late-0",
                                  pixels=phantoms(1, size, seed=7, bright=0.5)[0], unit="a.u.",
                                  scale=1.0, offset=0.0)])
        store.assign_split(0.2, lambda p: p)
    doc = _json(home.root, capsys)
    assert doc["guard"]["state"] == "stale" and "recalibrates" in doc["guard"]["next"]
    code, out, _ = _status(home.root, capsys)
    assert code == 0 and "guard: stale" in out and "next: the store" in out


def test_status_of_a_trained_and_of_a_partly_trained_generator(
    trained: NodePaths, tmp_path: Path, capsys: pytest.CaptureFixture[str],  # noqa: F811
) -> None:
    from node.generator.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint

    home = NodePaths(tmp_path / "home")
    shutil.copytree(trained.root, home.root)
    gen = _json(home.root, capsys)["generator"]
    assert gen["state"] == "trained" and gen["step"] == gen["total_steps"] == 60
    assert gen["preset"] == "tiny" and gen["train_slices"] == 40
    assert gen["modalities"] == ["CT", "MR"] and gen["store_holds_its_training_slices"]
    assert "next" not in gen and "problem" not in gen
    state, _ = load_checkpoint(checkpoint_path(home))
    save_checkpoint(checkpoint_path(home), {**state, "step": 12})  # as if stopped at step 12
    gen = _json(home.root, capsys)["generator"]
    assert gen["state"] == "partly trained" and gen["step"] == 12
    assert gen["next"] == "synthfed-node train --resume"
    code, out, _ = _status(home.root, capsys)
    assert "generator: partly trained, preset tiny, step 12 of 60" in out
    assert "next: synthfed-node train --resume" in out


def test_status_flags_a_generator_that_learnt_from_slices_the_store_does_not_hold(
    trained: NodePaths, calibrated_home: Path, tmp_path: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    home = NodePaths(tmp_path / "home")
    shutil.copytree(calibrated_home, home.root)
    shutil.copy2(trained.root / "models" / "generator.pt", home.root / "models" / "generator.pt")
    gen = _json(home.root, capsys)["generator"]
    assert gen["store_holds_its_training_slices"] is False
    assert gen["problem"].startswith("generate refuses it: the generator learnt from 40 slice(s)")
    code, out, _ = _status(home.root, capsys)
    assert code == 0 and "problem: generate refuses it: the generator learnt from 40" in out


def test_status_exits_2_on_a_damaged_audit_log_and_still_reports_the_rest(
    node_home: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    log = NodePaths(node_home).audit
    lines = log.read_text(encoding="utf-8").splitlines(keepends=True)
    first = json.loads(lines[0])
    first["time"] = 0.0  # rewrite history
    log.write_text(json.dumps(first) + "\n" + "".join(lines[1:]), encoding="utf-8")
    code, out, err = _status(node_home, capsys)
    assert code == 2
    assert err.startswith("error: the audit log fails verification")
    assert "audit log: BROKEN" in out and "store: empty" in out and "generator: none" in out
    code, out, _ = _status(node_home, capsys, "--json")
    doc = json.loads(out)
    assert code == 2 and doc["audit"]["state"] == "broken" and doc["audit"]["problem"]
    assert doc["store"]["slices"] == 0


def test_status_of_an_older_checkpoint_without_slice_digests(
    trained: NodePaths, node_home: Path, tmp_path: Path,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    from node.generator.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint

    home = NodePaths(tmp_path / "trained")
    shutil.copytree(trained.root, home.root)
    state, _ = load_checkpoint(checkpoint_path(home))
    old = {k: v for k, v in state.items() if k != "train_pixel_digests"}
    save_checkpoint(checkpoint_path(home), old)  # judged by its training split's digest
    gen = _json(home.root, capsys)["generator"]
    assert gen["store_holds_its_training_slices"] is True and "problem" not in gen
    # The same checkpoint in a home with nothing ingested: refused, and no store is created.
    empty = NodePaths(node_home)
    save_checkpoint(checkpoint_path(empty), old)
    before = _tree(empty.root)
    gen = _json(empty.root, capsys)["generator"]
    assert gen["store_holds_its_training_slices"] is False
    assert gen["problem"] == "the store is empty: generate refuses it"
    assert _tree(empty.root) == before


def test_status_reports_a_damaged_checkpoint_and_calibration_and_goes_on(
    node_home: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    paths = NodePaths(node_home)
    (paths.models / "generator.pt").write_bytes(b"not a checkpoint")
    paths.guard.mkdir(exist_ok=True)
    (paths.guard / "calibration.json").write_text('{"inputs_digest": ', encoding="utf-8")
    doc = _json(node_home, capsys)
    assert doc["generator"]["state"] == "unreadable"
    assert "checkpoint is unreadable" in doc["generator"]["problem"]
    assert doc["guard"]["state"] == "unreadable" and "JSONDecodeError" in doc["guard"]["problem"]
    assert doc["audit"]["state"] == "intact" and doc["outbox"]["pending"] == 0
    code, out, _ = _status(node_home, capsys)
    assert code == 0
    assert "generator: unreadable\n  problem: checkpoint is unreadable" in out
    assert "guard: unreadable\n  problem: JSONDecodeError" in out
