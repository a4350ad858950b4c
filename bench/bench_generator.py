"""Generator benchmark and real-data check (issue 3): build a store, train, measure.

    python bench/bench_generator.py build --home DIR --kind mr|ct [--size 64]
    python bench/bench_generator.py train --home DIR [--preset cpu] [--ae-steps N]
        [--diffusion-steps N]
    python bench/bench_generator.py bench --home DIR [--label TEXT]
    python bench/bench_generator.py weighting --home DIR [--diffusion-steps N] [--gamma G]
    python bench/bench_generator.py autoencoder --home DIR [--home DIR ...] [--count 512]

``build`` makes a store from ../shared/data without the ingest pipeline (written in parallel):
MR = brain-tumor-t1c JPEGs (per-slice 0.5 / 99.5 percentiles -> [0, 1], patients from
patients.csv); CT = the three CT folders, axial slices only, HU via RescaleSlope / Intercept,
window [-1024, 3071] -> [0, 1]. Slices are box-downsampled to the store's grid. ``bench``
times both training stages and three samplers on the same trained model and appends the
figures to bench/RESULTS.md. ``weighting`` trains one autoencoder, then one diffusion
stage per stage-2 loss weighting (uniform, min_snr) from it, with the same seeds, batches and
steps, and records both quality reports and a figure of samples of the same seeds side by
side. ``autoencoder`` puts the same holdout slices (the first ``--count`` of the first home's
holdout split; every home must hold the same split) through each home's EMA autoencoder and
records what stage 1 keeps of genuinely unseen slices: L1, PSNR, spectrum distance and the
fine-scale power deficit. Outputs stay in the node home (keep it out of the repository).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from node.store import NewSlice

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from machine import CpuShare, machine_line  # noqa: E402

SHARE = CpuShare()  # other processes' CPU use, from import to the record
DATA = REPO.parent / "shared" / "data"


def _resize(pixels: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    img = Image.fromarray(pixels.astype(np.float32), mode="F")
    return np.asarray(img.resize((size, size), Image.Resampling.BOX), dtype=np.float32)


def read_mr(home: Path, size: int) -> list[NewSlice]:
    from PIL import Image

    from node.pseudonym import Pseudonymiser
    from node.store import NewSlice
    from protocols.files import sha256_file

    root = DATA / "mr" / "brain-tumor-t1c"
    pseudo = Pseudonymiser.from_file(home / "keys" / "pseudonym.secret")
    rows = list(csv.DictReader(open(root / "patients.csv", encoding="utf-8")))
    slices: list[NewSlice] = []
    for row in rows:
        path = root / row["file"]
        raw = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
        low, high = np.percentile(raw, [0.5, 99.5])
        if high <= low:
            continue
        norm = np.clip((raw - low) / (high - low), 0.0, 1.0)
        digest = sha256_file(path)
        slices.append(NewSlice(
            modality="MR", patient=pseudo.patient(row["patient_id"]),
            series=pseudo.series(row["patient_id"] + "/" + row["label"]),
            position=float(Path(row["file"]).stem), source_digest=digest,
            instance_key=pseudo.instance(digest), pixels=_resize(norm, size),
            unit="a.u.", scale=float(high - low), offset=float(low), label=row["label"],
        ))
    return slices


def read_ct(home: Path, size: int) -> list[NewSlice]:
    import pydicom

    from node.pseudonym import Pseudonymiser
    from node.store import NewSlice
    from protocols.files import sha256_file

    pseudo = Pseudonymiser.from_file(home / "keys" / "pseudonym.secret")
    slices: list[NewSlice] = []
    skipped = 0
    for path in sorted((DATA / "ct").rglob("*")):
        if not path.is_file() or path.suffix.lower() in (".md", ".csv", ".txt"):
            continue
        try:
            ds = pydicom.dcmread(path)
            iop = np.array([float(v) for v in ds.ImageOrientationPatient])
            normal = np.cross(iop[:3], iop[3:])
            if abs(normal[2]) < 0.9:  # axial slices only
                skipped += 1
                continue
            hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(
                ds.RescaleIntercept
            )
        except Exception as exc:  # noqa: BLE001 - a bench skips any unreadable file
            print(f"skip {path.name}: {type(exc).__name__}", file=sys.stderr)
            skipped += 1
            continue
        norm = np.clip((hu + 1024.0) / 4095.0, 0.0, 1.0)
        digest = sha256_file(path)
        position = float(ds.ImagePositionPatient[2]) if "ImagePositionPatient" in ds else 0.0
        slices.append(NewSlice(
            modality="CT", patient=pseudo.patient(str(ds.PatientID)),
            series=pseudo.series(str(ds.SeriesInstanceUID)), position=position,
            source_digest=digest, instance_key=pseudo.instance(str(ds.SOPInstanceUID)),
            pixels=_resize(norm, size), unit="HU", scale=4095.0, offset=-1024.0,
            spacing_mm=float(ds.PixelSpacing[0]) * ds.Rows / size,
        ))
    print(f"CT: {len(slices)} axial slices read, {skipped} skipped (not axial or unreadable)")
    return slices


def write_store(home: Path, slices: list[NewSlice]) -> int:
    from node.pseudonym import Pseudonymiser
    from node.store import Store

    pseudo = Pseudonymiser.from_file(home / "keys" / "pseudonym.secret")
    added = 0
    with Store(home / "store") as store:
        for start in range(0, len(slices), 256):
            added += store.add_batch(slices[start : start + 256])
        split = store.assign_split(0.2, lambda p: pseudo.rank(0, p))
    print(f"store: {added} slices, {split}")
    return added


# A pack carries already-pseudonymised, already-resampled slices to a machine without
# ../shared (the lent GPU machine): pixels as uint8 (MR: 8-bit JPEG sources, so quantising the
# normalised [0, 1] values to 1/255 costs at most 0.002) or float16 (CT), metadata as JSON.
_PACK_FIELDS = ("modality", "patient", "series", "position", "source_digest", "instance_key",
                "unit", "scale", "offset", "spacing_mm", "label")


def write_pack(slices: list[NewSlice], out: Path, dtype: str) -> None:
    stack = np.stack([s.pixels for s in slices])
    pixels = np.round(stack * 255).astype(np.uint8) if dtype == "uint8" else stack.astype(
        np.float16)
    meta = [{k: getattr(s, k) for k in _PACK_FIELDS} for s in slices]
    np.savez_compressed(out, pixels=pixels, meta=np.array(json.dumps(meta)))
    print(f"pack {out}: {len(slices)} slices, {out.stat().st_size / 1e6:.1f} MB")


def read_pack(path: Path) -> list[NewSlice]:
    from node.store import NewSlice

    with np.load(path) as pack:
        pixels, meta = pack["pixels"], json.loads(str(pack["meta"]))
    scale = 255.0 if pixels.dtype == np.uint8 else 1.0
    return [NewSlice(pixels=(pixels[i].astype(np.float32) / scale), **meta[i])
            for i in range(len(meta))]


def cmd_build(args: argparse.Namespace) -> None:
    from node.home import init_home
    from node.store import Store

    home = Path(args.home)
    if (home / "store").exists():
        with Store(home / "store") as store:
            held = store.count()
        if held:
            # A pack's instance keys come from another home's secret, so nothing would
            # deduplicate them: a second build would silently double the store.
            raise SystemExit(f"{home}: the store already holds {held:,} slices; build makes a"
                             " new store, so give it a new --home")
    if args.from_pack:
        slices = read_pack(Path(args.from_pack))
        size = int(slices[0].pixels.shape[-1])
    else:
        size = args.size
    if not (home / "node.yaml").exists():
        init_home(home, f"bench-{args.kind}")
    text = (home / "node.yaml").read_text()
    text = text.replace("image_size: 64", f"image_size: {size}")
    (home / "node.yaml").write_text(text)
    if not args.from_pack:
        slices = (read_mr if args.kind == "mr" else read_ct)(home, size)
    if args.pack:
        write_pack(slices, Path(args.pack), "uint8" if args.kind == "mr" else "float16")
    else:
        write_store(home, slices)


def cmd_train(args: argparse.Namespace) -> None:
    from node.config import load_node_config, resolve_home
    from node.generator.train import train_generator

    if not 0.0 < args.ae_share < 1.0:
        raise SystemExit(f"--ae-share must be between 0 and 1, not {args.ae_share}")
    paths = resolve_home(args.home)
    config = load_node_config(paths)
    if args.ae_steps:
        config.generator.ae_steps = args.ae_steps
    if args.diffusion_steps:
        config.generator.diffusion_steps = args.diffusion_steps
    if args.budget_s:
        ae, diff = _steps_for_budget(paths, config, args.preset, args.budget_s, args.ae_share)
        config.generator.ae_steps, config.generator.diffusion_steps = ae, diff
        print(f"budget {args.budget_s:.0f} s: {ae} autoencoder + {diff} diffusion steps")
    summary = train_generator(paths, config, preset=args.preset, resume=args.resume,
                              overwrite=not args.resume, progress=True)
    print(json.dumps(summary, indent=2, sort_keys=True))


AE_SHARE = 0.35  # the autoencoder's share of a --budget-s run, about as in the presets


def _steps_for_budget(paths: object, config: object, preset: str, budget_s: float,
                      ae_share: float = AE_SHARE) -> tuple[int, int]:
    """Step counts that fill ``budget_s`` seconds of training, from timed probe steps.

    Only the step counts change (the LR schedules still run to completion); ``ae_share`` of the
    budget goes to the autoencoder. The probe's weights are thrown away.
    """
    from node.generator.device import choose_device
    from node.generator.presets import resolve_config
    from node.generator.train import _Run, load_training_data
    from node.store import Store

    cfg = resolve_config(config.generator, preset)  # type: ignore[attr-defined]
    with Store(paths.store) as store:  # type: ignore[attr-defined]
        data, digest = load_training_data(store, cfg.conditioning)
    run = _Run(cfg, data, choose_device(None), digest)
    run.step = cfg.ae_adversarial_start if cfg.ae_adversarial_weight > 0 else 0
    ae_rate = _time_steps(run, "autoencoder", 10)
    run.step = cfg.ae_steps
    diff_rate = _time_steps(run, "diffusion", 10)
    del run
    ae_steps = max(10, int(budget_s * ae_share * ae_rate))
    # The adversarial loss starts at the same fraction of the (shorter) autoencoder stage.
    config.generator.ae_adversarial_start = int(  # type: ignore[attr-defined]
        ae_steps * cfg.ae_adversarial_start / cfg.ae_steps)
    return ae_steps, max(10, int(budget_s * (1 - ae_share) * diff_rate))


def _time_steps(run: object, stage: str, n: int) -> float:
    step = run.autoencoder_step if stage == "autoencoder" else run.diffusion_step  # type: ignore[attr-defined]
    step()  # warm-up
    started = time.perf_counter()
    for _ in range(n):
        step()
    return n / (time.perf_counter() - started)


def _record(lines: list[str], results: str) -> None:
    """Append a section to ``results`` (default bench/RESULTS.md) and print it."""
    path = Path(results) if results else REPO / "bench" / "RESULTS.md"
    if not path.exists():
        path.write_text("# Benchmark results\n\nMachine, date, command and figures of each"
                        " run, newest last.\n")
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def cmd_bench(args: argparse.Namespace) -> None:
    import torch

    from node.config import resolve_home
    from node.generator.checkpoint import checkpoint_path, load_checkpoint
    from node.generator.device import choose_device, resolve_precision
    from node.generator.presets import config_from_dict
    from node.generator.sampling import load_generator
    from node.generator.train import _Run, load_training_data
    from node.store import Store

    paths = resolve_home(args.home)
    state, _ = load_checkpoint(checkpoint_path(paths))
    cfg = config_from_dict(state["config"])
    device = choose_device(None)
    with Store(paths.store) as store:
        data, digest = load_training_data(store, state["conditioning"])
    run = _Run(cfg, data, device, digest)
    run.restore(state)
    precisions = [p for p in args.precisions.split(",") if p]
    figures: dict[str, float] = {}
    run.step = 0
    figures["train_autoencoder_steps_per_s"] = _time_steps(run, "autoencoder", args.train_steps)
    generator = load_generator(paths)
    runs: tuple[tuple[str, Literal["dpm", "ddim", "ddpm"], int, int], ...] = (
        ("dpm20", "dpm", 20, args.count),
        ("ddim50", "ddim", 50, args.count),
        ("ddpm1000", "ddpm", 1000, args.ddpm_count),
    )
    for precision in precisions:
        # The UNet's precision only: the autoencoder's is fixed per device.
        run.unet_precision = generator.unet_precision = resolve_precision(device, precision)
        tag = "" if len(precisions) == 1 else f"[{run.unet_precision}]"
        run.step = cfg.ae_steps
        figures[f"train_diffusion_steps_per_s{tag}"] = _time_steps(run, "diffusion",
                                                                   args.train_steps)
        for name, scheduler, steps, count in runs:
            generator.sample(2, seed=99, scheduler=scheduler, steps=2)  # warm-up
            started = time.perf_counter()
            generator.sample(count, seed=0, scheduler=scheduler, steps=steps,
                             batch_size=min(count, 32))
            figures[f"sample_{name}_images_per_s{tag}"] = count / (time.perf_counter() - started)
    threads = torch.get_num_threads()
    lines = [
        "",
        f"## generator: {args.label}",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- machine: {platform.machine()}, device {device.type}, autoencoder"
        f" {run.ae_precision} (training steps {run.ae_train_precision}),"
        f" UNet {', '.join(precisions)} (as tagged),"
        f" {machine_line(SHARE, f'torch threads {threads}')}",
        f"- command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} .venv/bin/python"
        f" bench/bench_generator.py bench --home {args.home} --label '{args.label}'"
        f" --precisions {args.precisions}`",
        f"- model: preset {cfg.preset}, image {data.size}x{data.size}, {data.n} train slices,"
        f" AE batch {cfg.ae_batch_size}, UNet batch {cfg.diffusion_batch_size}",
    ]
    for key, value in figures.items():
        lines.append(f"- {key}: {value:.3f}")
    for key in [k for k in figures if k.endswith("[bfloat16]")]:
        base = key.replace("[bfloat16]", "[float32]")
        if base in figures:
            lines.append(f"- {key.replace('[bfloat16]', '')}: bfloat16 / float32 ="
                         f" {figures[key] / figures[base]:.2f}x")
    _record(lines, args.results)


AB_KEYS = {
    "loss_weighting": ("uniform,min_snr", "stage-2 loss weighting", "cpu-mr64-loss-weighting.png"),
    "diffusion_precision": ("float32,bfloat16", "UNet precision (bf16 autocast against float32)",
                            "cpu-mr64-precision.png"),
}
#: Settings that change the UNet's shape: an arm with one starts from a fresh UNet.
ARCHITECTURE_KEYS = ("unet_channels", "unet_num_res_blocks")


def _arm_setting(default_key: str, arm: str) -> tuple[str, object]:
    """An arm is a value of ``--key`` or ``key=value``; channel lists are written 64-128-128."""
    key, _, value = arm.rpartition("=")
    key = key or default_key
    if key == "unet_channels":
        return key, [int(c) for c in value.split("-")]
    if key == "unet_num_res_blocks":
        return key, int(value)
    return key, value


def _fresh_unet(paths: object, state: dict[str, object]) -> None:
    """Replace the checkpoint's UNet, its EMA, optimiser and schedule by freshly initialised
    ones of the shape its (edited) config now names; the autoencoder is kept."""
    from node.generator.device import choose_device
    from node.generator.presets import config_from_dict
    from node.generator.train import _Run, load_training_data
    from node.store import Store

    cfg = config_from_dict(state["config"])  # type: ignore[arg-type]
    with Store(paths.store) as store:  # type: ignore[attr-defined]
        data, digest = load_training_data(store, cfg.conditioning)
    fresh = _Run(cfg, data, choose_device(None), digest).state(str(state["run_id"]))
    for part in ("unet", "unet_ema", "unet_opt", "unet_sched"):
        state[part] = fresh[part]


def stage2_copy(base: Path, home: Path, edits: dict[str, object], *,
                restart: bool = False, fresh_unet: bool = False) -> Any:
    """Copy the node home ``base`` to ``home`` (its runs left behind) with its generator
    checkpoint edited for a new diffusion stage: ``edits`` written into the checkpoint's
    config; ``restart`` puts it back to the end of its autoencoder stage; a freshly
    initialised UNet (with EMA, optimiser and schedule) when ``fresh_unet`` or ``restart``.
    Returns the copy's NodePaths; ``train_generator(..., resume=True)`` trains the stage."""
    import shutil

    from node.config import resolve_home
    from node.generator.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint

    if home.exists():
        shutil.rmtree(home)
    shutil.copytree(base, home, ignore=shutil.ignore_patterns("runs"))
    paths = resolve_home(str(home))
    state, _ = load_checkpoint(checkpoint_path(paths))
    state.pop("format", None)
    state["config"].update(edits)
    if restart:
        state["step"] = int(state["config"]["ae_steps"])  # stage 2 starts over
        state["stage"] = "diffusion"
        state["run_id"] = f"{state['run_id']}-{home.name}"
    if fresh_unet or restart:
        _fresh_unet(paths, state)
    save_checkpoint(checkpoint_path(paths), state)
    return paths


def cmd_weighting(args: argparse.Namespace) -> None:
    """A/B of one stage-2 setting (``--key``) on one autoencoder, in one sitting."""

    import torch

    from node.config import load_node_config, resolve_home
    from node.generator.checkpoint import checkpoint_path, load_checkpoint
    from node.generator.sampling import load_generator
    from node.generator.train import train_generator

    base = resolve_home(args.home)
    config = load_node_config(base)
    if args.ae_steps:
        config.generator.ae_steps = args.ae_steps
    config.generator.diffusion_steps = args.diffusion_steps
    config.generator.loss_weighting = "uniform"
    config.generator.min_snr_gamma = args.gamma
    ckpt = checkpoint_path(base)
    started = time.perf_counter()
    reused = ckpt.exists()
    if reused:
        state, _ = load_checkpoint(ckpt)
        ae_steps = int(state["config"]["ae_steps"])
        if int(state["step"]) != ae_steps:
            raise SystemExit(f"{ckpt} is not at the end of its autoencoder stage")
        print(f"reusing the autoencoder of {ckpt}")
    else:
        first = train_generator(base, config, preset=args.preset,
                                max_steps=_ae_steps(config, args.preset), overwrite=True,
                                progress=True)
        ae_steps = int(first["ae_steps"])
    ae_wall = time.perf_counter() - started
    ae_note = (f"reused from {ckpt}, trained by an earlier run" if reused
               else f"{ae_wall:.0f} s")
    default_arms, title, figure_name = AB_KEYS[args.key]
    arms = [a for a in (args.arms or default_arms).split(",") if a]
    figure = Path(args.figure) if args.figure else REPO / "bench" / "figures" / figure_name
    results: dict[str, dict[str, object]] = {}
    samples: dict[str, np.ndarray] = {}
    for arm in arms:
        suffix = f"-s{args.seed}" if args.seed is not None else ""
        home = base.root.parent / f"{base.root.name}-{arm.replace('=', '-')}{suffix}"
        key, value = _arm_setting(args.key, arm)
        edits: dict[str, object] = {key: value, "min_snr_gamma": args.gamma}
        if args.seed is not None:
            # The autoencoder is trained already: the seed now decides only the diffusion
            # stage's batches, timesteps and noise, and the quality report's samples.
            edits["seed"] = args.seed
        paths = stage2_copy(base.root, home, edits, fresh_unet=key in ARCHITECTURE_KEYS)
        t0 = time.perf_counter()
        summary = train_generator(paths, load_node_config(paths), resume=True, progress=True)
        wall = time.perf_counter() - t0
        results[arm] = {"wall_s": wall, "final": summary["final_losses"],
                        "quality": summary.get("quality", {}), "run_dir": summary["run_dir"],
                        "device": summary["device"]}
        samples[arm] = load_generator(paths).sample(args.grid, seed=5, batch_size=16)
    _weighting_figure(samples, figure)
    threads = torch.get_num_threads()
    keys = ("intensity_wasserstein", "spectrum_distance", "precision", "recall")
    lines = [
        "",
        f"## Generator: {title}"
        + (f", gamma {args.gamma:g}" if args.key == "loss_weighting" else "")
        + (f"; arms {', '.join(arms)}" if any("=" in a for a in arms) else "")
        + f", one autoencoder ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        f"- machine: {platform.machine()}, {machine_line(SHARE, f'torch threads {threads}')}",
        "- device per arm: " + "; ".join(f"{arm}: {r['device']}" for arm, r in results.items()),
        f"- command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} .venv/bin/python"
        f" bench/bench_generator.py weighting --key {args.key} --arms {','.join(arms)}"
        f" --home {args.home} --preset {args.preset} --diffusion-steps"
        f" {args.diffusion_steps} --gamma {args.gamma:g}"
        + (f" --seed {args.seed}`" if args.seed is not None else "`"),
        f"- preset {args.preset}; autoencoder {ae_steps} steps ({ae_note}, shared by the"
        f" arms); each arm {args.diffusion_steps} diffusion steps from it, same seeds and"
        " batches; quality report of each arm as at the end of training"
        + (f"; diffusion-stage seed {args.seed}" if args.seed is not None else ""),
        "",
        "| arm | diffusion wall s | final v/eps MSE (unweighted) | final loss | "
        + " | ".join(keys) + " |",
        "| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in keys) + " |",
    ]
    for arm, r in results.items():
        final, by_group = r["final"], r["quality"]
        assert isinstance(final, dict) and isinstance(by_group, dict)
        quality: dict[str, float] = next(iter(by_group.values()), {})
        cells = [f"{float(quality[k]):.4g}" if k in quality else "-" for k in keys]
        mse = final.get("diffusion_mse", float("nan"))
        loss = np.mean([x["loss"] for x in _losses(Path(str(r["run_dir"])))[-50:]])
        lines.append(f"| {arm} | {r['wall_s']:.0f} | {mse:.4f} | {loss:.4f} | "
                     + " | ".join(cells) + " |")
    lines += ["", f"- samples of both arms, same seeds: `{figure}`"]
    _record(lines, args.results)
    print(json.dumps(results, indent=2, default=str))


def _losses(run_dir: Path) -> list[dict[str, float]]:
    from node.generator.train import read_losses

    return [r for r in read_losses(run_dir / "losses.jsonl") if r["stage"] == "diffusion"]


def _ae_steps(config: object, preset: str) -> int:
    from node.generator.presets import resolve_config

    return resolve_config(config.generator, preset).ae_steps  # type: ignore[attr-defined]


def _weighting_figure(samples: dict[str, np.ndarray], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(samples)
    n = min(len(v) for v in samples.values())
    cols = min(n, 8)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows * len(arms), cols, figsize=(1.6 * cols, 1.7 * rows * len(arms)),
                             squeeze=False)
    for a, arm in enumerate(arms):
        for i in range(rows * cols):
            ax = axes[a * rows + i // cols, i % cols]
            ax.axis("off")
            if i < n:
                ax.imshow(samples[arm][i], cmap="gray", vmin=0, vmax=1)
            if i % cols == 0:
                ax.set_title(arm if i == 0 else "", fontsize=8, loc="left")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)


FINE_RADII = (24, 28, 31)  # spatial-frequency radii of the fine-scale deficit (Nyquist 32 at 64)


def _ae_trained_in(paths: Any, state: dict[str, Any]) -> str:
    """The precision the autoencoder of checkpoint ``state`` was trained in, from its training
    run's summary (runs from before ``ae_train_precision`` trained it in their encoding
    precision)."""
    summary = paths.runs / str(state["run_id"]) / "summary.json"
    if not summary.exists():
        return "not recorded"
    precision = json.loads(summary.read_text()).get("precision", {})
    return str(precision.get("autoencoder_training", precision.get("autoencoder", "not recorded")))


def cmd_autoencoder(args: argparse.Namespace) -> None:
    from node.config import resolve_home
    from node.generator.checkpoint import checkpoint_path, load_checkpoint
    from node.generator.device import choose_device
    from node.generator.quality import radial_power_spectrum, spectrum_distance
    from node.generator.sampling import Generator
    from node.store import Store

    homes = [resolve_home(h) for h in args.home]
    with Store(homes[0].store) as store:
        digest = store.split_digest("holdout")
        images = store.load(store.records("holdout")[: args.count])
    lines = ["", f"## generator: autoencoder on holdout slices ({args.label or 'no label'})", "",
             f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             f"- machine: {platform.machine()}, {machine_line(SHARE)}",
             f"- command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} .venv/bin/python"
             f" bench/bench_generator.py autoencoder "
             + " ".join(f"--home {h}" for h in args.home) + f" --count {args.count}`",
             f"- slices: the first {len(images)} of the holdout split (never trained on), in the"
             " normalised [0, 1] space; PSNR per slice with peak 1, then averaged",
             "",
             "| home | autoencoder steps | train precision | L1 | PSNR dB | spectrum | "
             + " | ".join(f"log10 power at r={r}" for r in FINE_RADII) + " |",
             "| --- | ---: | --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in FINE_RADII)
             + " |"]
    real_profile = radial_power_spectrum(images)
    for home, paths in zip(args.home, homes, strict=True):
        with Store(paths.store) as store:
            if store.split_digest("holdout") != digest:
                raise SystemExit(f"{home}: its holdout split differs from {args.home[0]}'s")
        state, checkpoint_digest = load_checkpoint(checkpoint_path(paths))
        generator = Generator(state, checkpoint_digest, choose_device(None))
        recon = generator.reconstruct(images)
        mse = ((recon - images) ** 2).mean(axis=(1, 2))
        psnr = float(np.mean(10 * np.log10(1.0 / np.maximum(mse, 1e-12))))
        deficit = radial_power_spectrum(recon) - real_profile
        cfg = generator.config
        lines.append(
            f"| {home} | {cfg.ae_steps:,} | {_ae_trained_in(paths, state)} |"
            f" {float(np.abs(recon - images).mean()):.5f} | {psnr:.2f} |"
            f" {spectrum_distance(images, recon):.4f} | "
            + " | ".join(f"{deficit[r - 1]:+.2f}" for r in FINE_RADII) + " |")
    _record(lines, args.results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build")
    p.add_argument("--home", required=True)
    p.add_argument("--kind", choices=("mr", "ct"), required=True)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--pack", default="", help="write a pack (.npz) instead of a store")
    p.add_argument("--from-pack", default="", help="build the store from a pack")
    p.set_defaults(func=cmd_build)
    p = sub.add_parser("train")
    p.add_argument("--home", required=True)
    p.add_argument("--preset", default="cpu")
    p.add_argument("--ae-steps", type=int, default=0)
    p.add_argument("--diffusion-steps", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--budget-s", type=float, default=0.0,
                   help="set both stages' step counts to fill this many seconds")
    p.add_argument("--ae-share", type=float, default=AE_SHARE,
                   help="with --budget-s: the autoencoder's share of the budget")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("bench")
    p.add_argument("--home", required=True)
    p.add_argument("--label", default="")
    p.add_argument("--train-steps", type=int, default=20)
    p.add_argument("--results", default="", help="append here instead of bench/RESULTS.md")
    p.add_argument("--count", type=int, default=32)
    p.add_argument("--ddpm-count", type=int, default=4)
    p.add_argument("--precisions", default="auto",
                   help="UNet precisions to time, comma-separated (auto, float32, bfloat16)")
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("autoencoder")
    p.add_argument("--home", required=True, action="append", help="repeat for each home")
    p.add_argument("--count", type=int, default=512)
    p.add_argument("--label", default="")
    p.add_argument("--results", default="", help="append here instead of bench/RESULTS.md")
    p.set_defaults(func=cmd_autoencoder)

    p = sub.add_parser("weighting")
    p.add_argument("--home", required=True, help="a built home; arms go beside it")
    p.add_argument("--preset", default="cpu")
    p.add_argument("--ae-steps", type=int, default=0, help="0: the preset's")
    p.add_argument("--diffusion-steps", type=int, default=3000)
    p.add_argument("--gamma", type=float, default=5.0)
    p.add_argument("--key", choices=sorted(AB_KEYS), default="loss_weighting",
                   help="the stage-2 setting the arms differ in")
    p.add_argument("--arms", default="",
                   help="comma-separated values of --key, or key=value (default: per --key)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the diffusion stages (default: node.yaml's generator seed)")
    p.add_argument("--grid", type=int, default=24, help="samples per arm in the figure")
    p.add_argument("--figure", default="", help="default: bench/figures/<per --key>")
    p.add_argument("--results", default="", help="append here instead of bench/RESULTS.md")
    p.set_defaults(func=cmd_weighting)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
