"""Creating a coordinator home, and the audited changes to its trust store and policy.

``init`` writes coordinator.yaml (every default, commented), the coordinator's Ed25519 key
(0600), an empty trust store and a fail-closed policy (one reviewer signature per bundle), and
starts the audit log. Every change to trust or policy is appended to the audit log with the
digests before and after.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from coordinator.config import CoordinatorConfig, CoordinatorPaths
from protocols.audit import append_audit
from protocols.errors import ConfigError, UsageError
from protocols.files import atomic_write_json, atomic_write_text, sha256_file
from protocols.keys import PublicKey, generate_keypair, write_keypair

__all__ = [
    "init_coordinator_home",
    "default_policy",
    "load_trust",
    "load_coordinator_policy",
    "trust_add",
    "trust_remove",
    "trust_entries",
    "site_keys",
    "policy_set",
    "policy_show",
]

DEFAULT_MAX_BUNDLE_BYTES = 512 * 1024 * 1024
DEFAULT_MAX_IMAGES = 10_000


def default_policy() -> Any:
    """Fail-closed defaults: every bundle needs one reviewer signature besides the site's."""
    from protocols.policy import Policy

    return Policy(
        required_reviewer_signatures=1,
        min_thresholds={},
        min_canary_catch_rate={},
        max_bundle_bytes=DEFAULT_MAX_BUNDLE_BYTES,
        max_images=DEFAULT_MAX_IMAGES,
    )


def _policy_dict(policy: Any) -> dict[str, Any]:
    to_dict = getattr(policy, "to_dict", None)
    return dict(to_dict()) if callable(to_dict) else asdict(policy)


def init_coordinator_home(home: str | Path, consortium: str = "consortium") -> CoordinatorPaths:
    """Create a coordinator home; refuses an existing or non-empty folder."""
    from protocols.trust import TrustStore

    paths = CoordinatorPaths(Path(home).resolve())
    if paths.config.exists() or paths.audit.exists() or paths.coordinator_key.exists():
        raise UsageError("a coordinator home already exists here; refusing to overwrite",
                         str(paths.root))
    if paths.root.exists() and any(paths.root.iterdir()):
        raise UsageError("folder is not empty; choose a new folder for the home", str(paths.root))
    try:
        config = CoordinatorConfig(consortium=consortium)
    except ValueError as exc:
        raise ConfigError(str(exc), "--consortium") from None
    for folder in (paths.keys, paths.rounds, paths.inbox, paths.bundles, paths.received,
                   paths.pools):
        folder.mkdir(parents=True, exist_ok=True)
    paths.keys.chmod(0o700)
    key = generate_keypair()
    write_keypair(key, paths.coordinator_key, paths.coordinator_pub)
    append_audit(paths.audit, "init", {"role": "coordinator", "keyid": key.public.keyid})
    append_audit(paths.audit, "key_created", {"role": "coordinator", "keyid": key.public.keyid})
    TrustStore().save(paths.trust)
    atomic_write_json(paths.policy, _policy_dict(default_policy()))
    append_audit(paths.audit, "policy_set", {"policy_sha256": sha256_file(paths.policy),
                                             "previous_sha256": None})
    # coordinator.yaml last: its presence marks a complete home, so a killed init can be redone.
    atomic_write_text(paths.config, config.to_yaml())
    return paths


def load_trust(paths: CoordinatorPaths) -> Any:
    from protocols.trust import TrustStore

    return TrustStore.load(paths.trust)


def load_coordinator_policy(paths: CoordinatorPaths) -> Any:
    from protocols.policy import load_policy

    return load_policy(paths.policy)


def site_keys(trust: Any) -> dict[str, PublicKey]:
    """site -> site key, read from a TrustStore (contract C)."""
    result: dict[str, PublicKey] = {}
    for site in trust.sites():
        result[site] = _site_entry_key(trust, site)
    return result


def _site_entry_key(trust: Any, site: str) -> PublicKey:
    for name in ("site_key", "get_site_key"):
        getter = getattr(trust, name, None)
        if callable(getter):
            key = getter(site)
            if isinstance(key, PublicKey):
                return key
    entry = trust.site(site) if callable(getattr(trust, "site", None)) else None
    if entry is not None:
        key = getattr(entry, "site_key", None)
        if isinstance(key, PublicKey):
            return key
    raise ConfigError(f"trust store has no site key for {site!r}", "trust.json")


def trust_entries(paths: CoordinatorPaths) -> list[dict[str, Any]]:
    trust = load_trust(paths)
    entries = []
    for site, key in sorted(site_keys(trust).items()):
        entries.append({"site": site, "site_keyid": key.keyid,
                        "reviewer_keyids": sorted(_reviewer_keyids(trust, site))})
    return entries


def _reviewer_keyids(trust: Any, site: str) -> list[str]:
    for name in ("reviewer_keys", "get_reviewer_keys"):
        getter = getattr(trust, name, None)
        if callable(getter):
            return [k.keyid for k in getter(site)]
    entry = trust.site(site) if callable(getattr(trust, "site", None)) else None
    keys = getattr(entry, "reviewer_keys", []) if entry is not None else []
    return [k.keyid for k in keys]


def trust_add(paths: CoordinatorPaths, site: str, site_key: PublicKey,
              reviewer_keys: list[PublicKey]) -> None:
    before = sha256_file(paths.trust)
    trust = load_trust(paths)
    trust.add_site(site, site_key, reviewer_keys)
    trust.save(paths.trust)
    append_audit(paths.audit, "trust_add", {
        "site": site, "site_keyid": site_key.keyid,
        "reviewer_keyids": [k.keyid for k in reviewer_keys],
        "previous_sha256": before, "trust_sha256": sha256_file(paths.trust),
    })


def trust_remove(paths: CoordinatorPaths, site: str) -> None:
    before = sha256_file(paths.trust)
    trust = load_trust(paths)
    if site not in list(trust.sites()):
        raise UsageError(f"site {site!r} is not in the trust store", str(paths.trust))
    trust.remove_site(site)
    trust.save(paths.trust)
    append_audit(paths.audit, "trust_remove", {
        "site": site, "previous_sha256": before, "trust_sha256": sha256_file(paths.trust),
    })


def policy_show(paths: CoordinatorPaths) -> dict[str, Any]:
    return _policy_dict(load_coordinator_policy(paths))


def policy_set(paths: CoordinatorPaths, source: Path) -> dict[str, Any]:
    """Replace the policy with the (validated) JSON file ``source``; audited."""
    from protocols.policy import Policy

    try:
        data = json.loads(Path(source).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError("policy file not found", str(source)) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"policy file is not JSON: {exc}", str(source)) from None
    if not isinstance(data, dict):
        raise ConfigError("policy must be a JSON object", str(source))
    policy = Policy.from_dict(data)
    before = sha256_file(paths.policy)
    atomic_write_json(paths.policy, _policy_dict(policy))
    # Load it back through the one loader so a policy we cannot read is never left in place.
    load_coordinator_policy(paths)
    append_audit(paths.audit, "policy_set", {"previous_sha256": before,
                                             "policy_sha256": sha256_file(paths.policy)})
    return _policy_dict(policy)
