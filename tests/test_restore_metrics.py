"""PSNR / SSIM / RMSE in physical units equal scikit-image's on the same arrays."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity

from coordinator.restore.metrics import CT_WINDOW_HU, MetricWindow, image_metrics, psnr, rmse, ssim


def pair(seed: int, size: int = 32, n: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    reference = rng.uniform(-1024, 1500, (n, size, size))
    test = reference + rng.normal(0, 60, reference.shape)
    return test, reference


def test_psnr_equals_skimage() -> None:
    test, ref = pair(0)
    ours = psnr(test, ref, data_range=4095.0)
    theirs = [peak_signal_noise_ratio(ref[i], test[i], data_range=4095.0) for i in range(3)]
    assert np.allclose(ours, theirs, rtol=0, atol=1e-10)


def test_ssim_equals_skimage() -> None:
    test, ref = pair(1)
    ours = ssim(test, ref, data_range=4095.0)
    theirs = [structural_similarity(test[i], ref[i], data_range=4095.0) for i in range(3)]
    assert np.allclose(ours, theirs, rtol=0, atol=1e-10)


def test_rmse_equals_skimage_root_mse() -> None:
    test, ref = pair(2)
    assert np.allclose(rmse(test, ref), [np.sqrt(mean_squared_error(ref[i], test[i]))
                                         for i in range(3)], atol=1e-10)


def test_ct_window_clips_both_images_before_scoring() -> None:
    test, ref = pair(3)
    test[:, :4] = 5000.0  # metal-like values outside the window
    window = MetricWindow.ct()
    got = image_metrics(test, ref, window)
    low, high = CT_WINDOW_HU
    ct, cr = np.clip(test, low, high), np.clip(ref, low, high)
    assert window.data_range == 4095.0
    assert np.allclose(got["psnr_db"],
                       [peak_signal_noise_ratio(cr[i], ct[i], data_range=4095.0)
                        for i in range(3)], atol=1e-10)
    assert np.allclose(got["ssim"],
                       [structural_similarity(ct[i], cr[i], data_range=4095.0)
                        for i in range(3)], atol=1e-10)
    assert np.allclose(got["rmse"], np.sqrt(((ct - cr) ** 2).mean(axis=(1, 2))))


def test_per_image_data_range_for_mr() -> None:
    test, ref = pair(4)
    ranges = np.array([100.0, 2000.0, 4000.0])
    got_p = psnr(test, ref, ranges)
    got_s = ssim(test, ref, ranges)
    for i, r in enumerate(ranges):
        assert got_p[i] == pytest.approx(peak_signal_noise_ratio(ref[i], test[i], data_range=r))
        assert got_s[i] == pytest.approx(structural_similarity(test[i], ref[i], data_range=r))


def test_identical_images_give_infinite_psnr_and_unit_ssim() -> None:
    _, ref = pair(5, n=1)
    assert np.isinf(psnr(ref, ref, 4095.0)[0])
    assert ssim(ref, ref, 4095.0)[0] == pytest.approx(1.0)
    assert rmse(ref, ref)[0] == 0.0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: psnr(np.zeros((2, 8, 8)), np.zeros((2, 8, 9)), 1.0), "shapes differ"),
        (lambda: ssim(np.zeros((1, 5, 5)), np.zeros((1, 5, 5)), 1.0), "smaller than"),
        (lambda: psnr(np.zeros((2, 8, 8)), np.ones((2, 8, 8)), [1.0, 2.0, 3.0]), "3 values"),
        (lambda: psnr(np.zeros((8,)), np.zeros((8,)), 1.0), r"\[H, W\]"),
        (lambda: MetricWindow(data_range=0.0), "data_range"),
        (lambda: MetricWindow(data_range=1.0, clip=(1.0, 0.0)), "clip"),
        (lambda: ssim(np.zeros((1, 9, 9)), np.zeros((1, 9, 9)), 1.0, win_size=4), "odd"),
    ],
)
def test_bad_inputs_are_refused(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000), st.floats(1.0, 5000.0), st.integers(7, 24))
def test_equal_to_skimage_for_any_image(seed: int, data_range: float, size: int) -> None:
    rng = np.random.default_rng(seed)
    ref = rng.uniform(0, data_range, (size, size))
    test = ref + rng.normal(0, data_range / 20, (size, size))
    assert psnr(test, ref, data_range)[0] == pytest.approx(
        peak_signal_noise_ratio(ref, test, data_range=data_range), abs=1e-9)
    assert ssim(test, ref, data_range)[0] == pytest.approx(
        structural_similarity(test, ref, data_range=data_range), abs=1e-9)
