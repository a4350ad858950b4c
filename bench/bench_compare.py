"""The arm comparison (S, R, L, F, 0) on ../shared/data, recorded in bench/RESULTS.md.

    python bench/bench_compare.py build --task denoise|sr      # site homes via node.ingest
    python bench/bench_compare.py generators --task denoise|sr [--preset tiny|cpu]
        [--max-steps N] [--ae-steps N --diffusion-steps N]     # each site's own generator
    python bench/bench_compare.py restage --task denoise|sr --set KEY=VALUE --suffix SUFFIX
        [--diffusion-steps N]    # copies of the site homes: a new stage 2 on each site's own
                                 # autoencoder, with one setting changed (a wider UNet, say)
    python bench/bench_compare.py synth --task denoise|sr [--count N]   # arm S's guarded data
        [--home-suffix SUFFIX --synthetic-dir NAME]   # from the restaged copies
    python bench/bench_compare.py run --task denoise|sr [--steps N] [--batch-size N]
        [--arms S,R,L,F,0] [--synthetic guard|none] [--preset cpu|tiny] [--no-record]
        [--count-per-site N] [--synthetic-dir NAME]
    python bench/bench_compare.py diagnose --task denoise|sr --kind storemap|recon
        # stand-ins for arm S that split its gap to R (bench only, never an export):
        # storemap = each site's real train slices through the store-wide physical mapping
        # that synthetic images get; recon = the same after the site generator's autoencoder

Sites: CT denoising uses the three CT collections (covid-ny-sbu, tcga-luad,
pancreatic-ct-cbct-seg) as three sites; MR super-resolution splits brain-tumor-t1c by patient
(patients.csv, IDs that differ only by a trailing letter merged into one patient) into three
sites, each patient to the site chosen by a hash of its ID. Each site is a real node home built
by ``node.ingest.pipeline.ingest_sources`` (default 64x64, axial for CT) with its own seeded
patient-level split. The configs are bench/compare_ct.yaml and bench/compare_mr.yaml; command
line options override the step budget and arms. Outputs stay under bench/out/ (ignored).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from machine import CpuShare, machine_line  # noqa: E402
from mr_patients import merged_patient  # noqa: E402

SHARE = CpuShare()  # other processes' CPU use, from import to the record
DATA = REPO.parent / "shared" / "data"
CONFIGS = {"denoise": REPO / "bench" / "compare_ct.yaml", "sr": REPO / "bench" / "compare_mr.yaml"}
CT_SITES = ("covid-ny-sbu", "tcga-luad", "pancreatic-ct-cbct-seg")


def _home(path: Path, site: str):  # type: ignore[no-untyped-def]
    from node.config import NodePaths
    from node.home import init_home

    if (path / "node.yaml").exists():
        return NodePaths(path.resolve()), False
    if path.exists():
        import shutil

        shutil.rmtree(path)  # a half-built home from a killed build
    return init_home(path, site), True


def _store_count(paths) -> int:  # type: ignore[no-untyped-def]
    from node.store import Store

    with Store(paths.store) as store:
        return store.count()


def build_ct(config) -> list[str]:  # type: ignore[no-untyped-def]
    from node.config import load_node_config
    from node.ingest.pipeline import ingest_sources

    lines = []
    for site_cfg, name in zip(config.sites, CT_SITES, strict=True):
        paths, _ = _home(REPO / site_cfg.home, site_cfg.name)
        if _store_count(paths) == 0:
            summary = ingest_sources(paths, load_node_config(paths), [DATA / "ct" / name],
                                     progress=True)
            lines.append(f"{name}: {summary.human().splitlines()[0]}")
    return lines


# Every MR comparison since 2026-11-23 conditions the site generators on the tumour class
# (halved the SSIM gap to pooled real data then); build writes it into each new home.
MR_GENERATOR: dict[str, Any] = {"conditioning": "label", "guidance_scale": 1.0}


def _set_generator(paths: Any, values: dict[str, Any]) -> None:
    from dataclasses import replace

    from node.config import load_node_config
    from protocols.files import atomic_write_text

    config = load_node_config(paths)
    config = replace(config, generator=replace(config.generator, **values))
    atomic_write_text(paths.config, config.to_yaml())


def build_mr(config) -> list[str]:  # type: ignore[no-untyped-def]
    from node.config import load_node_config
    from node.ingest.pipeline import ingest_sources

    root = DATA / "mr" / "brain-tumor-t1c"
    with open(root / "patients.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    n_sites = len(config.sites)
    by_site: dict[int, list[dict[str, str]]] = {i: [] for i in range(n_sites)}
    for row in rows:
        key = merged_patient(row["patient_id"])
        site = int(hashlib.sha256(key.encode()).hexdigest(), 16) % n_sites
        by_site[site].append(row)
    lines = []
    for i, site_cfg in enumerate(config.sites):
        paths, created = _home(REPO / site_cfg.home, site_cfg.name)
        if created:
            _set_generator(paths, MR_GENERATOR)
        if _store_count(paths) > 0:
            continue
        table = REPO / site_cfg.home / "sources.csv"  # inside the home: no raw ids, file names
        with open(table, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["file", "patient_id", "label"])
            for row in by_site[i]:
                writer.writerow([str(root / row["file"]), merged_patient(row["patient_id"]),
                                 row["label"]])
        files = [root / row["file"] for row in by_site[i]]
        summary = ingest_sources(paths, load_node_config(paths), files, modality="MR",
                                 patient_rule=f"csv:{table}", progress=True)
        table.unlink()
        patients = len({merged_patient(r["patient_id"]) for r in by_site[i]})
        lines.append(f"{site_cfg.name}: {len(files)} files of {patients} patients: "
                     f"{summary.human().splitlines()[0]}")
    return lines


def _load(task: str):  # type: ignore[no-untyped-def]
    from coordinator.restore.compare import load_compare_config

    return load_compare_config(CONFIGS[task])


def build(task: str) -> None:
    config = _load(task)
    t0 = time.monotonic()
    lines = build_ct(config) if task == "denoise" else build_mr(config)
    for line in lines:
        print(line)
    print(f"homes ready in {time.monotonic() - t0:.0f} s")


def generators(task: str, preset: str, max_steps: int | None, ae_steps: int = 0,
               diffusion_steps: int = 0, sites: str = "") -> None:
    """Train each site's own generator on its own train split (arm S needs them).

    ``ae_steps`` / ``diffusion_steps`` shorten the stages with complete LR schedules;
    ``max_steps`` stops early inside the preset's schedule; ``sites`` (comma-separated
    names) trains only those sites.
    """
    from node.config import load_node_config, resolve_home
    from node.generator.train import train_generator

    config = _load(task)
    wanted = {name for name in sites.split(",") if name}
    unknown = wanted - {site.name for site in config.sites}
    if unknown:
        raise SystemExit(f"no site named {sorted(unknown)} in {CONFIGS[task]}")
    for site_cfg in config.sites:
        if wanted and site_cfg.name not in wanted:
            continue
        paths = resolve_home(REPO / site_cfg.home)
        node_config = load_node_config(paths)
        if ae_steps:
            node_config.generator.ae_steps = ae_steps
        if diffusion_steps:
            node_config.generator.diffusion_steps = diffusion_steps
        t0 = time.monotonic()
        summary = train_generator(paths, node_config, preset=preset,
                                  max_steps=max_steps, progress=True, overwrite=True,
                                  quality=False)
        print(f"{site_cfg.name}: generator {preset} trained to step {summary.get('step')} in "
              f"{time.monotonic() - t0:.0f} s")


def _synthetic_dir(task: str, name: str = "synthetic") -> Path:
    return REPO / "bench" / "out" / "compare" / ("ct" if task == "denoise" else "mr") / name


DIAGNOSTICS = {
    "storemap": "DIAGNOSTIC stand-in, not synthetic: each site's real train slices mapped to "
                "physical units by the store-wide mapping that generated images get",
    "recon": "DIAGNOSTIC stand-in, not synthetic: each site's real train slices encoded and "
             "decoded by its generator's autoencoder (EMA weights, latent mean), then the "
             "store-wide mapping that generated images get",
}


def _write_set(out: Path, name: str, images, info: dict[str, object]) -> None:  # type: ignore[no-untyped-def]
    """One site's cached arm-S set: ``NAME.npy`` (float32) and ``NAME.json``, each atomic."""
    import io
    import json

    import numpy as np

    from protocols.files import atomic_write_bytes, atomic_write_json

    buffer = io.BytesIO()
    np.save(buffer, np.asarray(images, dtype=np.float32), allow_pickle=False)
    atomic_write_json(out / f"{name}.json", json.loads(json.dumps(info, default=str)))
    atomic_write_bytes(out / f"{name}.npy", buffer.getvalue())


def diagnose(task: str, kind: str) -> None:
    """Stand-ins for arm S that split its gap to arm R into its parts (bench only).

    Arm S's images differ from arm R's in three ways: they pass the store-wide physical
    mapping instead of each slice's own, the autoencoder, and the diffusion stage. ``storemap``
    keeps only the first, ``recon`` the first two; run each in place of S with
    ``run --synthetic-dir synthetic-KIND``. They hold real patients' slices (as arm R does in
    this simulation) and stay under bench/out: nothing here is a node export.
    """
    config = _load(task)
    out = _synthetic_dir(task, f"synthetic-{kind}")
    out.mkdir(parents=True, exist_ok=True)
    for site_cfg in config.sites:
        from node.config import resolve_home

        images, info = stand_in(resolve_home(REPO / site_cfg.home), config.modality, kind)
        _write_set(out, site_cfg.name, images, info)
        print(f"{site_cfg.name}: {len(images)} {kind} images in {info['wall_s']} s"
              + (f" (autoencoder L1 {info['recon_l1']})" if kind == "recon" else ""))


def stand_in(paths, modality: str, kind: str):  # type: ignore[no-untyped-def]
    """One site's diagnostic set (see ``diagnose``): physical units, info for the record."""
    import numpy as np

    from node.generator.sampling import load_generator, to_physical
    from node.store import Store

    t0 = time.monotonic()
    with Store(paths.store) as store:
        normalised = store.load(store.records(split="train", modality=modality))
    info: dict[str, object] = {"source": DIAGNOSTICS[kind], "accepted": int(len(normalised))}
    if kind == "recon":
        gen = load_generator(paths)
        recon = gen.reconstruct(normalised)
        info["generator"] = {"preset": gen.config.preset, "steps": gen.steps_trained}
        info["recon_l1"] = round(float(np.abs(recon - normalised).mean()), 5)
        normalised = recon
    images, unit = to_physical(paths, normalised.astype(np.float32), modality)
    info["unit"] = unit
    info["wall_s"] = round(time.monotonic() - t0, 1)
    return images, info


def _farthest_points(feats, n: int):  # type: ignore[no-untyped-def]
    """Greedy k-centre: indices of ``n`` points, each the farthest from those before it
    (starting with point 0), in increasing order."""
    import numpy as np

    f = np.asarray(feats, dtype=np.float64)
    chosen = [0]
    gap = np.linalg.norm(f - f[0], axis=1)
    for _ in range(n - 1):
        nxt = int(np.argmax(gap))
        chosen.append(nxt)
        gap = np.minimum(gap, np.linalg.norm(f - f[nxt], axis=1))
    return np.sort(np.asarray(chosen))


SELECTIONS = {
    "realism": "the highest realism score (k=3, site autoencoder features) against the site's "
               "train slices",
    "coverage": "greedy farthest-point (k-centre) coverage of the set in the site autoencoder's "
                "feature space",
}


def select_subset(task: str, source: str, out_name: str, method: str) -> None:
    """Arm S from part of a larger guard-accepted set (bench only).

    For every site, the site's train count of images is kept (in their original order) from
    the ``source`` set (made by ``synth --count N``, N above that count), as ``out_name``:
    ``realism``: those with the highest :func:`node.generator.quality.realism_scores` in the
    site generator's feature space against the site's train slices; ``coverage``: a greedy
    farthest-point cover of the set in that feature space. Every kept image is one the guard
    accepted; a selection only drops some.
    """
    import json

    import numpy as np

    from node.config import resolve_home
    from node.generator.quality import precision_recall, realism_scores
    from node.generator.sampling import load_generator
    from node.store import Store

    config = _load(task)
    src, out = _synthetic_dir(task, source), _synthetic_dir(task, out_name)
    out.mkdir(parents=True, exist_ok=True)
    for site_cfg in config.sites:
        t0 = time.monotonic()
        paths = resolve_home(REPO / site_cfg.home)
        gen = load_generator(paths)
        with Store(paths.store) as store:
            real = store.load(store.records(split="train", modality=config.modality))
            scale, offset, _ = store.physical_mapping(config.modality)
        pool_phys = np.load(src / f"{site_cfg.name}.npy")
        n = len(real)
        if len(pool_phys) <= n:
            raise SystemExit(f"{src}/{site_cfg.name}.npy holds {len(pool_phys)} images, not "
                             f"more than the site's {n} train slices: nothing to select")
        pool = ((pool_phys - np.float32(offset)) / np.float32(scale)).astype(np.float32)
        real_f, pool_f = gen.features(real), gen.features(pool)
        scores = realism_scores(real_f, pool_f)
        if method == "realism":
            keep = np.sort(np.argsort(-scores, kind="stable")[:n])
        else:
            keep = _farthest_points(pool_f, n)
        p_first, r_first = precision_recall(real_f, pool_f[:n])
        p_kept, r_kept = precision_recall(real_f, pool_f[keep])
        info = json.loads((src / f"{site_cfg.name}.json").read_text(encoding="utf-8"))
        info.update({
            "accepted": int(n),
            "selection": f"the {n} of {len(pool)} guard-accepted images of {source} by "
                         f"{SELECTIONS[method]}",
            "precision_recall_first_n": [round(p_first, 4), round(r_first, 4)],
            "precision_recall_kept": [round(p_kept, 4), round(r_kept, 4)],
            "realism_median_first_n": round(float(np.median(scores[:n])), 4),
            "realism_median_kept": round(float(np.median(scores[keep])), 4),
        })
        _write_set(out, site_cfg.name, pool_phys[keep], info)
        print(f"{site_cfg.name}: kept {n} of {len(pool)} by {method} (median realism "
              f"{info['realism_median_first_n']} first {n} -> {info['realism_median_kept']}); "
              f"precision / recall {p_first:.3f} / {r_first:.3f} (first {n}) -> "
              f"{p_kept:.3f} / {r_kept:.3f} (kept), {time.monotonic() - t0:.0f} s")


def _checkpoint_digest(site_cfg) -> str | None:  # type: ignore[no-untyped-def]
    """sha256 of the site generator's checkpoint file (as its provenance records it)."""
    from node.config import resolve_home
    from node.generator.checkpoint import checkpoint_path
    from protocols.files import sha256_file

    ckpt = checkpoint_path(resolve_home(REPO / site_cfg.home))
    return sha256_file(ckpt) if ckpt.exists() else None


def restage(task: str, setting: str, suffix: str, diffusion_steps: int,
            resume: bool = False) -> None:
    """A new stage 2 for every site on its own trained autoencoder, with one setting changed.

    Each site home is copied to ``<home><suffix>`` (its runs left behind), the copy's
    checkpoint is put back to the end of its autoencoder stage with a freshly initialised UNet
    (``bench_generator.stage2_copy``), ``setting`` (``key=value``, channel lists as
    64-128-128) is written into its config, and the diffusion stage is trained again from
    there: ``diffusion_steps`` (0: as the checkpoint says) with a full LR schedule. The
    originals are not touched; ``synth --home-suffix`` samples from the copies. ``resume``
    continues the copies an interrupted restage left (their own last checkpoints; a finished
    copy returns at once) instead of starting them over.
    """
    import json

    from bench_generator import _arm_setting, stage2_copy

    from node.config import load_node_config, resolve_home
    from node.generator.train import train_generator

    key, value = _arm_setting("", setting)
    if not key:
        raise SystemExit("--set takes key=value, e.g. unet_channels=64-128-128")
    if isinstance(value, str):
        try:  # numbers and booleans as numbers and booleans; other words stay strings
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    edits: dict[str, object] = {key: value}
    if diffusion_steps:
        edits["diffusion_steps"] = diffusion_steps
    config = _load(task)
    for site_cfg in config.sites:
        source = REPO / site_cfg.home
        copy = source.parent / f"{source.name}{suffix}"
        if resume and _restaged(copy, edits):
            paths = resolve_home(str(copy))
        else:
            paths = stage2_copy(source, copy, edits, restart=True)
        t0 = time.monotonic()
        summary = train_generator(paths, load_node_config(paths), resume=True, progress=True,
                                  quality=False)
        print(f"{site_cfg.name}{suffix}: {key}={value}, stage 2 of"
              f" {summary.get('diffusion_steps')} steps from the site's autoencoder in"
              f" {time.monotonic() - t0:.0f} s; final {summary.get('final_losses')};"
              f" {summary.get('device')}")


def _restaged(home: Path, edits: dict[str, object]) -> bool:
    """Whether ``home`` holds a restaged generator checkpoint with ``edits`` in its config."""
    from node.config import resolve_home
    from node.generator.checkpoint import checkpoint_path, load_checkpoint

    if not home.is_dir():
        return False
    ckpt = checkpoint_path(resolve_home(str(home)))
    if not ckpt.exists():
        return False
    state, _ = load_checkpoint(ckpt)
    config = state.get("config", {})
    return all(config.get(k) == v for k, v in edits.items())


def _uniform_classes(site: Any) -> dict[str, Any]:
    """``generate_and_screen`` options that sample the site's label-conditioned generator
    with every class equally likely, instead of in its train split's class mix."""
    from node.generator.sampling import load_generator

    gen = load_generator(site.paths)
    if gen.conditioning != "label" or not gen.classes:
        raise SystemExit(f"{site.name}: the generator is not label-conditioned")
    gen.class_counts = [1] * len(gen.classes)
    modality = gen.modalities[0]

    def sampler(n: int, s: int):  # type: ignore[no-untyped-def]
        return gen.sample(n, seed=s, modality=modality, batch_size=min(n, 16))

    info = {**gen.summary(), "class_mix": "uniform"}
    return {"sampler": sampler, "modality": modality, "generator_info": info}


def synth(task: str, count: int, seed: int, home_suffix: str = "",
          synthetic_dir: str = "synthetic", class_mix: str = "train") -> None:
    """Arm S's data, made ahead of the run: generate_and_screen at each site (real guard),
    the accepted images cached in bench/out (they are synthetic, guard-accepted).
    ``home_suffix``: sample from the sites' restaged copies (``restage``) instead.
    ``class_mix``: ``train`` (a label-conditioned generator draws classes in its train
    split's mix, as the node does) or ``uniform`` (every class equally likely)."""
    import json
    from dataclasses import replace

    from coordinator.restore.compare import _load_site, guarded_synthetic_source, nothing_from
    from privacy.errors import GuardError

    config = _load(task)
    config.sites = [replace(s, home=f"{s.home}{home_suffix}") for s in config.sites]
    out = _synthetic_dir(task, synthetic_dir)
    for site_cfg in config.sites:
        target = out / f"{site_cfg.name}.npy"
        meta = out / f"{site_cfg.name}.json"
        key = {"count_asked": count, "seed": seed, "class_mix": class_mix}
        if target.exists() and meta.exists():
            # reused only for the same count, seed and generator checkpoint (the provenance's
            # checkpoint_digest is the sha256 of the checkpoint file's bytes)
            made = json.loads(meta.read_text(encoding="utf-8"))
            made_with = {**{k: made.get(k) for k in key},
                         "class_mix": made.get("class_mix", "train"),  # sets made before it
                         "checkpoint_digest": made.get("generator", {}).get("checkpoint_digest")}
            wanted = {**key, "checkpoint_digest": _checkpoint_digest(site_cfg)}
            stale = {k: v for k, v in made_with.items() if v != wanted[k]}
            if not stale:
                print(f"{site_cfg.name}: cached {target}")
                continue
            print(f"{site_cfg.name}: the cached set was made with {stale}; remaking it")
        site = _load_site(replace(site_cfg, home=str(REPO / site_cfg.home)), config.modality)
        n = count or int(site.train.shape[0])
        t0 = time.monotonic()
        try:
            options = _uniform_classes(site) if class_mix == "uniform" else {}
            images, info = guarded_synthetic_source(site, n, seed, **options)
        except GuardError as exc:  # the site's generator copies: it sends nothing
            images, info = nothing_from(site, exc)
            info["generator"] = {"checkpoint_digest": _checkpoint_digest(site_cfg)}
        info["wall_s"] = round(time.monotonic() - t0, 1)
        info.update(key)  # count_asked 0: the site's train count
        _write_set(out, site_cfg.name, images, info)
        print(f"{site_cfg.name}: {images.shape[0]} guard-accepted images in {info['wall_s']} s")


def _cached_source(task: str, name: str = "synthetic"):  # type: ignore[no-untyped-def]
    import json

    import numpy as np

    folder = _synthetic_dir(task, name)

    def source(site, count, seed):  # type: ignore[no-untyped-def]
        images = np.load(folder / f"{site.name}.npy")
        info = json.loads((folder / f"{site.name}.json").read_text())
        used = images[:count] if count else images
        info["used"] = int(used.shape[0])  # the first ``count`` of the cached accepted set
        return used, info

    return source


def run(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from coordinator.restore.compare import run_comparison

    config = _load(args.task)
    overrides = {}
    if args.steps:
        overrides["steps"] = args.steps
    if args.batch_size:
        overrides["batch_size"] = args.batch_size
    if args.train_seed is not None:
        overrides["seed"] = args.train_seed
    if args.lr_schedule:
        overrides["lr_schedule"] = args.lr_schedule
    if args.decay_fraction:
        overrides["lr_decay_fraction"] = args.decay_fraction
    if args.preset:
        overrides["preset"] = args.preset
    if args.arms:
        overrides["arms"] = args.arms.split(",")
    if args.rounds:
        overrides["fedavg"] = replace(config.fedavg, rounds=args.rounds)
    if args.synthetic:
        overrides["synthetic"] = replace(config.synthetic, source=args.synthetic)
    if args.count_per_site:
        synthetic = overrides.get("synthetic", config.synthetic)
        overrides["synthetic"] = replace(synthetic, count_per_site=args.count_per_site)
    config = replace(config, **overrides)
    config.sites = [replace(s, home=str(REPO / s.home)) for s in config.sites]
    out = REPO / (args.out or config.out)
    source, label = None, None
    names = [s.name for s in config.sites]
    folder = _synthetic_dir(args.task, args.synthetic_dir)
    cached = all((folder / f"{n}.npy").exists() for n in names)
    if args.synthetic_dir != "synthetic" and not cached:
        raise SystemExit(f"{folder} lacks a set for every site; make it first (diagnose/synth)")
    if "S" in config.arms and config.synthetic.source == "guard" and cached:
        source = _cached_source(args.task, args.synthetic_dir)
        kind = args.synthetic_dir.removeprefix("synthetic-")
        label = (f"{DIAGNOSTICS[kind]}, made by `bench_compare.py diagnose --kind {kind}`"
                 if kind in DIAGNOSTICS else
                 "guard-accepted synthetic images from node.guard.run.generate_and_screen at "
                 "each site with the site's own generator, made ahead by `bench_compare.py "
                 f"synth` and read from {folder.relative_to(REPO)}")
    t0 = time.monotonic()
    results = run_comparison(config, out, progress=True, synthetic_source=source,
                             synthetic_label=label)
    wall = time.monotonic() - t0
    if args.no_record:
        print(f"done in {wall:.0f} s (not recorded): {out / 'report.md'}")
        return
    record(args, config, results, out, wall)


def _decay(settings: dict) -> str:  # type: ignore[type-arg]
    fraction = settings.get("decay_fraction", 1.0)
    if settings.get("lr_schedule", "constant") != "cosine" or fraction == 1.0:
        return ""
    return f" over the last {fraction:.0%} of the steps"


def record(args, config, results, out: Path, wall: float) -> None:  # type: ignore[no-untyped-def]
    from coordinator.restore.report import ARM_NAMES

    st = results["settings"]
    cmd = "python bench/bench_compare.py " + " ".join(sys.argv[1:])
    lines = [
        "",
        f"## Restoration comparison: {config.task} ({config.modality}), "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        f"Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} {cmd}`. Machine: "
        f"{platform.machine()}, {machine_line(SHARE, 'CPU only')}. "
        f"Network `{st['net']}` {st['net_config']}, "
        f"{st['steps']} steps x batch {st['batch_size']} for every arm, seed {st['seed']}, "
        f"learning rate {st['lr']} {st.get('lr_schedule', 'constant')}"
        f"{_decay(st)}. "
        f"Total wall time {wall:.0f} s. Full report: `{out.relative_to(REPO)}/report.md` "
        "(and report.html).",
        "",
        config.description,
        "",
        "| site | train slices (patients) | holdout slices (patients) |",
        "| --- | ---: | ---: |",
    ]
    for s in results["sites"]:
        lines.append(f"| {s['name']} | {s['train_slices']} ({s['patients_train']}) | "
                     f"{s['holdout_slices']} ({s['patients_holdout']}) |")
    lines += ["", "| arm | n | PSNR dB mean (sd) [95 % CI] | SSIM mean (sd) [95 % CI] | "
              "RMSE mean | wall s (pairs + generate + train + evaluate) |",
              "| --- | ---: | --- | --- | ---: | ---: |"]
    for arm in ("S", "R", "L", "F", "0"):
        if arm not in results["table"]:
            if arm in results["notes"]:
                lines.append(f"| {ARM_NAMES[arm]} | - | {results['notes'][arm]} | | | |")
            continue
        o = results["table"][arm]["overall"]
        p, s, r = o["psnr_db"], o["ssim"], o["rmse"]
        t = results["timings_s"].get(arm, {})
        lines.append(
            f"| {ARM_NAMES[arm]} | {p['n']} | {p['mean']:.2f} ({p['sd']:.2f}) "
            f"[{p['ci95_low']:.2f}, {p['ci95_high']:.2f}] | {s['mean']:.4f} ({s['sd']:.4f}) "
            f"[{s['ci95_low']:.4f}, {s['ci95_high']:.4f}] | {r['mean']:.1f} | "
            f"{sum(t.values()):.0f} |" if t else
            f"| {ARM_NAMES[arm]} | {p['n']} | {p['mean']:.2f} ({p['sd']:.2f}) "
            f"[{p['ci95_low']:.2f}, {p['ci95_high']:.2f}] | {s['mean']:.4f} ({s['sd']:.4f}) "
            f"[{s['ci95_low']:.4f}, {s['ci95_high']:.4f}] | {r['mean']:.1f} | (in the others) |"
        )
    lines += ["", "| comparison | metric | n | mean diff [95 % CI] | Wilcoxon p | t-test p | "
              "TOST p (margin) | verdict |", "| --- | --- | ---: | --- | ---: | ---: | --- | --- |"]
    for key, by_metric in results["tests"].items():
        for metric in ("psnr_db", "ssim"):
            t = by_metric[metric]["overall"]
            tost = t["tost"] or {}
            lines.append(
                f"| {key} | {metric} | {t['n']} | {t['mean_difference']:.4f} "
                f"[{t['ci95_low']:.4f}, {t['ci95_high']:.4f}] | {t['wilcoxon_p']:.3g} | "
                f"{t['ttest_p']:.3g} | {tost.get('p', float('nan')):.3g} ({t['margin']}) | "
                f"{t['verdict']} |"
            )
    for arm, note in results["notes"].items():
        lines.append(f"\nArm {arm}: {note}")
    if "S" in results["provenance"]:
        prov = results["provenance"]["S"]
        counts = ", ".join(
            f"{site}: none (the guard refused every candidate: {info['refused']})"
            if info.get("refused") else
            f"{site}: {info.get('used', info.get('accepted'))} used, the first of "
            f"{info.get('accepted')} accepted of {info.get('candidates_tried')} tried "
            f"(generator preset {info.get('generator', {}).get('preset', '?')}, "
            f"{info.get('generator', {}).get('steps', '?')} steps)"
            for site, info in prov["sites"].items())
        lines.append(f"\nArm S data: {prov['label']}. Per site: {counts}.")
    with open(REPO / "bench" / "RESULTS.md", "a", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def seeds(reports: list[str], record_it: bool) -> None:
    """Several runs of one comparison (training or synthesis seeds) read together.

    Each report's per-image figures are those of one trained model per arm, i.e. one draw of
    its training noise. Here every arm's per-image PSNR / SSIM is averaged over the runs (same
    holdout images, same degraded inputs: checked), which estimates what the arm's training
    procedure gives an image, and the paired tests run on those means. Each run's own
    differences are listed beside them, so the spread the mean hides stays visible.
    """
    import json

    import numpy as np

    from coordinator.restore.compare import COMPARISONS
    from coordinator.restore.stats import paired_comparison

    runs = []
    for folder in reports:
        path = REPO / folder / "results.json"  # an absolute folder replaces REPO
        if not path.is_file():
            raise SystemExit(f"{path}: no results.json")
        runs.append((folder, json.loads(path.read_text(encoding="utf-8"))))
    if len(runs) < 2:
        raise SystemExit("give at least two report folders")
    first = runs[0][1]
    for folder, r in runs[1:]:
        if r["per_image"].get("0") != first["per_image"].get("0"):
            raise SystemExit(f"{folder}: other holdout images or degraded inputs than "
                             f"{runs[0][0]}; runs must share the evaluation")
    names = [s["name"] for s in first["sites"]]
    arms = [a for a in ("S", "R", "L", "F", "0") if all(a in r["per_image"] for _, r in runs)]
    margins = first["config"]["margins"]
    metrics = ("psnr_db", "ssim")

    def values(r: dict, arm: str, m: str, site: str | None = None) -> np.ndarray:  # type: ignore[type-arg]
        sites = [site] if site else names
        return np.array([v for n in sites for v in r["per_image"][arm][n][m]])

    lines = ["", f"## Restoration comparison over {len(runs)} runs, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             f"Command: `python bench/bench_compare.py {' '.join(sys.argv[1:])}`. Runs "
             "(training seed, learning-rate schedule, arm S's synthesis seed):", ""]
    for folder, r in runs:
        st = r["settings"]
        syn = {v.get("seed") for v in r.get("provenance", {}).get("S", {})
               .get("sites", {}).values()}
        lines.append(f"- `{folder}`: seed {st['seed']}, {st.get('lr_schedule', 'constant')}"
                     f"{_decay(st)}, "
                     f"synthesis seed {sorted(syn) if syn else '-'}")
    lines += ["", "Each run's mean differences (PSNR dB / SSIM):", "",
              "| run | " + " | ".join(f"{a} vs {b}" for a, b in COMPARISONS) + " |",
              "| --- |" + " ---: |" * len(COMPARISONS)]
    for folder, r in runs:
        cells = []
        for a, b in COMPARISONS:
            if a in r["per_image"] and b in r["per_image"]:
                d = [float(np.mean(values(r, a, m) - values(r, b, m))) for m in metrics]
                cells.append(f"{d[0]:+.3f} / {d[1]:+.4f}")
            else:
                cells.append("-")
        lines.append(f"| {Path(folder).name} | " + " | ".join(cells) + " |")
    mean = {a: {m: {n: np.mean([values(r, a, m, n) for _, r in runs], axis=0) for n in names}
                for m in metrics} for a in arms}
    lines += ["", "Arms' per-image figures averaged over the runs:", "",
              "| arm | PSNR dB | SSIM |", "| --- | ---: | ---: |"]
    for a in arms:
        overall = [float(np.mean(np.concatenate([mean[a][m][n] for n in names])))
                   for m in metrics]
        lines.append(f"| {a} | {overall[0]:.2f} | {overall[1]:.4f} |")
    lines += ["", "| comparison (means over runs) | metric | where | mean diff [95 % CI] | "
              "Wilcoxon p | TOST p (margin) | verdict |",
              "| --- | --- | --- | --- | ---: | --- | --- |"]
    for a, b in COMPARISONS:
        if a not in arms or b not in arms:
            continue
        for m in metrics:
            for where in ("overall", *names):
                sites = names if where == "overall" else [where]
                av = np.concatenate([mean[a][m][n] for n in sites])
                bv = np.concatenate([mean[b][m][n] for n in sites])
                t = paired_comparison(list(av), list(bv), margins.get(m))
                tost = (t.get("tost") or {}).get("p", float("nan"))
                lines.append(
                    f"| {a} vs {b} | {m} | {where} | {t['mean_difference']:+.4f} "
                    f"[{t['ci95_low']:+.4f}, {t['ci95_high']:+.4f}] | {t['wilcoxon_p']:.3g} | "
                    f"{tost:.3g} ({t['margin']}) | {t['verdict']} |")
    text = "\n".join(lines)
    print(text)
    if record_it:
        with open(REPO / "bench" / "RESULTS.md", "a", encoding="utf-8") as handle:
            handle.write(text + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--task", choices=("denoise", "sr"), required=True)
    g = sub.add_parser("generators")
    g.add_argument("--task", choices=("denoise", "sr"), required=True)
    g.add_argument("--preset", choices=("tiny", "cpu", "gpu"), default="tiny")
    g.add_argument("--max-steps", type=int, default=None)
    g.add_argument("--ae-steps", type=int, default=0)
    g.add_argument("--diffusion-steps", type=int, default=0)
    g.add_argument("--sites", default="", help="comma-separated site names (default: all)")
    y = sub.add_parser("synth")
    y.add_argument("--task", choices=("denoise", "sr"), required=True)
    y.add_argument("--count", type=int, default=0, help="per site; 0 = its train count")
    y.add_argument("--seed", type=int, default=0)
    y.add_argument("--home-suffix", default="", help="the restaged copies of the site homes")
    y.add_argument("--class-mix", choices=("train", "uniform"), default="train",
                   help="label-conditioned generators: classes in the train mix or uniform")
    y.add_argument("--synthetic-dir", default="synthetic",
                   help="the set's folder under bench/out/compare/TASK")
    sl = sub.add_parser("select", help="arm S from part of a larger guard-accepted set")
    sl.add_argument("--task", choices=("denoise", "sr"), required=True)
    sl.add_argument("--from", dest="source", required=True, help="e.g. synthetic-seed0-2400")
    sl.add_argument("--synthetic-dir", required=True, help="the selected set's folder name")
    sl.add_argument("--method", choices=tuple(SELECTIONS), default="realism")
    rs = sub.add_parser("restage")
    rs.add_argument("--task", choices=("denoise", "sr"), required=True)
    rs.add_argument("--set", required=True, help="key=value, e.g. unet_channels=64-128-128")
    rs.add_argument("--suffix", required=True, help="the copies are <home><suffix>")
    rs.add_argument("--diffusion-steps", type=int, default=0)
    rs.add_argument("--resume", action="store_true",
                    help="continue the copies an interrupted restage left")
    r = sub.add_parser("run")
    r.add_argument("--task", choices=("denoise", "sr"), required=True)
    r.add_argument("--steps", type=int, default=0)
    r.add_argument("--batch-size", type=int, default=0)
    r.add_argument("--train-seed", type=int, default=None,
                   help="network initialisation and batch order seed of every arm")
    r.add_argument("--lr-schedule", choices=("cosine", "constant"), default=None)
    r.add_argument("--decay-fraction", type=float, default=0.0,
                   help="cosine: the last fraction of the steps decays (default: the config's)")
    r.add_argument("--preset", choices=("tiny", "cpu", "gpu"), default=None)
    r.add_argument("--arms", default="")
    r.add_argument("--rounds", type=int, default=0)
    r.add_argument("--synthetic", choices=("guard", "pool", "none"), default=None)
    r.add_argument("--count-per-site", type=int, default=0,
                   help="arm S images per site (default: the config's, 0 = its train count)")
    r.add_argument("--out", default="")
    r.add_argument("--no-record", action="store_true", help="smoke run: do not touch RESULTS.md")
    r.add_argument("--synthetic-dir", default="synthetic",
                   help="arm S's cached set under bench/out/compare/TASK (synthetic-storemap /"
                        " synthetic-recon: the diagnose stand-ins)")
    d = sub.add_parser("diagnose")
    d.add_argument("--task", choices=("denoise", "sr"), required=True)
    d.add_argument("--kind", choices=tuple(DIAGNOSTICS), required=True)
    e = sub.add_parser("seeds", help="several runs' reports read together (see seeds())")
    e.add_argument("reports", nargs="+", help="report folders (with results.json)")
    e.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    if args.cmd == "seeds":
        seeds(args.reports, not args.no_record)
    elif args.cmd == "build":
        build(args.task)
    elif args.cmd == "generators":
        generators(args.task, args.preset, args.max_steps, args.ae_steps,
                   args.diffusion_steps, args.sites)
    elif args.cmd == "synth":
        synth(args.task, args.count, args.seed, args.home_suffix, args.synthetic_dir,
              args.class_mix)
    elif args.cmd == "restage":
        restage(args.task, args.set, args.suffix, args.diffusion_steps, args.resume)
    elif args.cmd == "select":
        select_subset(args.task, args.source, args.synthetic_dir, args.method)
    elif args.cmd == "diagnose":
        diagnose(args.task, args.kind)
    else:
        run(args)


if __name__ == "__main__":
    main()
