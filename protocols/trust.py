"""The trust store: which Ed25519 keys speak for which site, as a JSON file.

Each site has one site key (signs at export) and any number of reviewer keys (sign at
approval). A key belongs to at most one site and one role, so a signature names its site
without reading the (not yet verified) payload. Loading is strict: exact keys, hex keys of the
right length, a size cap; a damaged file is refused, never half-read.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocols.errors import ConfigError, UsageError
from protocols.files import atomic_write_json
from protocols.keys import PublicKey, public_key_from_hex

__all__ = ["TrustStore", "SiteEntry", "MAX_TRUST_BYTES"]

MAX_TRUST_BYTES = 4 * 1024 * 1024
_VERSION = 1
_SITE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")


@dataclass(frozen=True)
class SiteEntry:
    site: str
    site_key: PublicKey
    reviewer_keys: tuple[PublicKey, ...] = ()

    def keyids(self) -> set[str]:
        return {self.site_key.keyid, *(k.keyid for k in self.reviewer_keys)}

    def keys(self) -> dict[str, PublicKey]:
        """keyid -> key for every key of the site (site and reviewers)."""
        result = {k.keyid: k for k in self.reviewer_keys}
        result[self.site_key.keyid] = self.site_key
        return result


@dataclass
class TrustStore:
    """site -> keys. ``TrustStore()`` is empty; ``load`` / ``save`` read and write JSON."""

    entries: dict[str, SiteEntry] = field(default_factory=dict)

    # -- queries ----------------------------------------------------------------------------
    def sites(self) -> list[str]:
        return sorted(self.entries)

    def site(self, site: str) -> SiteEntry | None:
        return self.entries.get(site)

    def site_key(self, site: str) -> PublicKey:
        entry = self.entries.get(site)
        if entry is None:
            raise UsageError(f"site {site!r} is not in the trust store")
        return entry.site_key

    def reviewer_keys(self, site: str) -> list[PublicKey]:
        entry = self.entries.get(site)
        if entry is None:
            raise UsageError(f"site {site!r} is not in the trust store")
        return list(entry.reviewer_keys)

    def site_of(self, keyid: str) -> str | None:
        """The site that ``keyid`` belongs to (as site key or reviewer key), or None."""
        for name, entry in self.entries.items():
            if keyid in entry.keyids():
                return name
        return None

    # -- changes ----------------------------------------------------------------------------
    def add_site(self, site: str, site_key: PublicKey, reviewer_keys: list[PublicKey]) -> None:
        """Add or replace a site. A key already used by another site (or twice) is refused."""
        if not isinstance(site, str) or not _SITE.fullmatch(site):
            raise UsageError(f"site name {site!r} is not allowed (letters, digits, . _ -)")
        ids = [site_key.keyid, *(k.keyid for k in reviewer_keys)]
        if len(set(ids)) != len(ids):
            raise UsageError(f"site {site!r}: one key given twice (site and reviewer keys differ)")
        for other, entry in self.entries.items():
            if other != site and entry.keyids() & set(ids):
                raise UsageError(f"a key of site {site!r} already belongs to site {other!r}")
        self.entries[site] = SiteEntry(site, site_key, tuple(reviewer_keys))

    def remove_site(self, site: str) -> None:
        if site not in self.entries:
            raise UsageError(f"site {site!r} is not in the trust store")
        del self.entries[site]

    # -- files ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": _VERSION,
            "sites": {
                name: {
                    "site_key": e.site_key.hex,
                    "reviewer_keys": [k.hex for k in e.reviewer_keys],
                }
                for name, e in sorted(self.entries.items())
            },
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: Any, where: str = "trust store") -> TrustStore:
        if not isinstance(data, dict) or set(data) != {"version", "sites"}:
            raise ConfigError("trust store must have exactly 'version' and 'sites'", where)
        if data["version"] != _VERSION:
            raise ConfigError(f"trust store version {data['version']!r} is not {_VERSION}", where)
        if not isinstance(data["sites"], dict):
            raise ConfigError("trust store 'sites' is not a mapping", where)
        store = cls()
        for name, entry in data["sites"].items():
            if not isinstance(entry, dict) or set(entry) != {"site_key", "reviewer_keys"}:
                raise ConfigError(
                    f"sites.{name} must have exactly site_key and reviewer_keys", where
                )
            if not isinstance(entry["site_key"], str) or not isinstance(
                entry["reviewer_keys"], list
            ):
                raise ConfigError(f"sites.{name} has the wrong types", where)
            try:
                site_key = public_key_from_hex(entry["site_key"])
                reviewers = [public_key_from_hex(_hex(k)) for k in entry["reviewer_keys"]]
                store.add_site(name, site_key, reviewers)
            except UsageError as exc:
                raise ConfigError(f"sites.{name}: {exc.what}", where) from None
        return store

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TrustStore:
        p = Path(path)
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            raise ConfigError("trust store not found", str(p)) from None
        if size > MAX_TRUST_BYTES:
            raise ConfigError(f"trust store is {size} bytes, over the limit", str(p))
        try:
            data = json.loads(p.read_bytes())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"trust store is not valid JSON ({exc})", str(p)) from None
        return cls.from_dict(data, str(p))


def _hex(value: Any) -> str:
    if not isinstance(value, str):
        raise UsageError("public key is not a hex string")
    return value
