"""The machine line of a benchmark record, with what other processes took during the run.

A benchmark's figures mean little without knowing whether it ran alone. ``CpuShare``
(``protocols.cpu``, shared with the CLI's busy-core warning) reads the whole machine's busy CPU
time from /proc/stat when the run starts and when it is recorded, subtracts this process's own
CPU time (its threads included) and its waited-for children's, and states the rest: the cores
other processes kept busy on average. Where /proc/stat cannot be read it says so.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

from protocols.cpu import CpuShare

__all__ = ["CpuShare", "cpu_model", "machine_line"]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_line(share: CpuShare, extra: str = "") -> str:
    """``N CPU cores (model), Python x, OMP_NUM_THREADS=..[, extra]; alone/shared: ...``"""
    parts = [f"{os.cpu_count()} CPU cores ({cpu_model()})", f"Python {platform.python_version()}"]
    if extra:
        parts.append(extra)
    parts.append(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    return ", ".join(parts) + "; " + share.describe()
