"""privacy.calibrate: thresholds from new-patient distances, floors refused, fold methods."""

from __future__ import annotations

import numpy as np
import pytest

from privacy.calibrate import (
    calibrate_thresholds,
    expected_false_rejection,
    make_folds,
    threshold_from_distances,
)
from privacy.errors import GuardError
from privacy.metrics import PixelRMSE, ShiftFlipDistance
from privacy.search import brute_force_nearest


def test_threshold_is_the_lower_order_statistic_of_new_patient_distances() -> None:
    d = np.array([0.5, 0.2, 0.9, 0.3, 0.4])
    assert threshold_from_distances("pixel_rmse", d, 0.01, None) == 0.2
    assert threshold_from_distances("pixel_rmse", d, 0.25, None) == 0.3
    d200 = np.linspace(0.01, 2.0, 200)
    # j = floor(0.01 * 199) = 1: the second smallest.
    assert threshold_from_distances("pixel_rmse", d200, 0.01, None) == d200[1]


def test_expected_false_rejection_is_the_rank_bound() -> None:
    assert expected_false_rejection(15, 0.01) == pytest.approx(1 / 16)
    assert expected_false_rejection(569, 0.01) == pytest.approx(6 / 570)


def test_threshold_below_the_site_floor_is_refused_not_clamped() -> None:
    with pytest.raises(GuardError, match="below the site floor") as info:
        threshold_from_distances("shift_flip", np.array([0.03, 0.05]), 0.01, floor=0.04)
    assert info.value.exit_code == 2
    assert info.value.where == "policy.guard_floor.shift_flip"
    assert threshold_from_distances("shift_flip", np.array([0.05, 0.06]), 0.01, 0.04) == 0.05


def test_zero_threshold_from_a_duplicated_slice_is_refused() -> None:
    with pytest.raises(GuardError, match="threshold is 0"):
        threshold_from_distances("pixel_rmse", np.array([0.0, 0.1, 0.2]), 0.01, None)


def test_holdout_patients_are_calibrated_against_train() -> None:
    method, folds = make_folds(
        ["a", "a", "b", "c"], ["train", "train", "holdout", "train"], ["s1", "s1", "s2", "s3"],
        [0, 1, 0, 0],
    )
    assert method == "holdout"
    assert [f.queries.tolist() for f in folds] == [[2]]
    assert folds[0].reference.tolist() == [0, 1, 3]


def test_holdout_groups_are_calibrated_against_every_other_patient() -> None:
    # Five holdout patients in two groups: each group's slices against the train slices AND
    # the other group's, never against a slice of its own patients; each holdout slice once.
    patients = ["t1", "t1", "t2", "h1", "h1", "h2", "h3", "h4", "h4", "h5", "t3"]
    splits = ["train"] * 3 + ["holdout"] * 7 + ["train"]
    method, folds = make_folds(patients, splits, patients, [0.0] * len(patients), k=2)
    assert method == "holdout" and len(folds) == 2
    hold = [i for i, s in enumerate(splits) if s == "holdout"]
    assert sorted(sum((f.queries.tolist() for f in folds), [])) == hold
    for fold in folds:
        own = {patients[i] for i in fold.queries.tolist()}
        ref = fold.reference.tolist()
        assert sorted(ref) == [i for i in range(len(patients)) if patients[i] not in own]
        assert {0, 1, 2, 10} <= set(ref)  # every train slice
        assert set(ref) & set(hold)  # and the other holdout group's slices


def test_without_holdout_patients_are_left_out_in_groups() -> None:
    patients = ["a", "a", "b", "c", "d"]
    method, folds = make_folds(patients, ["train"] * 5, patients, [0, 1, 0, 0, 0], k=2)
    assert method == "leave-patients-out"
    for fold in folds:
        left_out = {patients[i] for i in fold.queries.tolist()}
        kept = {patients[i] for i in fold.reference.tolist()}
        assert left_out and not left_out & kept
    assert sorted(i for f in folds for i in f.queries.tolist()) == [0, 1, 2, 3, 4]


def test_single_patient_is_calibrated_by_leaving_slabs_out_with_a_gap() -> None:
    n = 20
    positions = list(range(n))[::-1]  # rows in reverse position order
    method, folds = make_folds(["p"] * n, ["train"] * n, ["s"] * n, positions, k=4, gap=2)
    assert method == "leave-slab-out"
    assert len(folds) == 4
    for fold in folds:
        q_pos = sorted(positions[i] for i in fold.queries.tolist())
        r_pos = {positions[i] for i in fold.reference.tolist()}
        assert q_pos == list(range(q_pos[0], q_pos[-1] + 1))  # contiguous slab
        # Neither the slab nor the two slices either side of it are in the reference.
        for p in range(q_pos[0] - 2, q_pos[-1] + 3):
            assert p not in r_pos


def test_single_patient_with_too_few_slices_is_refused() -> None:
    with pytest.raises(GuardError, match="too few slices"):
        make_folds(["p", "p"], ["train", "train"], ["s", "s"], [0, 1])


def test_calibrated_thresholds_are_the_quantile_of_exact_nearest_distances() -> None:
    rng = np.random.default_rng(0)
    images = np.kron(rng.random((30, 4, 4)), np.ones((1, 4, 4))).astype(np.float32)
    patients = [f"p{i // 3}" for i in range(30)]
    splits = ["holdout" if i >= 24 else "train" for i in range(30)]
    method, folds = make_folds(patients, splits, patients, list(range(30)))
    metrics = [PixelRMSE(), ShiftFlipDistance(2)]
    cal = calibrate_thresholds(metrics, images, folds, method, 0.2,
                               neighbour_pairs=np.array([[0, 1], [1, 2]]), n_components=4)
    for m in metrics:
        near = brute_force_nearest(
            m.query_variants(images[24:]), m.reference_features(images[:24])
        )
        d = near.distances(m.scale((16, 16)))[:, 0]
        np.testing.assert_array_equal(cal.distances[m.name], d)
        assert cal.thresholds[m.name] == float(np.quantile(d, 0.2, method="lower"))
        assert cal.metrics[m.name].neighbour["n"] == 2.0
    doc = cal.to_dict()
    assert doc["method"] == "holdout" and doc["n_queries"] == 6


def test_floor_for_an_unknown_metric_is_refused() -> None:
    with pytest.raises(GuardError, match="unknown metrics"):
        calibrate_thresholds([PixelRMSE()], np.zeros((3, 4, 4), dtype=np.float32), [], "holdout",
                             0.01, floors={"ssim": 0.1})


def test_one_patient_site_split_by_slabs_is_calibrated_by_leaving_slabs_out() -> None:
    # The store splits a one-patient site by slabs: train and holdout share the patient, so
    # holdout slices are no "new patient"; calibration leaves slabs out instead.
    n = 25
    splits = ["train"] * 20 + ["holdout"] * 5
    method, folds = make_folds(["p"] * n, splits, ["s"] * n, list(range(n)), k=5, gap=2)
    assert method == "leave-slab-out"
    assert sorted(i for f in folds for i in f.queries.tolist()) == list(range(n))
