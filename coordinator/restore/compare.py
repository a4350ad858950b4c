"""The comparison of training arms, every arm with the same network, steps, seeds and evaluation.

Arms (Shi et al., arXiv 2301.06604, and the issue):

- ``S``: pooled guarded synthetic data (ours): each site's accepted synthetic images, from
  ``node.guard.run.generate_and_screen`` at each site or from a coordinator pool;
- ``R``: pooled real training slices of every site (the upper bound; possible only in a
  simulation, since real slices never leave a site);
- ``L``: each site alone on its own real training split (evaluated on its own holdout);
- ``F``: FedAvg over the sites' real training slices in Flower's simulation engine, with the same
  total number of optimiser steps (see :mod:`coordinator.restore.fedavg`);
- ``0``: the degraded input itself.

Every trained arm starts from the same seeded initialisation and gets the same step budget and
batch size; every model is evaluated by each site's own ``node.evaluate.evaluate_model`` (the
contract-E path: the site degrades its own holdout with the same seed) so per-image results pair
across arms. Statistics: S vs R and S vs F (and F vs R, S vs L for context), per site and over
all images: Wilcoxon signed-rank, paired t-test, TOST with stated margins, verdict.

This runs in simulation: it reads every site's home on this machine. The example-slice figure is
the only place a real image is rendered, and it stays in the local report folder.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from protocols.errors import ConfigError, OperationError, UsageError
from protocols.files import atomic_write_bytes
from protocols.typed import load_yaml_config, setting, to_dict

__all__ = [
    "ARMS",
    "SiteConfig",
    "SyntheticConfig",
    "FedAvgConfig",
    "CompareConfig",
    "SiteData",
    "load_compare_config",
    "run_comparison",
    "guarded_synthetic_source",
    "nothing_from",
    "pool_synthetic_source",
]

ARMS = ("S", "R", "L", "F", "0")
COMPARISONS = (("S", "R"), ("S", "F"), ("F", "R"), ("S", "L"))


@dataclass
class SiteConfig:
    name: str = setting("", "site name in the report")
    home: str = setting("", "the site's node home (ingested, split assigned)")


@dataclass
class SyntheticConfig:
    source: Literal["guard", "pool", "none"] = setting(
        "guard", "guard: generate_and_screen at each site; pool: a coordinator pool folder"
    )
    pool: str = setting("", "pool folder (source: pool)")
    count_per_site: int = setting(0, "accepted images per site; 0 = the site's train count")
    seed: int = setting(0, "sampling seed")


@dataclass
class FedAvgConfig:
    rounds: int = setting(10, "FedAvg rounds (fewer when the step budget is smaller)")
    budget: Literal["summed", "per-site"] = setting(
        "summed", "summed: rounds*local*sites = steps (same compute); per-site: each site steps"
    )


@dataclass
class CompareConfig:
    description: str = setting("", "free text at the top of the report (how sites were formed)")
    task: Literal["denoise", "sr"] = setting("denoise", "denoise (CT low dose) or sr")
    modality: str = setting("CT", "modality of the slices used at every site")
    net: str = setting("", "network name; empty = redcnn (denoise) / edsr (sr)")
    preset: Literal["tiny", "cpu", "gpu"] = setting("cpu", "network sizes and default budget")
    net_config: dict[str, Any] = setting({}, "overrides of the preset's network config")
    steps: int = setting(0, "optimiser steps of every arm; 0 = the preset's")
    batch_size: int = setting(0, "batch size of every arm; 0 = the preset's")
    seed: int = setting(0, "network initialisation and batch order seed (every arm)")
    lr_schedule: Literal["cosine", "constant"] = setting(
        "cosine", "Adam's rate: cosine decay to zero over the steps, or constant (every arm)"
    )
    lr_decay_fraction: float = setting(
        0.2, "cosine: the last fraction of the steps decays, the rate is flat before it"
    )
    eval_seed: int = setting(0, "degradation seed of the evaluation")
    train_seed: int = setting(1, "degradation seed of the training pairs")
    arms: list[str] = setting(list(ARMS), "arms to run, of S R L F 0")
    sites: list[SiteConfig] = setting([], "the sites (node homes)")
    synthetic: SyntheticConfig = field(
        default_factory=SyntheticConfig, metadata={"help": "where arm S's images come from"}
    )
    fedavg: FedAvgConfig = field(
        default_factory=FedAvgConfig, metadata={"help": "arm F"}
    )
    low_dose: dict[str, Any] = setting(
        {}, "LowDoseConfig overrides: photons_per_ray, n_angles, field_of_view_mm, mu_water_per_mm"
    )
    sr: dict[str, Any] = setting({}, "SRConfig overrides (factor, anti_alias)")
    ct_window_hu: list[float] = setting([-1024.0, 3071.0], "CT normalisation and metric window")
    margins: dict[str, float] = setting(
        {"psnr_db": 0.5, "ssim": 0.01}, "TOST equivalence margins per metric"
    )
    examples_per_site: int = setting(1, "holdout slices per site in the example figure")
    reuse_models: bool = setting(
        True, "reuse an arm's model from <out>/models when settings and training data match"
    )
    out: str = setting("", "report folder (the command's --out overrides)")

    def __post_init__(self) -> None:
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown:
            raise ValueError(f"unknown arms {unknown}; choose from {list(ARMS)}")
        if self.steps < 0 or self.batch_size < 0:
            raise ValueError("steps and batch_size must be >= 0")


def load_compare_config(path: str | Path) -> CompareConfig:
    if not Path(path).is_file():
        raise UsageError("comparison config not found", str(path))
    config: CompareConfig = load_yaml_config(CompareConfig, str(path))
    return config


@dataclass
class SiteData:
    """One site of the simulation: its home and its real training slices (physical units)."""

    name: str
    paths: Any  # NodePaths
    config: Any  # NodeConfig
    train: np.ndarray
    n_holdout: int
    patients_train: int
    patients_holdout: int
    unit: str


SyntheticSource = Callable[[SiteData, int, int], tuple[np.ndarray, dict[str, Any]]]


def _say(progress: bool, text: str) -> None:
    if progress:
        print(text, file=sys.stderr, flush=True)


def _load_site(site: SiteConfig, modality: str) -> SiteData:
    from node.config import load_node_config, resolve_home
    from node.store import Store

    paths = resolve_home(site.home)
    config = load_node_config(paths)
    with Store(paths.store) as store:
        train_recs = store.records(split="train", modality=modality)
        hold_recs = store.records(split="holdout", modality=modality)
        if not train_recs or not hold_recs:
            raise UsageError(
                f"site {site.name or config.site} has {len(train_recs)} train and "
                f"{len(hold_recs)} holdout slices of {modality}; both are needed", site.home,
            )
        normalised = store.load(train_recs)
    scale = np.array([r.scale for r in train_recs], np.float32)[:, None, None]
    offset = np.array([r.offset for r in train_recs], np.float32)[:, None, None]
    return SiteData(
        name=site.name or config.site, paths=paths, config=config,
        train=(normalised * scale + offset).astype(np.float32),
        n_holdout=len(hold_recs),
        patients_train=len({r.patient for r in train_recs}),
        patients_holdout=len({r.patient for r in hold_recs}),
        unit=train_recs[0].unit,
    )


def nothing_from(site: SiteData, refusal: Exception) -> tuple[np.ndarray, dict[str, Any]]:
    """Arm S's share of a site whose guard accepted nothing (its generator copies): as in a
    real round, the site sends nothing and the pool is the other sites'."""
    return np.zeros((0, *site.train.shape[1:]), np.float32), {"accepted": 0,
                                                              "refused": str(refusal)}


def guarded_synthetic_source(
    site: SiteData, count: int, seed: int, **run_options: Any
) -> tuple[np.ndarray, dict[str, Any]]:
    """Arm S at one site: guard-accepted synthetic images from the site's own generator.
    ``run_options`` go to ``generate_and_screen`` (``sampler``, ``modality``,
    ``generator_info``: the site's generator sampled another way)."""
    from node.errors import TrainingError
    from node.generator.checkpoint import checkpoint_path
    from node.guard.run import generate_and_screen

    if not checkpoint_path(site.paths).exists():
        # fail before the guard's calibration, which is the slow part
        raise TrainingError("no trained generator at this site", site.name)
    run = generate_and_screen(site.paths, site.config, count, seed=seed, progress=True,
                              **run_options)
    images = np.asarray(run.images_physical, dtype=np.float32)
    report = run.report if isinstance(run.report, dict) else {}
    info = {
        "source": "node.guard.run.generate_and_screen (guard-accepted synthetic images)",
        "accepted": int(images.shape[0]),
        "candidates_tried": report.get("candidates_tried"),
        "acceptance_rate": report.get("acceptance_rate"),
        "canary_catch_rates": report.get("canary_catch_rates"),
        "generator": {k: v for k, v in (run.generator or {}).items()
                      if isinstance(v, (str, int, float))},
    }
    return images, info


def pool_synthetic_source(pool_dir: str, modality: str) -> SyntheticSource:
    """Arm S from a coordinator pool (contract D): each site's share of the pool."""
    from coordinator.pool import load_pool

    images, index, manifest = load_pool(pool_dir)

    def source(site: SiteData, count: int, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
        rows = [i for i, line in enumerate(index)
                if line["site"] == site.config.site and line["modality"] == modality]
        picked = np.asarray(images[rows], dtype=np.float32)
        return picked, {"source": f"coordinator pool {manifest.get('round')}",
                        "accepted": int(picked.shape[0])}

    return source


def _settings(config: CompareConfig) -> Any:
    from coordinator.restore.degrade import DegradationConfig, LowDoseConfig, SRConfig
    from coordinator.restore.nets import default_net
    from coordinator.restore.train import settings_for

    types = {"photons_per_ray": float, "n_angles": int, "field_of_view_mm": float,
             "mu_water_per_mm": float, "factor": int, "anti_alias": bool}
    try:
        # YAML reads 1e4 as a string and 96.0 as a float: convert by field, refuse the rest
        low_dose = {k: types[k](v) if k in types else v for k, v in config.low_dose.items()}
        sr = {k: types[k](v) if k in types else v for k, v in config.sr.items()}
        degradation = DegradationConfig(
            task=config.task, low_dose=LowDoseConfig(**low_dose), sr=SRConfig(**sr),
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"degradation: {exc}") from None
    return settings_for(
        config.net or default_net(config.task), config.task, config.modality, config.preset,
        steps=config.steps or None, batch_size=config.batch_size or None, seed=config.seed,
        degradation=degradation, net_config=dict(config.net_config),
        lr_schedule=config.lr_schedule, decay_fraction=float(config.lr_decay_fraction),
        ct_window_hu=(float(config.ct_window_hu[0]), float(config.ct_window_hu[1])),
    )


def run_comparison(
    config: CompareConfig,
    out_dir: Path,
    *,
    synthetic_source: SyntheticSource | None = None,
    synthetic_label: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every arm of ``config``; writes the report into ``out_dir``; returns the results.

    ``synthetic_source(site, count, seed) -> (images, info)`` overrides where arm S's images
    come from (tests use a stand-in; the report then states ``synthetic_label``).
    """
    from coordinator.restore.degrade import DegradationConfig
    from coordinator.restore.evaluate import restore_physical
    from coordinator.restore.fedavg import train_fedavg
    from coordinator.restore.report import write_report
    from coordinator.restore.stats import describe, paired_comparison
    from coordinator.restore.train import (
        MODEL_FILE_TOP_LEVEL,
        Normalisation,
        data_digest,
        load_model,
        make_pairs,
        model_bytes,
        train_network,
    )
    from node.evaluate import evaluate_model, holdout_physical

    if len(config.sites) < 1:
        raise ConfigError("no sites in the comparison config")
    t_start = time.monotonic()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = _settings(config)
    degradation = DegradationConfig.from_dict(settings.degradation)
    norm = Normalisation.from_dict(settings.normalisation)
    sites = [_load_site(s, config.modality) for s in config.sites]
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        raise ConfigError(f"site names repeat: {names}")
    arms = [a for a in ARMS if a in config.arms]
    if "F" in arms and len(sites) < 2:
        raise ConfigError("arm F (FedAvg) needs at least two sites")

    timings: dict[str, dict[str, float]] = {}
    notes: dict[str, str] = {}
    provenance: dict[str, Any] = {}
    models: dict[str, dict[str, bytes]] = {}  # arm -> site -> model blob ("*" = every site)

    def pairs_of(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        inputs, targets, _, _ = make_pairs(images, degradation, norm, seed=config.train_seed)
        return inputs, targets

    model_dir = out_dir / "models"
    wanted_settings = json.loads(json.dumps(asdict(settings)))

    def reusable(name: str, digest: str) -> bytes | None:
        """A model of this arm from an earlier run with the same settings and data."""
        path = model_dir / f"{name}.pt"
        if not config.reuse_models or not path.is_file():
            return None
        blob = path.read_bytes()
        try:
            _, info = load_model(blob, str(path))
        except UsageError:
            return None
        # every setting must be recorded and equal: a model file from before a setting existed
        # (e.g. lr_schedule) was made another way and is not reused
        recorded = {**info.get("train", {}), **{k: info.get(k) for k in MODEL_FILE_TOP_LEVEL}}
        same = all(k in recorded and recorded[k] == v for k, v in wanted_settings.items())
        if not same or info.get("data", {}).get("data_digest") != digest:
            return None
        return blob

    def keep(name: str, blob: bytes) -> bytes:
        atomic_write_bytes(model_dir / f"{name}.pt", blob)
        return blob

    def train_arm(arm: str, label: str, images: np.ndarray, extra: dict[str, Any],
                  name: str) -> bytes:
        digest = data_digest(images)
        entry = timings.setdefault(arm, {"degrade_s": 0.0, "train_s": 0.0, "evaluate_s": 0.0})
        old = reusable(name, digest)
        if old is not None:
            _say(progress, f"arm {label}: reusing {model_dir / (name + '.pt')}")
            _, info = load_model(old)
            entry["train_s"] += float(info["train"].get("wall_s", 0.0))
            entry["reused"] = 1.0
            return old
        t0 = time.monotonic()
        inputs, targets = pairs_of(images)
        t1 = time.monotonic()
        _say(progress, f"arm {label}: training on {images.shape[0]} images")
        net, summary = train_network(inputs, targets, settings, None, progress=progress)
        t2 = time.monotonic()
        entry["degrade_s"] += t1 - t0
        entry["train_s"] += t2 - t1
        extra = {**extra, "n_images": int(images.shape[0]), "data_digest": digest}
        return keep(name, model_bytes(net, settings, summary, extra))

    # ---- train -------------------------------------------------------------------------
    if "R" in arms:
        pooled = np.concatenate([s.train for s in sites])
        models["R"] = {"*": train_arm("R", "R (pooled real)", pooled, {"arm": "R"}, "R")}
    if "L" in arms:
        models["L"] = {
            s.name: train_arm("L", f"L ({s.name} alone)", s.train,
                              {"arm": "L", "site": s.name}, f"L-{s.name}")
            for s in sites
        }
    if "F" in arms:
        fed_digest = data_digest(np.concatenate([s.train for s in sites]))
        fed_old = reusable(f"F-{config.fedavg.budget}-{config.fedavg.rounds}", fed_digest)
        if fed_old is not None:
            _, info = load_model(fed_old)
            provenance["F"] = {k: info["train"][k] for k in (
                "rounds", "local_steps", "sites", "budget", "total_steps", "steps_per_site",
                "wall_s", "engine") if k in info["train"]}
            timings["F"] = {"degrade_s": 0.0, "train_s": float(info["train"].get("wall_s", 0)),
                            "evaluate_s": 0.0, "reused": 1.0}
            models["F"] = {"*": fed_old}
        else:
            t0 = time.monotonic()
            site_pairs = [pairs_of(s.train) for s in sites]
            t1 = time.monotonic()
            net, fed_summary = train_fedavg(
                site_pairs, settings, out_dir / "fedavg-work", rounds=config.fedavg.rounds,
                budget=config.fedavg.budget, progress=progress,
            )
            for f in (out_dir / "fedavg-work").glob("site-*.npz"):
                f.unlink()  # real training pairs do not stay in the report folder
            timings["F"] = {"degrade_s": t1 - t0, "train_s": time.monotonic() - t1,
                            "evaluate_s": 0.0}
            provenance["F"] = fed_summary
            models["F"] = {"*": keep(
                f"F-{config.fedavg.budget}-{config.fedavg.rounds}",
                model_bytes(net, settings, fed_summary, {"arm": "F", "data_digest": fed_digest}),
            )}
    if "S" in arms:
        source = synthetic_source
        label = synthetic_label
        if source is None:
            if config.synthetic.source == "pool":
                if not config.synthetic.pool:
                    raise ConfigError("synthetic.source is pool but synthetic.pool is empty")
                source = pool_synthetic_source(config.synthetic.pool, config.modality)
                label = f"coordinator pool {config.synthetic.pool}"
            elif config.synthetic.source == "guard":
                source = guarded_synthetic_source
                label = "guard-accepted synthetic images (generate_and_screen at each site)"
        if source is None:
            notes["S"] = "not run: synthetic.source is none"
        else:
            from privacy.errors import GuardError

            t0 = time.monotonic()
            parts, infos = [], {}
            try:
                for s in sites:
                    count = config.synthetic.count_per_site or int(s.train.shape[0])
                    _say(progress, f"arm S: asking {s.name} for {count} synthetic images")
                    try:
                        images, info = source(s, count, config.synthetic.seed)
                    except GuardError as exc:
                        images, info = nothing_from(s, exc)
                    _say(progress, f"arm S: {s.name} gave {images.shape[0]} images")
                    if images.ndim != 3 or images.shape[1:] != s.train.shape[1:]:
                        raise OperationError(
                            f"synthetic images of {s.name} have shape {images.shape}, "
                            f"the site's slices {s.train.shape[1:]}"
                        )
                    parts.append(np.asarray(images, np.float32))
                    infos[s.name] = info
            except Exception as exc:  # the report states why S is missing; other arms stand
                notes["S"] = f"not run: {type(exc).__name__}: {exc}"
                _say(progress, f"arm S skipped: {notes['S']}")
            else:
                if sum(p.shape[0] for p in parts) == 0:
                    notes["S"] = "not run: no site's guard accepted any synthetic image"
            if "S" not in notes:
                gen_s = time.monotonic() - t0
                provenance["S"] = {"label": label, "sites": infos}
                models["S"] = {"*": train_arm("S", "S (pooled synthetic)",
                                              np.concatenate(parts), {"arm": "S"}, "S")}
                timings["S"]["generate_s"] = gen_s

    # ---- evaluate at each site (contract E) ----------------------------------------------
    metrics = ("psnr_db", "ssim", "rmse")
    per_image: dict[str, dict[str, dict[str, list[float]]]] = {}  # arm -> site -> metric
    eval_info: dict[str, Any] = {}
    for arm, blobs in models.items():
        t0 = time.monotonic()
        per_image[arm] = {}
        for s in sites:
            blob = blobs.get(s.name, blobs.get("*"))
            if blob is None:
                continue
            reply = evaluate_model(s.paths, s.config, blob, config.task, seed=config.eval_seed)
            per_image[arm][s.name] = {m: reply[m] for m in metrics}
            if "0" in arms:
                # the degraded input is the same for every model (same seed): arm 0
                per_image.setdefault("0", {}).setdefault(
                    s.name, {m: reply[f"input_{m}"] for m in metrics})
            eval_info[s.name] = {k: reply[k] for k in ("n_images", "unit", "window_hu",
                                                       "data_range_rule", "holdout_digest")}
        timings[arm]["evaluate_s"] += time.monotonic() - t0

    # ---- statistics ----------------------------------------------------------------------
    table: dict[str, Any] = {}
    for arm, by_site in per_image.items():
        table[arm] = {"sites": {}, "overall": {}}
        for m in metrics:
            pooled_values: list[float] = []
            for name in names:
                if name in by_site:
                    table[arm]["sites"].setdefault(name, {})[m] = describe(by_site[name][m])
                    pooled_values.extend(by_site[name][m])
            table[arm]["overall"][m] = describe(pooled_values)
    tests: dict[str, Any] = {}
    for a, b in COMPARISONS:
        if a not in per_image or b not in per_image:
            continue
        key = f"{a} vs {b}"
        tests[key] = {}
        for m in metrics:
            margin = config.margins.get(m)
            av = [v for name in names for v in per_image[a].get(name, {}).get(m, [])]
            bv = [v for name in names for v in per_image[b].get(name, {}).get(m, [])]
            entry = {"overall": paired_comparison(av, bv, margin)}
            for name in names:
                if name in per_image[a] and name in per_image[b]:
                    entry[name] = paired_comparison(
                        per_image[a][name][m], per_image[b][name][m], margin)
            tests[key][m] = entry

    # ---- example slices (simulation only, local report) ----------------------------------
    examples: list[dict[str, Any]] = []
    for s in sites:
        if config.examples_per_site < 1:
            break
        clean, _ = holdout_physical(s.paths, config.modality)
        clean = clean[: config.examples_per_site]
        row: dict[str, Any] = {"site": s.name, "reference": clean}
        for arm, blobs in models.items():
            blob = blobs.get(s.name, blobs.get("*"))
            if blob is None:
                continue
            net, info = load_model(blob)
            degraded, restored, _ = restore_physical(net, info, clean, config.eval_seed)
            row["degraded"] = degraded
            row[arm] = restored
        examples.append(row)

    results: dict[str, Any] = {
        "config": to_dict(config),
        "settings": asdict(settings),
        "sites": [
            {"name": s.name, "train_slices": int(s.train.shape[0]),
             "holdout_slices": s.n_holdout, "patients_train": s.patients_train,
             "patients_holdout": s.patients_holdout, "unit": s.unit}
            for s in sites
        ],
        "arms": arms,
        "arms_run": [a for a in arms if a in per_image],
        "notes": notes,
        "provenance": provenance,
        "evaluation": eval_info,
        "table": table,
        "tests": tests,
        "per_image": per_image,
        "timings_s": {a: {k: round(v, 2) for k, v in t.items()} for a, t in timings.items()},
        "wall_s": round(time.monotonic() - t_start, 2),
    }
    write_report(results, examples, out_dir)
    return results
