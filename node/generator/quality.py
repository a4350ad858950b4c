"""How close the generator's samples are to the site's real train slices, without any
pretrained network (nothing is downloaded, ARCHITECTURE invariant 7).

Three measures, each computed synthetic-vs-real and, as a yardstick, real-vs-real (two
disjoint halves of the train split: what "as good as real" looks like at that sample size):

(a) ``intensity_wasserstein``: 1-D Wasserstein distance between the pixel-intensity
    distributions in physical units (HU for CT);
(b) ``spectrum_distance``: mean absolute difference of the radially averaged log10 power
    spectra (texture and sharpness; blur shows as missing high frequencies);
(c) improved precision and recall (Kynkäänniemi et al., NeurIPS 2019, k-NN manifolds, k=3)
    in a feature space trained at the site: the autoencoder encoder's latent means, pooled.
    When the home's guard has trained its contrastive encoder (the first generate or screen
    does), the same two figures also in that encoder's space (``guard_precision``,
    ``guard_recall``): it does not change with the generator, so two generators of one home
    compare directly there (same ``guard_encoder.weights_sha256``), which the autoencoder's
    own space does not allow.

Only the train split is read (the holdout split stays unseen by everything generator-side).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from node.config import NodePaths
from node.generator.figures import save_side_by_side_png
from node.store import Store
from protocols.files import atomic_write_json

__all__ = [
    "intensity_wasserstein",
    "radial_power_spectrum",
    "spectrum_distance",
    "precision_recall",
    "realism_scores",
    "compare_sets",
    "quality_report",
]

K_NEIGHBOURS = 3


def intensity_wasserstein(
    real: np.ndarray, synthetic: np.ndarray, max_pixels: int = 200_000, seed: int = 0
) -> float:
    """W1 distance between the pixel values of two image sets (same units as the input)."""
    from scipy.stats import wasserstein_distance

    rng = np.random.default_rng(seed)
    a, b = real.ravel(), synthetic.ravel()
    if a.size > max_pixels:
        a = a[rng.choice(a.size, max_pixels, replace=False)]
    if b.size > max_pixels:
        b = b[rng.choice(b.size, max_pixels, replace=False)]
    return float(wasserstein_distance(a.astype(np.float64), b.astype(np.float64)))


def radial_power_spectrum(images: np.ndarray) -> np.ndarray:
    """Mean log10 power per integer radius (0 .. S//2) of the centred 2-D spectrum."""
    n, h, w = images.shape
    x = images.astype(np.float64) - images.mean(axis=(1, 2), keepdims=True)
    power = np.abs(np.fft.fftshift(np.fft.fft2(x), axes=(1, 2))) ** 2 / (h * w)
    yy, xx = np.indices((h, w))
    radius = np.hypot(yy - h // 2, xx - w // 2).round().astype(int)
    r_max = min(h, w) // 2
    mean_power = power.mean(axis=0)
    profile = np.array(
        [mean_power[radius == r].mean() for r in range(1, r_max + 1)], dtype=np.float64
    )
    result: np.ndarray = np.asarray(np.log10(profile + 1e-12), dtype=np.float64)
    return result


def spectrum_distance(real: np.ndarray, synthetic: np.ndarray) -> float:
    """Mean |log10 P_real(r) - log10 P_synth(r)| over radii (decades of power)."""
    return float(np.mean(np.abs(radial_power_spectrum(real) - radial_power_spectrum(synthetic))))


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    sq = (a64**2).sum(1)[:, None] + (b64**2).sum(1)[None, :] - 2.0 * a64 @ b64.T
    result: np.ndarray = np.sqrt(np.maximum(sq, 0.0))
    return result


def _knn_radius(points: np.ndarray, k: int) -> np.ndarray:
    """Distance from each point to its k-th nearest other point (column 0 is itself)."""
    out: np.ndarray = np.sort(_pairwise(points, points), axis=1)[:, k]
    return out


def realism_scores(
    real: np.ndarray, synthetic: np.ndarray, k: int = K_NEIGHBOURS
) -> np.ndarray:
    """Realism score of each synthetic point (Kynkäänniemi et al. 2019): the largest ratio
    of a real point's k-NN radius to its distance from the synthetic point; at least 1 inside
    the real manifold of :func:`precision_recall`, larger the deeper inside."""
    if len(real) <= k:
        raise ValueError(f"realism scores need more than k={k} real points")
    radius = _knn_radius(real, k)
    out: np.ndarray = (radius[None, :] / np.maximum(_pairwise(synthetic, real), 1e-12)).max(1)
    return out


def precision_recall(
    real: np.ndarray, synthetic: np.ndarray, k: int = K_NEIGHBOURS
) -> tuple[float, float]:
    """Improved precision (synthetic inside the real manifold) and recall (real inside the
    synthetic manifold); a manifold is the union of balls reaching each point's k-th NN."""
    if len(real) <= k or len(synthetic) <= k:
        raise ValueError(f"precision / recall need more than k={k} points in each set")
    r_real = _knn_radius(real, k)
    r_syn = _knn_radius(synthetic, k)
    cross = _pairwise(synthetic, real)  # [n_syn, n_real]
    precision = float(np.mean(np.any(cross <= r_real[None, :], axis=1)))
    recall = float(np.mean(np.any(cross.T <= r_syn[None, :], axis=1)))
    return precision, recall


def compare_sets(
    real_norm: np.ndarray, real_phys: np.ndarray, real_feat: np.ndarray,
    other_norm: np.ndarray, other_phys: np.ndarray, other_feat: np.ndarray, seed: int = 0,
) -> dict[str, float]:
    precision, recall = precision_recall(real_feat, other_feat)
    return {
        "intensity_wasserstein": intensity_wasserstein(real_phys, other_phys, seed=seed),
        "spectrum_distance": spectrum_distance(real_norm, other_norm),
        "precision": precision,
        "recall": recall,
    }


def quality_report(
    paths: NodePaths,
    generator: Any,
    count: int,
    seed: int = 0,
    out_dir: Path | None = None,
    progress: bool = False,
    scheduler: str = "dpm",
) -> dict[str, Any]:
    """Sample ``count`` images per modality and compare them with the train split; writes
    quality.json and quality-<modality>.png into ``out_dir`` (a new run folder if None)."""
    started = time.monotonic()
    if out_dir is None:
        out_dir = paths.runs / ("quality-" + time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()))
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    per_group: dict[str, Any] = {}
    pngs: list[str] = []
    by_modality = generator.conditioning == "modality" or len(generator.modalities) == 1
    from node.guard.calibration import kept_encoder  # lazy: node.guard imports the generator

    guard_encoder = kept_encoder(paths)

    def add_guard_space(figures: dict[str, float], real: np.ndarray, other: np.ndarray) -> None:
        if guard_encoder is None:
            return
        embed, meta = guard_encoder
        if meta["config"].get("image_size") != real.shape[-1]:
            return  # an encoder of another grid
        figures["guard_precision"], figures["guard_recall"] = precision_recall(
            embed(real), embed(other)
        )

    groups: list[str | None] = list(generator.modalities) if by_modality else [None]
    with Store(paths.store) as store:
        for modality in groups:
            real_norm, records = store.images("train", modality)
            order = rng.permutation(len(records))
            n_real = min(count, len(records))
            pick = order[:n_real]
            real_a = real_norm[pick]
            scale = np.array([records[i].scale for i in pick], dtype=np.float32)[:, None, None]
            offset = np.array([records[i].offset for i in pick], dtype=np.float32)[:, None, None]
            synth = generator.sample(count, seed=seed, scheduler=scheduler, modality=modality,
                                     progress=progress)
            if modality is None:
                unit = "normalised"
                real_phys, synth_phys = real_a, synth
            else:
                s, o, unit = store.physical_mapping(modality)
                real_phys = real_a * scale + offset
                synth_phys = synth * np.float32(s) + np.float32(o)
            real_feat = generator.features(real_a)
            synth_feat = generator.features(synth)
            entry: dict[str, Any] = {
                "unit": unit,
                "n_synthetic": count,
                "n_real": n_real,
                "synthetic_vs_real": compare_sets(real_a, real_phys, real_feat,
                                                  synth, synth_phys, synth_feat, seed),
            }
            add_guard_space(entry["synthetic_vs_real"], real_a, synth)
            half = min(count, len(records) // 2)
            if half > K_NEIGHBOURS + 1:
                i1, i2 = order[:half], order[half : 2 * half]
                r1, r2 = real_norm[i1], real_norm[i2]
                p1 = r1 * np.array([records[i].scale for i in i1], np.float32)[:, None, None] \
                    + np.array([records[i].offset for i in i1], np.float32)[:, None, None]
                p2 = r2 * np.array([records[i].scale for i in i2], np.float32)[:, None, None] \
                    + np.array([records[i].offset for i in i2], np.float32)[:, None, None]
                if modality is None:
                    p1, p2 = r1, r2
                entry["real_vs_real"] = compare_sets(
                    r1, p1, generator.features(r1), r2, p2, generator.features(r2), seed
                )
                add_guard_space(entry["real_vs_real"], r1, r2)
                entry["real_vs_real_n"] = half
            low, high = np.percentile(real_phys, [0.5, 99.5])
            name = f"quality-{modality or 'all'}.png"
            save_side_by_side_png(
                out_dir / name, real_phys[:16], synth_phys[:16],
                f"{modality or 'all'} ({unit}), window [{low:.0f}, {high:.0f}]",
                (float(low), float(high)),
            )
            pngs.append(name)
            per_group[modality or "all"] = entry
    report = {
        "generator": {
            "checkpoint_digest": generator.checkpoint_digest,
            "train_split_digest": generator.train_split_digest,
            "preset": generator.config.preset,
            "steps": generator.steps_trained,
        },
        "sampler": scheduler,
        "seed": seed,
        "k": K_NEIGHBOURS,
        "feature_space": "EMA AutoencoderKL encoder latent means, average-pooled to 4x4",
        "guard_encoder": None if guard_encoder is None else {
            "feature_space": "the guard's contrastive encoder (unit embeddings)",
            "weights_sha256": guard_encoder[1].get("weights_sha256"),
            "inputs_digest": guard_encoder[1].get("inputs_digest"),
        },
        "by_modality": per_group,
        "pngs": pngs,
        "wall_s": round(time.monotonic() - started, 2),
    }
    report["summary"] = {
        mod: {k: round(v, 4) for k, v in entry["synthetic_vs_real"].items()}
        for mod, entry in per_group.items()
    }
    atomic_write_json(out_dir / "quality.json", report)
    report["path"] = str(out_dir / "quality.json")
    return report
