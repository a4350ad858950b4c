"""Trust store and policy: strict files, fail-closed policies, policy checks on bundles."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fixtures.bundle_factory import configure, export_small, trust_of

from node.export import approve_bundle
from protocols.bundle import verify_bundle
from protocols.errors import ConfigError, UsageError, VerificationError
from protocols.keys import generate_keypair
from protocols.policy import Policy, load_policy
from protocols.trust import TrustStore

# -- trust store ------------------------------------------------------------------------------


def test_trust_store_round_trips(tmp_path: Path) -> None:
    site, reviewer = generate_keypair().public, generate_keypair().public
    store = TrustStore()
    store.add_site("site-a", site, [reviewer])
    store.save(tmp_path / "trust.json")
    loaded = TrustStore.load(tmp_path / "trust.json")
    assert loaded.sites() == ["site-a"]
    assert loaded.site_key("site-a") == site
    assert loaded.reviewer_keys("site-a") == [reviewer]
    assert loaded.site_of(reviewer.keyid) == "site-a"
    loaded.remove_site("site-a")
    assert loaded.sites() == []


def test_key_of_one_site_cannot_join_another(tmp_path: Path) -> None:
    key = generate_keypair().public
    store = TrustStore()
    store.add_site("site-a", key, [])
    with pytest.raises(UsageError, match="already belongs to site 'site-a'"):
        store.add_site("site-b", generate_keypair().public, [key])


def test_site_key_repeated_as_reviewer_is_refused() -> None:
    key = generate_keypair().public
    with pytest.raises(UsageError, match="one key given twice"):
        TrustStore().add_site("site-a", key, [key])


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("{", "not valid JSON"),
        ('{"version": 1}', "exactly 'version' and 'sites'"),
        ('{"version": 2, "sites": {}}', "version 2 is not 1"),
        ('{"version": 1, "sites": {"a": {"site_key": "00"}}}', "exactly site_key and"),
        ('{"version": 1, "sites": {"a": {"site_key": "zz", "reviewer_keys": []}}}', "not hex"),
        ('{"version": 1, "sites": {"a/b": {"site_key": "' + "00" * 32 + '", '
         '"reviewer_keys": []}}}', "not allowed"),
        ("[]", "exactly 'version' and 'sites'"),
        ('{"version": 1, "sites": []}', "'sites' is not a mapping"),
        ('{"version": 1, "sites": {"a": {"site_key": 7, "reviewer_keys": []}}}',
         "sites.a has the wrong types"),
        ('{"version": 1, "sites": {"a": {"site_key": "00", "reviewer_keys": "00"}}}',
         "sites.a has the wrong types"),
    ],
)
def test_damaged_trust_store_is_refused(tmp_path: Path, text: str, reason: str) -> None:
    (tmp_path / "trust.json").write_text(text)
    with pytest.raises(ConfigError) as err:
        TrustStore.load(tmp_path / "trust.json")
    assert reason in err.value.what


# -- policy -----------------------------------------------------------------------------------


def test_policy_that_requires_nothing_is_refused() -> None:
    with pytest.raises(ConfigError, match="policy requires nothing"):
        Policy(required_reviewer_signatures=0, min_thresholds={}, min_canary_catch_rate={},
               max_bundle_bytes=10, max_images=10)


def test_empty_policy_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "p.json").write_text('{"required_reviewer_signatures": 0}')
    with pytest.raises(ConfigError, match="policy requires nothing"):
        load_policy(tmp_path / "p.json")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ({"surprise": 1}, "unknown key surprise"),
        ({"required_reviewer_signatures": "1"}, "expected an integer"),
        ({"max_images": 0}, "max_images must be a positive integer"),
        ({"min_canary_catch_rate": {"exact": 1.5}}, "must be in [0, 1]"),
        ({"min_thresholds": {"CT": {}}}, "names no metric"),
        ({"min_thresholds": {"CT": {"rmse": -0.1}}}, "must be a number >= 0"),
    ],
)
def test_bad_policy_is_refused_naming_the_key(data: dict[str, Any], reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        Policy.from_dict(data)
    assert reason in err.value.what


def test_policy_loads_from_yaml_and_json(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("min_thresholds:\n  CT:\n    rmse: 0.04\n")
    (tmp_path / "p.json").write_text(json.dumps({"min_thresholds": {"CT": {"rmse": 0.04}}}))
    assert load_policy(tmp_path / "p.yaml") == load_policy(tmp_path / "p.json")
    assert load_policy(tmp_path / "p.yaml").required_reviewer_signatures == 1
    assert Policy.from_dict(load_policy(tmp_path / "p.json").to_dict()) == load_policy(
        tmp_path / "p.json"
    )


# -- policy applied to bundles ----------------------------------------------------------------


@pytest.fixture
def approved(node_home: Path) -> tuple[Path, TrustStore]:
    paths, config, reviewers = configure(node_home, reviewers=1, required=1)
    bundle = approve_bundle(paths, export_small(paths, config), reviewers[0])
    return bundle, trust_of(paths, config)


def _refused(bundle: Path, trust: TrustStore, **policy: Any) -> str:
    with pytest.raises(VerificationError) as err:
        verify_bundle(bundle, trust, Policy(**policy))
    return err.value.reason


def test_bundle_meeting_every_floor_verifies(approved: tuple[Path, TrustStore]) -> None:
    bundle, trust = approved
    policy = Policy(
        required_reviewer_signatures=1,
        min_thresholds={"CT": {"rmse": 0.05, "embedding": 0.25}},
        min_canary_catch_rate={"exact": 1.0, "shifted": 1.0},
    )
    assert verify_bundle(bundle, trust, policy).n_images == 3


def test_threshold_below_policy_floor_is_refused(approved: tuple[Path, TrustStore]) -> None:
    reason = _refused(*approved, min_thresholds={"CT": {"rmse": 0.06}})
    assert reason == "bundle threshold for rmse is 0.05, below the policy floor 0.06"


def test_metric_the_policy_names_but_the_bundle_lacks_is_refused(
    approved: tuple[Path, TrustStore],
) -> None:
    reason = _refused(*approved, min_thresholds={"CT": {"ssim": 0.1}})
    assert reason == "bundle has no threshold for guard metric ssim"


def test_modality_without_a_floor_is_refused(approved: tuple[Path, TrustStore]) -> None:
    reason = _refused(*approved, min_thresholds={"MR": {"rmse": 0.01}})
    assert reason == "the policy sets no threshold floor for modality CT"


def test_canary_catch_rate_below_minimum_is_refused(approved: tuple[Path, TrustStore]) -> None:
    reason = _refused(*approved, min_canary_catch_rate={"noise": 0.95})
    assert reason == "canary catch rate for noise is 0.9, below the policy minimum 0.95"


def test_missing_canary_rate_is_refused(approved: tuple[Path, TrustStore]) -> None:
    reason = _refused(*approved, min_canary_catch_rate={"rotated": 0.5})
    assert reason == "bundle reports no canary catch rate for rotated"


def test_bundle_over_the_byte_cap_is_refused(approved: tuple[Path, TrustStore]) -> None:
    reason = _refused(*approved, max_bundle_bytes=1000)
    assert reason.startswith("bundle is ") and reason.endswith("bytes, over the policy's 1000")


def test_bundle_over_the_image_cap_is_refused(approved: tuple[Path, TrustStore]) -> None:
    reason = _refused(*approved, max_images=2)
    assert reason == "bundle has 3 images, over the policy's 2"


def test_two_reviewers_required_one_signed_is_refused(approved: tuple[Path, TrustStore]) -> None:
    reason = _refused(*approved, required_reviewer_signatures=2)
    assert reason == "bundle has 1 reviewer signature(s), the policy requires 2"


def test_demo_auto_approved_bundle_needs_an_explicit_policy(node_home: Path) -> None:
    paths, config, reviewers = configure(node_home, reviewers=1, required=1)
    bundle = approve_bundle(
        paths, export_small(paths, config, demo_auto_approved=True), reviewers[0]
    )
    trust = trust_of(paths, config)
    reason = _refused(bundle, trust, required_reviewer_signatures=1)
    assert reason == "bundle was approved by a scripted demo reviewer; the policy refuses it"
    allowed = Policy(required_reviewer_signatures=1, allow_demo_auto_approved=True)
    assert verify_bundle(bundle, trust, allowed).predicate["demo_auto_approved"] is True


def test_bare_keys_count_reviewers_beyond_the_first_signature(
    approved: tuple[Path, TrustStore],
) -> None:
    bundle, trust = approved
    keys = {k.keyid: k for site in trust.sites()
            for k in [trust.site_key(site), *trust.reviewer_keys(site)]}
    assert verify_bundle(bundle, keys, Policy(required_reviewer_signatures=1)).site == "site-a"
    with pytest.raises(VerificationError, match="requires 2"):
        verify_bundle(bundle, keys, Policy(required_reviewer_signatures=2))


def test_missing_or_oversized_trust_store_is_refused_unread(tmp_path: Path) -> None:
    from protocols.trust import MAX_TRUST_BYTES

    with pytest.raises(ConfigError, match="trust store not found"):
        TrustStore.load(tmp_path / "trust.json")
    (tmp_path / "trust.json").write_bytes(b"[" * (MAX_TRUST_BYTES + 1))  # a nesting bomb
    with pytest.raises(ConfigError, match=f"trust store is {MAX_TRUST_BYTES + 1} bytes"):
        TrustStore.load(tmp_path / "trust.json")
    store = TrustStore()
    with pytest.raises(UsageError, match="site 'x' is not in the trust store"):
        store.site_key("x")
    with pytest.raises(UsageError, match="site 'x' is not in the trust store"):
        store.reviewer_keys("x")
    with pytest.raises(UsageError, match="site 'x' is not in the trust store"):
        store.remove_site("x")


def test_policy_files_that_are_missing_oversized_or_do_not_parse_are_refused(
    tmp_path: Path,
) -> None:
    from protocols.policy import MAX_POLICY_BYTES

    with pytest.raises(ConfigError, match="policy file not found"):
        load_policy(tmp_path / "policy.yaml")
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (MAX_POLICY_BYTES + 1))
    with pytest.raises(ConfigError, match="over the limit"):
        load_policy(big)
    for name, text in (("bad.json", "{"), ("bad.yaml", "a: [1, 2"), ("list.yaml", "- 1\n")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match="does not parse|policy must be a mapping"):
            load_policy(tmp_path / name)


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from protocols.files import atomic_write_bytes

    target = tmp_path / "trust.json"
    target.write_bytes(b"old")

    def full_disk(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trust.json"]
