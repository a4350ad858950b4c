"""Run a snippet in a fresh interpreter and say which modules it imported (import-cost tests)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterable


def imported_after(code: str, modules: Iterable[str]) -> list[str]:
    """Those of ``modules`` in ``sys.modules`` after ``code`` ran in a new interpreter."""
    names = tuple(modules)
    probe = (f"{code}\nimport sys\n"
             f"print('IMPORTED=' + ','.join(m for m in {names!r} if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("IMPORTED="), proc.stdout
    return [m for m in line.removeprefix("IMPORTED=").split(",") if m]
