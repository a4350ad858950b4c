"""Arm F's rounds: the step budget is shared as planned and the rate follows one schedule."""

from __future__ import annotations

import pytest

from coordinator.restore.fedavg import local_settings, plan_rounds, shared_settings
from coordinator.restore.train import learning_rate, settings_for


def test_summed_budget_gives_every_site_its_share_of_the_steps() -> None:
    assert plan_rounds(1500, 3, 10) == (10, 50)
    assert plan_rounds(1500, 3, 10, "per-site") == (10, 150)
    assert plan_rounds(6, 3, 10) == (2, 1)  # fewer rounds when steps are few
    with pytest.raises(ValueError, match="cannot be shared"):
        plan_rounds(2, 3, 10)


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_rounds_run_consecutive_slices_of_one_rate_schedule(schedule: str) -> None:
    settings = settings_for("edsr", "sr", "MR", "cpu", steps=1500, lr_schedule=schedule)
    n_rounds, local_steps = plan_rounds(settings.steps, 3, 10)
    shared = shared_settings(settings, n_rounds, local_steps)
    whole = settings_for("edsr", "sr", "MR", "cpu", steps=n_rounds * local_steps,
                         lr_schedule=schedule)
    expected = [learning_rate(whole, k) for k in range(whole.steps)]
    for site in range(3):
        rates = []
        seeds = set()
        for r in range(1, n_rounds + 1):
            local = local_settings(shared, local_steps, r, site)
            assert local.steps == local_steps
            seeds.add(local.seed)
            rates += [learning_rate(local, k) for k in range(local.steps)]
        assert rates == pytest.approx(expected)
        assert len(seeds) == n_rounds  # a new batch order every round
    if schedule == "cosine":
        assert expected[-1] < 0.001 * settings.lr
