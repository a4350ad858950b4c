"""How busy this machine's cores are, from /proc/stat: for benchmark records and a CLI warning.

``CpuShare`` reads the whole machine's busy CPU time when it is made and again when asked,
subtracts this process's own CPU time (its threads and its waited-for children included) and
states the rest: the cores other processes kept busy on average. Where /proc/stat cannot be
read it says so (``None``) instead of guessing.

Torch's CPU threads wait for each other at every parallel region, so a thread whose core is
taken by another process holds all of them back: on the 2-core box one busy core made two-thread
generator training 6x slower, not 2x (bench/RESULTS.md). ``warn_if_cores_busy`` tells whoever
starts a long CPU run on a shared server, before it starts, to set ``OMP_NUM_THREADS``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

__all__ = ["CpuShare", "busy_cores_warning", "warn_if_cores_busy"]


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


def busy_cores_warning(others: float, cores: int, threads: int) -> str | None:
    """The warning for ``threads`` torch threads when other processes keep ``others`` of
    ``cores`` busy, or None when the threads find their cores (within half a core)."""
    free = cores - others
    if threads <= 1 or free >= threads - 0.5:
        return None
    advice = (f"Set OMP_NUM_THREADS={max(1, round(free))} (the free cores) or run it when the"
              " machine is free" if free >= 0.5 else
              "No core is free: run it when the machine is free, or set OMP_NUM_THREADS=1")
    return (f"warning: other processes keep {others:.1f} of this machine's {cores} cores busy,"
            f" and this run uses {threads} CPU threads; threads that share a busy core can make"
            f" it several times slower. {advice}.")


def warn_if_cores_busy(device: str | None = None, *, interval_s: float = 0.3) -> str | None:
    """Before a long CPU run: measure the other processes' load for ``interval_s`` and print
    :func:`busy_cores_warning` on stderr if it applies (returned too). Silent on a CUDA
    device, under a multi-process launch (torchrun: the other ranks are this run's own) and
    where /proc/stat cannot be read."""
    import torch

    on_cuda = device.startswith("cuda") if device else torch.cuda.is_available()
    if on_cuda or int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        return None
    share = CpuShare()
    time.sleep(interval_s)
    others = share.others()
    if others is None:
        return None
    message = busy_cores_warning(others, os.cpu_count() or 1, torch.get_num_threads())
    if message:
        print(message, file=sys.stderr)
    return message
