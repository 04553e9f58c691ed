"""The torch-only local-LR controller, checked against exact answers.

Quadratics ``½ xᵀHx`` with known dense ``H`` (float64): block sharpness, bounds and the coupled ratio
``λ_max(D^{1/2} Q(H + A)Q D^{1/2})`` are compared with ``torch.linalg.eigvalsh`` of the dense matrices;
the update scaling is compared with reference optimizers that really have per-layer learning rates.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

from lightning_eos import bounds
from lightning_eos.curvature import FunctionOperator, HessianOperator, eigsh
from lightning_eos.local_lr import (
    COUPLED_DEADBAND,
    GLOBAL_LAYER,
    LayerUpdateScaler,
    LocalLRController,
    RefreshSchedule,
    check_linear_update,
    controlled_layers,
    coupled_operator,
)

DT = torch.float64


# --------------------------------------------------------------------------------------- fixtures


def _spd(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT))
    return q @ torch.diag(torch.linspace(lo, hi, n, dtype=DT)) @ q.T


class Quad(nn.Module):
    """``loss = scale · ½ xᵀHx`` with ``x = (a, b, c)``: three "layers" of known Hessian blocks."""

    def __init__(self, H: torch.Tensor, sizes: tuple[int, ...], seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.H = H
        self.sizes = sizes
        self.scale = 1.0
        self.parts = nn.ParameterList([nn.Parameter(torch.randn(n, generator=gen, dtype=DT)) for n in sizes])

    def loss(self) -> torch.Tensor:
        x = torch.cat(list(self.parts))
        return self.scale * 0.5 * x @ self.H @ x

    def layers(self) -> dict[str, list[nn.Parameter]]:
        return {f"l{i}": [p] for i, p in enumerate(self.parts)}


def _hessian(model: Quad) -> HessianOperator:
    return HessianOperator(model, lambda m, b: m.loss(), torch.zeros(1, 1))


def _coupled_H(seed: int = 0, coupling: float = 0.9) -> tuple[torch.Tensor, tuple[int, int, int]]:
    gen = torch.Generator().manual_seed(seed)
    sizes = (3, 4, 2)
    H = torch.zeros(9, 9, dtype=DT)
    H[:3, :3] = _spd(3, 1.0, 10.0, gen)
    H[3:7, 3:7] = _spd(4, 0.5, 2.0, gen)
    H[7:, 7:] = _spd(2, 0.2, 0.6, gen)
    C = coupling * torch.randn(3, 4, generator=gen, dtype=DT)
    H[:3, 3:7], H[3:7, :3] = C, C.T
    return H, sizes


def _slices(sizes: tuple[int, ...]) -> list[slice]:
    out, start = [], 0
    for n in sizes:
        out.append(slice(start, start + n))
        start += n
    return out


def _top(M: torch.Tensor) -> float:
    return float(torch.linalg.eigvalsh(0.5 * (M + M.T))[-1])


def _dense_ratio(H: torch.Tensor, d: torch.Tensor, q: torch.Tensor, a: torch.Tensor) -> float:
    """λ_max(D^{1/2} Q (H + diag a) Q D^{1/2})."""
    s = (d * q * q).sqrt()
    return _top(s[:, None] * (H + torch.diag(a)) * s[None, :])


def _per_param(sizes: tuple[int, ...], values: list[float]) -> torch.Tensor:
    return torch.cat([torch.full((n,), v, dtype=DT) for n, v in zip(sizes, values)])


# --------------------------------------------------------------------------------------- operators


def test_coupled_operator_is_the_dense_scaled_matrix() -> None:
    gen = torch.Generator().manual_seed(1)
    A = torch.randn(7, 7, generator=gen, dtype=DT)
    H = A + A.T
    base = FunctionOperator(lambda v: H @ v, 7)
    scale = torch.rand(7, generator=gen, dtype=DT) + 0.1
    shift = torch.rand(7, generator=gen, dtype=DT)
    op = coupled_operator(base, scale, shift)
    dense = torch.stack([op.matvec(e) for e in torch.eye(7, dtype=DT)], dim=1)
    want = scale[:, None] * H * scale[None, :] + torch.diag(shift)
    torch.testing.assert_close(dense, want, rtol=1e-14, atol=1e-14)
    res = eigsh(op, k=1, tol=1e-10, eig_tol=1e-12)
    assert res.max == pytest.approx(_top(want), rel=1e-10)


# --------------------------------------------------------------------------------------- SGD family


@pytest.mark.parametrize(
    ("opt_kw", "c"),
    [
        ({}, 2.0),
        ({"momentum": 0.9, "weight_decay": 0.3}, 3.8),
        ({"momentum": 0.5, "nesterov": True, "weight_decay": 0.1}, 3.0 / 2.0),
        ({"momentum": 0.9, "dampening": 0.5}, 3.8 / 0.5),
    ],
)
def test_sgd_bounds_and_coupled_ratio_match_dense(opt_kw: dict[str, float], c: float) -> None:
    H, sizes = _coupled_H()
    model = Quad(H, sizes)
    lr, safety = 0.5, 0.8
    opt = torch.optim.SGD(model.parameters(), lr=lr, **opt_kw)
    ctl = LocalLRController(opt, model.layers(), safety=safety, tol=1e-8)
    rec = ctl.refresh(_hessian(model))
    assert rec is not None and rec.converged and not rec.preconditioned
    alpha = opt_kw.get("weight_decay", 0.0)
    for i, sl in enumerate(_slices(sizes)):
        lam = _top(H[sl, sl])
        name = f"l{i}"
        assert rec.sharpness[name] == pytest.approx(lam, rel=1e-8)
        # the bound is the registry's c/(λ + α) of the block (from the upper estimate λ + error)
        assert rec.bound[name] == pytest.approx(c / (lam + alpha), rel=1e-6)
        assert rec.target[name] == pytest.approx(min(1.0, safety * c / (lam + alpha) / lr), rel=1e-6)
    # the coupled ratio at the targets and at the applied multipliers, against the dense matrix
    a = torch.full((9,), alpha, dtype=DT)
    q = torch.ones(9, dtype=DT)
    names = [f"l{i}" for i in range(3)]
    raw = _dense_ratio(H, _per_param(sizes, [rec.target[n] * lr / c for n in names]), q, a)
    assert rec.coupled_ratio_raw == pytest.approx(raw, rel=1e-6)
    applied = _dense_ratio(H, _per_param(sizes, [rec.multiplier[n] * lr / c for n in names]), q, a)
    assert applied <= safety * (1 + COUPLED_DEADBAND)
    if raw > safety * (1 + COUPLED_DEADBAND):
        assert rec.scale < 1.0 and applied == pytest.approx(safety, rel=1e-6)
        assert rec.coupled_ratio == pytest.approx(applied, rel=1e-6)
    for n in names:
        assert rec.multiplier[n] == pytest.approx(rec.target[n] * rec.scale, rel=1e-12)


def test_per_layer_caps_alone_would_be_unstable_and_the_coupled_check_fixes_it() -> None:
    # Two layers, each block alone stable at the capped LR, the coupled system not: H = [[1, b], [b, 1]].
    H = torch.tensor([[1.0, 0.95], [0.95, 1.0]], dtype=DT)
    model = Quad(H, (1, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1.7)
    ctl = LocalLRController(opt, model.layers(), safety=0.9, tol=1e-10)
    rec = ctl.refresh(_hessian(model))
    assert rec is not None
    assert rec.target == {"l0": 1.0, "l1": 1.0}  # each block: 1.7·1 < 0.9·2, no cap
    assert rec.coupled_ratio_raw == pytest.approx(1.7 * 1.95 / 2.0, rel=1e-10)  # > 1: GD diverges
    assert rec.scale == pytest.approx(0.9 * 2.0 / (1.7 * 1.95), rel=1e-10)
    # and gradient descent with the applied LRs on the quadratic indeed converges (without: diverges)
    for scale, converges in ((1.0, False), (rec.scale, True)):
        x = torch.tensor([1.0, -0.3], dtype=DT)
        for _ in range(400):
            x = x - scale * 1.7 * (H @ x)
        assert bool(x.norm() < 1e-3) == converges


def test_block_diagonal_problem_only_the_stiff_layer_is_cut() -> None:
    gen = torch.Generator().manual_seed(3)
    H = torch.block_diag(_spd(3, 5.0, 40.0, gen), _spd(4, 0.5, 2.0, gen), _spd(2, 0.1, 0.3, gen))
    model = Quad(H, (3, 4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.4)
    ctl = LocalLRController(opt, model.layers(), safety=0.8)
    rec = ctl.refresh(_hessian(model))
    assert rec is not None
    assert rec.multiplier["l0"] == pytest.approx(0.8 * 2.0 / 40.0 / 0.4, rel=1e-3)
    assert rec.multiplier["l1"] == 1.0 and rec.multiplier["l2"] == 1.0 and rec.scale == 1.0


def test_fill_mode_raises_soft_layers_up_to_max_multiplier() -> None:
    gen = torch.Generator().manual_seed(3)
    H = torch.block_diag(_spd(3, 5.0, 10.0, gen), _spd(4, 0.5, 2.0, gen), _spd(2, 0.01, 0.02, gen))
    model = Quad(H, (3, 4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctl = LocalLRController(opt, model.layers(), mode="fill", max_multiplier=5.0, safety=0.5, tol=1e-8)
    rec = ctl.refresh(_hessian(model))
    assert rec is not None
    assert rec.multiplier["l0"] == pytest.approx(0.5 * 2.0 / 10.0 / 0.1, rel=1e-6)  # 1.0: at the edge x 0.5
    assert rec.multiplier["l1"] == pytest.approx(0.5 * 2.0 / 2.0 / 0.1, rel=1e-6)  # 5.0 = raised
    assert rec.multiplier["l2"] == 5.0  # bound far above: the ceiling
    cap = LocalLRController(opt, model.layers(), mode="cap", safety=0.5).refresh(_hessian(model))
    assert cap is not None and max(cap.multiplier.values()) <= 1.0


def test_one_entry_layer_is_solved_exactly() -> None:
    H = torch.tensor([[4.0, 0.0], [0.0, 1.0]], dtype=DT)
    model = Quad(H, (1, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    rec = LocalLRController(opt, model.layers(), safety=0.8).refresh(_hessian(model))
    assert rec is not None and rec.sharpness == {"l0": 4.0, "l1": 1.0} and rec.error_bound["l0"] == 0.0
    assert rec.multiplier == {"l0": pytest.approx(0.4), "l1": 1.0}


# --------------------------------------------------------------------------------------- Adam family


def _adam_after_steps(make: Callable[[Quad], torch.optim.Optimizer]) -> tuple[Quad, torch.optim.Optimizer]:
    H, sizes = _coupled_H(seed=2)
    model = Quad(H, sizes, seed=2)
    opt = make(model)
    for _ in range(3):
        opt.zero_grad()
        model.loss().backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("kind", ["adam_coupled", "adamw", "rmsprop_coupled"])
def test_preconditioned_blocks_and_coupled_ratio_match_dense(kind: str) -> None:
    make = {
        "adam_coupled": lambda m: torch.optim.Adam(m.parameters(), lr=0.05, weight_decay=0.2, eps=1e-3),
        "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=0.05, weight_decay=0.5, eps=1e-3),
        "rmsprop_coupled": lambda m: torch.optim.RMSprop(m.parameters(), lr=0.05, weight_decay=0.2, eps=1e-3),
    }[kind]
    model, opt = _adam_after_steps(make)
    safety = 0.9
    ctl = LocalLRController(opt, model.layers(), safety=safety, tol=1e-8)
    rec = ctl.refresh(_hessian(model))
    assert rec is not None and rec.preconditioned
    P = bounds.optimizer_preconditioner(opt, list(model.parameters()))
    q = P.rsqrt()
    g = opt.param_groups[0]
    alpha = 0.0 if g.get("decoupled_weight_decay", False) else float(g["weight_decay"])
    a = torch.full((9,), alpha, dtype=DT)
    K = q[:, None] * (model.H + torch.diag(a)) * q[None, :]
    names = [f"l{i}" for i in range(3)]
    for name, sl in zip(names, _slices(model.sizes)):
        lam = _top(K[sl, sl])
        assert rec.sharpness[name] == pytest.approx(lam, rel=1e-7)
        assert rec.bound[name] == pytest.approx(bounds.max_stable_lr(lam, opt), rel=1e-6)
    lr = 0.05

    def d_of(mult: dict[str, float]) -> torch.Tensor:
        vals = []
        for n in names:
            eta = mult[n] * lr
            vals.append(eta / (bounds.critical_sharpness(opt, group={**g, "lr": eta}) * eta))
        return _per_param(model.sizes, vals)

    raw = _dense_ratio(model.H, d_of(rec.target), q, a)
    assert rec.coupled_ratio_raw == pytest.approx(raw, rel=1e-6)
    applied = _dense_ratio(model.H, d_of(rec.multiplier), q, a)
    assert applied <= safety * (1 + COUPLED_DEADBAND) * (1 + 1e-9)


def test_adaptive_optimizer_without_state_is_not_refreshed_yet() -> None:
    H, sizes = _coupled_H()
    model = Quad(H, sizes)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    ctl = LocalLRController(opt, model.layers())
    assert ctl.refresh(_hessian(model)) is None and ctl.history == []
    assert ctl.plan().multiplier == {"l0": 1.0, "l1": 1.0, "l2": 1.0}


# --------------------------------------------------------------------------------------- time


def test_curvature_rises_at_once_and_falls_smoothed_and_rate_limited() -> None:
    H = torch.tensor([[1.0]], dtype=DT)
    model = Quad(torch.block_diag(H, 0.1 * H), (1, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def run(smoothing: float) -> list[float]:
        ctl = LocalLRController(opt, model.layers(), smoothing=smoothing, max_change=2.0)
        seen = []
        for scale in (1.0, 4.0, 3.0, 0.1, 0.1):
            model.scale = scale
            ctl.refresh(_hessian(model))
            value = ctl.curvature["l0"]
            assert value is not None
            seen.append(value)
        return seen

    # rise: at once; fall: exponential average (weight 0.5 on the previous value) ...
    assert run(0.5) == pytest.approx([1.0, 4.0, 3.5, 1.8, 0.95])
    # ... and at most a factor max_change = 2 per refresh
    assert run(0.0) == pytest.approx([1.0, 4.0, 3.0, 1.5, 0.75])


def test_refresh_interval_halves_on_rising_curvature_and_doubles_otherwise() -> None:
    sched = RefreshSchedule(8, tolerance=0.1)
    assert sched.due(0) and sched.interval == 1
    steps = []
    step = 0
    for rise in (math.nan, 0.0, 0.05, 0.5, 0.3, 0.0, 0.0, 0.0, 0.0):
        assert sched.due(step)
        sched.refreshed(step, rise)
        steps.append(sched.interval)
        assert not sched.due(sched.next_step - 1)
        step = sched.next_step
    assert steps == [1, 2, 4, 2, 1, 2, 4, 8, 8]
    fixed = RefreshSchedule(5, adaptive=False)
    fixed.refreshed(0, 1.0)
    assert fixed.next_step == 5
    other = RefreshSchedule(8)
    other.load_state_dict(sched.state_dict())
    assert other.state_dict() == sched.state_dict()
    for bad in (
        {"max_interval": 0},
        {"max_interval": 4, "min_interval": 5},
        {"max_interval": 4, "tolerance": 0.0},
    ):
        with pytest.raises(ValueError, match="accepted values"):
            RefreshSchedule(**bad)  # type: ignore[arg-type]


def test_freeze_after_keeps_the_bounds_of_the_first_refreshes() -> None:
    """``freeze_after=2``: the third refresh spends no product and changes nothing; the frozen
    curvature still sets the multipliers at the live LR (the static ablation)."""
    H = torch.tensor([[1.0]], dtype=DT)
    model = Quad(torch.block_diag(H, 0.1 * H), (1, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1.5)
    ctl = LocalLRController(opt, model.layers(), freeze_after=2, tol=1e-8)
    adaptive = LocalLRController(opt, model.layers(), tol=1e-8)
    for scale in (1.0, 2.0):
        model.scale = scale
        assert ctl.refresh(_hessian(model)) is not None
        adaptive.refresh(_hessian(model))
        assert not ctl.frozen or scale == 2.0
    assert ctl.frozen and ctl.refreshes == 2 and len(ctl.history) == 2
    frozen_state = {k: v for k, v in ctl.state_dict().items() if k != "vectors"}
    model.scale = 8.0  # the curvature rises 4x: the adaptive controller cuts, the frozen one does not
    assert ctl.refresh(_hessian(model)) is None
    adaptive.refresh(_hessian(model))
    ctl.update_twin({"l0": 1.0, "l1": 1.0})  # ignored too
    assert {k: v for k, v in ctl.state_dict().items() if k != "vectors"} == frozen_state
    # exact answers: η* = 2/λ; multiplier min(1, 0.8·η*/η) with λ = 2 (frozen) and 8 (adaptive)
    assert ctl.plan().multiplier["l0"] == pytest.approx(0.8 * (2 / 2.0) / 1.5, rel=1e-6)
    assert adaptive.plan().multiplier["l0"] == pytest.approx(0.8 * (2 / 8.0) / 1.5, rel=1e-6)
    opt.param_groups[0]["lr"] = 3.0  # the frozen bound still applies to the live LR
    assert ctl.plan().target["l0"] * 3.0 == pytest.approx(0.8 * 2 / 2.0, rel=1e-6)
    restored = LocalLRController(opt, model.layers(), freeze_after=2)
    restored.load_state_dict(ctl.state_dict())
    assert restored.frozen and restored.refreshes == 2


def test_curvature_rise_is_recorded() -> None:
    H = torch.tensor([[1.0]], dtype=DT)
    model = Quad(torch.block_diag(H, 0.1 * H), (1, 1))
    ctl = LocalLRController(torch.optim.SGD(model.parameters(), lr=0.1), model.layers())
    first = ctl.refresh(_hessian(model))
    model.scale = 1.5
    second = ctl.refresh(_hessian(model))
    assert first is not None and second is not None
    assert math.isnan(first.curvature_rise) and second.curvature_rise == pytest.approx(0.5)


def test_multipliers_follow_the_live_lr_between_refreshes() -> None:
    H, sizes = _coupled_H(seed=5)
    model = Quad(H, sizes)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ctl = LocalLRController(opt, model.layers(), safety=0.8, tol=1e-8)
    rec = ctl.refresh(_hessian(model))
    assert rec is not None and rec.multiplier == {"l0": 1.0, "l1": 1.0, "l2": 1.0}  # small LR: no cap
    for lr in (0.5, 2.0, 0.01):
        opt.param_groups[0]["lr"] = lr
        plan = ctl.plan()
        d = _per_param(sizes, [plan.multiplier[f"l{i}"] * lr / 2.0 for i in range(3)])
        ratio = _dense_ratio(H, d, torch.ones(9, dtype=DT), torch.zeros(9, dtype=DT))
        assert ratio <= 0.8 * (1 + COUPLED_DEADBAND) + 1e-12  # the bound between refreshes holds
        for i, sl in enumerate(_slices(sizes)):
            assert plan.effective_lr[f"l{i}"] <= 0.8 * 2.0 / _top(H[sl, sl]) * (1 + 1e-9)
    assert ctl.plan().multiplier == {"l0": 1.0, "l1": 1.0, "l2": 1.0}  # back at 0.01


def test_twin_cuts_amplifying_layers_and_recovers_flat_ones() -> None:
    H, sizes = _coupled_H()
    model = Quad(H, sizes)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    ctl = LocalLRController(opt, model.layers(), twin_threshold=0.01, twin_cut=0.5, max_change=2.0)
    ctl.refresh(_hessian(model))
    ctl.update_twin({"l0": 0.05, "l1": 0.001, "l2": math.nan})
    assert ctl.plan().multiplier == {"l0": 0.5, "l1": 1.0, "l2": 1.0}
    ctl.update_twin({"l0": 0.05})
    assert ctl.twin["l0"] == 0.25
    ctl.update_twin({"l0": -0.01})
    assert ctl.twin["l0"] == 0.5
    ctl.update_twin({"l0": 0.0})
    ctl.update_twin({"l0": 0.0})
    assert ctl.twin["l0"] == 1.0  # recovered to its curvature value, not beyond


# --------------------------------------------------------------------------------------- applying


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 2)).double()


_OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd_momentum_nesterov_wd": lambda ps, lr: torch.optim.SGD(
        ps, lr=lr, momentum=0.9, nesterov=True, weight_decay=0.1
    ),
    "sgd_dampening": lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.8, dampening=0.3),
    "adam_amsgrad_wd": lambda ps, lr: torch.optim.Adam(ps, lr=lr, weight_decay=0.1, amsgrad=True),
    "adamw": lambda ps, lr: torch.optim.AdamW(ps, lr=lr, weight_decay=0.3),
    "rmsprop_centered_momentum": lambda ps, lr: torch.optim.RMSprop(ps, lr=lr, momentum=0.5, centered=True),
    "adagrad": lambda ps, lr: torch.optim.Adagrad(ps, lr=lr),
    "nadam": lambda ps, lr: torch.optim.NAdam(ps, lr=lr, weight_decay=0.1),
    "radam": lambda ps, lr: torch.optim.RAdam(ps, lr=lr),
    "adamax": lambda ps, lr: torch.optim.Adamax(ps, lr=lr),
    "adadelta": lambda ps, lr: torch.optim.Adadelta(ps, lr=lr),
}


@pytest.mark.parametrize("name", sorted(_OPTIMIZERS))
def test_update_scaling_is_a_per_layer_learning_rate(name: str) -> None:
    """Scaling each layer's update by s_l == running that layer at lr s_l·η (a reference optimizer
    with one param group per layer), over 25 steps with momentum/moment state building up."""
    make = _OPTIMIZERS[name]
    lr = 0.05
    mult = {"0": 0.3, "2": 1.0, "4": 1.7}
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 5, generator=gen, dtype=DT), torch.randn(16, 2, generator=gen, dtype=DT)
    scaled, ref = _mlp(), _mlp()
    opt = make(scaled.parameters(), lr)
    layer_params = {k: list(scaled[int(k)].parameters()) for k in mult}
    scaler = LayerUpdateScaler(opt, layer_params, lambda: mult)
    scaler.attach()
    ref_opt = make([{"params": list(ref[int(k)].parameters()), "lr": s * lr} for k, s in mult.items()], lr)
    for _ in range(25):
        for model, o in ((scaled, opt), (ref, ref_opt)):
            o.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            o.step()
    assert scaler.steps == 25 and scaler.last == mult
    for a, b in zip(scaled.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert opt.param_groups[0]["lr"] == lr  # the user's group is untouched
    scaler.detach()
    assert not scaler.attached


def test_multipliers_of_one_leave_the_step_bitwise_unchanged() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(16, 5), torch.randn(16, 2)
    a, b = _mlp().float(), _mlp().float()
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    ones = {"0": 1.0, "2": 1.0, "4": 1.0}
    scaler = LayerUpdateScaler(opt_a, {k: list(a[int(k)].parameters()) for k in ones}, lambda: ones)
    scaler.attach()
    for _ in range(10):
        for model, o in ((a, opt_a), (b, opt_b)):
            o.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            o.step()
    assert scaler.steps == 10 and not scaler._buffers  # nothing was even snapshotted
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    # (p_old + 1·(p_new − p_old) would not be bitwise p_new in float32: skipping is what makes it exact)


# --------------------------------------------------------------------------------------- refusals


class Prodigy(torch.optim.SGD):
    """Stands in for prodigyopt.Prodigy (refused by class name)."""


class MyOpt(torch.optim.Optimizer):
    def __init__(self, params: object) -> None:
        super().__init__(params, {"lr": 0.1})

    def step(self, closure: object = None) -> None:  # pragma: no cover - never stepped
        return None


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda ps: torch.optim.LBFGS(ps), "line search"),
        (lambda ps: torch.optim.Rprop(ps), "Rprop|step sizes"),
        (lambda ps: torch.optim.ASGD(ps), "nonlinear"),
        (lambda ps: torch.optim.Adagrad(ps, lr_decay=0.1), "lr_decay"),
        (lambda ps: Prodigy(ps, lr=1.0), "step size d"),
        (lambda ps: MyOpt(ps), "not known to update"),
    ],
)
def test_optimizers_whose_update_is_not_linear_in_lr_are_refused(make: Callable, reason: str) -> None:
    opt = make(_mlp().parameters())
    with pytest.raises(bounds.UnsupportedOptimizerError, match=reason) as err:
        check_linear_update(opt)
    assert "Accepted: SGD, Adam" in str(err.value)


def test_linear_optimizer_without_a_stability_rule_is_refused_with_instructions() -> None:
    with pytest.raises(bounds.UnsupportedOptimizerError, match="register_threshold"):
        LocalLRController(torch.optim.Adagrad(_mlp().parameters()), {"all": list(_mlp().parameters())})


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"mode": "greedy"}, "mode"),
        ({"safety": 0.0}, "safety"),
        ({"safety": 1.5}, "safety"),
        ({"max_multiplier": 0.5}, "max_multiplier"),
        ({"max_change": 1.0}, "max_change"),
        ({"smoothing": 1.0}, "smoothing"),
        ({"coupled": 1}, "coupled"),
        ({"tol": 0.0}, "tol"),
        ({"max_iter": 1}, "max_iter"),
        ({"warm_start": "yes"}, "warm_start"),
        ({"twin_threshold": -1.0}, "twin_threshold"),
        ({"twin_cut": 1.0}, "twin_cut"),
        ({"freeze_after": 0}, "freeze_after"),
        ({"freeze_after": 2.0}, "freeze_after"),
        ({"freeze_after": True}, "freeze_after"),
        ({"seed": 0.5}, "seed"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict[str, object], name: str) -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=rf"{name}=.*accepted values"):
        LocalLRController(opt, {"all": list(model.parameters())}, **kwargs)  # type: ignore[arg-type]


def test_bad_layers() -> None:
    model, other = _mlp(), _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="does not manage"):
        LocalLRController(opt, {"x": list(other.parameters())})
    with pytest.raises(ValueError, match="two layers"):
        LocalLRController(opt, {"x": [model[0].weight], "y": [model[0].weight]})
    with pytest.raises(ValueError, match=r"check_weight_decay=True.*accepted values: False"):
        LocalLRController(
            torch.optim.Adam(model.parameters()), {"x": list(model.parameters())}, check_weight_decay=True
        )


# --------------------------------------------------------------------------------------- layers


def test_controlled_layers_specs() -> None:
    model = _mlp()
    model[2].bias.requires_grad_(False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    by_module = controlled_layers(model, opt)
    assert list(by_module) == ["0", "2", "4"] and by_module["2"] == [model[2].weight]
    assert list(controlled_layers(model, opt, "parameter")) == [
        "0.weight",
        "0.bias",
        "2.weight",
        "4.weight",
        "4.bias",
    ]
    (only,) = controlled_layers(model, opt, "global").values()
    assert list(controlled_layers(model, opt, "global")) == [GLOBAL_LAYER] and len(only) == 5
    custom = controlled_layers(model, opt, {"0": "in", "4.bias": "head_bias"})
    assert custom == {
        "in": list(model[0].parameters()),
        "2": [model[2].weight],
        "4": [model[4].weight],
        "head_bias": [model[4].bias],
    }
    with pytest.raises(ValueError, match=r"\['nope'\] match no trainable parameter"):
        controlled_layers(model, opt, {"nope": "x"})
    with pytest.raises(ValueError, match="layers='blocks' is not supported; accepted values"):
        controlled_layers(model, opt, "blocks")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not parameters of the model"):
        controlled_layers(_mlp(), opt)


# --------------------------------------------------------------------------------------- state


def test_state_dict_round_trips_through_weights_only_load(tmp_path) -> None:  # type: ignore[no-untyped-def]
    H, sizes = _coupled_H()
    model = Quad(H, sizes)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    ctl = LocalLRController(opt, model.layers())
    ctl.refresh(_hessian(model))
    ctl.update_twin({"l1": 1.0})
    torch.save(ctl.state_dict(), tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)
    other = LocalLRController(opt, model.layers())
    other.load_state_dict(state)
    assert other.plan() == ctl.plan() and other.history == ctl.history
    assert set(other._vectors) == {"l0", "l1", "l2", "(coupled)"}
    # warm start: the next refresh of the restored controller equals the original's
    assert other.refresh(_hessian(model)) == ctl.refresh(_hessian(model))
    with pytest.raises(ValueError, match="same model and `layers` setting"):
        LocalLRController(opt, {"all": list(model.parameters())}).load_state_dict(state)


def test_warm_start_saves_products() -> None:
    torch.manual_seed(0)
    model = _mlp()
    x, y = torch.randn(32, 5, dtype=DT), torch.randn(32, 2, dtype=DT)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    layers = controlled_layers(model, opt)

    def op() -> HessianOperator:
        return HessianOperator(model, lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(), (x, y))

    cold = LocalLRController(opt, layers, warm_start=False, tol=1e-6)
    warm = LocalLRController(opt, layers, warm_start=True, tol=1e-6)
    cold.refresh(op())
    warm.refresh(op())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    c, w = cold.refresh(op()), warm.refresh(op())
    assert c is not None and w is not None
    assert w.hvps < c.hvps
    for name in layers:
        assert w.sharpness[name] == pytest.approx(c.sharpness[name], rel=1e-5)


def test_weight_decay_outside_its_window_warns_once_per_layer() -> None:
    gen = torch.Generator().manual_seed(3)
    H = torch.block_diag(_spd(3, -2.0, 1.0, gen), _spd(2, 0.5, 1.0, gen))  # l0 has negative curvature
    model = Quad(H, (3, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.5)  # needs α > 2 for l0
    messages: list[str] = []
    ctl = LocalLRController(opt, model.layers(), check_weight_decay=True, warn=messages.append, tol=1e-8)
    rec = ctl.refresh(_hessian(model))
    ctl.refresh(_hessian(model))
    assert rec is not None and rec.lambda_min["l0"] == pytest.approx(-2.0, rel=1e-6)
    assert len(messages) == 1 and "'l0'" in messages[0] and "outside its stable window" in messages[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LocalLRController(opt, model.layers(), check_weight_decay=False).refresh(_hessian(model))


def test_curvature_rise_is_measured_against_the_recent_maximum() -> None:
    H = torch.tensor([[1.0]], dtype=DT)
    model = Quad(torch.block_diag(H, 0.1 * H), (1, 1))
    ctl = LocalLRController(torch.optim.SGD(model.parameters(), lr=0.1), model.layers())
    rises = []
    for scale in (1.0, 0.8, 1.05, 0.9, 1.0, 0.95, 1.3):  # noisy but flat, then a real rise
        model.scale = scale
        rec = ctl.refresh(_hessian(model))
        assert rec is not None
        rises.append(rec.curvature_rise)
    assert math.isnan(rises[0])
    assert rises[1:6] == pytest.approx([-0.2, 0.05, 0.9 / 1.05 - 1, 1.0 / 1.05 - 1, 0.95 / 1.05 - 1])
    assert rises[6] == pytest.approx(1.3 / 1.05 - 1)  # the window (4) still holds 1.05
