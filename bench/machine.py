"""The machine line of a benchmark record, with what other processes took during the run.

A benchmark's figures mean little without knowing whether it ran alone. ``CpuShare`` reads
the whole machine's busy CPU time from /proc/stat when the run starts and when it is recorded,
subtracts this process's own CPU time (its threads included) and its waited-for children's,
and states the rest: the cores other processes kept busy on average. Where /proc/stat cannot
be read it says so instead of guessing.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

__all__ = ["CpuShare", "cpu_model", "machine_line"]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _busy_s() -> float | None:
    """Busy CPU seconds of the whole machine since boot (all cores), or None."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(v) for v in fields[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    busy = sum(ticks[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


def _own_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class CpuShare:
    """Started at construction; :meth:`others` is the average number of cores other processes
    kept busy since then."""

    def __init__(self) -> None:
        self.wall0, self.busy0, self.own0 = time.monotonic(), _busy_s(), _own_s()

    def others(self) -> float | None:
        busy = _busy_s()
        wall = time.monotonic() - self.wall0
        if busy is None or self.busy0 is None or wall <= 0:
            return None
        return max(0.0, (busy - self.busy0) - (_own_s() - self.own0)) / wall

    def describe(self) -> str:
        others = self.others()
        if others is None:
            return "other processes' CPU use not measured (/proc/stat unreadable)"
        verdict = "alone" if others < 0.1 else "shared"
        return (f"{verdict}: other processes kept {others:.2f} of {os.cpu_count()} cores busy on"
                " average during the run (/proc/stat less this process)")


def machine_line(share: CpuShare, extra: str = "") -> str:
    """``N CPU cores (model), Python x, OMP_NUM_THREADS=..[, extra]; alone/shared: ...``"""
    parts = [f"{os.cpu_count()} CPU cores ({cpu_model()})", f"Python {platform.python_version()}"]
    if extra:
        parts.append(extra)
    parts.append(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    return ", ".join(parts) + "; " + share.describe()
