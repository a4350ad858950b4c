"""The benchmark records' machine line measures other processes' CPU use, not its own."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from machine import machine_line  # noqa: E402

from protocols.cpu import CpuShare, _busy_s  # noqa: E402

pytestmark = pytest.mark.skipif(not Path("/proc/stat").exists(), reason="needs /proc/stat")

SPIN = "import time\nend = time.monotonic() + {s}\nwhile time.monotonic() < end: pass\n"


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_another_process_spinning_a_core_is_counted() -> None:
    share = CpuShare()
    child = subprocess.Popen([sys.executable, "-c", SPIN.format(s=1.5)])
    time.sleep(1.6)
    others = share.others()  # before the wait: the child is another process here
    described = share.describe()
    child.wait()
    assert others is not None and others > 0.3
    assert described.startswith("shared")
    # Once waited for, a child's CPU time is this run's own (a benchmark's subprocesses).
    after = share.others()
    assert after is not None and after < others


def test_this_process_spinning_is_not_counted_as_another() -> None:
    # Compared with the raw machine-wide figure over the same time, so that other load on a
    # shared CI host cannot decide the test: what is taken out is exactly our own spin.
    busy0, times0, wall0 = _busy_s(), os.times(), time.monotonic()
    share = CpuShare()
    _spin(1.5)
    others = share.others()
    busy1, times1, wall = _busy_s(), os.times(), time.monotonic() - wall0
    assert others is not None and busy0 is not None and busy1 is not None
    own = (times1.user + times1.system - times0.user - times0.system) / wall
    raw = (busy1 - busy0) / wall
    assert own > 0.3  # the spin ran
    assert raw - others == pytest.approx(own, abs=0.1)
    line = machine_line(share, "torch threads 2")
    assert "torch threads 2" in line and "OMP_NUM_THREADS=" in line
