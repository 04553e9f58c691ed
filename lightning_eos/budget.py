"""When to measure: keep a monitor's share of the wall time inside a budget the user sets.

A measurement (a Hessian eigen-solve over a probe set) costs many training steps' worth of time; a
fixed ``every_n_steps`` is either wasteful on a small model or ruinous on a large one. The
:class:`MeasurementBudget` times the training steps and the measurements and schedules the next
measurement at the first step where, had it been taken, the monitor's share of the wall time since
training started would still be at most ``budget``:

    measured + ĉ  ≤  budget · (trained + Δ·t̂ + measured + ĉ)

with ``trained``/``measured`` the seconds spent so far in training and in measurements, ``t̂`` the mean
training step time, ``ĉ`` the predicted cost of the next measurement (the last one's, or before any,
``first_cost_steps · t̂`` from a cost model) and ``Δ`` the steps to wait. Stopped at any point, a run
has spent at most about ``budget`` of its time in the monitor (the first measurement included, as
far as its predicted cost is right).

Decisions are made only at *planning points* (``plan_after`` steps into training, and right after each
measurement) and are step numbers, so data-parallel ranks agree by broadcasting one integer from
rank zero at those points (``agree``): every rank then measures at the same steps.

Torch only in spirit: no Lightning import (no torch either).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

__all__ = ["MeasurementBudget"]


class MeasurementBudget:
    """Schedules measurements so that their share of wall time stays at or under ``budget``.

    Args:
        budget: the largest fraction of wall time the measurements may take, in (0, 1).
        first_cost_steps: predicted cost of the first measurement in training-step units (the caller's
            cost model, e.g. products × probe batches); replaced by measured costs afterwards.
        plan_after: steps timed before the first measurement is planned (≥ 1).

    Use: call :meth:`observe_step` once per training step with its duration, ask :meth:`due` whether
    to measure at this step, and after measuring call :meth:`measured` with the measurement's
    duration. All times in seconds.
    """

    def __init__(self, budget: float, first_cost_steps: float, plan_after: int = 5) -> None:
        if not (0.0 < budget < 1.0):
            raise ValueError(f"budget={budget!r} is not supported; accepted values: a float in (0, 1).")
        if not (first_cost_steps > 0 and math.isfinite(first_cost_steps)):
            raise ValueError(f"first_cost_steps={first_cost_steps!r}; accepted values: a finite float > 0.")
        if plan_after < 1:
            raise ValueError(f"plan_after={plan_after!r}; accepted values: an int >= 1.")
        self.budget = float(budget)
        self.first_cost_steps = float(first_cost_steps)
        self.plan_after = int(plan_after)
        self.steps = 0  # training steps observed
        self.trained = 0.0  # seconds spent in training steps
        self.measured_time = 0.0  # seconds spent in measurements
        self.measurements = 0
        self.last_cost: float | None = None  # seconds of the latest measurement
        self.next_step: int | None = None  # step number (1-based count of observed steps) to measure at

    @property
    def step_time(self) -> float:
        """Mean training step time so far (seconds; 0 before any step)."""
        return self.trained / self.steps if self.steps else 0.0

    @property
    def overhead(self) -> float:
        """The measured share of wall time spent in measurements so far (0..1)."""
        total = self.trained + self.measured_time
        return self.measured_time / total if total > 0 else 0.0

    def observe_step(self, seconds: float) -> None:
        """Account one training step of ``seconds`` (the time between two steps, less measurements)."""
        self.steps += 1
        self.trained += max(float(seconds), 0.0)

    def due(self, agree: Callable[[int], int] | None = None) -> bool:
        """Whether to measure at the step just observed.

        ``agree(proposal) -> decision`` makes the ranks of a data-parallel run agree (rank zero's
        proposal broadcast); it is called at planning points only, identically on every rank.
        """
        if self.next_step is None and self.steps >= self.plan_after:
            self.next_step = self._agree(self._plan(), agree)
        return self.next_step is not None and self.steps >= self.next_step

    def measured(self, seconds: float, agree: Callable[[int], int] | None = None) -> None:
        """Account a measurement of ``seconds`` taken at the current step and plan the next one."""
        self.measurements += 1
        self.measured_time += max(float(seconds), 0.0)
        self.last_cost = max(float(seconds), 0.0)
        self.next_step = self._agree(self._plan(), agree)

    def _plan(self) -> int:
        """The first step whose measurement keeps the share within the budget (see module docs)."""
        t = self.step_time
        cost = self.last_cost if self.last_cost is not None else self.first_cost_steps * t
        b = self.budget
        if t <= 0.0:
            return self.steps + 1
        wait = ((self.measured_time + cost) * (1.0 - b) - b * self.trained) / (b * t)
        return self.steps + max(1, math.ceil(wait))

    @staticmethod
    def _agree(proposal: int, agree: Callable[[int], int] | None) -> int:
        return int(agree(proposal)) if agree is not None else proposal

    def state_dict(self) -> dict[str, Any]:
        """Plain numbers (checkpoints load with ``weights_only=True``)."""
        return {
            "steps": self.steps,
            "trained": self.trained,
            "measured_time": self.measured_time,
            "measurements": self.measurements,
            "last_cost": self.last_cost,
            "next_step": self.next_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.trained = float(state["trained"])
        self.measured_time = float(state["measured_time"])
        self.measurements = int(state["measurements"])
        self.last_cost = None if state["last_cost"] is None else float(state["last_cost"])
        self.next_step = None if state["next_step"] is None else int(state["next_step"])
