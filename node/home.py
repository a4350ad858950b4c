"""Creating and opening a node home (ARCHITECTURE, 'The node home')."""

from __future__ import annotations

from pathlib import Path

from node.config import NodeConfig, NodePaths, record_policy
from node.errors import HomeError
from node.pseudonym import create_secret
from protocols.audit import append_audit
from protocols.files import atomic_write_text
from protocols.keys import generate_keypair, write_keypair

__all__ = ["init_home"]


def init_home(home: str | Path, site: str) -> NodePaths:
    """Create a node home for ``site``; refuses to touch an existing one."""
    paths = NodePaths(Path(home).resolve())
    if paths.config.exists() or paths.audit.exists() or paths.site_key.exists():
        raise HomeError("a node home already exists here; refusing to overwrite", str(paths.root))
    if paths.root.exists() and any(paths.root.iterdir()):
        raise HomeError("folder is not empty; choose a new folder for the home", str(paths.root))
    try:
        config = NodeConfig(site=site)
    except ValueError as exc:
        raise HomeError(str(exc), "--site") from None
    for folder in (
        paths.keys,
        paths.store / "shards",
        paths.models,
        paths.guard,
        paths.runs,
        paths.outbox / "pending",
        paths.outbox / "approved",
        paths.outbox / "sent",
    ):
        folder.mkdir(parents=True, exist_ok=True)
    paths.keys.chmod(0o700)
    key = generate_keypair()
    write_keypair(key, paths.site_key, paths.site_pub)
    create_secret(paths.pseudonym_secret)
    append_audit(paths.audit, "init", {"site": site, "site_keyid": key.public.keyid})
    append_audit(paths.audit, "key_created", {"role": "site", "keyid": key.public.keyid})
    # node.yaml last: its presence marks a complete home, so a killed init can be redone.
    atomic_write_text(paths.config, config.to_yaml())
    record_policy(paths, config)
    return paths
