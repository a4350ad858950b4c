"""node.yaml: every setting of a site node, typed and validated at load.

Unknown keys and wrong types are errors naming the key; command-line options override the
file. ``init`` writes the file with every default spelled out and commented.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from node.errors import HomeError
from node.generator.settings import GeneratorSettings
from node.guard.settings import GuardSettings
from protocols.typed import load_yaml_config, setting, to_commented_yaml

__all__ = [
    "NodeConfig",
    "StoreSettings",
    "PolicySettings",
    "load_node_config",
    "record_policy",
    "policy_digest",
    "resolve_home",
    "NodePaths",
]

Plane = Literal["axial", "sagittal", "coronal", "any"]


@dataclass
class StoreSettings:
    image_size: Literal[64, 128, 256, 512] = setting(64, "model grid: slices are resized to N x N")
    plane: Plane = setting("axial", "the one plane this store holds; other planes are skipped")
    holdout_fraction: float = setting(0.2, "fraction of patients held out (never trained on)")
    split_seed: int = setting(0, "seed of the patient-level train / holdout split")
    ct_window_hu: list[float] = setting(
        [-1024.0, 3071.0], "CT: HU range mapped linearly to [0, 1]; values outside are clipped"
    )
    mr_percentiles: list[float] = setting(
        [0.5, 99.5], "MR / PET / images: per-slice percentiles mapped to [0, 1]"
    )
    min_nonzero_fraction: float = setting(
        0.02, "slices with fewer non-background pixels than this are skipped as empty"
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ValueError("holdout_fraction must be in [0, 1)")
        if len(self.ct_window_hu) != 2 or self.ct_window_hu[0] >= self.ct_window_hu[1]:
            raise ValueError("ct_window_hu must be [low, high] with low < high")
        if len(self.mr_percentiles) != 2 or not (
            0 <= self.mr_percentiles[0] < self.mr_percentiles[1] <= 100
        ):
            raise ValueError("mr_percentiles must be [low, high] within 0..100")


@dataclass
class PolicySettings:
    reviewer_signatures_required: int = setting(
        1, "reviewer signatures a bundle needs before it may leave the node (0 only for demos)"
    )
    reviewer_keys: list[str] = setting([], "hex Ed25519 public keys of the site's reviewers")
    coordinator_key: str = setting("", "hex Ed25519 public key whose round requests we answer")
    modalities_offered: list[str] = setting(["CT", "MR", "PT"], "modalities we generate for rounds")
    max_images_per_round: int = setting(1000, "largest count a round may ask of this site")
    min_minutes_between_rounds: float = setting(0.0, "rate limit on answered round requests")
    guard_floor: dict[str, float] = setting(
        {}, "absolute floor per guard metric; a calibrated threshold below it is refused"
    )

    def __post_init__(self) -> None:
        if self.reviewer_signatures_required < 0:
            raise ValueError("reviewer_signatures_required must be >= 0")


@dataclass
class NodeConfig:
    site: str = setting("site", "site id as the consortium knows it (no patient data)")
    store: StoreSettings = field(
        default_factory=StoreSettings, metadata={"help": "ingest and store"}
    )
    generator: GeneratorSettings = field(
        default_factory=GeneratorSettings, metadata={"help": "latent diffusion generator"}
    )
    guard: GuardSettings = field(
        default_factory=GuardSettings, metadata={"help": "distance guard"}
    )
    policy: PolicySettings = field(
        default_factory=PolicySettings, metadata={"help": "site policy for exports and rounds"}
    )

    def __post_init__(self) -> None:
        if not self.site or any(c in self.site for c in "/\\ \t\n"):
            raise ValueError("site must be a non-empty name without slashes or spaces")

    def to_yaml(self) -> str:
        return to_commented_yaml(
            self, header="synthfed node configuration. Every setting, with its default."
        )


@dataclass(frozen=True)
class NodePaths:
    """Where everything lives inside a node home (ARCHITECTURE, 'The node home')."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "node.yaml"

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def site_key(self) -> Path:
        return self.keys / "site.ed25519"

    @property
    def site_pub(self) -> Path:
        return self.keys / "site.pub"

    @property
    def pseudonym_secret(self) -> Path:
        return self.keys / "pseudonym.secret"

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def guard(self) -> Path:
        return self.root / "guard"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def outbox(self) -> Path:
        return self.root / "outbox"

    @property
    def audit(self) -> Path:
        return self.root / "audit.jsonl"


def resolve_home(home: str | os.PathLike[str] | None) -> NodePaths:
    """The node home from ``--home`` or ``SYNTHFED_HOME``; it must have been initialised."""
    value = home if home is not None else os.environ.get("SYNTHFED_HOME")
    if not value:
        raise HomeError("no node home given: pass --home DIR or set SYNTHFED_HOME")
    paths = NodePaths(Path(value).resolve())
    if not paths.config.exists():
        raise HomeError("not a node home (no node.yaml); run synthfed-node init", str(paths.root))
    return paths


def policy_digest(config: NodeConfig) -> str:
    """sha256 of the canonical site policy (what the audit log tracks)."""
    from protocols.files import canonical_json, sha256_hex
    from protocols.typed import to_dict

    return sha256_hex(canonical_json(to_dict(config.policy)))


def record_policy(paths: NodePaths, config: NodeConfig) -> bool:
    """Audit the site policy when it differs from the last one audited; True if it did.

    The policy lives in node.yaml, which an operator edits by hand, so the change is noticed
    the next time any command loads the config: the audit record names the digests before and
    after and holds the new policy (keys and numbers only, no patient data).
    """
    from protocols.audit import append_audit
    from protocols.files import atomic_write_text, canonical_json
    from protocols.typed import to_dict

    marker = paths.root / ".policy.sha256"
    digest = policy_digest(config)
    try:
        before = marker.read_text().strip()
    except FileNotFoundError:
        before = ""
    if before == digest:
        return False
    policy = canonical_json(to_dict(config.policy)).decode()
    append_audit(paths.audit, "policy_set" if not before else "policy_changed",
                 {"before": before or None, "after": digest, "policy": policy})
    atomic_write_text(marker, digest + "\n")
    return True


def load_node_config(paths: NodePaths) -> NodeConfig:
    """Load and validate node.yaml; a changed site policy is audited on the way."""
    config = load_yaml_config(NodeConfig, str(paths.config))
    if paths.audit.exists():
        record_policy(paths, config)
    return config
