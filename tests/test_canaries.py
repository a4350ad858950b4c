"""privacy.canaries: every alteration is caught by the guard; canaries never leave a run."""

from __future__ import annotations

import numpy as np
import pytest

from privacy.calibrate import calibrate_thresholds, make_folds
from privacy.canaries import ALTERATIONS, MUST_CATCH, alter, catch_rates, make_canaries
from privacy.guard import Guard
from privacy.metrics import PixelRMSE, ShiftFlipDistance
from tests.test_screen import phantoms as _phantoms

SIZE = 32


@pytest.fixture(scope="module")
def guard() -> tuple[Guard, np.ndarray]:
    train = _phantoms(60, 1)
    holdout = _phantoms(20, 2)
    images = np.concatenate([train, holdout])
    patients = [f"p{i}" for i in range(80)]
    splits = ["train"] * 60 + ["holdout"] * 20
    method, folds = make_folds(patients, splits, patients, [0.0] * 80)
    metrics = [PixelRMSE(), ShiftFlipDistance(4)]
    cal = calibrate_thresholds(metrics, images, folds, method, 0.01, n_components=16)
    return Guard(metrics, images, cal.thresholds, n_components=16), train


def _caught(guard_and_train: tuple[Guard, np.ndarray], kind: str) -> np.ndarray:
    guard, train = guard_and_train
    canaries = make_canaries(train, 30, np.random.default_rng(5), kinds=(kind,))
    assert canaries.kinds == [kind] * 30
    return ~guard.screen(canaries.images).accepted


def test_exact_copy_is_caught(guard: tuple[Guard, np.ndarray]) -> None:
    assert _caught(guard, "exact").all()


def test_shifted_copy_is_caught(guard: tuple[Guard, np.ndarray]) -> None:
    assert _caught(guard, "shift").all()


def test_mirrored_copy_is_caught(guard: tuple[Guard, np.ndarray]) -> None:
    assert _caught(guard, "mirror").all()


def test_intensity_scaled_copy_is_caught(guard: tuple[Guard, np.ndarray]) -> None:
    assert _caught(guard, "intensity").all()


def test_noisy_copy_is_caught(guard: tuple[Guard, np.ndarray]) -> None:
    assert _caught(guard, "noise").all()


def test_rotated_copy_is_caught(guard: tuple[Guard, np.ndarray]) -> None:
    assert _caught(guard, "rotation").all()


def test_combined_alteration_copy_is_caught(guard: tuple[Guard, np.ndarray]) -> None:
    assert _caught(guard, "combination").all()


def test_new_phantoms_are_mostly_accepted_against_the_calibration_reference(
    guard: tuple[Guard, np.ndarray],
) -> None:
    g, train = guard
    train_only = Guard(g.metrics, train, g.thresholds, n_components=16)
    assert train_only.screen(_phantoms(40, 3)).accepted.mean() >= 0.85


def test_alterations_stay_within_their_stated_ranges() -> None:
    rng = np.random.default_rng(0)
    img = _phantoms(1, 9)[0]
    for _ in range(20):
        shifted = alter("shift", img, rng)
        assert not np.array_equal(shifted, img)
        ratio = alter("intensity", img, rng)[img > 0.1] / img[img > 0.1]
        assert np.all((ratio > 0.9 - 1e-6) & (ratio < 1.1 + 1e-6)) or np.any(ratio > 1)
        noisy = alter("noise", img, rng)
        assert np.std(noisy - img) < 0.035
    np.testing.assert_array_equal(alter("mirror", img, rng), img[:, ::-1])
    np.testing.assert_array_equal(alter("exact", img, rng), img)
    for kind in ALTERATIONS:
        out = alter(kind, img, rng)
        assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1


def test_catch_rates_count_per_alteration() -> None:
    rates = catch_rates(["exact", "exact", "noise"], np.array([True, False, True]))
    assert rates == {
        "exact": {"planted": 2, "caught": 1, "rate": 0.5},
        "noise": {"planted": 1, "caught": 1, "rate": 1.0},
    }
    assert set(MUST_CATCH) == {"exact", "shift", "mirror", "intensity"}


def test_canaries_drawn_through_rows_equal_those_of_the_copied_rows() -> None:
    images = _phantoms(40, 9)
    rows = np.array([3, 7, 11, 20, 21, 30, 38])
    copied = make_canaries(images[rows], 4, np.random.default_rng(3))
    viewed = make_canaries(images, 4, np.random.default_rng(3), rows=rows)
    assert np.array_equal(copied.images, viewed.images)
    assert copied.kinds == viewed.kinds and np.array_equal(copied.source, viewed.source)
    # every canary comes from one of the named rows, never from another slice
    other = np.setdiff1d(np.arange(40), rows)
    exact = np.asarray(viewed.kinds) == "exact"
    for img in viewed.images[exact]:
        assert any(np.array_equal(img, images[r]) for r in rows)
        assert not any(np.array_equal(img, images[r]) for r in other)
