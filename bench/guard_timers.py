"""Where a generate run's guard time goes: one run with timers around its parts.

    OMP_NUM_THREADS=2 .venv/bin/python bench/guard_timers.py HOME SEED [COUNT]

Runs ``generate_and_screen`` (after one ``prepare_guard`` outside the timers, as a second run
finds it) and prints the run's own ``timing_s`` and the seconds spent in: ``prepare_guard``
(reference, calibration, encoder), ``GuardState.guard`` (building the guard), ``Guard.screen``
(of which ``workers``: the searches in the worker threads), ``make_canaries`` and
``build_report``. Nothing is written to RESULTS.md; copy the figures by hand.
"""

from __future__ import annotations

import collections
import functools
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TIMES: collections.defaultdict[str, float] = collections.defaultdict(float)


def _wrap(owner: Any, name: str, key: str) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            TIMES[key] += time.perf_counter() - t0

    setattr(owner, name, timed)


def main() -> None:
    import node.guard.calibration as calibration
    import node.guard.run as run
    import privacy.guard as guard
    from node.config import load_node_config, resolve_home

    home, seed = sys.argv[1], int(sys.argv[2])
    count = int(sys.argv[3]) if len(sys.argv) > 3 else 64
    _wrap(run, "prepare_guard", "prepare")
    _wrap(calibration.GuardState, "guard", "build")
    _wrap(guard.Guard, "screen", "screen")
    _wrap(guard.Guard, "_in_workers", "workers")
    _wrap(run, "make_canaries", "make_canaries")
    _wrap(run, "build_report", "build_report")
    paths = resolve_home(home)
    config = load_node_config(paths)
    calibration.prepare_guard(paths, config)
    TIMES.clear()
    result = run.generate_and_screen(paths, config, count, seed=seed, progress=False)
    print(result.report["timing_s"], {k: round(v, 3) for k, v in TIMES.items()})


if __name__ == "__main__":
    main()
