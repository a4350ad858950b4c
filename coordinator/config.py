"""coordinator.yaml and the layout of a coordinator home.

Every setting is typed and written out with its default by ``init``; unknown keys and wrong
types are errors naming the key. :class:`CoordinatorPaths` is the one place that knows where
things live inside the home.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from protocols.errors import UsageError
from protocols.typed import load_yaml_config, setting, to_commented_yaml

__all__ = [
    "CoordinatorConfig",
    "RoundSettings",
    "TransportSettings",
    "CoordinatorPaths",
    "resolve_coordinator_home",
    "load_coordinator_config",
]


@dataclass
class RoundSettings:
    request_ttl_hours: float = setting(
        72.0, "a round request expires after this long; nodes refuse expired requests"
    )
    reply_timeout_s: float = setting(
        600.0, "how long one poll of the sites waits for replies before asking again"
    )
    poll_interval_s: float = setting(
        5.0, "pause between polls of sites that are still generating or awaiting approval"
    )
    round_timeout_minutes: float = setting(
        1440.0, "a site that has not delivered after this long is recorded as dropped out"
    )
    default_count: int = setting(64, "images asked of each site when round open gets no --count")

    def __post_init__(self) -> None:
        for name in ("request_ttl_hours", "reply_timeout_s", "round_timeout_minutes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.poll_interval_s < 0:
            raise ValueError("poll_interval_s must be >= 0")


@dataclass
class TransportSettings:
    chunk_bytes: int = setting(
        1 << 20, "bundle bytes travel in chunks of this size inside one Flower message"
    )

    def __post_init__(self) -> None:
        if self.chunk_bytes < 1024:
            raise ValueError("chunk_bytes must be at least 1024")


@dataclass
class CoordinatorConfig:
    consortium: str = setting("consortium", "name of the consortium (free text, no patient data)")
    rounds: RoundSettings = field(
        default_factory=RoundSettings, metadata={"help": "pooling rounds"}
    )
    transport: TransportSettings = field(
        default_factory=TransportSettings, metadata={"help": "Flower transport"}
    )

    def to_yaml(self) -> str:
        return to_commented_yaml(
            self, header="synthfed coordinator configuration. Every setting, with its default."
        )


@dataclass(frozen=True)
class CoordinatorPaths:
    root: Path

    @property
    def config(self) -> Path:
        return self.root / "coordinator.yaml"

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def coordinator_key(self) -> Path:
        return self.keys / "coordinator.ed25519"

    @property
    def coordinator_pub(self) -> Path:
        return self.keys / "coordinator.pub"

    @property
    def audit(self) -> Path:
        return self.root / "audit.jsonl"

    @property
    def trust(self) -> Path:
        return self.root / "trust.json"

    @property
    def policy(self) -> Path:
        return self.root / "policy.json"

    @property
    def rounds(self) -> Path:
        return self.root / "rounds"

    @property
    def inbox(self) -> Path:
        """Arrivals being unpacked and verified; nothing here is trusted."""
        return self.root / "inbox"

    @property
    def bundles(self) -> Path:
        """Verified bundles, one folder per manifest digest."""
        return self.root / "bundles"

    @property
    def received(self) -> Path:
        """One file per bundle digest ever received (the replay ledger)."""
        return self.root / "received"

    @property
    def pools(self) -> Path:
        return self.root / "pools"


def resolve_coordinator_home(home: str | os.PathLike[str] | None) -> CoordinatorPaths:
    value = home if home is not None else os.environ.get("SYNTHFED_COORDINATOR_HOME")
    if not value:
        raise UsageError(
            "no coordinator home given: pass --home DIR or set SYNTHFED_COORDINATOR_HOME"
        )
    paths = CoordinatorPaths(Path(value).resolve())
    if not paths.config.exists():
        raise UsageError(
            "not a coordinator home (no coordinator.yaml); run synthfed-coordinator init",
            str(paths.root),
        )
    return paths


def load_coordinator_config(paths: CoordinatorPaths) -> CoordinatorConfig:
    return load_yaml_config(CoordinatorConfig, str(paths.config))
