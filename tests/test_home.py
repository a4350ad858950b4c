import re
import stat
from pathlib import Path

import pytest
import yaml

from node.config import NodeConfig, NodePaths, load_node_config
from node.errors import HomeError
from node.home import init_home
from protocols.audit import verify_audit_log
from protocols.errors import ConfigError
from protocols.keys import load_public_key, load_signing_key


def test_init_creates_the_home_of_the_design(tmp_path: Path) -> None:
    paths = init_home(tmp_path / "h", "site-a")
    for sub in ("store/shards", "models", "guard", "runs", "outbox/pending",
                "outbox/approved", "outbox/sent"):
        assert (paths.root / sub).is_dir(), sub
    assert stat.S_IMODE(paths.site_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(paths.pseudonym_secret.stat().st_mode) == 0o600
    key = load_signing_key(paths.site_key)
    assert key.public == load_public_key(paths.site_pub)
    assert verify_audit_log(paths.audit).records == 3  # init, key, policy_set
    config = load_node_config(paths)
    assert config.site == "site-a"
    assert config.store.image_size == 64


def test_init_refuses_an_existing_home(tmp_path: Path) -> None:
    init_home(tmp_path / "h", "site-a")
    with pytest.raises(HomeError, match="already exists"):
        init_home(tmp_path / "h", "site-b")


def test_node_yaml_writes_every_default_with_a_comment(tmp_path: Path) -> None:
    paths = init_home(tmp_path / "h", "site-a")
    text = paths.config.read_text()
    data = yaml.safe_load(text)
    assert data["store"]["holdout_fraction"] == 0.2
    assert data["policy"]["reviewer_signatures_required"] == 1
    assert text.count("#") >= 10


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"store": {"imagesize": 64}}, "unknown key store.imagesize"),
        ({"store": {"image_size": 65}}, "store.image_size"),
        ({"store": {"holdout_fraction": "a lot"}}, "store.holdout_fraction"),
        ({"store": {"holdout_fraction": 1.5}}, "holdout_fraction must be in"),
        ({"policy": {"reviewer_keys": "abc"}}, "policy.reviewer_keys"),
        ({"store": {"plane": "oblique"}}, "store.plane"),
        ({"guard": {"threshold_quantile": 0.5}}, "threshold_quantile must be in [0, 0.5)"),
        ({"guard": {"max_shift_px": -1}}, "max_shift_px must be >= 0"),
        ({"guard": {"rotations_deg": [0.0, 50.0]}}, "rotations_deg must be within 45 degrees"),
        ({"guard": {"metrics": ["pixel_rmse", "pixel_rmse"]}}, "metrics must be distinct"),
        ({"guard": {"metrics": ["pixel_rmse", "ssim"]}}, "metrics must be distinct"),
        ({"guard": {"metrics": []}}, "metrics must be distinct"),
        ({"guard": {"canaries_per_alteration": 0}}, "canaries are not optional"),
        ({"guard": {"batch_size": 0}}, "batch_size must be >= 1"),
        ({"guard": {"max_tries_factor": 0.5}}, "max_tries_factor >= 1"),
        ({"guard": {"pca_components": 600}}, "pca_components must be in 0..512"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, patch: dict, message: str) -> None:
    paths = init_home(tmp_path / "h", "site-a")
    data = yaml.safe_load(paths.config.read_text())
    for section, values in patch.items():
        data[section].update(values)
    paths.config.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_node_config(NodePaths(paths.root))


def test_config_round_trips_through_yaml() -> None:
    from protocols.typed import from_dict

    config = NodeConfig(site="x")
    assert from_dict(NodeConfig, yaml.safe_load(config.to_yaml())) == config


def test_hand_edited_policy_is_audited_once(tmp_path: Path) -> None:
    import json

    paths = init_home(tmp_path / "h", "site-a")
    data = yaml.safe_load(paths.config.read_text())
    data["policy"]["max_images_per_round"] = 7
    paths.config.write_text(yaml.safe_dump(data))
    load_node_config(paths)
    load_node_config(paths)  # unchanged since: no second record
    records = [json.loads(line) for line in paths.audit.read_text().splitlines()]
    assert [r["event"] for r in records] == ["init", "key_created", "policy_set", "policy_changed"]
    change = records[-1]["details"]
    assert change["before"] == records[2]["details"]["after"] != change["after"]
    assert json.loads(change["policy"])["max_images_per_round"] == 7
    assert verify_audit_log(paths.audit).records == 4


def test_the_pseudonym_secret_is_never_replaced_and_must_be_sound(tmp_path: Path) -> None:
    # Every patient, series and instance key of a store is keyed by this secret: losing or
    # swapping it would silently split one patient into two, so each fault is refused.
    from node.pseudonym import Pseudonymiser, create_secret

    paths = init_home(tmp_path / "h", "site-a")
    before = paths.pseudonym_secret.read_bytes()
    with pytest.raises(HomeError, match="refusing to overwrite the pseudonym secret"):
        create_secret(paths.pseudonym_secret)
    assert paths.pseudonym_secret.read_bytes() == before
    for text, message in (("not hex at all", "pseudonym secret is not hex"),
                          ("abcd", "pseudonym secret is too short")):
        paths.pseudonym_secret.write_text(text + "\n")
        with pytest.raises(HomeError, match=message):
            Pseudonymiser.from_file(paths.pseudonym_secret)
    paths.pseudonym_secret.unlink()
    with pytest.raises(HomeError, match="pseudonym secret missing"):
        Pseudonymiser.from_file(paths.pseudonym_secret)
