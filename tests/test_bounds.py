"""Tests for lightning_eos.bounds: every threshold is checked against torch.optim itself.

Two kinds of evidence:
1. Direct simulation: run the real optimizer on a quadratic ½wᵀAw whose (preconditioned) top
   eigenvalue sits 2 % below / above the predicted threshold and check decay vs growth.
2. Linear algebra: extract the optimizer's one-step transition matrix on a 1-D mode from torch.optim
   (by stepping from unit states) and compare the largest root modulus of its characteristic
   polynomial (numpy.roots) with 1 around the threshold, for random hyper-parameters (hypothesis).

Adaptive optimizers need a frozen preconditioner P. We pre-warm the state: ``exp_avg_sq`` (Adam) or
``square_avg`` (RMSprop) is set to (P − ε)², Adam's ``step`` to 1e15 so both bias corrections are 1,
and the second-moment decay to β2 = 1 − 1e-12 (Adam forbids β2 = 1) or alpha = 1 (RMSprop allows it,
which freezes square_avg and grad_avg exactly). Over a few hundred steps v then moves by < 1e-6
relative, so the optimizer is the linear map with that P.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_eos import bounds
from lightning_eos.bounds import (
    UnsupportedOptimizerError,
    WeightDecayWindow,
    critical_sharpness,
    max_stable_lr,
    preconditioned_for,
    register_threshold,
    stability_constant,
    unregister_threshold,
    weight_decay_window,
)

DTYPE = torch.float64
BETA2_FROZEN = 1.0 - 1e-12


def _orthogonal(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DTYPE))
    return q


def _sym_with_spectrum(eigs: list[float], seed: int) -> torch.Tensor:
    """A dense symmetric matrix with the given eigenvalues (random rotation)."""
    q = _orthogonal(len(eigs), seed)
    return q @ torch.diag(torch.tensor(eigs, dtype=DTYPE)) @ q.T


def _growth(
    make_opt: Callable[[torch.nn.Parameter], torch.optim.Optimizer],
    hessian: torch.Tensor,
    steps: int = 600,
    prepare: Callable[[torch.optim.Optimizer, torch.nn.Parameter], None] | None = None,
    sign: float = 1.0,
) -> float:
    """Run the optimizer on loss = sign·½wᵀAw; return ‖w_T‖/‖w_0‖ (stops early once clearly diverged)."""
    gen = torch.Generator().manual_seed(0)
    # Small start: for the adaptive optimizers a growing gradient would feed back into v (the
    # preconditioner is only nearly frozen); 1e3 growth from 1e-6 keeps that feedback < 1e-9 relative.
    w0 = torch.randn(hessian.shape[0], generator=gen, dtype=DTYPE) * 1e-6
    p = torch.nn.Parameter(w0.clone())
    opt = make_opt(p)
    if prepare is not None:
        prepare(opt, p)
    n0 = float(w0.norm())
    for _ in range(steps):
        opt.zero_grad()
        # The gradient of sign·½wᵀAw, written directly (autograd would give the same numbers).
        p.grad = sign * (hessian @ p.detach())
        opt.step()
        ratio = float(p.detach().norm()) / n0
        if not math.isfinite(ratio) or ratio > 1e3:
            return math.inf
    return float(p.detach().norm()) / n0


def _spectrum(top: float) -> list[float]:
    return [top, 0.8 * top, 0.5 * top, 0.3 * top, 0.2 * top, 0.05 * top]


# ---------------------------------------------------------------------------------------------------
# SGD family by simulation
# ---------------------------------------------------------------------------------------------------

SGD_CASES: list[dict[str, Any]] = [
    {"lr": 0.1},
    {"lr": 0.1, "weight_decay": 2.0},
    {"lr": 0.01, "momentum": 0.9, "weight_decay": 0.5},
    {"lr": 0.05, "momentum": 0.5, "dampening": 0.3},
    {"lr": 0.02, "momentum": 0.7, "dampening": 0.6, "weight_decay": 1.0},
    {"lr": 0.01, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1},
    {"lr": 0.1, "momentum": 0.3, "nesterov": True},
]


@pytest.mark.parametrize("kwargs", SGD_CASES, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_sgd_threshold_matches_simulation(kwargs: dict[str, Any]) -> None:
    probe = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], **kwargs)
    thr = critical_sharpness(probe)
    mu, d, alpha = kwargs.get("momentum", 0.0), kwargs.get("dampening", 0.0), kwargs.get("weight_decay", 0.0)
    c = (2 + 2 * mu) / ((1 + 2 * mu) if kwargs.get("nesterov") else (1 - d))
    assert thr == pytest.approx(c / kwargs["lr"] - alpha, rel=1e-12)
    assert not preconditioned_for(probe)
    for factor, stable in ((0.98, True), (1.02, False)):
        a = _sym_with_spectrum(_spectrum(factor * thr), seed=1)
        g = _growth(lambda p: torch.optim.SGD([p], **kwargs), a)
        assert (g < 1e-2) if stable else (g > 1e2), (factor, g)


def test_sgd_maximize_threshold_applies_to_negated_loss() -> None:
    """maximize=True descends −loss: a loss −½wᵀBw behaves like ½wᵀBw without maximize."""
    kwargs = {"lr": 0.05, "momentum": 0.5, "weight_decay": 1.0, "maximize": True}
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], **kwargs)
    thr = critical_sharpness(opt)
    assert bounds.is_maximizing(opt)
    assert thr == pytest.approx(3.0 / 0.05 - 1.0)
    for factor, stable in ((0.98, True), (1.02, False)):
        b = _sym_with_spectrum(_spectrum(factor * thr), seed=2)
        g = _growth(lambda p: torch.optim.SGD([p], **kwargs), b, sign=-1.0)
        assert (g < 1e-2) if stable else (g > 1e2), (factor, g)


# ---------------------------------------------------------------------------------------------------
# Adaptive optimizers with a frozen preconditioner
# ---------------------------------------------------------------------------------------------------


def _precond_diag(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 0.5 * 4.0 ** torch.rand(n, generator=gen, dtype=DTYPE)  # P in [0.5, 2]: far from scalar


def _freeze_adam(
    pdiag: torch.Tensor, eps: float
) -> Callable[[torch.optim.Optimizer, torch.nn.Parameter], None]:
    def prepare(opt: torch.optim.Optimizer, p: torch.nn.Parameter) -> None:
        opt.state[p] = {
            "step": torch.tensor(1e15, dtype=torch.float32),
            "exp_avg": torch.zeros_like(p),
            "exp_avg_sq": (pdiag - eps) ** 2,
        }

    return prepare


def _freeze_rmsprop(
    pdiag: torch.Tensor, eps: float, momentum: float, grad_avg: torch.Tensor | None
) -> Callable[[torch.optim.Optimizer, torch.nn.Parameter], None]:
    def prepare(opt: torch.optim.Optimizer, p: torch.nn.Parameter) -> None:
        sq = (pdiag - eps) ** 2
        state: dict[str, torch.Tensor] = {"step": torch.tensor(0.0)}
        if grad_avg is not None:  # centered: denominator is sqrt(square_avg − grad_avg²) + eps
            state["grad_avg"] = grad_avg.clone()
            sq = sq + grad_avg**2
        state["square_avg"] = sq
        if momentum > 0:
            state["momentum_buffer"] = torch.zeros_like(p)
        opt.state[p] = state

    return prepare


def _precond_hessian(target_top: float, pdiag: torch.Tensor, seed: int, coupled: float = 0.0) -> torch.Tensor:
    """H such that P^{-1/2}(H + coupled·I)P^{-1/2} has spectrum _spectrum(target_top)."""
    s = _sym_with_spectrum(_spectrum(target_top), seed)
    root = pdiag.sqrt()
    return root[:, None] * s * root[None, :] - coupled * torch.eye(len(pdiag), dtype=DTYPE)


ADAM_CASES: list[tuple[str, dict[str, Any]]] = [
    ("adam", {"lr": 0.01, "betas": (0.9, BETA2_FROZEN)}),
    ("adam", {"lr": 0.003, "betas": (0.5, BETA2_FROZEN)}),
    # coupled decay: the threshold applies to P⁻¹(H + αI); αP⁻¹ here is 3-10 % of the threshold, so
    # treating α as a scalar shift would fail the ±2 % test.
    ("adam", {"lr": 0.01, "betas": (0.9, BETA2_FROZEN), "weight_decay": 200.0}),
    # decoupled decay with ηλ_wd = 0.1 moves the edge by 5 %.
    ("adamw", {"lr": 0.01, "betas": (0.9, BETA2_FROZEN), "weight_decay": 10.0}),
    (
        "adam",
        {"lr": 0.01, "betas": (0.8, BETA2_FROZEN), "weight_decay": 20.0, "decoupled_weight_decay": True},
    ),
]


@pytest.mark.parametrize(("name", "kwargs"), ADAM_CASES)
def test_adam_family_threshold_matches_simulation(name: str, kwargs: dict[str, Any]) -> None:
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    eps = 1e-8
    probe = cls([torch.nn.Parameter(torch.zeros(1))], eps=eps, foreach=False, **kwargs)
    thr = critical_sharpness(probe)
    assert preconditioned_for(probe)
    beta1, lr, wd = kwargs["betas"][0], kwargs["lr"], kwargs.get("weight_decay", 0.0)
    decoupled = name == "adamw" or kwargs.get("decoupled_weight_decay", False)
    expected = (2 + 2 * beta1) / ((1 - beta1) * lr) * ((1 - lr * wd / 2) if decoupled else 1.0)
    assert thr == pytest.approx(expected, rel=1e-12)
    pdiag = _precond_diag(6, seed=3)
    coupled = 0.0 if decoupled else wd
    for factor, stable in ((0.98, True), (1.02, False)):
        h = _precond_hessian(factor * thr, pdiag, seed=4, coupled=coupled)
        g = _growth(
            lambda p: cls([p], eps=eps, foreach=False, **kwargs),
            h,
            steps=800,
            prepare=_freeze_adam(pdiag, eps),
        )
        assert (g < 1e-2) if stable else (g > 1e2), (factor, g)


def test_adam_coupled_decay_bracket_contains_true_threshold() -> None:
    """The threshold for λ_max(P⁻¹H) alone (coupled decay excluded) lies in coupled_decay_bracket."""
    eps, lr, wd = 1e-8, 0.01, 200.0
    pdiag = _precond_diag(6, seed=3)
    p = torch.nn.Parameter(torch.zeros(6, dtype=DTYPE))
    opt = torch.optim.Adam([p], lr=lr, betas=(0.9, BETA2_FROZEN), eps=eps, weight_decay=wd, foreach=False)
    _freeze_adam(pdiag, eps)(opt, p)
    lo, hi = bounds.coupled_decay_bracket(opt)
    thr = critical_sharpness(opt)
    assert lo == pytest.approx(thr - wd / float(pdiag.min()), rel=1e-9)
    assert hi == pytest.approx(thr - wd / float(pdiag.max()), rel=1e-9)
    # The true edge for λ_max(P⁻¹H): scale a fixed H until λ_max(P⁻¹(H + αI)) = thr.
    h0 = _precond_hessian(1.0, pdiag, seed=4)
    pinv_half = pdiag.rsqrt()

    def top(scale: float, coupled: float) -> float:
        m = pinv_half[:, None] * (scale * h0 + coupled * torch.eye(6, dtype=DTYPE)) * pinv_half[None, :]
        return float(torch.linalg.eigvalsh(m)[-1])

    lo_s, hi_s = 0.0, 2.0 * thr
    for _ in range(100):
        mid = 0.5 * (lo_s + hi_s)
        lo_s, hi_s = (mid, hi_s) if top(mid, wd) < thr else (lo_s, mid)
    true_edge = top(lo_s, 0.0)
    assert lo <= true_edge <= hi


RMS_CASES: list[dict[str, Any]] = [
    {"lr": 0.01},
    {"lr": 0.01, "momentum": 0.9},
    {"lr": 0.02, "momentum": 0.5, "weight_decay": 30.0},
    {"lr": 0.01, "momentum": 0.6, "centered": True},
]


@pytest.mark.parametrize("kwargs", RMS_CASES, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_rmsprop_threshold_matches_simulation(kwargs: dict[str, Any]) -> None:
    eps = 1e-8
    probe = torch.optim.RMSprop([torch.nn.Parameter(torch.zeros(1))], alpha=1.0, eps=eps, **kwargs)
    thr = critical_sharpness(probe)
    mu = kwargs.get("momentum", 0.0)
    assert thr == pytest.approx((2 + 2 * mu) / kwargs["lr"], rel=1e-12)
    assert preconditioned_for(probe)
    pdiag = _precond_diag(6, seed=5)
    grad_avg = 0.3 * torch.ones(6, dtype=DTYPE) if kwargs.get("centered") else None
    for factor, stable in ((0.98, True), (1.02, False)):
        h = _precond_hessian(factor * thr, pdiag, seed=6, coupled=kwargs.get("weight_decay", 0.0))
        g = _growth(
            lambda p: torch.optim.RMSprop([p], alpha=1.0, eps=eps, foreach=False, **kwargs),
            h,
            steps=800,
            prepare=_freeze_rmsprop(pdiag, eps, mu, grad_avg),
        )
        assert (g < 1e-2) if stable else (g > 1e2), (factor, g)


# ---------------------------------------------------------------------------------------------------
# Characteristic polynomials from torch.optim's own transition matrix
# ---------------------------------------------------------------------------------------------------


def _sgd_transition(curv: float, **kwargs: Any) -> np.ndarray:
    """2×2 matrix mapping (w, buf) → (w', buf') for one torch.optim.SGD step on ½·curv·w²."""
    cols = []
    for w0, b0 in ((1.0, 0.0), (0.0, 1.0)):
        p = torch.nn.Parameter(torch.tensor([w0], dtype=DTYPE))
        opt = torch.optim.SGD([p], foreach=False, **kwargs)
        opt.state[p] = {"momentum_buffer": torch.tensor([b0], dtype=DTYPE)}
        p.grad = curv * p.detach().clone()
        opt.step()
        cols.append([float(p.detach()), float(opt.state[p]["momentum_buffer"])])
    return np.array(cols).T


def _rho(m: np.ndarray) -> float:
    """Largest root modulus of det(zI − M) = z² − tr(M) z + det(M)."""
    return float(np.max(np.abs(np.roots([1.0, -np.trace(m), np.linalg.det(m)]))))


@settings(max_examples=60, deadline=None)
@given(
    mu=st.floats(0.01, 0.95),
    lr=st.floats(1e-3, 1.0),
    alpha=st.floats(0.0, 10.0),
    damp=st.floats(0.0, 0.9),
    nesterov=st.booleans(),
)
def test_sgd_root_modulus_crosses_one_at_threshold(
    mu: float, lr: float, alpha: float, damp: float, nesterov: bool
) -> None:
    kwargs = {"lr": lr, "momentum": mu, "weight_decay": alpha, "nesterov": nesterov}
    kwargs["dampening"] = 0.0 if nesterov else damp
    thr = critical_sharpness(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], **kwargs))
    width = stability_constant(mu, nesterov, kwargs["dampening"]) / lr  # c/η = thr + α
    rho_at = _rho(_sgd_transition(thr, **kwargs))
    rho_below = _rho(_sgd_transition(thr - 1e-3 * width, **kwargs))
    rho_above = _rho(_sgd_transition(thr + 1e-3 * width, **kwargs))
    assert rho_at == pytest.approx(1.0, abs=1e-6)
    assert rho_below < 1.0 < rho_above
    # The derived polynomials of docs/theory.md have the same coefficients.
    x = lr * (thr + alpha)
    m = _sgd_transition(thr, **kwargs)
    if nesterov:
        tr, det = (1 + mu) * (1 - x), mu * (1 - x)
    else:
        tr, det = 1 + mu - (1 - kwargs["dampening"]) * x, mu
    assert np.trace(m) == pytest.approx(tr, abs=1e-9)
    assert np.linalg.det(m) == pytest.approx(det, abs=1e-9)


def _adam_transition(kappa: float, pval: float, **kwargs: Any) -> np.ndarray:
    """(w, m) → (w', m') for one torch.optim.Adam/AdamW step on ½·h·w² with frozen P = pval."""
    cols = []
    tiny = 1e-6  # keeps g² far below v so that β2 = 1 − 1e-12 freezes P to ~1e-15
    for w0, m0 in ((tiny, 0.0), (0.0, tiny)):
        p = torch.nn.Parameter(torch.tensor([w0], dtype=DTYPE))
        opt = torch.optim.Adam([p], eps=0.0, foreach=False, **kwargs)
        opt.state[p] = {
            "step": torch.tensor(1e15, dtype=torch.float32),
            "exp_avg": torch.tensor([m0], dtype=DTYPE),
            "exp_avg_sq": torch.tensor([pval**2], dtype=DTYPE),
        }
        p.grad = kappa * pval * p.detach().clone()  # h = κ·P so that P⁻¹h = κ
        opt.step()
        cols.append([float(p.detach()) / tiny, float(opt.state[p]["exp_avg"]) / tiny])
    return np.array(cols).T


@settings(max_examples=40, deadline=None)
@given(beta1=st.floats(0.0, 0.95), lr=st.floats(1e-4, 0.1), wd_frac=st.floats(0.0, 0.5))
def test_adamw_root_modulus_crosses_one_at_threshold(beta1: float, lr: float, wd_frac: float) -> None:
    kwargs = {
        "lr": lr,
        "betas": (beta1, BETA2_FROZEN),
        "weight_decay": wd_frac / lr,
        "decoupled_weight_decay": True,
    }
    thr = critical_sharpness(torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], **kwargs))
    scale = (2 + 2 * beta1) / ((1 - beta1) * lr)
    assert _rho(_adam_transition(thr, 0.7, **kwargs)) == pytest.approx(1.0, abs=1e-6)
    assert _rho(_adam_transition(thr - 1e-3 * scale, 0.7, **kwargs)) < 1.0
    assert _rho(_adam_transition(thr + 1e-3 * scale, 0.7, **kwargs)) > 1.0


# ---------------------------------------------------------------------------------------------------
# max_stable_lr, windows, registry, validation
# ---------------------------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(
    mu=st.floats(0.0, 0.95),
    lr=st.floats(1e-4, 1.0),
    alpha=st.floats(0.0, 5.0),
    nesterov=st.booleans(),
    sharp=st.floats(0.1, 1e4),
)
def test_max_stable_lr_inverts_critical_sharpness(
    mu: float, lr: float, alpha: float, nesterov: bool, sharp: float
) -> None:
    opt = torch.optim.SGD(
        [torch.nn.Parameter(torch.zeros(1))],
        lr=lr,
        momentum=mu,
        weight_decay=alpha,
        nesterov=nesterov and mu > 0,
    )
    eta = max_stable_lr(sharp, opt)
    opt.param_groups[0]["lr"] = eta
    assert critical_sharpness(opt) == pytest.approx(sharp, rel=1e-9)


def test_max_stable_lr_adam_family_and_inf() -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    for opt in (
        torch.optim.AdamW([p], lr=0.01, weight_decay=5.0),
        torch.optim.Adam([p], lr=torch.tensor(0.01), betas=(0.8, 0.99)),
        torch.optim.RMSprop([p], lr=0.01, momentum=0.3),
    ):
        eta = max_stable_lr(1234.5, opt)
        opt.param_groups[0]["lr"] = eta
        assert critical_sharpness(opt) == pytest.approx(1234.5, rel=1e-9)
    sgd = torch.optim.SGD([p], lr=0.1, weight_decay=0.5)
    assert max_stable_lr(-0.5, sgd) == math.inf
    assert max_stable_lr(-1.0, torch.optim.Adam([p])) == math.inf
    assert max_stable_lr(1.5, sgd) == pytest.approx(1.0)


def test_critical_sharpness_follows_live_lr_and_tensor_lr() -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=torch.tensor(0.5))
    assert critical_sharpness(opt) == pytest.approx(4.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    p.grad = torch.zeros(1)
    opt.step()
    sched.step()
    assert critical_sharpness(opt) == pytest.approx(8.0)


def test_multiple_groups_and_bad_group() -> None:
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a]}, {"params": [b], "lr": 0.01}], lr=0.1)
    assert critical_sharpness(opt, 0) == pytest.approx(20.0)
    assert critical_sharpness(opt, 1) == pytest.approx(200.0)
    for bad in (2, -3, 1.0, "0"):
        with pytest.raises(ValueError, match="group"):
            critical_sharpness(opt, bad)  # type: ignore[arg-type]


def test_unknown_optimizer_error_and_registration() -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adagrad([p], lr=0.1)
    with pytest.raises(UnsupportedOptimizerError, match=r"Adagrad.*register_threshold") as info:
        critical_sharpness(opt)
    assert isinstance(info.value, TypeError)
    with pytest.raises(UnsupportedOptimizerError):
        preconditioned_for(opt)

    class MySGD(torch.optim.SGD):
        pass

    assert critical_sharpness(MySGD([p], lr=0.1)) == pytest.approx(20.0)  # resolves through the MRO
    try:
        register_threshold(torch.optim.Adagrad, lambda g: 2.0 / float(g["lr"]), preconditioned=True)
        assert critical_sharpness(opt) == pytest.approx(20.0)
        assert preconditioned_for(opt)
        # no closed-form inverse registered: bisection
        assert max_stable_lr(40.0, opt) == pytest.approx(0.05, rel=1e-9)
        register_threshold(MySGD, lambda g: 1.0)  # the most specific class wins
        assert critical_sharpness(MySGD([p], lr=0.1)) == 1.0
    finally:
        unregister_threshold(torch.optim.Adagrad)
        unregister_threshold(MySGD)
    with pytest.raises(UnsupportedOptimizerError):
        critical_sharpness(opt)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": -1.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"lr": 0.1, "momentum": 1.0}, "momentum"),
        ({"lr": 0.1, "momentum": 0.5, "dampening": 1.5}, "dampening"),
        ({"lr": 0.1, "weight_decay": float("inf")}, "weight_decay"),
    ],
)
def test_bad_hyper_parameters_raise(kwargs: dict[str, Any], match: str) -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    opt.param_groups[0].update(kwargs)  # bypass torch's own checks: groups can be edited live
    with pytest.raises(ValueError, match=match):
        critical_sharpness(opt)


def test_zero_lr_is_never_unstable() -> None:
    """A schedule at lr = 0 (warm-up start, annealed end) must not crash a monitor reading it."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
    opt.param_groups[0]["lr"] = 0.0
    assert critical_sharpness(opt) == math.inf
    assert max_stable_lr(10.0, opt) == pytest.approx(3.8 / 10.0)


def test_weight_decay_window_values_and_validation() -> None:
    w = weight_decay_window(-3.0, 10.0, lr=0.1)
    assert isinstance(w, WeightDecayWindow)
    assert tuple(w) == pytest.approx((3.0, 10.0))
    low, high = w
    assert (low, high) == (w.low, w.high) and not w.empty and 5.0 in w and 11.0 not in w
    assert weight_decay_window(0.0, 1.0, 0.1, momentum=0.9).high == pytest.approx(37.0)
    assert weight_decay_window(0.0, 1.0, 0.1, momentum=0.9, nesterov=True).high == pytest.approx(
        3.8 / 0.28 - 1
    )
    assert weight_decay_window(0.0, 1.0, 0.1, momentum=0.5, dampening=0.5).high == pytest.approx(59.0)
    empty = weight_decay_window(-15.0, 10.0, lr=0.1)
    assert empty.empty and "empty" in str(empty) and "empty" in empty.message
    with pytest.raises(ValueError, match="lambda_min"):
        weight_decay_window(2.0, 1.0, 0.1)
    with pytest.raises(ValueError, match="lr"):
        weight_decay_window(0.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="momentum"):
        weight_decay_window(0.0, 1.0, 0.1, momentum=-0.1)
    with pytest.raises(ValueError, match="lambda_max"):
        weight_decay_window(0.0, float("inf"), 0.1)
    with pytest.raises(ValueError, match="dampening"):
        weight_decay_window(0.0, 1.0, 0.1, momentum=0.5, nesterov=True, dampening=0.1)


@settings(max_examples=40, deadline=None)
@given(
    lmin=st.floats(-5.0, 5.0),
    spread=st.floats(0.0, 30.0),
    lr=st.floats(0.01, 1.0),
    mu=st.floats(0.0, 0.9),
    nesterov=st.booleans(),
)
def test_weight_decay_window_edges_are_marginal(
    lmin: float, spread: float, lr: float, mu: float, nesterov: bool
) -> None:
    """At α inside the window every mode of H + αI is stable for SGD; just outside one mode is not."""
    lmax = lmin + spread
    win = weight_decay_window(lmin, lmax, lr, momentum=mu, nesterov=nesterov)
    kw = {"lr": lr, "momentum": mu, "nesterov": nesterov and mu > 0}
    if mu == 0.0 or not kw["nesterov"]:
        kw["nesterov"] = False

    def worst(alpha: float) -> float:
        return max(_rho(_sgd_transition(lam + alpha, **kw)) for lam in (lmin, lmax))

    eps = 1e-3 * (win.high - win.low) if not win.empty else 1e-3
    if not win.empty:
        assert worst(0.5 * (win.low + win.high)) <= 1.0 + 1e-9
        assert worst(win.low - eps) > 1.0
        assert worst(win.high + eps) > 1.0
    else:
        assert worst(0.5 * (win.low + win.high)) > 1.0 - 1e-9


def test_group_snapshot_is_read_instead_of_the_live_group() -> None:
    """Monitors pass the hyper-parameters a step applied; the live group may already hold the next LR."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
    applied = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    opt.param_groups[0]["lr"] = 0.05  # a scheduler stepped
    assert critical_sharpness(opt, group=applied) == pytest.approx(3.8 / 0.1)
    assert critical_sharpness(opt) == pytest.approx(3.8 / 0.05)
    assert max_stable_lr(19.0, opt, group=applied) == pytest.approx(0.2)


# ---------------------------------------------------------------------------------------------------
# One preconditioner (bounds.optimizer_preconditioner), used by coupled_decay_bracket and curvature
# ---------------------------------------------------------------------------------------------------


def test_one_preconditioner_function_is_shared_with_curvature() -> None:
    from lightning_eos import curvature
    from lightning_eos.curvature import spectrum

    assert curvature.optimizer_preconditioner is bounds.optimizer_preconditioner
    assert spectrum.optimizer_preconditioner is bounds.optimizer_preconditioner


def _stepped(kind: str, alpha: float) -> tuple[torch.optim.Optimizer, list[torch.nn.Parameter]]:
    """An adaptive optimizer with coupled decay α after 3 steps on tiny random gradients (so that
    ε is a sizeable part of P); returns it and the trainable parameters of its only group."""
    gen = torch.Generator().manual_seed(7)
    p = torch.nn.Parameter(torch.randn(4, generator=gen, dtype=DTYPE))
    q = torch.nn.Parameter(torch.randn(3, generator=gen, dtype=DTYPE))
    if kind == "frozen_param":
        q.requires_grad_(False)  # never gets a gradient, so never any optimizer state
    make: dict[str, Callable[[], torch.optim.Optimizer]] = {
        "adam_amsgrad": lambda: torch.optim.Adam([p, q], lr=0.01, weight_decay=alpha, amsgrad=True),
        "rmsprop_centered": lambda: torch.optim.RMSprop([p, q], lr=0.01, weight_decay=alpha, centered=True),
        "adagrad_registered": lambda: torch.optim.Adagrad([p, q], lr=0.01, weight_decay=alpha, eps=1e-8),
        "no_eps_key": lambda: torch.optim.Adam([p, q], lr=0.01, weight_decay=alpha),
        "frozen_param": lambda: torch.optim.Adam([p, q], lr=0.01, weight_decay=alpha),
    }
    opt = make[kind]()
    for _ in range(3):
        for t in (p, q):
            if t.requires_grad:
                t.grad = 1e-7 * torch.randn(t.shape, generator=gen, dtype=DTYPE)
        opt.step()
    if kind == "no_eps_key":
        del opt.param_groups[0]["eps"]  # a group without eps: the preconditioner has no ε added
    return opt, [t for t in (p, q) if t.requires_grad]


@pytest.mark.parametrize(
    "kind", ["adam_amsgrad", "rmsprop_centered", "adagrad_registered", "no_eps_key", "frozen_param"]
)
def test_coupled_decay_bracket_uses_the_one_preconditioner(kind: str) -> None:
    alpha = 1e-9
    if kind == "adagrad_registered":
        register_threshold(torch.optim.Adagrad, lambda g: 2.0 / float(g["lr"]), preconditioned=True)
    try:
        opt, trainable = _stepped(kind, alpha)
        P = bounds.optimizer_preconditioner(opt, trainable)
        thr = critical_sharpness(opt)
        lo, hi = bounds.coupled_decay_bracket(opt)
    finally:
        unregister_threshold(torch.optim.Adagrad)
    assert P.dtype == torch.float64 and P.shape == (7 if kind != "frozen_param" else 4,)
    # Weyl: [T − α·max P⁻¹, T − α·min P⁻¹], with the P curvature's preconditioned sharpness uses.
    assert lo == pytest.approx(thr - alpha / float(P.min()), rel=1e-12)
    assert hi == pytest.approx(thr - alpha / float(P.max()), rel=1e-12)
    assert lo < hi < thr


def test_preconditioner_formulas_and_defaults() -> None:
    opt, trainable = _stepped("no_eps_key", 0.0)
    state = [opt.state[t] for t in trainable]
    step = float(state[0]["step"])
    want = torch.cat([(s["exp_avg_sq"] / (1 - 0.999**step)).sqrt() for s in state])  # no ε: none set
    torch.testing.assert_close(bounds.optimizer_preconditioner(opt), want, rtol=1e-14, atol=0.0)
    opt, trainable = _stepped("rmsprop_centered", 0.0)
    s = opt.state[trainable[0]]
    want = (s["square_avg"] - s["grad_avg"] ** 2).sqrt() + 1e-8
    torch.testing.assert_close(bounds.optimizer_preconditioner(opt, trainable[:1]), want)
    with pytest.raises(ValueError, match=r"missing_state='skip'.*accepted values: 'error', 'identity'"):
        bounds.optimizer_preconditioner(opt, trainable, missing_state="skip")  # type: ignore[arg-type]


def test_coupled_decay_bracket_before_any_state() -> None:
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(3))], lr=0.01, weight_decay=0.1)
    assert bounds.coupled_decay_bracket(opt) == (-math.inf, pytest.approx(38 / 0.01))


# ---------------------------------------------------------------------------------------------------
# assess: the one threshold comparison the monitors (and the LR controller) use
# ---------------------------------------------------------------------------------------------------


def _three_groups() -> torch.optim.SGD:
    a, b, c = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    c.requires_grad_(False)
    # critical sharpness 3.8/0.1 = 38, 2/0.5 = 4 and 2/2 = 1 (the last group is frozen: it binds nothing)
    return torch.optim.SGD(
        [{"params": [a], "momentum": 0.9}, {"params": [b], "lr": 0.5}, {"params": [c], "lr": 2.0}], lr=0.1
    )


def test_assess_per_group_values_and_binding_group() -> None:
    opt = _three_groups()
    res = bounds.assess(3.0, opt)
    assert isinstance(res, bounds.StabilityAssessment)
    assert res.critical_per_group == pytest.approx((38.0, 4.0, 1.0))
    assert res.lr_per_group == pytest.approx((0.1, 0.5, 2.0))
    assert res.trained == (True, True, False)
    assert res.binding_group == 1 and res.critical == pytest.approx(4.0) and res.lr == 0.5
    assert res.sharpness == 3.0 and res.ratio == pytest.approx(0.75) and not res.preconditioned
    assert res.max_stable_lr == pytest.approx(2.0 / 3.0)
    assert res.max_stable_lr_per_group == pytest.approx((3.8 / 3.0, 2.0 / 3.0, 2.0 / 3.0))
    assert res.ratio_per_group == pytest.approx((3.0 / 38.0, 0.75, 3.0))
    assert res.lr_margin_per_group == pytest.approx((0.1 / (3.8 / 3.0), 0.75, 3.0))
    with pytest.raises(AttributeError):
        res.critical = 1.0  # type: ignore[misc]  # frozen


def test_assess_reads_snapshots_and_handles_no_sharpness_and_all_frozen() -> None:
    opt = _three_groups()
    snap = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    snap[1]["lr"] = 0.25  # the applied value; the live group has moved on
    res = bounds.assess(None, opt, snap)
    assert res.critical_per_group == pytest.approx((38.0, 8.0, 1.0)) and res.lr == 0.25
    assert math.isnan(res.sharpness) and math.isnan(res.ratio) and math.isnan(res.max_stable_lr)
    assert all(math.isnan(v) for v in res.lr_margin_per_group + res.max_stable_lr_per_group)
    for g in opt.param_groups:
        for p in g["params"]:
            p.requires_grad_(False)
    assert bounds.assess(0.5, opt).binding_group == 2  # nothing trains: every group counts
    opt.param_groups[0]["lr"] = 0.0
    zero = bounds.assess(0.5, opt)
    assert zero.critical_per_group[0] == math.inf and zero.lr_margin_per_group[0] == 0.0


def test_assess_adam_is_preconditioned() -> None:
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    res = bounds.assess(1900.0, opt)
    assert res.preconditioned and res.critical == pytest.approx(3800.0) and res.ratio == pytest.approx(0.5)
    assert res.max_stable_lr == pytest.approx(0.02)


def test_assess_bad_input() -> None:
    opt = _three_groups()
    with pytest.raises(ValueError, match=r"groups.*3 param groups.*got 2"):
        bounds.assess(1.0, opt, [{"lr": 0.1}, {"lr": 0.1}])
    for bad in (float("nan"), math.inf, "1.0"):
        with pytest.raises(ValueError, match="sharpness"):
            bounds.assess(bad, opt)  # type: ignore[arg-type]
    with pytest.raises(UnsupportedOptimizerError):
        bounds.assess(1.0, torch.optim.Adagrad([torch.nn.Parameter(torch.zeros(1))]))


def test_objective_sign() -> None:
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    assert bounds.objective_sign(torch.optim.SGD([a], lr=0.1)) == 1.0
    assert bounds.objective_sign(torch.optim.Adam([a], maximize=True)) == -1.0
    mixed = torch.optim.SGD([{"params": [a], "maximize": True}, {"params": [b]}], lr=0.1)
    with pytest.raises(ValueError, match=r"maximize=\[True, False\].*accepted values"):
        bounds.objective_sign(mixed)
    assert bounds.objective_sign(mixed, [{"maximize": True}, {"maximize": True}]) == -1.0
    assert bounds.is_maximizing(mixed, {"maximize": True}) and not bounds.is_maximizing(mixed, 1)
