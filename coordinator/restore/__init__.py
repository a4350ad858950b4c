"""Shared restoration networks: degradations, networks, metrics, training, evaluation, the
comparison of training arms and its report.

Heavy modules (torch) load on first use; ``from coordinator.restore import degrade`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "compare",
    "degrade",
    "evaluate",
    "fedavg",
    "metrics",
    "nets",
    "report",
    "stats",
    "train",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return importlib.import_module(f"coordinator.restore.{name}")
    raise AttributeError(name)
