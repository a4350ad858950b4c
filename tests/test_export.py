"""Export, approval, sending and the outbox states; the review report; CLI wiring."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from fixtures.bundle_factory import GUARD, THRESHOLDS, configure, export_small, trust_of
from typer.testing import CliRunner

from node.cli import app as node_app
from node.export import approve_bundle, export_bundle, list_outbox, send_bundle
from protocols.audit import verify_audit_log
from protocols.bundle import MANIFEST, load_bundle_images, verify_bundle
from protocols.errors import OperationError, UsageError, VerificationError
from protocols.files import sha256_file
from protocols.keys import generate_keypair, write_keypair

runner = CliRunner()


def _audit_events(home: Path) -> list[dict[str, object]]:
    lines = (home / "audit.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_export_writes_a_complete_signed_bundle_into_pending(node_home: Path) -> None:
    paths, config, _ = configure(node_home)
    bundle = export_small(paths, config, n=4, dicom=True, round_id="r7", nonce="abc")
    assert bundle.parent == paths.outbox / "pending"
    assert bundle.name.startswith("site-a-")
    names = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())
    assert names == sorted(
        ["images.npy", "images.jsonl", "review.html", "manifest.dsse.json"]
        + [f"dicom/{i:06d}.dcm" for i in range(4)]
    )
    verified = verify_bundle(bundle, trust_of(paths, config), expected_round=("r7", "abc"))
    pred = verified.predicate
    assert pred["site"] == "site-a"
    assert pred["images"]["dtype"] == "int16" and pred["images"]["unit"] == "HU"
    assert pred["thresholds"] == THRESHOLDS
    assert pred["canary_catch_rates"] == GUARD["canary_catch_rates"]
    assert pred["demo_auto_approved"] is False
    assert not list(paths.outbox.glob(".tmp-*"))
    event = _audit_events(node_home)[-1]
    assert event["event"] == "export"
    assert event["details"]["manifest_sha256"] == sha256_file(bundle / MANIFEST)  # type: ignore[index]
    verify_audit_log(paths.audit)


def test_hu_images_come_back_as_rounded_hu(node_home: Path) -> None:
    paths, config, _ = configure(node_home)
    images = np.array([[[-1000.4, 0.6], [40.5, 3071.0]]], dtype=np.float32)
    bundle = export_bundle(
        paths, config, images, modality="CT", unit="HU",
        distances={m: np.array([1.0]) for m in THRESHOLDS}, guard=GUARD, generator={},
        dicom=False,
    )
    loaded = load_bundle_images(verify_bundle(bundle, trust_of(paths, config)))
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, np.rint(images))


def test_non_hu_images_are_float16(node_home: Path) -> None:
    paths, config, _ = configure(node_home)
    bundle = export_small(paths, config, modality="MR", unit="a.u.", dicom=True)
    verified = verify_bundle(bundle, trust_of(paths, config))
    assert verified.dtype == "float16"
    assert np.load(bundle / "images.npy").dtype == np.float16


def test_image_closer_than_threshold_is_never_exported(node_home: Path) -> None:
    paths, config, _ = configure(node_home)
    distances = {m: np.array([1.0, 1.0]) for m in THRESHOLDS}
    distances["rmse"] = np.array([1.0, 0.01])
    with pytest.raises(OperationError, match="image 1 is closer than the rmse threshold"):
        export_bundle(
            paths, config, np.zeros((2, 8, 8), np.float32), modality="CT", unit="HU",
            distances=distances, guard=GUARD, generator={},
        )
    assert list((paths.outbox / "pending").iterdir()) == []
    assert not list(paths.outbox.glob(".tmp-*"))


def test_guard_report_without_thresholds_is_refused(node_home: Path) -> None:
    paths, config, _ = configure(node_home)
    with pytest.raises(UsageError, match="thresholds must map"):
        export_bundle(paths, config, np.zeros((1, 8, 8), np.float32), modality="CT",
                      unit="HU", distances={}, guard={}, generator={})


def test_nothing_from_the_node_home_secret_reaches_the_bundle(node_home: Path) -> None:
    paths, config, _ = configure(node_home)
    bundle = export_small(paths, config, dicom=True)
    secret = paths.pseudonym_secret.read_bytes().strip()
    seed = paths.site_key.read_bytes().strip()
    for f in bundle.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            assert secret not in data and seed not in data


def test_reviewer_key_not_in_policy_is_refused(node_home: Path) -> None:
    paths, config, _ = configure(node_home, reviewers=1)
    bundle = export_small(paths, config)
    with pytest.raises(VerificationError, match="not listed in policy.reviewer_keys"):
        approve_bundle(paths, bundle, generate_keypair())
    assert bundle.is_dir()


def test_site_key_cannot_approve(node_home: Path) -> None:
    from protocols.keys import load_signing_key

    paths, config, _ = configure(node_home, reviewers=1)
    bundle = export_small(paths, config)
    with pytest.raises(VerificationError, match="not listed in policy.reviewer_keys"):
        approve_bundle(paths, bundle, load_signing_key(paths.site_key))


def test_bundle_moves_to_approved_only_when_enough_reviewers_signed(node_home: Path) -> None:
    paths, config, reviewers = configure(node_home, reviewers=2, required=2)
    bundle = export_small(paths, config)
    after_one = approve_bundle(paths, bundle, reviewers[0])
    assert after_one == bundle and after_one.parent.name == "pending"
    with pytest.raises(UsageError, match="already signed"):
        approve_bundle(paths, bundle, reviewers[0])
    after_two = approve_bundle(paths, bundle, reviewers[1])
    assert after_two.parent == paths.outbox / "approved"
    verified = verify_bundle(after_two, trust_of(paths, config))
    assert len(verified.reviewer_signers) == 2
    events = [e for e in _audit_events(node_home) if e["event"] == "approve"]
    assert [e["details"]["state"] for e in events] == ["pending", "approved"]  # type: ignore[index]


def test_tampered_pending_bundle_cannot_be_approved(node_home: Path) -> None:
    paths, config, reviewers = configure(node_home, reviewers=1)
    bundle = export_small(paths, config)
    (bundle / "review.html").write_text("<p>all fine, sign here</p>")
    with pytest.raises(VerificationError, match="review.html does not match"):
        approve_bundle(paths, bundle, reviewers[0])
    assert bundle.parent.name == "pending"


def test_zero_reviewer_policy_approves_without_key_and_marks_demo(node_home: Path) -> None:
    paths, config, _ = configure(node_home, required=0)
    bundle = export_small(paths, config)
    assert verify_bundle(bundle, trust_of(paths, config)).predicate["demo_auto_approved"]
    approved = approve_bundle(paths, bundle, None)
    assert approved.parent.name == "approved"


def test_approve_without_key_is_refused_when_policy_needs_reviewers(node_home: Path) -> None:
    paths, config, _ = configure(node_home, reviewers=1, required=1)
    bundle = export_small(paths, config)
    with pytest.raises(UsageError, match="pass --reviewer-key"):
        approve_bundle(paths, bundle, None)


def test_pending_bundle_is_never_sent(node_home: Path, tmp_path: Path) -> None:
    paths, config, _ = configure(node_home, reviewers=1)
    bundle = export_small(paths, config)
    with pytest.raises(VerificationError, match="only an approved bundle may leave"):
        send_bundle(paths, bundle, tmp_path / "drop")
    assert not (tmp_path / "drop").exists()


def test_send_copies_atomically_and_moves_to_sent(node_home: Path, tmp_path: Path) -> None:
    paths, config, reviewers = configure(node_home, reviewers=1)
    approved = approve_bundle(paths, export_small(paths, config, dicom=True), reviewers[0])
    digest = sha256_file(approved / MANIFEST)
    dest = send_bundle(paths, approved.name, tmp_path / "drop")
    assert dest == (tmp_path / "drop" / approved.name).resolve()
    assert (paths.outbox / "sent" / approved.name).is_dir()
    assert not approved.exists()
    assert verify_bundle(dest, trust_of(paths, config)).digest == digest
    assert [p.name for p in (tmp_path / "drop").iterdir()] == [approved.name]
    assert _audit_events(node_home)[-1]["event"] == "send"
    with pytest.raises(UsageError, match="bundle not found"):
        send_bundle(paths, approved.name + "-nope", tmp_path / "drop")


def test_send_rerun_after_copy_landed_finishes_the_move(node_home: Path, tmp_path: Path) -> None:
    import shutil

    paths, config, reviewers = configure(node_home, reviewers=1)
    approved = approve_bundle(paths, export_small(paths, config), reviewers[0])
    shutil.copytree(approved, tmp_path / "drop" / approved.name)  # a send killed after copy
    send_bundle(paths, approved, tmp_path / "drop")
    assert (paths.outbox / "sent" / approved.name).is_dir()


def test_killed_export_leaves_no_bundle_and_is_cleaned_later(node_home: Path) -> None:
    paths, config, _ = configure(node_home)
    stale = paths.outbox / ".tmp-export-killed"
    stale.mkdir()
    (stale / "images.npy").write_bytes(b"half")
    os.utime(stale, (0, 0))
    assert list_outbox(paths) == {"pending": [], "approved": [], "sent": []}
    export_small(paths, config)
    assert not stale.exists()


def test_outbox_lists_each_state(node_home: Path) -> None:
    paths, config, reviewers = configure(node_home, reviewers=1)
    export_small(paths, config, seed=1)
    approve_bundle(paths, export_small(paths, config, seed=2, round_id="r1", nonce="n"),
                   reviewers[0])
    listing = list_outbox(paths)
    assert [len(listing[s]) for s in ("pending", "approved", "sent")] == [1, 1, 0]
    assert listing["approved"][0]["round"] == "r1"
    assert listing["approved"][0]["signatures"] == 2


def test_review_report_is_self_contained_and_signed(node_home: Path) -> None:
    paths, config, _ = configure(node_home)
    bundle = export_small(paths, config, n=5, demo_auto_approved=True)
    page = (bundle / "review.html").read_text()
    assert "data:image/png;base64," in page
    assert page.count("<svg") == len(THRESHOLDS)
    assert "DEMO" in page and "Canary self-test" in page
    for forbidden in ("http://", "https://", "<script", "src='/", 'src="http'):
        assert forbidden not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert verify_bundle(bundle, trust_of(paths, config)).subjects["review.html"] == (
        sha256_file(bundle / "review.html")
    )


# -- CLI wiring -------------------------------------------------------------------------------


def test_cli_approve_send_outbox_review(node_home: Path, tmp_path: Path) -> None:
    paths, config, reviewers = configure(node_home, reviewers=1)
    key_file = tmp_path / "reviewer.ed25519"
    write_keypair(reviewers[0], key_file, tmp_path / "reviewer.pub")
    bundle = export_small(paths, config)
    home = ["--home", str(node_home)]

    result = runner.invoke(node_app, ["review", bundle.name, "--json", "--out",
                                      str(tmp_path / "r.html"), *home])
    assert result.exit_code == 0, result.output
    review = json.loads(result.stdout)
    assert review["state"] == "pending" and (tmp_path / "r.html").read_bytes() == (
        bundle / "review.html"
    ).read_bytes()

    result = runner.invoke(node_app, ["approve", str(bundle), "--reviewer-key", str(key_file),
                                      "--json", *home])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["state"] == "approved"

    result = runner.invoke(node_app, ["outbox", "--json", *home])
    assert json.loads(result.stdout)["approved"][0]["bundle_id"] == bundle.name

    result = runner.invoke(node_app, ["send", bundle.name, "--to", str(tmp_path / "drop"),
                                      *home])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "drop" / bundle.name / MANIFEST).is_file()


def test_cli_send_of_pending_bundle_exits_2(node_home: Path, tmp_path: Path) -> None:
    from protocols.cli_support import run_app

    paths, config, _ = configure(node_home, reviewers=1)
    bundle = export_small(paths, config)
    with pytest.raises(SystemExit) as exit_info:
        run_app(node_app, ["send", bundle.name, "--to", str(tmp_path / "d"),
                           "--home", str(node_home)])
    assert exit_info.value.code == 2


def test_local_closest_view_is_written_outside_the_bundle(node_home: Path) -> None:
    from node.review import review_bundle
    from node.store import NewSlice, Store

    paths, config, _ = configure(node_home)
    rng = np.random.default_rng(3)
    real = rng.uniform(0, 1, (4, 16, 16)).astype(np.float32)
    with Store(paths.store) as store:
        store.add_batch([
            NewSlice(modality="CT", patient=f"p{i}", series="s", position=float(i),
                     source_digest=f"d{i}", instance_key=f"k{i}", pixels=real[i], unit="HU",
                     scale=4095.0, offset=-1024.0)
            for i in range(4)
        ])
    # Synthetic images that are (shifted) copies of real slices 2 and 0.
    physical = np.stack([real[2], real[0]]) * 4095.0 - 1024.0
    bundle = export_bundle(
        paths, config, physical, modality="CT", unit="HU",
        distances={m: np.array([1.0, 1.0]) for m in THRESHOLDS}, guard=GUARD, generator={},
        dicom=False,
    )
    before = {p: sha256_file(p) for p in bundle.rglob("*") if p.is_file()}
    result = review_bundle(paths, config, bundle, local_closest=True)
    view = Path(result["closest_view"])
    assert view.parent == paths.runs and oct(view.stat().st_mode & 0o777) == "0o600"
    assert "LOCAL ONLY" in view.read_text()
    assert {p: sha256_file(p) for p in bundle.rglob("*") if p.is_file()} == before
    from node.review import _nearest_rmse

    index, _ = _nearest_rmse((physical + 1024.0) / 4095.0, real)
    assert index.tolist() == [2, 0]


def test_closest_view_refuses_the_outbox(node_home: Path) -> None:
    from node.review import write_closest_view

    paths, _, _ = configure(node_home)
    with pytest.raises(ValueError, match="never write it in the outbox"):
        write_closest_view(paths, np.zeros((1, 4, 4), np.float32), "CT",
                           paths.outbox / "pending" / "x.html")



def test_canary_rates_in_privacy_catch_rates_shape_are_recorded(node_home: Path) -> None:
    paths, config, _ = configure(node_home)
    guard = dict(GUARD)
    guard["canary_catch_rates"] = {
        "exact": {"planted": 4, "caught": 4, "rate": 1.0},
        "noise": {"planted": 5, "caught": 4, "rate": 0.8},
    }
    bundle = export_bundle(
        paths, config, np.zeros((1, 8, 8), np.float32), modality="CT", unit="HU",
        distances={m: np.array([1.0]) for m in THRESHOLDS}, guard=guard, generator={},
        dicom=False,
    )
    pred = verify_bundle(bundle, trust_of(paths, config)).predicate
    assert pred["canary_catch_rates"] == {"exact": 1.0, "noise": 0.8}
    assert pred["guard"]["canary_catch_rates"]["noise"]["planted"] == 5


def _export_case(case: str, paths: object, config: object) -> None:
    """Call export_bundle with one thing wrong (the rest as a valid two-image export)."""
    images = np.zeros((2, 8, 8), np.float32)
    kwargs: dict[str, object] = {
        "modality": "CT", "unit": "HU", "guard": GUARD, "generator": {},
        "distances": {m: np.array([1.0, 1.0]) for m in THRESHOLDS},
    }
    if case == "no images":
        images = np.zeros((0, 8, 8), np.float32)
    elif case == "one image plane":
        images = np.zeros((8, 8), np.float32)
    elif case == "NaN pixel":
        images[1, 2, 3] = np.nan
    elif case == "round without nonce":
        kwargs["round_id"] = "r1"
    elif case == "no modality":
        kwargs["modality"] = ""
    elif case == "zero spacing":
        kwargs["pixel_spacing_mm"] = 0.0
    elif case == "NaN spacing":
        kwargs["pixel_spacing_mm"] = float("nan")
    elif case == "empty thresholds":
        kwargs["guard"] = dict(GUARD, thresholds={})
    elif case == "negative threshold":
        kwargs["guard"] = dict(GUARD, thresholds=dict(THRESHOLDS, rmse=-1.0))
    elif case == "a metric without distances":
        kwargs["distances"] = {m: np.array([1.0, 1.0]) for m in list(THRESHOLDS)[1:]}
    elif case == "one distance short":
        kwargs["distances"] = {m: np.array([1.0]) for m in THRESHOLDS}
    elif case == "infinite distance":
        kwargs["distances"] = {m: np.array([1.0, np.inf]) for m in THRESHOLDS}
    elif case == "beyond float16":
        images = np.full((2, 8, 8), 1e6, np.float32)
        kwargs["unit"] = "a.u."
    export_bundle(paths, config, images, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("case", "message"), [
    ("no images", "images must be a non-empty [N, H, W] array"),
    ("one image plane", "images must be a non-empty [N, H, W] array"),
    ("NaN pixel", "images hold NaN or infinite values"),
    ("round without nonce", "round_id and nonce go together"),
    ("no modality", "modality and unit must be named"),
    ("zero spacing", "pixel_spacing_mm must be a positive number"),
    ("NaN spacing", "pixel_spacing_mm must be a positive number"),
    ("empty thresholds", "guard report names no threshold"),
    ("negative threshold", "guard report: thresholds.rmse is not a non-negative number"),
    ("a metric without distances", "distances are for"),
    ("one distance short", "distances["),
    ("infinite distance", "distances["),
    ("beyond float16", "images in unit a.u. exceed the float16 range"),
])
def test_bad_export_requests_are_refused_and_leave_no_bundle(
    node_home: Path, case: str, message: str
) -> None:
    paths, config, _ = configure(node_home)
    with pytest.raises(UsageError) as err:
        _export_case(case, paths, config)
    assert err.value.what.startswith(message)
    assert list((paths.outbox / "pending").iterdir()) == []
    assert not list(paths.outbox.glob(".tmp-*"))


def test_a_site_key_that_does_not_match_its_public_half_exports_nothing(node_home: Path) -> None:
    paths, config, _ = configure(node_home)
    write_keypair(generate_keypair(), paths.keys / "other.ed25519", paths.keys / "other.pub")
    (paths.keys / "other.pub").replace(paths.site_pub)  # the public half of another key
    with pytest.raises(OperationError, match="keys/site.ed25519 and keys/site.pub do not match"):
        _export_case("valid", paths, config)
    assert list((paths.outbox / "pending").iterdir()) == []


def test_send_refuses_the_outbox_a_name_clash_and_folders_outside_the_outbox(
    node_home: Path, tmp_path: Path
) -> None:
    import shutil

    paths, config, reviewers = configure(node_home, reviewers=1)
    approved = approve_bundle(paths, export_small(paths, config), reviewers[0])
    other = approve_bundle(paths, export_small(paths, config, seed=1), reviewers[0])
    for inside in (paths.outbox, paths.outbox / "drop"):
        with pytest.raises(UsageError, match="the destination is inside the outbox"):
            send_bundle(paths, approved, inside)
    clash = tmp_path / "drop" / approved.name  # another bundle already under this name
    shutil.copytree(other, clash)
    with pytest.raises(UsageError, match="a different bundle of that name is already there"):
        send_bundle(paths, approved, tmp_path / "drop")
    assert approved.is_dir() and not (paths.outbox / "sent" / approved.name).exists()
    stray = tmp_path / "stray" / "approved" / approved.name  # looks like an outbox, is not
    shutil.copytree(approved, stray)
    with pytest.raises(UsageError, match="not a bundle of this node's outbox"):
        send_bundle(paths, stray, tmp_path / "drop2")
    with pytest.raises(UsageError, match="bundle not found"):
        send_bundle(paths, "../" + approved.name, tmp_path / "drop2")
    assert not (tmp_path / "drop2").exists()


def test_approve_refuses_a_non_pending_bundle_and_a_manifest_swapped_under_it(
    node_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import node.export as export

    paths, config, reviewers = configure(node_home, reviewers=2, required=2)
    pending = export_small(paths, config)
    approve_bundle(paths, pending, reviewers[0])
    original = export.verify_bundle  # type: ignore[attr-defined]

    def swap_after_verifying(folder: Path, *args: object, **kwargs: object) -> object:
        verified = original(folder, *args, **kwargs)  # type: ignore[arg-type]
        manifest = Path(folder) / MANIFEST
        manifest.write_bytes(manifest.read_bytes() + b" ")  # changed between check and use
        return verified

    monkeypatch.setattr(export, "verify_bundle", swap_after_verifying)
    with pytest.raises(VerificationError, match="manifest changed while being approved"):
        approve_bundle(paths, pending, reviewers[1])
    monkeypatch.setattr(export, "verify_bundle", original)
    assert (paths.outbox / "pending" / pending.name).is_dir()  # not approved, not moved
    assert _audit_events(node_home)[-1]["event"] == "approve"  # only the first approval
    (pending / MANIFEST).write_bytes((pending / MANIFEST).read_bytes().rstrip(b" "))
    approved = approve_bundle(paths, pending, reviewers[1])
    assert approved.parent.name == "approved"
    with pytest.raises(UsageError, match="bundle is approved; only a pending bundle can be"):
        approve_bundle(paths, approved, reviewers[1])
