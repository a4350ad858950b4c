"""Generator hyperparameters as they appear in node.yaml (section ``generator``).

The preset named here fills every value left at its default; see ``node.generator.presets``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from protocols.typed import setting

__all__ = ["GeneratorSettings"]


@dataclass
class GeneratorSettings:
    preset: Literal["tiny", "cpu", "gpu"] = setting(
        "cpu", "tiny: CI/demo (<3 min on 2 cores); cpu: ~1 h on 2 cores at 64x64; gpu: 128x128+"
    )
    seed: int = setting(0, "seed of data order, initial weights and sampling")
