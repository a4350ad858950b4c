"""Benchmarks of the distance guard; figures are appended to bench/RESULTS.md.

``catch``: on real data (``../shared/data``), CT and MR separately, each ingested into a fresh
node home: the guard's calibration at the default settings, the catch rate per canary
alteration (canaries screened against every real slice, as in a run), and the false-rejection
rate of genuinely new patients (holdout slices screened against the train slices only, at the
calibrated thresholds; plus a cross-fitted figure where thresholds come from one half of the
holdout patients and are applied to the other half).

``frr``: nested cross-fitted false rejection. Patients are split into groups; each group in
turn plays the new patients, and the encoder, the calibration and the reference come from the
other patients only (as a site that never saw them would have them), for the site's own
calibration method and for leave-patients-out calibration over every slice.

``--which`` (``catch`` and ``frr``): ``ct`` (the three CT folders in one home), ``mr``
(brain-tumor-t1c with its 233 patient IDs) and ``mr-merged`` (the same slices with the IDs that
differ only by a trailing letter counted as one patient, 209: the data README's cautious
grouping; with 233 IDs a "new" patient can have a same-named twin in the reference).

``throughput``: exact screening (privacy.search.ExactIndex, pixel RMSE) against plain faiss
``IndexFlatL2`` brute force on the same reference, in one run, at several reference sizes and
image sizes; decisions compared one by one. Reference sets are generated from the real MR
slices (random real slices resampled, shifted, re-contrasted, mixed in pairs, with noise), so
they have the structure of real images.

``skip``: one run's screening (generator samples and the run's canaries), alternately with and
without the window search of images a one-variant metric already rejected, in one process:
times, ratio, and whether every decision is the same.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_guard.py catch [--per-alteration 200]
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_guard.py frr [--which ct,mr] [--folds 10]
        [--methods site,leave-patients-out]
    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_guard.py throughput [--sizes 64,128]
    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_guard.py skip --home HOME [--count 64]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from machine import CpuShare, machine_line  # noqa: E402
from mr_patients import merged_patients_csv  # noqa: E402

SHARE = CpuShare()  # other processes' CPU use, from import to each record
DATA = REPO.parent / "shared" / "data"
RESULTS = REPO / "bench" / "RESULTS.md"
_T = TypeVar("_T")


def _machine() -> str:
    return machine_line(SHARE)


def _append(section: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    RESULTS.write_text(text.rstrip("\n") + "\n\n" + section.strip("\n") + "\n")


# ---- catch rates and false rejections -----------------------------------------------------


def _home(which: str, root: Path) -> Path:
    from node.config import load_node_config
    from node.home import init_home
    from node.ingest.pipeline import ingest_sources

    home = root / f"home_{which}"
    if (home / "node.yaml").exists():
        return home
    paths = init_home(home, f"bench-{which}")
    config = load_node_config(paths)
    if which == "ct":
        sources = [DATA / "ct" / n for n in ("covid-ny-sbu", "tcga-luad", "pancreatic-ct-cbct-seg")]
        ingest_sources(paths, config, sources, progress=False)
    else:
        folder = DATA / "mr" / "brain-tumor-t1c"
        csv = folder / "patients.csv"
        if which == "mr-merged":
            csv = merged_patients_csv(csv, root / "patients-merged.csv")
        ingest_sources(paths, config, [folder], modality="MR",
                       plane="any", patient_rule=f"csv:{csv}", progress=False)
    return home


def _catch(which: str, root: Path, per_alteration: int) -> list[str]:
    from node.config import NodePaths, load_node_config
    from node.guard.calibration import prepare_guard
    from privacy.canaries import ALTERATIONS, catch_rates, make_canaries
    from privacy.guard import Guard

    home = _home(which, root)
    paths = NodePaths(home)
    config = load_node_config(paths)
    t0 = time.perf_counter()
    state = prepare_guard(paths, config, progress=False, recalibrate=True)
    calib_s = time.perf_counter() - t0
    modality = state.reference.modalities[0]
    thresholds = state.thresholds(modality)
    cal = state.calibration["modalities"][modality]
    ref = state.reference
    train_rows = ref.rows(modality=modality, split="train")
    hold_rows = ref.rows(modality=modality, split="holdout")
    canaries = make_canaries(ref.images[train_rows], per_alteration, np.random.default_rng(123))
    t0 = time.perf_counter()
    screening = state.guard(modality).screen(canaries.images)
    screen_s = time.perf_counter() - t0
    rates = catch_rates(canaries.kinds, ~screening.accepted)
    per_metric = {
        m: catch_rates(canaries.kinds, screening.distances[m] < thresholds[m]) for m in thresholds
    }
    # New patients: holdout slices against the train slices only.
    train_guard = Guard(state.metrics, ref.images[train_rows], thresholds,
                        n_components=state.settings.pca_components)
    hold = train_guard.screen(ref.images[hold_rows])
    frr = 1.0 - float(hold.accepted.mean())
    frr_metric = {m: float((hold.distances[m] < thresholds[m]).mean()) for m in thresholds}
    # Cross-fitted: thresholds from half the holdout patients, applied to the other half.
    d = state.new_patient[modality]
    patients = np.asarray([ref.records[i].patient for i in hold_rows.tolist()])
    uniq = sorted(set(patients.tolist()))
    halves = [np.isin(patients, uniq[0::2]), np.isin(patients, uniq[1::2])]
    q = state.settings.threshold_quantile
    cross = []
    for a, b in ((0, 1), (1, 0)):
        if halves[a].sum() == 0 or halves[b].sum() == 0:
            continue
        thr = {m: float(np.quantile(d[m][halves[a]], q, method="lower")) for m in thresholds}
        rejected = np.zeros(int(halves[b].sum()), dtype=bool)
        for m in thresholds:
            rejected |= d[m][halves[b]] < thr[m]
        cross.append(float(rejected.mean()))
    lines = [
        f"### {which.upper()}: {len(ref.records)} slices ({train_rows.size} train, "
        f"{hold_rows.size} holdout), calibration method {cal['method']}",
        "",
        f"- calibration (encoder training + thresholds): {calib_s:.1f} s; screening "
        f"{len(canaries.kinds)} canaries against all {len(ref.records)} slices: {screen_s:.1f} s",
        "- thresholds: " + ", ".join(f"{m} {v:.4f}" for m, v in thresholds.items()),
        "- expected false rejection per metric (rank bound (j+1)/(n+1)): "
        + ", ".join(
            f"{m} {cal['metrics'][m]['expected_false_rejection']:.3f}" for m in thresholds
        ),
        "",
        "| alteration | planted | caught (any metric) | catch rate | "
        + " | ".join(f"{m} alone" for m in thresholds) + " |",
        "| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in thresholds) + " |",
    ]
    for kind in ALTERATIONS:
        r = rates[kind]
        lines.append(
            f"| {kind} | {r['planted']} | {r['caught']} | {100 * float(r['rate']):.1f} % | "
            + " | ".join(f"{100 * float(per_metric[m][kind]['rate']):.1f} %" for m in thresholds)
            + " |"
        )
    lines += [
        "",
        f"- false rejection of new patients (holdout {hold_rows.size} slices vs train only, "
        f"calibrated thresholds, in-sample): {100 * frr:.1f} % "
        f"({int(round(frr * hold_rows.size))} slices); per metric "
        + ", ".join(f"{m} {100 * v:.1f} %" for m, v in frr_metric.items()),
        "- cross-fitted false rejection (thresholds from half the holdout patients, applied "
        "to the other half; both ways): " + ", ".join(f"{100 * c:.1f} %" for c in cross),
        "",
    ]
    return lines


def _per_home_run(
    args: argparse.Namespace,
    title: str,
    command: str,
    about: str,
    section: Callable[[str, Path], list[str]],
) -> None:
    """One RESULTS.md section: a header, then ``section(which, work root)`` per home."""
    root = Path(args.work)
    root.mkdir(parents=True, exist_ok=True)
    lines = [
        f"## Guard: {title} ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        f"- machine: {_machine()}",
        f"- command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} .venv/bin/python "
        f"bench/bench_guard.py {command}`",
        f"- {about}",
        "",
    ]
    for which in args.which.split(","):
        lines += section(which, root)
        print("\n".join(lines), flush=True)
    _append("\n".join(lines))


def run_catch(args: argparse.Namespace) -> None:
    _per_home_run(
        args,
        "canary catch rates and false rejections",
        f"catch --per-alteration {args.per_alteration}",
        "default guard settings (quantile 0.01, shift 4 px, PCA 256, encoder 400 steps, seed 0)"
        "; CT = the three CT folders in one home (axial), MR = brain-tumor-t1c with its "
        "patients.csv; image size 64",
        lambda which, root: _catch(which, root, args.per_alteration),
    )


# ---- nested cross-fitted false rejection --------------------------------------------------


def _wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion k / n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _frr(which: str, root: Path, n_folds: int, methods: tuple[str, ...]) -> list[str]:
    """Each patient group in turn is the new patient: the site is everything else.

    The encoder is trained, the thresholds calibrated and the reference built from the other
    patients only, exactly as a site without that group would; then the group's slices are
    screened. ``methods`` names the calibrations of that site: ``site`` (make_folds on its own
    split, as deployed) and/or ``leave-patients-out`` over every slice (all splits pooled).
    """
    from node.config import NodePaths, load_node_config
    from node.guard.calibration import build_metrics, encoder_config
    from node.guard.reference import load_reference
    from privacy.calibrate import calibrate_thresholds, make_folds
    from privacy.encoder import make_embedder, train_encoder
    from privacy.errors import GuardError
    from privacy.guard import Guard

    home = _home(which, root)
    paths = NodePaths(home)
    config = load_node_config(paths)
    settings = config.guard
    ref = load_reference(paths)
    modality = ref.modalities[0]
    rows = ref.rows(modality=modality)
    images = ref.images[rows]
    recs = [ref.records[i] for i in rows.tolist()]
    patients = np.asarray([r.patient for r in recs])
    uniq = sorted(set(patients.tolist()))
    np.random.default_rng(7).shuffle(uniq)
    groups = [uniq[i::n_folds] for i in range(min(n_folds, len(uniq)))]
    rejected = {m: np.zeros(len(recs), dtype=bool) for m in methods}
    by_metric = {m: {name: np.zeros(len(recs), dtype=bool) for name in settings.metrics}
                 for m in methods}
    thresholds_seen: dict[str, dict[str, list[float]]] = {m: {} for m in methods}
    refused: dict[str, int] = {m: 0 for m in methods}
    used_method: dict[str, set[str]] = {m: set() for m in methods}
    enc_cfg = encoder_config(settings, int(images.shape[1]))
    t0 = time.perf_counter()
    for group in groups:
        new = np.isin(patients, group)
        rest = np.flatnonzero(~new)
        sub = [recs[i] for i in rest.tolist()]
        train_rows = np.asarray([i for i, r in zip(rest, sub, strict=True) if r.split == "train"])
        if train_rows.size < 2:
            train_rows = rest
        state, _ = train_encoder(images[train_rows], enc_cfg)
        metrics = build_metrics(settings, make_embedder(state, enc_cfg), {})
        for method in methods:
            splits = [r.split for r in sub] if method == "site" else ["train"] * len(sub)
            how, folds = make_folds(
                [r.patient for r in sub], splits, [r.series for r in sub],
                [r.position for r in sub], k=settings.calibration_folds, gap=settings.slab_gap,
            )
            used_method[method].add(how)
            try:
                cal = calibrate_thresholds(
                    metrics, images[rest], folds, how, settings.threshold_quantile,
                    floors=dict(config.policy.guard_floor), n_components=settings.pca_components,
                )
            except GuardError:
                refused[method] += 1  # the site could not calibrate: it would export nothing
                rejected[method][new] = True
                continue
            thr = cal.thresholds
            for name, v in thr.items():
                thresholds_seen[method].setdefault(name, []).append(v)
            guard = Guard(metrics, images[rest], thr, n_components=settings.pca_components)
            scr = guard.screen(images[new])
            rejected[method][new] = ~scr.accepted
            for name in thr:
                by_metric[method][name][new] = scr.distances[name] < thr[name]
    wall = time.perf_counter() - t0
    n = len(recs)
    lines = [
        f"### {which.upper()}: {n} slices of {len(uniq)} patients, {len(groups)} patient groups",
        "",
        f"- wall time: {wall:.0f} s ({len(groups)} encoders trained, "
        f"{len(methods)} calibration(s) each)",
        "",
        "| calibration of the site without the group | slices screened | falsely rejected | "
        "rate (95 % CI) | patient-weighted rate | "
        + " | ".join(f"{m} alone" for m in settings.metrics) + " | threshold range over groups |",
        "| --- | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in settings.metrics)
        + " | --- |",
    ]
    for method in methods:
        k = int(rejected[method].sum())
        lo, hi = _wilson(k, n)
        per_patient = np.mean([rejected[method][patients == p].mean() for p in uniq])
        ranges = "; ".join(
            f"{name} {min(v):.3f}–{max(v):.3f}" for name, v in thresholds_seen[method].items()
        )
        label = f"{method} ({', '.join(sorted(used_method[method]))})"
        if refused[method]:
            label += f"; {refused[method]} groups refused (counted as rejected)"
        lines.append(
            f"| {label} | {n} | {k} | {100 * k / n:.1f} % ({100 * lo:.1f}–{100 * hi:.1f} %) | "
            f"{100 * per_patient:.1f} % | "
            + " | ".join(f"{100 * by_metric[method][m].mean():.1f} %" for m in settings.metrics)
            + f" | {ranges} |"
        )
    first = methods[0]
    worst = sorted(uniq, key=lambda p: -rejected[first][patients == p].sum())[:3]
    lines += [
        "",
        f"- patients with the most falsely rejected slices ({first} calibration): "
        + ", ".join(
            f"{int(rejected[first][patients == p].sum())} of {int((patients == p).sum())}"
            for p in worst
        ),
        "",
    ]
    return lines


def run_frr(args: argparse.Namespace) -> None:
    methods = tuple(args.methods.split(","))
    unknown = set(methods) - {"site", "leave-patients-out"}
    if unknown or not methods:
        raise SystemExit(f"--methods: unknown {sorted(unknown)}; use site,leave-patients-out")
    _per_home_run(
        args,
        "nested cross-fitted false rejection of new patients",
        f"frr --which {args.which} --folds {args.folds} --methods {args.methods}",
        "each patient group in turn plays the new patients; the encoder, the calibration and "
        "the reference come from the other patients only, so no figure is in-sample; default "
        "guard settings (quantile 0.01, shift 4 px, PCA 256, encoder 400 steps), image size 64",
        lambda which, root: _frr(which, root, args.folds, methods),
    )


# ---- throughput against faiss brute force -------------------------------------------------


def _real_mr(size: int) -> np.ndarray:
    from node.ingest.images import read_image
    from node.ingest.normalise import intensity_window, normalise_slice

    files = sorted((DATA / "mr" / "brain-tumor-t1c").rglob("*.jpg"))
    out = []
    for path in files:
        values = read_image(path.read_bytes())
        window = intensity_window(values, "MR", ct_window_hu=(-1024, 3071),
                                  percentiles=(0.5, 99.5), fixed_window=False)
        if window is None:
            continue
        out.append(normalise_slice(values, window, size, None).pixels)
    return np.stack(out).astype(np.float32)


def _mem_gib() -> float:
    with open("/proc/meminfo") as fh:
        return int(fh.readline().split()[1]) / (1 << 20)


def _synthetic(
    base: np.ndarray, n: int, seed: int, chunk: int = 20000, spill: Path | None = None
) -> np.ndarray:
    """n realistic slices (float16): real slices shifted, re-contrasted, mixed and noised.

    With ``spill`` they are written to that file as a float16 memory map instead of memory
    (for a reference larger than the machine's memory); the caller deletes the file.
    """
    rng = np.random.default_rng(seed)
    size = base.shape[1]
    out: np.ndarray
    if spill is None:
        out = np.empty((n, size, size), dtype=np.float16)
    else:
        out = np.lib.format.open_memmap(spill, mode="w+", dtype=np.float16, shape=(n, size, size))
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        a = base[rng.integers(0, len(base), m)]
        b = base[rng.integers(0, len(base), m)]
        w = rng.uniform(0.55, 1.0, size=(m, 1, 1)).astype(np.float32)
        img = w * a + (1 - w) * b
        img *= rng.uniform(0.8, 1.2, size=(m, 1, 1)).astype(np.float32)
        dy, dx = rng.integers(-6, 7, size=2)
        img = np.roll(img, (int(dy), int(dx)), axis=(1, 2))
        img += rng.normal(0, 0.01, size=img.shape).astype(np.float32)
        out[start : start + m] = np.clip(img, 0, 1)
    return out


def _faiss_brute(reference: np.ndarray, queries: np.ndarray, chunk: int) -> np.ndarray:
    """Squared L2 nearest distance by plain IndexFlatL2, the reference added in chunks."""
    import faiss

    dim = queries.shape[1]
    best = np.full(queries.shape[0], np.inf, dtype=np.float32)
    for start in range(0, reference.shape[0], chunk):
        index = faiss.IndexFlatL2(dim)
        index.add(np.ascontiguousarray(reference[start : start + chunk], dtype=np.float32))
        d, _ = index.search(queries, 1)
        best = np.minimum(best, d[:, 0])
        del index
    return best


def run_throughput(args: argparse.Namespace) -> None:
    from privacy.search import ExactIndex, index_layout

    started = datetime.now(UTC)
    lines = [
        f"## Guard: exact screening vs faiss IndexFlatL2 brute force ({started:%Y-%m-%d %H:%M}"
        " UTC)",
        "",
        f"- machine: {_machine()}",
        f"- command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} .venv/bin/python "
        f"bench/bench_guard.py throughput --sizes {args.sizes} --refs {args.refs} "
        f"--queries {args.queries} --components {args.components} --blocks {args.blocks} "
        f"--ram-gib {args.ram_gib}{' --spill ' + args.spill if args.spill else ''}`",
        "- metric: pixel RMSE (one variant per query); reference: generated from the real MR "
        "slices (mixes of two slices, contrast x0.8-1.2, shifts, noise), stored float16; "
        "queries: other generated slices (from held-out real slices); threshold midway between "
        "the two smallest exact nearest distances, so both outcomes occur",
        "- guard = ExactIndex.nearest (exact distances, float64) after the proven bound "
        "(privacy.search.index_layout for one variant per query: global PCA axes + 64 "
        "residual blocks) and the proven float32 GEMM interval filter "
        "('exact pairs' counts the float64 evaluations only); a reference of at most "
        "2^26 entries (10k slices at 64x64) takes the dense path instead: one float32 GEMM "
        "of every pair with its proven interval, float64 for the pairs it cannot decide; "
        "brute force = faiss.IndexFlatL2 over the same reference (float32, added in chunks of "
        "100k rows), decisions from its float32 distances; build = the guard's one-off "
        "projection of the reference (cached at a site), reported apart",
        "",
        "| image | references | queries | guard build s | guard screen s | guard img/s | "
        "brute force s | brute img/s | speed-up | exact pairs / brute pairs | same decisions |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    budget_bytes = args.ram_gib * (1 << 30)
    spilled: list[str] = []
    for size in [int(s) for s in args.sizes.split(",")]:
        base = _real_mr(size)
        rng = np.random.default_rng(7)
        holdout = base[rng.permutation(len(base))[: len(base) // 5]]
        train = np.delete(base, np.arange(len(base))[: len(base) // 5], axis=0)
        for n in [int(v) for v in args.refs.split(",")]:
            gib = n * size * size * 2 / (1 << 30)  # the reference as float16
            spill = None
            if gib * 1.3 * (1 << 30) > budget_bytes:  # + working space
                if not args.spill:
                    lines.append(
                        f"| {size}x{size} | {n:,} | - | - | - | - | - | - | - | - | does not fit: "
                        f"{gib:.1f} GiB as float16 (+ working space) > {args.ram_gib} GiB budget |"
                    )
                    continue
                spill = Path(args.spill) / f"reference-{size}-{n}.npy"
                spill.parent.mkdir(parents=True, exist_ok=True)
                spilled.append(f"{size}x{size} {n:,} ({gib:.1f} GiB)")
            t0 = time.perf_counter()
            reference = _synthetic(train, n, seed=n + size, spill=spill)
            if spill is not None:
                print(f"{size}x{size} {n:,}: reference written to {spill} in "
                      f"{time.perf_counter() - t0:.0f} s", flush=True)
            queries = _synthetic(holdout, args.queries, seed=99).reshape(args.queries, -1)
            queries = queries.astype(np.float32)
            flat = reference.reshape(n, -1)
            t0 = time.perf_counter()
            layout = index_layout(1, args.components)  # what the guard uses for pixel RMSE
            if args.blocks:
                layout["blocks"] = args.blocks
            index = ExactIndex(flat, **layout)
            build = time.perf_counter() - t0
            t0 = time.perf_counter()
            near = index.nearest(queries[:, None, :], k=1)
            guard_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            brute_sq = _faiss_brute(flat, queries, 100_000)
            brute_s = time.perf_counter() - t0
            scale = 1.0 / size
            exact = np.sqrt(near.sq[:, 0]) * scale
            # Midway between two order statistics, so no query sits exactly on the threshold.
            ordered = np.sort(exact)
            threshold = float(0.5 * (ordered[0] + ordered[1]))
            guard_accept = exact >= threshold
            brute_accept = np.sqrt(np.maximum(brute_sq, 0)) * scale >= threshold
            same = int((guard_accept == brute_accept).sum())
            ratio = near.evaluated.sum() / (args.queries * n)
            lines.append(
                f"| {size}x{size} | {n:,} | {args.queries} | {build:.1f} | {guard_s:.2f} | "
                f"{args.queries / guard_s:.1f} | {brute_s:.2f} | {args.queries / brute_s:.1f} | "
                f"{brute_s / guard_s:.1f}x | {ratio:.2e} | {same}/{args.queries} |"
            )
            print(lines[-1], flush=True)
            del reference, flat, index
            if spill is not None:
                spill.unlink()
    lines += [
        "",
        *(
            [
                f"- reference held on disk as a float16 memory map (`--spill`), not in memory: "
                f"{', '.join(spilled)}; both searches read it from there (the guard: once to "
                "build its projection, then only the candidate rows; faiss: every row, in "
                "chunks of 100k made float32); what the page cache cannot hold is read from disk "
                f"each time (memory here: {_mem_gib():.0f} GiB)"
            ]
            if spilled
            else []
        ),
        "- 'same decisions' compares accept / reject at the threshold; where they differ, "
        "faiss's float32 distance fell on the other side of the threshold (the guard's float64 "
        "distance is the exact one, checked against brute force in tests/test_privacy_search.py)",
        "",
    ]
    _append("\n".join(lines))


# ---- guard cost in a normal generate run --------------------------------------------------


def run_cost(args: argparse.Namespace) -> None:
    """generate_and_screen on a home with a trained generator: sampling vs guard seconds."""

    from node.config import load_node_config, resolve_home
    from node.guard.calibration import prepare_guard
    from node.guard.run import generate_and_screen
    from privacy.guard import blas_threads

    if args.numpy_hugepages:  # the A/B's other arm: numpy's own huge-page advice kept
        os.environ["NUMPY_MADVISE_HUGEPAGE"] = "1"
    if args.gc_default:  # the A/B's other arm: the collector walks every object
        os.environ["SYNTHFED_GC_FREEZE"] = "0"
    paths = resolve_home(args.home)
    config = load_node_config(paths)
    t0 = time.perf_counter()
    prepare_guard(paths, config, progress=False)
    prepare_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    run = generate_and_screen(paths, config, args.count, seed=args.seed, progress=False,
                              search_rejected=args.search_rejected)
    whole_s = time.perf_counter() - t0
    timing = run.report["timing_s"]
    figure = timing["report_figure"]
    ratio = timing["guard"] / timing["sampling"]
    flag = (" --search-rejected" if args.search_rejected else "") + (
        " --numpy-hugepages" if args.numpy_hugepages else "") + (
        " --gc-default" if args.gc_default else "")
    window = ("every image (--search-rejected)" if args.search_rejected
              else "only the images no one-variant metric rejected (the default)")
    pages = ("kept (--numpy-hugepages)" if args.numpy_hugepages
             else "off during the run (the default)")
    freeze = ("not frozen (--gc-default)" if args.gc_default
              else "frozen during the run (the default)")
    ratio_all = (timing["guard"] + figure) / timing["sampling"]
    tried = run.report["candidates_tried"]
    section = f"""
## Guard: cost in a generate run ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)

- machine: {_machine()}
- command: `OMP_NUM_THREADS={os.environ.get("OMP_NUM_THREADS")} .venv/bin/python
  bench/bench_guard.py cost --home {args.home} --count {args.count} --seed {args.seed}{flag}`
- window search: {window}; numpy's huge-page advice for new arrays: {pages}; objects
  that exist when the run starts: {freeze}
- home: {args.label or "not described (no --label given)"}
- guard preparation before the run (reference, calibration, encoder; kept after the first
  run): {prepare_s:.1f} s
- generate: {run.report["exported"]} exported of {tried} sampled;
  sampling {timing["sampling"]:.2f} s, guard {timing["guard"]:.2f} s (every metric, the run's
  canaries, and the run's own loading of the guard: reference, calibration, kept indexes and
  features); search threads {blas_threads()}: guard / sampling = {ratio:.1%}
- the whole run (loading the generator, sampling, guard, writing the run folder):
  {whole_s:.2f} s
- the run's report figure (distance histograms, drawn once per run): {figure:.2f} s;
  guard and figure together / sampling = {ratio_all:.1%}
"""
    print(section)
    _append(section)

# ---- per-metric screening time, old search vs tile cascade, in one run ---------------------


def _home_samples(args: argparse.Namespace) -> tuple[Any, str, np.ndarray, float]:
    """(guard state, modality, ``args.count`` generator samples, seconds to sample them) of
    the home ``args.home`` (DPM-Solver, batches of 16, seed ``args.seed``)."""
    from node.config import load_node_config, resolve_home
    from node.generator.sampling import load_generator
    from node.guard.calibration import prepare_guard

    paths = resolve_home(args.home)
    config = load_node_config(paths)
    state = prepare_guard(paths, config, progress=False)
    gen = load_generator(paths)
    modality = gen.modalities[0]
    t0 = time.perf_counter()
    samples = np.asarray(gen.sample(args.count, seed=args.seed, modality=modality,
                                    batch_size=16), dtype=np.float32)
    return state, modality, samples, time.perf_counter() - t0


def run_metrics(args: argparse.Namespace) -> None:
    """Per-metric screening time on generator samples; the shift metric by both searches."""
    from privacy.guard import metric_nearest
    from privacy.search import ExactIndex, index_layout
    from privacy.tiles import TileIndex

    state, modality, samples, sampled_s = _home_samples(args)
    sampling = sampled_s / args.count
    t0 = time.perf_counter()
    guard = state.guard(modality)
    build = time.perf_counter() - t0
    guard.screen(samples[:4])  # imports and first-call costs out of the timings
    rows = []
    for m in guard.metrics:
        t0 = time.perf_counter()
        res = guard.decide(m, samples) if guard.bounded(m) else guard.nearest(m, samples, k=2)
        took = (time.perf_counter() - t0) / args.count
        how = "tile cascade, capped at the threshold" if guard.bounded(m) else "ExactIndex k = 2"
        rows.append(f"| {m.name} | {how} | {took * 1e3:.2f} | {res.evaluated.mean():.1f} |")
    t0 = time.perf_counter()
    screening = guard.screen(samples)
    total = (time.perf_counter() - t0) / args.count
    shift = next(m for m in guard.metrics if guard.bounded(m))
    feats = shift.reference_features(state.reference.images)
    thr = guard.thresholds[shift.name]
    scale = shift.scale(guard.image_shape)
    t0 = time.perf_counter()
    old = ExactIndex(feats, n_components=state.settings.pca_components,
                     **{k: v for k, v in index_layout(shift.n_variants()).items()
                        if k != "n_components"})
    old_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    old_res = metric_nearest(shift, old, samples, k=2)
    old_s = (time.perf_counter() - t0) / args.count
    windows = shift.windows(samples)
    assert windows is not None
    tiles = TileIndex(feats, windows.shape)
    t0 = time.perf_counter()
    knn = tiles.nearest(windows, k=2)
    knn_s = (time.perf_counter() - t0) / args.count
    knn_same = bool(np.array_equal(knn.sq, old_res.sq))
    t0 = time.perf_counter()
    capped = guard.decide(shift, samples)
    new_s = (time.perf_counter() - t0) / args.count
    old_d = np.sqrt(old_res.sq[:, 0]) * scale
    new_d = screening.distances[shift.name]
    same = int(np.sum((old_d < thr) == (new_d < thr)))
    exact_below = old_d < thr
    below_equal = bool(np.array_equal(old_d[exact_below], new_d[exact_below]))
    bound_ok = bool(np.all(new_d[~exact_below] >= thr) and np.all(new_d <= old_d + 0.0))
    stamp = f"{datetime.now(UTC):%Y-%m-%d %H:%M}"
    section = f"""
## Guard: screening time per metric, the shift metric by both searches ({stamp} UTC)

- machine: {_machine()}
- command: `OMP_NUM_THREADS={os.environ.get("OMP_NUM_THREADS")} .venv/bin/python
  bench/bench_guard.py metrics --home {args.home} --count {args.count} --seed {args.seed}`
- home: {args.label}; {len(state.reference.records):,} reference slices; {args.count} generator
  samples (DPM-Solver 20 steps: {sampling * 1e3:.0f} ms per image, batches of 16)
- building the guard (indexes loaded from the home's cache, tile statistics of the reference,
  first-call imports): {build:.2f} s once per run

| metric | search | ms per image | exact pairs per image |
| --- | --- | ---: | ---: |
""" + "\n".join(rows) + f"""

- whole screen (every metric, no canaries): {total * 1e3:.2f} ms per image =
  {total / sampling:.1%} of a sampled image's time
- the shift / mirror / rotation metric ({shift.n_variants()} variants) in the same run:
  ExactIndex k = 2 (the guard's search before the tile cascade; index built in
  {old_build:.1f} s) {old_s * 1e3:.2f} ms per image; TileIndex k = 2 without a cap
  {knn_s * 1e3:.2f} ms (the same exact distances: {knn_same}); TileIndex capped at the
  threshold (the guard now) {new_s * 1e3:.2f} ms: **{old_s / new_s:.1f}x** faster than the old
  search
- same accept / reject decisions as the exact distances: {same}/{args.count}; rejected images'
  distances equal the exact ones: {below_equal}; accepted images' lower bounds at or above the
  threshold and at or below the exact distance: {bound_ok}; capped search exact pairs per
  image {capped.evaluated.mean():.1f}
"""
    print(section)
    _append(section)


# ---- skipping the window search of images already rejected, in one run -----------------


def _alternated(repeats: int, run: Callable[[bool], _T]) -> tuple[dict[bool, list[float]],
                                                                   dict[bool, _T]]:
    """``run(arm)`` for the arms True and False, ``repeats`` times each, the order alternated:
    the seconds of every run per arm, and each arm's last result."""
    times: dict[bool, list[float]] = {True: [], False: []}
    last: dict[bool, _T] = {}
    for rep in range(repeats):
        for arm in ((True, False) if rep % 2 == 0 else (False, True)):
            t0 = time.perf_counter()
            last[arm] = run(arm)
            times[arm].append(time.perf_counter() - t0)
    return times, last


def _in_process_header(args: argparse.Namespace, sub: str, state: Any, sampling: float) -> str:
    """Machine, command and home lines of an A/B of one run's screening in one process."""
    return f"""- machine: {_machine()}
- command: `OMP_NUM_THREADS={os.environ.get("OMP_NUM_THREADS")} .venv/bin/python
  bench/bench_guard.py {sub} --home {args.home} --count {args.count} --seed {args.seed}
  --repeats {args.repeats}`
- home: {args.label or "not described (no --label given)"}; {len(state.reference.records):,}
  reference slices; {args.count} generator samples ({sampling:.2f} s to sample) and the
  run's canaries, screened {args.repeats} times each way, alternating (guard built once,
  outside the times)"""


def _runs(times: list[float]) -> str:
    return ", ".join(f"{t:.3f}" for t in times)


def run_skip(args: argparse.Namespace) -> None:
    """A run's screening (samples plus its canaries) with and without the window search of
    images a one-variant metric already rejected, alternated in one process: seconds, ratio,
    and whether the decisions are the same."""
    from node.guard.run import screen_with_canaries

    state, modality, samples, sampling = _home_samples(args)
    screen_with_canaries(state, modality, samples[:4], args.seed)  # build, first calls

    def screen(every: bool) -> tuple[np.ndarray, np.ndarray, dict[str, int], int]:
        cand, canaries = screen_with_canaries(state, modality, samples, args.seed, every)
        caught = np.asarray([r["caught"] for r in canaries.rates.values()])
        planted = sum(int(r["planted"]) for r in canaries.rates.values())
        return cand.accepted, caught, cand.searched(), planted

    times, outcome = _alternated(args.repeats, screen)
    same = bool(np.array_equal(outcome[False][0], outcome[True][0])
                and np.array_equal(outcome[False][1], outcome[True][1]))
    quick, full = float(np.median(times[False])), float(np.median(times[True]))
    section = f"""
## Guard: skipping the window search of images already rejected, A/B in one run \
({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)

{_in_process_header(args, "skip", state, sampling)}; {outcome[True][3]} canaries
- window search of every image: median {full:.3f} s (runs {_runs(times[True])})
- window search only of images no one-variant metric rejected (the default): median
  {quick:.3f} s (runs {_runs(times[False])});
  **{full / quick:.2f}x** faster, {1 - quick / full:.0%} less; window search of
  {outcome[False][2].get("shift_flip", 0)} of {args.count} samples
- same decisions for every sample and canary: {same}
- screening / sampling of these {args.count} samples: {full / sampling:.1%} before,
  {quick / sampling:.1%} now (the run's loading of the guard not included)
"""
    print(section)
    _append(section)


# ---- one float32 GEMM for the pixel and contrast metrics, in one run ------------------------


def run_shared(args: argparse.Namespace) -> None:
    """A run's screening (samples plus its canaries) with the contrast metric's dense search
    reusing the pixel metric's GEMM (the default) and with its own GEMM, alternated in one
    process: seconds, ratio, and whether every distance is the same."""
    from node.guard.run import screen_with_canaries

    state, modality, samples, sampling = _home_samples(args)
    guard = state.guard(modality)
    paired = dict(guard.rescales)
    screen_with_canaries(state, modality, samples[:4], args.seed)  # build, first calls

    def screen(shared: bool) -> tuple[Any, list[int]]:
        guard.rescales = dict(paired) if shared else {}
        cand, canaries = screen_with_canaries(state, modality, samples, args.seed)
        return cand, [int(r["caught"]) for r in canaries.rates.values()]

    times, outcome = _alternated(args.repeats, screen)
    guard.rescales = paired
    a, b = outcome[True][0], outcome[False][0]
    same = bool(np.array_equal(a.accepted, b.accepted) and outcome[True][1] == outcome[False][1]
                and all(np.array_equal(a.distances[m], b.distances[m], equal_nan=True)
                        and np.array_equal(a.nearest_row[m], b.nearest_row[m])
                        for m in a.distances))
    one, two = float(np.median(times[True])), float(np.median(times[False]))
    pairs = paired or "none (no pixel and contrast metrics with dense indexes)"
    section = f"""
## Guard: one GEMM for the pixel and contrast metrics, A/B in one run \
({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)

{_in_process_header(args, "shared", state, sampling)}; pairs: {pairs}
- contrast search with its own GEMM: median {two:.3f} s (runs {_runs(times[False])})
- contrast search from the pixel metric's GEMM (the default): median {one:.3f} s (runs
  {_runs(times[True])}); **{two / one:.2f}x**, {1 - one / two:.0%} less
- every decision, distance and nearest row the same: {same}
"""
    print(section)
    _append(section)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("catch")
    c.add_argument("--per-alteration", type=int, default=200)
    c.add_argument("--which", default="ct,mr")
    c.add_argument("--work", default="/tmp/synthfed-bench-guard")
    t = sub.add_parser("throughput")
    t.add_argument("--sizes", default="64,128")
    t.add_argument("--refs", default="10000,100000,1000000")
    t.add_argument("--queries", type=int, default=64)
    t.add_argument("--components", type=int, default=256)
    t.add_argument("--blocks", type=int, default=0, help="0: the guard's layout")
    t.add_argument("--ram-gib", type=float, default=14.0)
    t.add_argument("--spill", default="", help="folder for a reference above --ram-gib, "
                   "held there as a memory map (needs its size free on disk)")
    f = sub.add_parser("frr")
    f.add_argument("--which", default="ct,mr")
    f.add_argument("--folds", type=int, default=10)
    f.add_argument("--methods", default="site,leave-patients-out")
    f.add_argument("--work", default="/tmp/synthfed-bench-guard")
    def home_run(name: str, count: int, seed: int, repeats: int = 0) -> argparse.ArgumentParser:
        """A subcommand over a home with a trained generator: its samples and its label."""
        p = sub.add_parser(name)
        p.add_argument("--home", required=True)
        p.add_argument("--count", type=int, default=count)
        p.add_argument("--seed", type=int, default=seed)
        p.add_argument("--label", default="")
        if repeats:
            p.add_argument("--repeats", type=int, default=repeats)
        return p

    c = home_run("cost", 64, 0)
    c.add_argument("--search-rejected", action="store_true",
                   help="search the window metric for every image, as before 2026-12-07")
    c.add_argument("--numpy-hugepages", action="store_true",
                   help="keep numpy's huge-page advice during the run, as before 2026-12-07")
    c.add_argument("--gc-default", action="store_true",
                   help="no gc.freeze during the run, as before 2026-12-07 21:20")
    home_run("skip", 64, 0, repeats=5)
    home_run("shared", 64, 0, repeats=7)
    home_run("metrics", 96, 7)
    args = parser.parse_args()
    {"catch": run_catch, "frr": run_frr, "throughput": run_throughput,
     "cost": run_cost, "skip": run_skip, "shared": run_shared,
     "metrics": run_metrics}[args.cmd](args)

if __name__ == "__main__":
    main()
