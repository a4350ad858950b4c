"""Degradations: projection-domain low-dose CT and SR decimation (coordinator.restore.degrade)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.restore.degrade import (
    DegradationConfig,
    LowDoseConfig,
    SRConfig,
    decimate,
    degrade,
    degrade_batch,
    hu_to_mu,
    mu_to_hu,
    simulate_low_dose_ct,
    sr_input,
    upsample_cubic,
)


def phantom(size: int = 32) -> np.ndarray:
    """A water disc (0 HU) with a bone insert (1000 HU) in air (-1000 HU)."""
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    image = np.full((size, size), -1000.0, np.float32)
    image[xx**2 + yy**2 < (0.4 * size) ** 2] = 0.0
    image[(xx - size / 8) ** 2 + yy**2 < (0.1 * size) ** 2] = 1000.0
    return image


def smooth(size: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size] / size
    return (100 * np.sin(2 * np.pi * xx) * np.cos(np.pi * yy) + 50 * xx).astype(np.float32)


def noise_sd(photons: float, seed: int = 0) -> float:
    image = phantom()
    noisy = simulate_low_dose_ct(image, np.random.default_rng(seed), LowDoseConfig(photons))
    clean = simulate_low_dose_ct(image, np.random.default_rng(seed), LowDoseConfig(1e12))
    return float(np.std(noisy - clean))


def test_low_dose_noise_grows_as_photon_count_falls() -> None:
    sds = [noise_sd(p) for p in (1e6, 1e5, 1e4, 1e3)]
    assert sds == sorted(sds)
    # Poisson noise: the sd scales close to 1/sqrt(I0) while counts are large
    assert 2.5 < sds[2] / sds[1] < 4.0


def test_low_dose_is_reproducible_for_a_seed_and_differs_across_seeds() -> None:
    config = DegradationConfig(task="denoise")
    a = degrade(phantom(), config, seed=3, cache=False)
    b = degrade(phantom(), config, seed=3, cache=False)
    c = degrade(phantom(), config, seed=4, cache=False)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_cached_result_equals_a_fresh_one_and_is_not_aliased() -> None:
    config = DegradationConfig(task="denoise")
    first = degrade(phantom(), config, seed=7)
    first[0, 0] = 1e9  # the caller's copy, not the cache's
    again = degrade(phantom(), config, seed=7)
    assert np.array_equal(again, degrade(phantom(), config, seed=7, cache=False))


def test_noise_of_an_image_does_not_depend_on_its_place_in_the_batch() -> None:
    config = DegradationConfig(task="denoise")
    a, b = phantom(), phantom() + 10
    forward = degrade_batch(np.stack([a, b]), config, seed=1, cache=False)
    backward = degrade_batch(np.stack([b, a]), config, seed=1, cache=False)
    assert np.array_equal(forward[0], backward[1])


def test_noise_free_reconstruction_keeps_the_hu_scale() -> None:
    image = phantom(64)
    recon = simulate_low_dose_ct(image, np.random.default_rng(0), LowDoseConfig(1e12, 180))
    inner = np.abs(np.mgrid[:64, :64] - 31.5).max(axis=0) < 8  # water around the centre
    inner &= image == 0
    assert abs(float(np.median(recon[inner]))) < 60.0


def test_hu_to_mu_round_trip_and_air_clipped() -> None:
    hu = np.array([-1024.0, -1000.0, 0.0, 1000.0])
    mu = hu_to_mu(hu)
    assert mu[0] == 0.0 and mu[1] == 0.0
    assert np.allclose(mu_to_hu(mu)[2:], hu[2:])


def test_decimation_and_bicubic_round_trip_on_smooth_image_is_close() -> None:
    image = smooth()
    for factor in (2, 4):
        back = sr_input(image, SRConfig(factor=factor, anti_alias=True))
        rel = np.sqrt(np.mean((back - image) ** 2)) / np.ptp(image)
        assert rel < 0.02, (factor, rel)


def test_decimation_by_4_loses_fine_detail() -> None:
    rng = np.random.default_rng(0)
    texture = rng.normal(0, 100, (64, 64)).astype(np.float32)
    back = sr_input(texture, SRConfig(factor=4))
    assert np.sqrt(np.mean((back - texture) ** 2)) > 50


def test_anti_alias_suppresses_aliasing_of_a_fine_pattern() -> None:
    # stripes of period 3 px are far above the Nyquist limit of a 4x decimated grid
    xx = np.arange(64)
    stripes = np.tile(100 * np.cos(2 * np.pi * xx / 3.0), (64, 1)).astype(np.float32)
    assert np.abs(decimate(stripes, 4, anti_alias=True)).max() < 5
    assert np.abs(decimate(stripes, 4, anti_alias=False)).max() > 40


def test_decimate_shapes_and_errors() -> None:
    assert decimate(smooth(), 4).shape == (16, 16)
    assert upsample_cubic(np.zeros((16, 16)), (64, 64)).shape == (64, 64)
    with pytest.raises(ValueError, match="not divisible"):
        decimate(np.zeros((30, 30)), 4)
    with pytest.raises(ValueError, match="square"):
        simulate_low_dose_ct(np.zeros((16, 32)), np.random.default_rng(0))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"photons_per_ray": 0}, "photons_per_ray"),
        ({"n_angles": 1}, "n_angles"),
        ({"field_of_view_mm": -1}, "field_of_view_mm"),
        ({"mu_water_per_mm": 0}, "mu_water_per_mm"),
    ],
)
def test_low_dose_config_rejects_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LowDoseConfig(**kwargs)


def test_sr_config_and_task_rejected() -> None:
    with pytest.raises(ValueError, match="factor"):
        SRConfig(factor=5)
    with pytest.raises(ValueError, match="task"):
        DegradationConfig(task="deblur")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown degradation keys"):
        DegradationConfig.from_dict({"task": "sr", "blur": 1})


def test_config_round_trips_through_its_dict() -> None:
    config = DegradationConfig(task="sr", sr=SRConfig(factor=2, anti_alias=False))
    assert DegradationConfig.from_dict(config.to_dict()) == config


@settings(max_examples=25, deadline=None)
@given(st.floats(-500, 500), st.floats(0.1, 10), st.sampled_from([2, 4]))
def test_sr_input_is_linear_in_intensity(offset: float, gain: float, factor: int) -> None:
    # so degrading in physical units equals degrading in the normalised space (MR mapping)
    image = smooth(32)
    config = SRConfig(factor=factor)
    lhs = sr_input(image * gain + offset, config)
    rhs = sr_input(image, config) * gain + offset
    assert np.allclose(lhs, rhs, atol=1e-3 * max(1.0, abs(offset)) + 1e-3 * gain * 200)
