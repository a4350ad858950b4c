"""Sample quality measures: each detects what it claims to, and the report is complete."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.config import load_node_config
from node.generator.quality import (
    intensity_wasserstein,
    precision_recall,
    quality_report,
    radial_power_spectrum,
    realism_scores,
    spectrum_distance,
)
from node.store import NewSlice, Store
from protocols.errors import UsageError


def smooth_images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]
    out = np.zeros((n, size, size), np.float32)
    for i in range(n):
        cx, cy, r = rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3), rng.uniform(0.3, 0.7)
        out[i] = ((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r) * rng.uniform(0.4, 0.9)
    return out


def test_shifted_intensities_give_the_shift_as_wasserstein_distance() -> None:
    real = smooth_images(20) * 1000.0
    assert intensity_wasserstein(real, real) == pytest.approx(0.0, abs=1e-9)
    assert intensity_wasserstein(real, real + 35.0) == pytest.approx(35.0, rel=1e-6)


def test_blur_is_caught_by_the_power_spectrum_distance() -> None:
    from scipy.ndimage import gaussian_filter

    real = smooth_images(40, seed=1)
    other_real = smooth_images(40, seed=2)
    blurred = np.stack([gaussian_filter(x, 2.0) for x in other_real])
    profile = radial_power_spectrum(real)
    assert profile.shape == (16,)
    assert spectrum_distance(real, real) == 0.0
    assert spectrum_distance(real, blurred) > 3 * spectrum_distance(real, other_real)


def test_identical_sets_have_full_precision_and_recall() -> None:
    feats = np.random.default_rng(0).normal(size=(50, 6))
    assert precision_recall(feats, feats) == (1.0, 1.0)


def test_far_away_samples_have_zero_precision_and_recall() -> None:
    rng = np.random.default_rng(0)
    real = rng.normal(size=(40, 6))
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)


def test_mode_collapse_keeps_precision_but_loses_recall() -> None:
    rng = np.random.default_rng(1)
    real = rng.normal(size=(200, 4))
    collapsed = real[np.argsort(real[:, 0])[:40]] + rng.normal(scale=0.01, size=(40, 4))
    precision, recall = precision_recall(real, collapsed)
    assert precision > 0.9 and recall < 0.5


@settings(max_examples=25, deadline=None)
@given(st.integers(5, 30), st.integers(5, 30), st.integers(0, 10_000))
def test_precision_of_a_against_b_is_recall_of_b_against_a(na: int, nb: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(na, 3)), rng.normal(loc=0.5, size=(nb, 3))
    p_ab, r_ab = precision_recall(a, b)
    p_ba, r_ba = precision_recall(b, a)
    assert p_ab == r_ba and r_ab == p_ba
    assert 0.0 <= p_ab <= 1.0 and 0.0 <= r_ab <= 1.0


@settings(max_examples=25, deadline=None)
@given(st.integers(5, 30), st.integers(4, 30), st.integers(0, 10_000))
def test_realism_of_at_least_one_is_membership_of_the_real_manifold(
    nr: int, ns: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    real, synthetic = rng.normal(size=(nr, 3)), rng.normal(loc=0.7, size=(ns, 3))
    scores = realism_scores(real, synthetic)
    # brute force: synthetic point s is inside the manifold iff some real r has |s - r| <= its
    # k-th nearest other real point's distance
    d_rr = np.linalg.norm(real[:, None] - real[None], axis=2)
    radius = np.sort(d_rr, axis=1)[:, 3]
    d_sr = np.linalg.norm(synthetic[:, None] - real[None], axis=2)
    inside = (d_sr <= radius[None, :] * (1 + 1e-9)).any(axis=1)
    assert ((scores >= 1.0 - 1e-9) == inside).all()
    assert np.mean(scores >= 1.0 - 1e-9) == pytest.approx(precision_recall(real, synthetic)[0])


def test_realism_is_high_on_a_real_point_and_below_one_far_away() -> None:
    real = np.random.default_rng(2).normal(size=(300, 2))
    scores = realism_scores(real, np.array([real[7] + 1e-6, real[7] + 0.5, [40.0, 0.0]]))
    assert scores[0] > 1e3 and scores[0] > scores[1] and scores[2] < 0.1


def test_too_few_points_for_k_neighbours_is_refused() -> None:
    with pytest.raises(ValueError, match="more than k=3"):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)))


def test_quality_report_writes_json_and_png_from_the_train_split(tmp_path: Path) -> None:
    from node.generator.sampling import load_generator
    from node.generator.train import train_generator
    from node.home import init_home

    paths = init_home(tmp_path / "home", "site-q")
    px = smooth_images(40, seed=3)
    with Store(paths.store) as store:
        store.add_batch([
            NewSlice("CT", f"patient-{i % 8}", f"s{i % 8}", float(i), f"d{i}", f"k{i}", px[i],
                     "HU", 4095.0, -1024.0)
            for i in range(40)
        ])
        store.assign_split(0.25, lambda p: p)
    config = load_node_config(paths)
    gen = dataclasses.replace(config.generator, preset="tiny", ae_steps=20, diffusion_steps=20)
    train_generator(paths, dataclasses.replace(config, generator=gen), progress=False,
                    quality=False)
    generator = load_generator(paths)
    report = quality_report(paths, generator, count=12, seed=0, out_dir=tmp_path / "q")
    saved = json.loads((tmp_path / "q" / "quality.json").read_text())
    entry = saved["by_modality"]["CT"]
    assert entry["unit"] == "HU" and entry["n_synthetic"] == 12 and entry["n_real"] == 12
    assert set(entry["synthetic_vs_real"]) == {
        "intensity_wasserstein", "spectrum_distance", "precision", "recall"
    }
    assert entry["real_vs_real_n"] == 12  # 30 train slices: two disjoint halves of 12
    assert saved["generator"]["checkpoint_digest"] == generator.checkpoint_digest
    assert report["summary"]["CT"]["precision"] == round(
        entry["synthetic_vs_real"]["precision"], 4
    )
    assert (tmp_path / "q" / "quality-CT.png").read_bytes()[:4] == b"\x89PNG"
    assert saved["guard_encoder"] is None  # no guard calibrated yet: no second feature space

    # Once the guard has its encoder, precision / recall also come in that fixed space.
    from node.guard.calibration import kept_encoder, prepare_guard

    guard_config = dataclasses.replace(
        config, guard=dataclasses.replace(config.guard, encoder_steps=5, neighbour_pairs=0)
    )
    prepare_guard(paths, guard_config)
    second = quality_report(paths, generator, count=12, seed=0, out_dir=tmp_path / "q2")
    figures = second["by_modality"]["CT"]["synthetic_vs_real"]
    meta = json.loads((paths.guard / "encoder.json").read_text())
    assert second["guard_encoder"]["weights_sha256"] == meta["weights_sha256"]
    embed = kept_encoder(paths)
    assert embed is not None
    with Store(paths.store) as store:
        real_norm, _ = store.images("train", "CT")
    synth = generator.sample(12, seed=0, scheduler="dpm", modality="CT")
    pick = np.random.default_rng(0).permutation(len(real_norm))[:12]
    expected = precision_recall(embed[0](real_norm[pick]), embed[0](synth))
    assert (figures["guard_precision"], figures["guard_recall"]) == expected
    assert "guard_precision" in second["by_modality"]["CT"]["real_vs_real"]
    # every other figure is unchanged by the extra feature space
    assert {k: v for k, v in figures.items() if not k.startswith("guard_")} == \
        entry["synthetic_vs_real"]
    # weights that do not match their recorded sha256 are not used
    weights = paths.guard / "encoder.npz"
    weights.write_bytes(weights.read_bytes() + b"x")
    assert kept_encoder(paths) is None
    (paths.guard / "encoder.json").write_text("{not json")
    assert kept_encoder(paths) is None


def test_quality_command_reports_json(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from node.cli import app
    from node.generator.train import train_generator
    from node.home import init_home

    paths = init_home(tmp_path / "home", "site-c")
    px = smooth_images(24, seed=4)
    with Store(paths.store) as store:
        store.add_batch([
            NewSlice("MR", f"patient-{i % 6}", "s", float(i), f"d{i}", f"k{i}", px[i], "a.u.",
                     50.0, 1.0)
            for i in range(24)
        ])
    config = load_node_config(paths)
    gen = dataclasses.replace(config.generator, preset="tiny", ae_steps=4, diffusion_steps=4)
    train_generator(paths, dataclasses.replace(config, generator=gen), progress=False,
                    quality=False)
    runner = CliRunner()
    result = runner.invoke(app, ["quality", "--home", str(paths.root), "--count", "8", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report["summary"]) == {"MR"} and Path(report["path"]).exists()
    result = runner.invoke(app, ["quality", "--home", str(paths.root), "--count", "3"])
    assert isinstance(result.exception, UsageError)
    assert "--count must be at least 8" in result.exception.what
