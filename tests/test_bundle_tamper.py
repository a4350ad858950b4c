"""The tamper suite: each test is one attack on a bundle, refused with its own reason."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fixtures.bundle_factory import configure, export_small, resign_statement, trust_of
from hypothesis import given, settings
from hypothesis import strategies as st

from node.export import approve_bundle
from protocols.bundle import MANIFEST, MAX_MANIFEST_BYTES, verify_bundle
from protocols.dsse import IN_TOTO_PAYLOAD_TYPE, parse_envelope, sign_envelope
from protocols.errors import VerificationError
from protocols.files import canonical_json, sha256_file
from protocols.keys import generate_keypair, load_signing_key
from protocols.policy import Policy
from protocols.trust import TrustStore

POLICY = Policy(required_reviewer_signatures=1, max_bundle_bytes=10**8, max_images=100)


@pytest.fixture
def site(node_home: Path) -> Any:
    paths, config, reviewers = configure(node_home, reviewers=1, required=1)
    return paths, config, reviewers


@pytest.fixture
def bundle(site: Any) -> Path:
    paths, config, reviewers = site
    pending = export_small(paths, config, round_id="r1", nonce="n1")
    return approve_bundle(paths, pending, reviewers[0])


def refused(path: Path, trust: Any, **kwargs: Any) -> VerificationError:
    with pytest.raises(VerificationError) as err:
        verify_bundle(path, trust, **kwargs)
    return err.value


def envelope_json(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((path / MANIFEST).read_bytes())
    return data


def write_envelope(path: Path, obj: dict[str, Any]) -> None:
    (path / MANIFEST).write_text(json.dumps(obj, indent=2))


def test_untouched_bundle_verifies_with_policy_and_round(site: Any, bundle: Path) -> None:
    paths, config, _ = site
    verified = verify_bundle(bundle, trust_of(paths, config), POLICY, ("r1", "n1"))
    assert verified.n_images == 3
    assert len(verified.reviewer_signers) == 1
    assert verified.digest == sha256_file(bundle / MANIFEST)


def test_one_pixel_changed_is_refused(site: Any, bundle: Path) -> None:
    paths, config, _ = site
    array = np.load(bundle / "images.npy")
    array[1, 7, 7] += 1
    np.save(bundle / "images.npy", array)
    err = refused(bundle, trust_of(paths, config))
    assert err.reason == "file images.npy does not match its sha256 in the manifest (changed)"


def test_one_metadata_line_changed_is_refused(site: Any, bundle: Path) -> None:
    paths, config, _ = site
    lines = (bundle / "images.jsonl").read_text().splitlines()
    record = json.loads(lines[1])
    record["distances"]["rmse"] = 9.0
    lines[1] = json.dumps(record, sort_keys=True, separators=(",", ":"))
    (bundle / "images.jsonl").write_text("\n".join(lines) + "\n")
    err = refused(bundle, trust_of(paths, config))
    assert err.reason == "file images.jsonl does not match its sha256 in the manifest (changed)"


def test_manifest_predicate_field_changed_is_refused(site: Any, bundle: Path) -> None:
    paths, config, _ = site
    env = envelope_json(bundle)
    statement = json.loads(base64.b64decode(env["payload"]))
    statement["predicate"]["thresholds"]["rmse"] = 0.5  # claim a stricter guard than was run
    env["payload"] = base64.b64encode(canonical_json(statement)).decode()
    write_envelope(bundle, env)
    site_keyid = load_signing_key(paths.site_key).public.keyid
    err = refused(bundle, trust_of(paths, config))
    assert err.reason == f"bad signature from key {site_keyid[:16]}"


def test_manifest_payload_type_changed_is_refused(site: Any, bundle: Path) -> None:
    paths, config, _ = site
    env = envelope_json(bundle)
    env["payloadType"] = "application/json"
    write_envelope(bundle, env)
    err = refused(bundle, trust_of(paths, config))
    assert err.reason == (
        f"payloadType is 'application/json', expected {IN_TOTO_PAYLOAD_TYPE!r}"
    )


def test_file_removed_is_refused(site: Any, bundle: Path) -> None:
    paths, config, _ = site
    (bundle / "review.html").unlink()
    err = refused(bundle, trust_of(paths, config))
    assert err.reason == "file review.html listed in the manifest is missing"


def test_file_added_is_refused(site: Any, bundle: Path) -> None:
    paths, config, _ = site
    (bundle / "notes.txt").write_text("an extra file\n")
    err = refused(bundle, trust_of(paths, config))
    assert err.reason == "file notes.txt is not listed in the manifest (added after signing)"


def test_file_added_in_dicom_folder_is_refused(site: Any) -> None:
    paths, config, _ = site
    pending = export_small(paths, config, n=2, dicom=True)
    shutil.copy(pending / "dicom" / "000000.dcm", pending / "dicom" / "000002.dcm")
    err = refused(pending, trust_of(paths, config))
    assert err.reason == (
        "file dicom/000002.dcm is not listed in the manifest (added after signing)"
    )


def test_signature_from_another_bundle_is_refused(site: Any, bundle: Path) -> None:
    paths, config, _ = site
    other = export_small(paths, config, seed=1)
    env = envelope_json(bundle)
    donor = envelope_json(other)
    site_keyid = load_signing_key(paths.site_key).public.keyid
    env["signatures"] = [s for s in env["signatures"] if s["keyid"] != site_keyid] + [
        s for s in donor["signatures"] if s["keyid"] == site_keyid
    ]
    write_envelope(bundle, env)
    err = refused(bundle, trust_of(paths, config))
    assert err.reason == f"bad signature from key {site_keyid[:16]}"


def test_signed_by_an_unknown_key_is_refused(site: Any, bundle: Path) -> None:
    paths, config, _ = site
    env = parse_envelope((bundle / MANIFEST).read_bytes())
    stranger = generate_keypair()
    forged = sign_envelope(env.payload, env.payload_type, [stranger])
    (bundle / MANIFEST).write_bytes(forged.to_bytes())
    err = refused(bundle, trust_of(paths, config))
    assert err.reason == f"signed by an unknown key {stranger.public.keyid[:16]}"


def test_unknown_key_added_beside_valid_signatures_is_refused(site: Any, bundle: Path) -> None:
    paths, config, _ = site
    env = parse_envelope((bundle / MANIFEST).read_bytes())
    from protocols.dsse import add_signature

    stranger = generate_keypair()
    (bundle / MANIFEST).write_bytes(add_signature(env, stranger).to_bytes())
    err = refused(bundle, trust_of(paths, config))
    assert err.reason == f"signed by an unknown key {stranger.public.keyid[:16]}"


def test_reviewer_signature_missing_when_policy_needs_it_is_refused(site: Any) -> None:
    paths, config, _ = site
    pending = export_small(paths, config)
    err = refused(pending, trust_of(paths, config), policy=POLICY)
    assert err.reason == "bundle has 0 reviewer signature(s), the policy requires 1"


def test_reviewer_signature_without_site_signature_is_refused(site: Any, bundle: Path) -> None:
    paths, config, reviewers = site
    env = envelope_json(bundle)
    env["signatures"] = [
        s for s in env["signatures"] if s["keyid"] == reviewers[0].public.keyid
    ]
    write_envelope(bundle, env)
    err = refused(bundle, trust_of(paths, config))
    assert err.reason == "bundle is not signed by the site key of site-a"


def test_last_rounds_bundle_replayed_under_a_new_nonce_is_refused(
    site: Any, bundle: Path
) -> None:
    paths, config, _ = site
    err = refused(bundle, trust_of(paths, config), policy=POLICY, expected_round=("r2", "n2"))
    assert err.reason == "bundle was made for round r1, not round r2 (replay?)"


def test_same_round_id_with_another_nonce_is_refused(site: Any, bundle: Path) -> None:
    paths, config, _ = site
    err = refused(bundle, trust_of(paths, config), expected_round=("r1", "fresh-nonce"))
    assert err.reason == "bundle nonce does not match round r1's nonce (replay?)"


def test_local_bundle_offered_to_a_round_is_refused(site: Any) -> None:
    paths, config, _ = site
    pending = export_small(paths, config)
    err = refused(pending, trust_of(paths, config), expected_round=("r1", "n1"))
    assert err.reason == "bundle answers no round; round r1 was expected"


def test_truncated_json_is_refused(site: Any, bundle: Path) -> None:
    paths, config, _ = site
    data = (bundle / MANIFEST).read_bytes()
    (bundle / MANIFEST).write_bytes(data[: len(data) // 2])
    err = refused(bundle, trust_of(paths, config))
    assert err.reason.startswith("envelope is not valid JSON (")


def test_oversized_json_document_is_refused_before_parsing(site: Any, bundle: Path) -> None:
    paths, config, _ = site
    # A nesting bomb: parsing it would blow the recursion limit; the size cap comes first.
    bomb = b"[" * (MAX_MANIFEST_BYTES + 1)
    (bundle / MANIFEST).write_bytes(bomb)
    err = refused(bundle, trust_of(paths, config))
    assert err.reason == (
        f"manifest is {MAX_MANIFEST_BYTES + 1} bytes, over the {MAX_MANIFEST_BYTES} byte limit"
    )


def test_oversized_metadata_line_is_refused(site: Any) -> None:
    """A site that signs a huge metadata line still cannot make the verifier parse it."""
    paths, config, _ = site
    pending = export_small(paths, config, n=1)
    lines = (pending / "images.jsonl").read_bytes()
    record = json.loads(lines)
    record["pad"] = " " * 5000
    _resign_with_file(paths, pending, "images.jsonl", canonical_json(record) + b"\n")
    err = refused(pending, trust_of(paths, config))
    assert err.reason == "metadata line 0 is over 4096 bytes"


def _resign_with_file(paths: Any, bundle: Path, name: str, data: bytes,
                      subject_name: str | None = None) -> None:
    """Rewrite a file and re-sign the statement with the site key (a dishonest site)."""
    (bundle / name).write_bytes(data)

    def point_at_new_file(statement: dict[str, Any]) -> None:
        for item in statement["subject"]:
            if item["name"] == name:
                item["digest"]["sha256"] = sha256_file(bundle / name)
                if subject_name is not None:
                    item["name"] = subject_name

    resign_statement(paths, bundle, point_at_new_file)


def test_path_with_dotdot_in_subject_list_is_refused(site: Any, tmp_path: Path) -> None:
    paths, config, _ = site
    pending = export_small(paths, config)
    _resign_with_file(paths, pending, "review.html", b"<p>x</p>", subject_name="../review.html")
    err = refused(pending, trust_of(paths, config))
    assert err.reason == "subject name '../review.html' leaves the bundle ('..' or '.')"


def test_absolute_path_in_subject_list_is_refused(site: Any) -> None:
    paths, config, _ = site
    pending = export_small(paths, config)
    _resign_with_file(paths, pending, "review.html", b"<p>x</p>", subject_name="/etc/passwd")
    err = refused(pending, trust_of(paths, config))
    assert err.reason == "subject name '/etc/passwd' is an absolute path"


def test_signed_distance_below_threshold_is_refused(site: Any) -> None:
    """Even a validly signed bundle may not hold an image closer than its own threshold."""
    paths, config, _ = site
    pending = export_small(paths, config, n=2)
    lines = (pending / "images.jsonl").read_text().splitlines()
    record = json.loads(lines[1])
    record["distances"]["rmse"] = 0.0
    lines[1] = json.dumps(record, sort_keys=True, separators=(",", ":"))
    _resign_with_file(paths, pending, "images.jsonl", ("\n".join(lines) + "\n").encode())
    err = refused(pending, trust_of(paths, config))
    assert err.reason == "image 1 is closer than the guard threshold under rmse (0.0 < 0.05)"


def test_symbolic_link_in_bundle_is_refused(site: Any, bundle: Path, tmp_path: Path) -> None:
    paths, config, _ = site
    outside = tmp_path / "outside.html"
    shutil.move(bundle / "review.html", outside)
    (bundle / "review.html").symlink_to(outside)
    err = refused(bundle, trust_of(paths, config))
    assert err.reason == "review.html is a symbolic link"


def test_bundle_signed_by_another_sites_keys_is_refused(site: Any, bundle: Path) -> None:
    """Site B re-signs site A's statement with its own trusted key: the site names differ."""
    paths, config, _ = site
    trust = trust_of(paths, config)
    other = generate_keypair()
    trust.add_site("site-b", other.public, [])
    env = parse_envelope((bundle / MANIFEST).read_bytes())
    (bundle / MANIFEST).write_bytes(
        sign_envelope(env.payload, env.payload_type, [other]).to_bytes()
    )
    err = refused(bundle, trust)
    assert err.reason == "statement names site site-a but is signed by site-b's keys"


def test_signatures_from_two_sites_are_refused(site: Any, bundle: Path) -> None:
    paths, config, _ = site
    trust: TrustStore = trust_of(paths, config)
    other = generate_keypair()
    trust.add_site("site-b", other.public, [])
    from protocols.dsse import add_signature

    env = parse_envelope((bundle / MANIFEST).read_bytes())
    (bundle / MANIFEST).write_bytes(add_signature(env, other).to_bytes())
    err = refused(bundle, trust)
    assert err.reason == "signatures come from more than one site (site-a, site-b)"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TrustStore]:
    from node.home import init_home

    home = tmp_path_factory.mktemp("pristine") / "home"
    init_home(home, "site-a")
    paths, config, reviewers = configure(home, reviewers=1, required=1)
    bundle = approve_bundle(paths, export_small(paths, config, n=2, dicom=True), reviewers[0])
    return bundle, trust_of(paths, config)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_any_flipped_byte_in_any_signed_file_is_refused(
    pristine: tuple[Path, TrustStore], tmp_path_factory: pytest.TempPathFactory,
    data: st.DataObject,
) -> None:
    source, trust = pristine
    bundle = tmp_path_factory.mktemp("flip") / source.name
    shutil.copytree(source, bundle)
    # Every signed file (the manifest's own whitespace is not signed; its payload is).
    files = sorted(p for p in bundle.rglob("*") if p.is_file() and p.name != MANIFEST)
    target = data.draw(st.sampled_from(files))
    content = bytearray(target.read_bytes())
    position = data.draw(st.integers(0, len(content) - 1))
    content[position] ^= data.draw(st.integers(1, 255))
    target.write_bytes(bytes(content))
    with pytest.raises(VerificationError):
        verify_bundle(bundle, trust, POLICY)
