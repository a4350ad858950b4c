"""A long CPU run warns before it starts when other processes hold the cores its threads need."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from protocols.cpu import busy_cores_warning, warn_if_cores_busy

SPIN = "import time\nend = time.monotonic() + {s}\nwhile time.monotonic() < end: pass\n"


@pytest.mark.parametrize(
    ("others", "cores", "threads", "fit"),
    [(1.0, 2, 2, 1), (1.02, 2, 2, 1), (1.9, 2, 2, 1), (3.0, 4, 4, 1), (2.6, 4, 4, 1),
     (6.0, 16, 16, 10)],
)
def test_threads_without_free_cores_are_warned_about(
    others: float, cores: int, threads: int, fit: int
) -> None:
    message = busy_cores_warning(others, cores, threads)
    assert message is not None
    assert f"OMP_NUM_THREADS={fit}" in message
    assert f"{others:.1f} of this machine's {cores} cores" in message
    assert ("No core is free" in message) == (cores - others < 0.5)


@pytest.mark.parametrize(
    ("others", "cores", "threads"),
    [(0.0, 2, 2), (0.4, 2, 2), (1.0, 2, 1), (3.0, 2, 1), (1.0, 4, 2), (6.0, 16, 8)],
)
def test_threads_that_find_free_cores_are_not_warned_about(
    others: float, cores: int, threads: int
) -> None:
    assert busy_cores_warning(others, cores, threads) is None


@pytest.mark.skipif(not Path("/proc/stat").exists() or (os.cpu_count() or 1) < 2,
                    reason="needs /proc/stat and two cores")
@pytest.mark.parametrize("world_size", ["", "1", "2"])
def test_a_process_spinning_a_core_is_measured_and_warned_about(
    world_size: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Warned about alone; not under torchrun with several ranks (they are the run itself)."""
    if world_size:
        monkeypatch.setenv("WORLD_SIZE", world_size)
    else:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # as many threads as cores, the default
    child = subprocess.Popen([sys.executable, "-c", SPIN.format(s=2.5)])
    try:
        time.sleep(0.5)  # the child is up and spinning
        message = warn_if_cores_busy("cpu", interval_s=1.0)
    finally:
        child.wait()
        torch.set_num_threads(before)
    if world_size == "2":
        assert message is None and capsys.readouterr().err == ""
    else:
        assert message is not None and "OMP_NUM_THREADS=" in message
        assert message in capsys.readouterr().err


def test_a_cuda_run_is_never_warned_about(capsys: pytest.CaptureFixture[str]) -> None:
    assert warn_if_cores_busy("cuda:0", interval_s=0.0) is None
    assert capsys.readouterr().err == ""
