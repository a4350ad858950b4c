"""Time the guard's window search (shift / mirror / rotation) of one run's candidates.

    OMP_NUM_THREADS=1 .venv/bin/python bench/window_search_timer.py CODE_ROOT HOME [REPEATS]

``CODE_ROOT`` is the tree whose code runs (this checkout, or an older commit checked out with
``git worktree add /tmp/old COMMIT``), so two versions are compared in alternating processes
on the same candidates: 64 samples of the home's generator (seed 101, kept in
``/tmp/synthfed-window-timer-<home>.npy`` after the first run) and the run's 56 canaries
(seed 5). The window search is timed on the images the one-variant metrics did not reject
(what a generate run sends to it), in one thread, ``REPEATS`` times. Prints the median and
the least time and how many images were found closer than the threshold (which must agree
between versions). Nothing is written to RESULTS.md; copy the figures by hand.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np


def main() -> None:
    root, home = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
    repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    sys.path.insert(0, str(root))
    from threadpoolctl import threadpool_limits

    import node.guard.calibration as calibration
    from node.config import load_node_config, resolve_home
    from privacy.canaries import make_canaries

    paths = resolve_home(str(home))
    config = load_node_config(paths)
    state = calibration.prepare_guard(paths, config)
    ref = state.reference
    modality = ref.modalities[0]
    cache = Path(f"/tmp/synthfed-window-timer-{home.name}.npy")
    if not cache.exists():
        from node.generator.sampling import load_generator

        gen = load_generator(paths)
        np.save(cache, gen.sample(64, seed=101, modality=modality, batch_size=16))
    samples = np.load(cache).astype(np.float32)
    canaries = make_canaries(ref.images, config.guard.canaries_per_alteration,
                             np.random.default_rng(5),
                             rows=ref.rows(modality=modality, split="train"))
    mixed = np.concatenate([samples, canaries.images])
    guard = state.guard(modality)
    screening = guard.screen(mixed, search_rejected=False)
    metric = next(m for m in guard.metrics if guard.bounded(m))
    queries = mixed[~np.isnan(screening.distances[metric.name])]
    times = []
    with threadpool_limits(1, user_api="blas"):
        for _ in range(repeats):
            t0 = time.perf_counter()
            found = guard.decide(metric, queries)
            times.append(time.perf_counter() - t0)
    print(f"{root}: window search of {queries.shape[0]} images, one thread: median "
          f"{np.median(times):.4f} s, least {min(times):.4f} s; "
          f"{int(np.isfinite(found.sq[:, 0]).sum())} closer than the threshold")


if __name__ == "__main__":
    main()
