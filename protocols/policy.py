"""What a coordinator requires of a bundle before it reads it.

Fail-closed: a policy that requires nothing (no reviewer signature, no threshold floor, no
canary minimum) is refused when it is built, so "no policy by mistake" cannot pass. Floors are
per modality and per guard metric: a bundle whose threshold for a metric is below the floor,
or that does not report a metric the policy names, is refused; a modality the policy gives
floors for others but not for this one is refused too.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from protocols.errors import ConfigError
from protocols.typed import from_dict

__all__ = ["Policy", "load_policy", "MAX_POLICY_BYTES"]

MAX_POLICY_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Policy:
    required_reviewer_signatures: int = 1
    min_thresholds: dict[str, dict[str, float]] = field(default_factory=dict)
    min_canary_catch_rate: dict[str, float] = field(default_factory=dict)
    max_bundle_bytes: int = 512 * 1024 * 1024
    max_images: int = 10_000
    # A bundle whose predicate says it was approved by a scripted demo reviewer is refused
    # unless the policy says otherwise (only a demo coordinator should).
    allow_demo_auto_approved: bool = False

    def __post_init__(self) -> None:
        where = "policy"
        if isinstance(self.required_reviewer_signatures, bool) or not isinstance(
            self.required_reviewer_signatures, int
        ) or self.required_reviewer_signatures < 0:
            raise ConfigError("required_reviewer_signatures must be an integer >= 0", where)
        for name in ("max_bundle_bytes", "max_images"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer", where)
        for modality, floors in self.min_thresholds.items():
            if not floors:
                raise ConfigError(f"min_thresholds.{modality} names no metric", where)
            for metric, floor in floors.items():
                if not _finite(floor) or floor < 0:
                    raise ConfigError(
                        f"min_thresholds.{modality}.{metric} must be a number >= 0", where
                    )
        for name, rate in self.min_canary_catch_rate.items():
            if not _finite(rate) or not 0 <= rate <= 1:
                raise ConfigError(f"min_canary_catch_rate.{name} must be in [0, 1]", where)
        if (
            self.required_reviewer_signatures == 0
            and not self.min_thresholds
            and not self.min_canary_catch_rate
        ):
            raise ConfigError(
                "policy requires nothing (no reviewer signature, no threshold floor, no canary "
                "minimum); refusing a policy that would accept any signed bundle",
                where,
            )

    @classmethod
    def from_dict(cls, data: Any, where: str = "policy") -> Policy:
        if not isinstance(data, dict):
            raise ConfigError("policy must be a mapping", where)
        try:
            return from_dict(cls, data, where)
        except ConfigError as exc:
            raise ConfigError(exc.what, where) from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _finite(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(
        value
    )


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Read a policy from JSON (``.json``) or YAML (anything else); strict."""
    p = Path(path)
    try:
        size = p.stat().st_size
    except FileNotFoundError:
        raise ConfigError("policy file not found", str(p)) from None
    if size > MAX_POLICY_BYTES:
        raise ConfigError(f"policy file is {size} bytes, over the limit", str(p))
    text = p.read_bytes()
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            data = yaml.safe_load(text)
    except (json.JSONDecodeError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"policy file does not parse: {exc}".splitlines()[0], str(p)) from None
    return Policy.from_dict(data, str(p))
