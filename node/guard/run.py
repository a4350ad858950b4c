"""Guarded generation (contract B): sample, screen with canaries, repeat, hand over to export.

:func:`generate_and_screen` samples the site generator in batches, plants canaries (altered
copies of real train slices) among the first batch's candidates, screens everything with the
exact guard against every real slice of the site, and samples more until ``count`` images are
accepted or the cap on tries is reached. Canaries are removed by position before anything else
sees the accepted set, so they can never be exported; a run in which any exact, shifted,
mirrored or re-scaled canary passes fails with :class:`GuardError`. :func:`generate` then hands
the accepted images to :func:`node.export.export_bundle` (contract C).

The run folder ``runs/<run-id>/`` gets ``report.json`` (with the per-patient exposure that
stays at the site), ``distances.png`` and ``report.html``; the audit log a ``generate`` record.
"""

from __future__ import annotations

import gc
import math
import os
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterator
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from node.config import NodeConfig, NodePaths
from node.guard.calibration import GuardState, prepare_guard
from node.guard.figures import distance_histograms_png, report_html
from node.store import Store
from privacy.calibrate import summarise
from privacy.canaries import MUST_CATCH, catch_rates, make_canaries
from privacy.errors import GuardError
from privacy.guard import Screening
from privacy.report import privacy_report
from protocols.audit import append_audit
from protocols.files import atomic_write_bytes, atomic_write_json, atomic_write_text

__all__ = [
    "GuardRun",
    "CanaryResult",
    "generate_and_screen",
    "check_generator_covered",
    "generate",
    "export_run",
    "screen_with_canaries",
    "new_run_dir",
    "canary_summary",
    "Sampler",
]

Sampler = Callable[[int, int], np.ndarray]
_CANARY_STREAM = 0xC4A7


@dataclass
class CanaryResult:
    rates: dict[str, dict[str, float | int]]
    failed: list[str]  # must-catch alterations with a canary that passed
    distances: dict[str, np.ndarray]  # per metric, every canary

    def as_report(self) -> dict[str, Any]:
        return {"catch_rates": self.rates, "must_catch": list(MUST_CATCH), "failed": self.failed}


@dataclass
class GuardRun:
    """The outcome of a guarded generation (contract B)."""

    images_normalised: np.ndarray  # float32 [N, S, S]
    images_physical: np.ndarray  # float32 [N, S, S]
    modality: str
    unit: str
    distances: dict[str, np.ndarray]  # per accepted image, per metric (exact)
    report: dict[str, Any]  # the guard section of the manifest (no identifiers)
    generator: dict[str, Any]
    run_id: str = ""
    run_dir: Path | None = None
    pixel_spacing_mm: float | None = None
    complete: bool = True
    local_report: dict[str, Any] = field(default_factory=dict)


def canary_summary(rates: dict[str, dict[str, Any]]) -> str:
    """One console line of a run's canary self-test, e.g. ``canary self-test: 56 of 56 planted
    copies caught (exact 8/8, shift 8/8, ...)``."""
    caught = sum(int(r["caught"]) for r in rates.values())
    planted = sum(int(r["planted"]) for r in rates.values())
    parts = ", ".join(f"{k} {int(r['caught'])}/{int(r['planted'])}" for k, r in rates.items())
    return f"canary self-test: {caught} of {planted} planted copies caught ({parts})"


def new_run_dir(paths: NodePaths, kind: str) -> tuple[str, Path]:
    run_id = f"{kind}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"
    folder = paths.runs / run_id
    folder.mkdir(parents=True, exist_ok=False)
    return run_id, folder


def _subset(s: Screening, rows: np.ndarray) -> Screening:
    return Screening(
        accepted=s.accepted[rows],
        distances={m: d[rows] for m, d in s.distances.items()},
        second={m: d[rows] for m, d in s.second.items()},
        nearest_row={m: d[rows] for m, d in s.nearest_row.items()},
        failed=[s.failed[i] for i in rows.tolist()],
        evaluated_pairs=dict(s.evaluated_pairs),
        brute_force_pairs=dict(s.brute_force_pairs),
        bounded=s.bounded,
    )


def screen_with_canaries(
    state: GuardState, modality: str, candidates: np.ndarray, seed: int,
    search_rejected: bool = False,
) -> tuple[Screening, CanaryResult]:
    """Screen ``candidates`` with canaries mixed in at random positions; split them again.
    ``search_rejected``: also search the window metric for images a one-variant metric
    already rejected (same decisions, every distance; see :mod:`privacy.guard`)."""
    settings = state.settings
    ref = state.reference
    source_rows = ref.rows(modality=modality, split="train")
    if source_rows.size == 0:
        source_rows = ref.rows(modality=modality)
    rng = np.random.default_rng(np.random.SeedSequence([seed, _CANARY_STREAM]))
    canaries = make_canaries(ref.images, settings.canaries_per_alteration, rng,
                             rows=source_rows)
    n_c = candidates.shape[0]
    mixed = np.concatenate([np.asarray(candidates, dtype=np.float32), canaries.images])
    order = rng.permutation(mixed.shape[0])
    position = np.argsort(order)  # position[i]: where input i sits in the mixed batch
    screening = state.guard(modality).screen(mixed[order], search_rejected=search_rejected)
    cand = _subset(screening, position[:n_c])
    canary = _subset(screening, position[n_c:])
    rates = catch_rates(canaries.kinds, ~canary.accepted)
    failed = [k for k in MUST_CATCH if k in rates and rates[k]["caught"] < rates[k]["planted"]]
    return cand, CanaryResult(rates, failed, canary.distances)


def _spacing(paths: NodePaths, modality: str) -> float | None:
    with Store(paths.store) as store:
        values = [
            r.spacing_mm for r in store.records(modality=modality) if r.spacing_mm is not None
        ]
    return float(np.median(values)) if values else None


def _physical(paths: NodePaths, modality: str, images: np.ndarray) -> tuple[np.ndarray, str]:
    with Store(paths.store) as store:
        scale, offset, unit = store.physical_mapping(modality)
    return (images * np.float32(scale) + np.float32(offset)).astype(np.float32), unit


def _sole_modality(state: GuardState) -> str:
    mods = state.reference.modalities
    if len(mods) != 1:
        raise GuardError(f"the store holds {', '.join(mods)}: name a modality", "--modality", 2)
    return mods[0]


def build_report(
    state: GuardState,
    modality: str,
    screened: list[Screening],
    accepted_distances: dict[str, np.ndarray],
    accepted_second: dict[str, np.ndarray],
    accepted_rows: dict[str, np.ndarray],
    canaries: CanaryResult,
    tried: int,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(manifest guard section, local report additions with per-patient exposure)."""
    thresholds = state.thresholds(modality)
    patients = state.reference.patients
    bounded = {m for s in screened for m in s.bounded}
    exact = [m for m in accepted_distances if m not in bounded]
    nearest_patients = {m: [patients[i] for i in accepted_rows[m].tolist()] for m in exact}
    privacy = privacy_report(
        {m: accepted_distances[m] for m in exact}, {m: accepted_second[m] for m in exact},
        state.new_patient.get(modality, {}), nearest_patients,
    )
    per_patient = {m: p["patient_exposure"].pop("counts") for m, p in privacy.items()}
    rejected_by: dict[str, int] = {m: 0 for m in thresholds}
    accepted_total = 0
    evaluated = {m: 0 for m in thresholds}
    brute = {m: 0 for m in thresholds}
    searched = {m: 0 for m in thresholds}
    for s in screened:
        accepted_total += int(s.accepted.sum())
        for names in s.failed:
            for m in names:
                rejected_by[m] += 1
        for m, n in s.searched().items():
            searched[m] += n
        for m in thresholds:
            evaluated[m] += s.evaluated_pairs.get(m, 0)
            brute[m] += s.brute_force_pairs.get(m, 0)
    report = {
        "metrics": [m.describe() for m in state.metrics],
        "thresholds": thresholds,
        "calibration": state.manifest_section(modality),
        "reference_slices": len(state.reference.records),
        "exactness": "exact nearest neighbour over every real slice of the site; references "
        "skipped only by proven lower bounds (privacy.search, privacy.tiles)",
        # "exact": the distance to the closest real slice; "lower_bound": a proven lower bound
        # on it, at or above the threshold (the search stops at the threshold for this metric).
        "distance_kind": {m: ("lower_bound" if m in bounded else "exact") for m in thresholds},
        "candidates_tried": tried,
        "candidates_accepted": accepted_total,
        "acceptance_rate": accepted_total / tried if tried else 0.0,
        "rejected_by_metric": rejected_by,
        "canary_catch_rates": canaries.rates,
        "canaries": canaries.as_report(),
        "accepted_distances": {m: summarise(d) for m, d in accepted_distances.items()},
        "privacy": privacy,
        # The window metric searches only the images no one-variant metric rejected (the
        # decision is the same: one metric finding an image too close rejects it), so its
        # count in rejected_by_metric covers those images only.
        "search": {m: {"exact_pairs": evaluated[m], "brute_force_pairs": brute[m],
                       "images_searched": searched[m]} for m in thresholds},
    }
    return report, {"patient_exposure_counts": per_patient}


def _write_run(
    run_dir: Path,
    title: str,
    report: dict[str, Any],
    candidate_distances: dict[str, np.ndarray],
    state: GuardState,
    modality: str,
    canaries: CanaryResult,
) -> None:
    kinds = report.get("distance_kind", {})
    t0 = time.perf_counter()
    try:
        png = distance_histograms_png(
            candidate_distances, state.new_patient.get(modality, {}), state.thresholds(modality),
            canaries.distances, bounded=[m for m, kind in kinds.items() if kind == "lower_bound"],
        )
    finally:  # the report is written once, and even if the figure fails
        if isinstance(report.get("timing_s"), dict):  # the figure is part of the guard's work
            report["timing_s"]["report_figure"] = round(time.perf_counter() - t0, 3)
        atomic_write_json(run_dir / "report.json", report)
    atomic_write_bytes(run_dir / "distances.png", png)
    atomic_write_text(run_dir / "report.html", report_html(title, report, png))


def check_generator_covered(
    paths: NodePaths, held: AbstractSet[str], pixel_digests: AbstractSet[str] | None,
    split_digest: str,
) -> None:
    """Refuse a generator that learnt from a slice the guard's reference does not hold.

    The guard keeps copies of the slices it screens against from leaving, nothing else: a
    generator trained in another home (or on a store since rebuilt) could reproduce slices
    this reference has never seen. Checkpoints record the pixel digests of their training
    slices; older ones only their training split's digest, which must then be this store's.
    ``held``: the pixel digests of every slice of the store (the guard's reference).
    """
    if pixel_digests is not None:
        missing = len(set(pixel_digests) - set(held))
        if missing:
            raise GuardError(
                f"the generator learnt from {missing} slice(s) that this node's store does not"
                " hold, and the guard can only keep copies of the slices it screens against"
                " from leaving: train the generator in this home (synthfed-node train"
                " --overwrite)",
                "models/generator.pt",
                2,
            )
        return
    with Store(paths.store) as store:
        current = store.split_digest("train")
    if split_digest != current:
        raise GuardError(
            "the generator's checkpoint does not record which slices it learnt from, and its"
            f" training split ({split_digest[:12]}) is not this store's ({current[:12]}):"
            " train the generator in this home again (synthfed-node train --overwrite)",
            "models/generator.pt",
            2,
        )


@contextmanager
def small_pages() -> Iterator[None]:
    """Turn off numpy's huge-page advice for new arrays while the block runs, unless
    ``NUMPY_MADVISE_HUGEPAGE`` says otherwise.

    numpy asks the kernel for transparent huge pages on every large array (``madvise``); with
    the common ``defrag: madvise`` policy a page fault on such an array may compact memory
    first, and right after sampling (memory fragmented by torch) that made building the guard
    two to four times slower: 0.27-0.60 s against 0.12-0.19 s with small pages, 3,064
    references. The arithmetic is the same either way.
    """
    multiarray = getattr(getattr(np, "_core", None), "multiarray", None)
    setter = getattr(multiarray, "_set_madvise_hugepage", None)  # None: another numpy layout
    if os.environ.get("NUMPY_MADVISE_HUGEPAGE") is not None:
        setter = None  # the user's choice stands
    previous = setter(False) if setter is not None else None
    try:
        yield
    finally:
        if setter is not None:
            setter(previous)


_frozen_lock = threading.Lock()
_frozen_depth = 0


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Keep the objects that exist when the block starts out of the garbage collector's full
    collections until it ends (``gc.freeze``; ``gc.unfreeze`` when the outermost such block
    ends). ``SYNTHFED_GC_FREEZE=0`` in the environment leaves the collector alone.

    A process that has imported torch, diffusers and MONAI tracks some 300,000 long-lived
    objects; a generate run allocates enough to trigger four or five full collections, each
    walking all of them (0.1-0.2 s each, growing, 0.7-0.8 s of GC in a 64-image run on two
    cores), and one of them regularly fell into the guard's loading. Frozen, those
    collections walk only what the run itself made. Nothing is collected that would not be:
    garbage among the frozen objects waits for the block's end.
    """
    global _frozen_depth
    if os.environ.get("SYNTHFED_GC_FREEZE", "1") == "0":
        yield
        return
    with _frozen_lock:
        _frozen_depth += 1
        gc.freeze()
    try:
        yield
    finally:
        with _frozen_lock:
            _frozen_depth -= 1
            if _frozen_depth == 0:
                gc.unfreeze()


def _freeze_now() -> None:
    """Inside a :func:`frozen_heap` block, freeze what exists now too (its end unfreezes)."""
    with _frozen_lock:
        if _frozen_depth > 0:
            gc.freeze()


@small_pages()
@frozen_heap()
def generate_and_screen(
    paths: NodePaths,
    config: NodeConfig,
    count: int,
    seed: int = 0,
    round_id: str | None = None,
    nonce: str | None = None,
    max_tries: int | None = None,
    progress: bool = True,
    *,
    sampler: Sampler | None = None,
    modality: str | None = None,
    generator_info: dict[str, Any] | None = None,
    search_rejected: bool = False,
) -> GuardRun:
    """Sample, screen and resample until ``count`` images pass or ``max_tries`` are spent.

    ``sampler(n, seed) -> float32 [n, S, S]`` replaces the site generator (tests, other
    generators); by default the trained generator of ``paths`` (contract A) is loaded.
    ``search_rejected``: see :func:`screen_with_canaries` (the benchmark's comparison).
    """
    if count < 1:
        raise GuardError("count must be at least 1", "--count", 2)
    settings = config.guard
    cap = int(max_tries) if max_tries is not None else math.ceil(settings.max_tries_factor * count)
    if cap < 1:
        raise GuardError("max_tries must be at least 1", "--max-tries", 2)
    if sampler is None:
        # The site generator is a torch network: its import (about a second) is the sampler's
        # cost, not the guard's, even when the guard's encoder is the first to ask for it.
        import torch  # noqa: F401
    t0 = time.perf_counter()
    state = prepare_guard(paths, config, progress=progress)
    prepare_s = time.perf_counter() - t0  # the guard's share of the run starts here
    if sampler is None:
        from node.generator.sampling import load_generator

        gen = load_generator(paths)
        _freeze_now()  # the generator's objects too
        check_generator_covered(paths, {r.pixel_digest for r in state.reference.records},
                                gen.train_pixel_digests, gen.train_split_digest)
        if modality is None:
            modality = gen.modalities[0] if len(gen.modalities) == 1 else _sole_modality(state)
        chosen = modality
        generator = gen.summary()

        def sampler(n: int, s: int) -> np.ndarray:
            return gen.sample(n, seed=s, modality=chosen, batch_size=min(n, 16))

    else:
        modality = modality or _sole_modality(state)
        generator = dict(generator_info or {"sampler": "injected"})
    thresholds = state.thresholds(modality)
    size = state.reference.images.shape[1:]
    run_id, run_dir = new_run_dir(paths, "generate")
    kept: list[np.ndarray] = []
    dist: dict[str, list[np.ndarray]] = {m: [] for m in thresholds}
    second: dict[str, list[np.ndarray]] = {m: [] for m in thresholds}
    rows: dict[str, list[np.ndarray]] = {m: [] for m in thresholds}
    all_candidate_d: dict[str, list[np.ndarray]] = {m: [] for m in thresholds}
    rejected: list[dict[str, Any]] = []
    screened: list[Screening] = []
    canaries: CanaryResult | None = None
    tried = n_kept = batch_no = 0
    sample_s, guard_s = 0.0, prepare_s
    while n_kept < count and tried < cap:
        # One screening per group: as many candidates as should fill the request at the
        # acceptance rate seen so far (all of it, at first), sampled in batches. Screening a
        # group at once costs less per image than batch by batch (the references are read
        # once per group), and stops no sooner than before: a short group is topped up.
        rate = max(n_kept / tried if tried else 1.0, 1.0 / settings.max_tries_factor)
        group = max(1, min(math.ceil((count - n_kept) / rate), cap - tried))
        parts: list[np.ndarray] = []
        for start in range(0, group, settings.batch_size):
            n = min(settings.batch_size, group - start)
            batch_seed = int(np.random.SeedSequence([seed, batch_no]).generate_state(1)[0] >> 1)
            t0 = time.perf_counter()
            part = np.asarray(sampler(n, batch_seed), dtype=np.float32)
            sample_s += time.perf_counter() - t0
            if part.shape != (n, *size):
                raise GuardError(
                    f"the sampler returned {part.shape}, expected {(n, *size)}", "sampler", 1
                )
            parts.append(part)
            batch_no += 1
            if progress:
                print(f"guard: sampled {tried + start + n}/{tried + group} candidates",
                      file=sys.stderr)
        images = np.concatenate(parts)
        n = images.shape[0]
        t0 = time.perf_counter()
        if canaries is None:
            screening, canaries = screen_with_canaries(state, modality, images, seed,
                                                       search_rejected)
        else:
            screening = state.guard(modality).screen(images, search_rejected=search_rejected)
        guard_s += time.perf_counter() - t0
        screened.append(screening)
        for entry in screening.rejected(thresholds):
            entry["index"] = int(entry["index"]) + tried  # type: ignore[call-overload]
            rejected.append(entry)
        for m in thresholds:
            all_candidate_d[m].append(screening.distances[m])
        take = np.flatnonzero(screening.accepted)[: count - n_kept]
        kept.append(images[take])
        for m in thresholds:
            dist[m].append(screening.distances[m][take])
            second[m].append(screening.second[m][take])
            rows[m].append(screening.nearest_row[m][take])
        n_kept += take.size
        tried += n
        if progress:
            print(f"guard: {n_kept}/{count} accepted after {tried} candidates", file=sys.stderr)
    assert canaries is not None
    accepted = np.concatenate(kept) if kept else np.zeros((0, *size), dtype=np.float32)
    distances = {m: np.concatenate(v) for m, v in dist.items()}
    report, local = build_report(
        state, modality, screened, distances,
        {m: np.concatenate(v) for m, v in second.items()},
        {m: np.concatenate(v) for m, v in rows.items()},
        canaries, tried,
    )
    rate = report["acceptance_rate"]
    warning = None
    if rate < settings.min_acceptance_rate:
        warning = (
            f"the generator copies too much: only {rate:.0%} of {tried} candidates were far "
            f"enough from every real slice (below the {settings.min_acceptance_rate:.0%} "
            "expected); train longer on more data or lower the learning rate before exporting"
        )
    report.update(
        {
            "requested": count,
            "exported": int(accepted.shape[0]),
            "complete": bool(accepted.shape[0] >= count),
            "copying_warning": warning,
            "timing_s": {"sampling": round(sample_s, 3), "guard": round(guard_s, 3)},
            "round": None if round_id is None else {"id": round_id, "nonce": nonce},
        }
    )
    local_report = {"run_id": run_id, **report, **local, "rejected": rejected}
    _write_run(
        run_dir, f"generate {run_id}", local_report,
        {m: np.concatenate(v) for m, v in all_candidate_d.items()}, state, modality, canaries,
    )
    append_audit(
        paths.audit,
        "generate",
        {
            "run": run_id,
            "modality": modality,
            "requested": count,
            "accepted": int(accepted.shape[0]),
            "tried": tried,
            "acceptance_rate": round(rate, 6),
            "canaries_failed": canaries.failed,
            "thresholds": thresholds,
            "round": round_id,
        },
    )
    if canaries.failed:
        raise GuardError(
            f"canary self-test failed: a {', '.join(canaries.failed)} copy of a real slice "
            "passed the guard; nothing is exported",
            str(run_dir / "report.json"),
            1,
        )
    if accepted.shape[0] == 0:
        raise GuardError(
            f"no candidate passed the guard in {tried} tries: the generator copies its "
            "training slices; nothing is exported",
            str(run_dir / "report.json"),
            1,
        )
    physical, unit = _physical(paths, modality, accepted)
    return GuardRun(
        images_normalised=accepted,
        images_physical=physical,
        modality=modality,
        unit=unit,
        distances=distances,
        report=report,
        generator=generator,
        run_id=run_id,
        run_dir=run_dir,
        pixel_spacing_mm=_spacing(paths, modality),
        complete=bool(accepted.shape[0] >= count),
        local_report=local_report,
    )


def generate(
    paths: NodePaths,
    config: NodeConfig,
    count: int,
    seed: int = 0,
    round_id: str | None = None,
    nonce: str | None = None,
    max_tries: int | None = None,
    progress: bool = True,
    *,
    sampler: Sampler | None = None,
    modality: str | None = None,
) -> Path:
    """Guarded generation, then export (contract C); returns the pending bundle folder."""
    run = generate_and_screen(
        paths, config, count, seed, round_id, nonce, max_tries, progress,
        sampler=sampler, modality=modality,
    )
    return export_run(paths, config, run, round_id, nonce)


def export_run(
    paths: NodePaths,
    config: NodeConfig,
    run: GuardRun,
    round_id: str | None = None,
    nonce: str | None = None,
) -> Path:
    """Hand a guarded run's accepted images (never its canaries) to the export step."""
    from node.export import export_bundle

    return export_bundle(
        paths,
        config,
        run.images_physical,
        modality=run.modality,
        unit=run.unit,
        distances=run.distances,
        guard=run.report,
        generator=run.generator,
        round_id=round_id,
        nonce=nonce,
        pixel_spacing_mm=run.pixel_spacing_mm,
    )
