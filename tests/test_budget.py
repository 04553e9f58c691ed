"""The measurement budget: the monitor's share of wall time stays inside what the user allows."""

from __future__ import annotations

import pytest

from lightning_eos.budget import MeasurementBudget


def _run(budget: MeasurementBudget, steps: int, step_s: float, cost_s: float) -> list[int]:
    """Drive the schedule with synthetic timings; return the steps at which it measured."""
    taken = []
    for _ in range(steps):
        budget.observe_step(step_s)
        if budget.due():
            taken.append(budget.steps)
            budget.measured(cost_s)
            # At every point after a measurement the share so far is within the budget.
            assert budget.overhead <= budget.budget + 1e-12
    return taken


@pytest.mark.parametrize("cost_steps", [0.5, 3.0, 40.0])
def test_share_of_wall_time_stays_within_the_budget(cost_steps: float) -> None:
    b = MeasurementBudget(0.05, first_cost_steps=cost_steps, plan_after=5)
    taken = _run(b, 2000, step_s=0.01, cost_s=cost_steps * 0.01)
    assert taken and b.overhead <= 0.05 + 1e-12
    # Not starved either: the measurements use most of what the budget allows.
    allowed = 0.05 * (b.trained + b.measured_time) / (cost_steps * 0.01)
    assert len(taken) >= 0.8 * allowed - 1


def test_first_measurement_waits_for_its_predicted_cost() -> None:
    # A cold first measurement predicted at 20 steps with a 5 % budget: ~380 steps of training first.
    b = MeasurementBudget(0.05, first_cost_steps=20.0, plan_after=5)
    taken = _run(b, 1000, step_s=0.01, cost_s=0.2)
    assert 370 <= taken[0] <= 390


def test_a_measurement_dearer_than_predicted_is_paid_back() -> None:
    b = MeasurementBudget(0.1, first_cost_steps=1.0, plan_after=2)
    taken = _run(b, 50, step_s=0.01, cost_s=0.01)  # as predicted
    b.observe_step(0.01)
    gap_before = taken[-1] - taken[-2]
    b.measured(0.5)  # 50 steps' worth: the next one waits until the share is back under 10 %
    assert b.next_step is not None and b.next_step - b.steps > 10 * gap_before
    assert b.overhead > 0.1  # this one overshot (it happened); the schedule makes up for it


def test_ranks_follow_the_agreed_decision_and_state_round_trips() -> None:
    b = MeasurementBudget(0.05, first_cost_steps=10.0, plan_after=3)
    proposals: list[int] = []

    def rank_zero_says(proposal: int) -> int:
        proposals.append(proposal)
        return 7  # what rank zero broadcast

    for _ in range(3):
        b.observe_step(0.01)
    assert not b.due(agree=rank_zero_says) and b.next_step == 7 and len(proposals) == 1
    other = MeasurementBudget(0.05, first_cost_steps=10.0, plan_after=3)
    other.load_state_dict(b.state_dict())
    assert other.state_dict() == b.state_dict()


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"budget": 0.0}, "budget"),
        ({"budget": 1.0}, "budget"),
        ({"first_cost_steps": -1.0}, "first_cost_steps"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict[str, float], name: str) -> None:
    args = {"budget": 0.05, "first_cost_steps": 10.0, **kwargs}
    with pytest.raises(ValueError, match=name):
        MeasurementBudget(**args)
