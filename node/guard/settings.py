"""Guard settings as they appear in node.yaml (section ``guard``)."""

from __future__ import annotations

from dataclasses import dataclass

from protocols.typed import setting

__all__ = ["GuardSettings"]


@dataclass
class GuardSettings:
    threshold_quantile: float = setting(
        0.01,
        "default threshold = this quantile of holdout-patient-to-nearest-train distances",
    )
    max_shift_px: int = setting(4, "shift-tolerant metric: largest integer shift tried (pixels)")
