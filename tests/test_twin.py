"""TwinEngine (torch only): perturbations, lockstep, gap growth against linear theory, state."""

from __future__ import annotations

import dataclasses
import io
import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from lightning_eos.records import TwinRecord
from lightning_eos.twin import TwinEngine, apply_ulp, check_rescale_supported


class Quadratic(nn.Module):
    """L(w) = ½ (w − w*)ᵀ A (w − w*) with A = Q diag(eigs) Qᵀ, started at w = w*."""

    def __init__(self, eigs: list[float], seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        d = len(eigs)
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        self.register_buffer("a", q @ torch.diag(torch.tensor(eigs, dtype=torch.float64)) @ q.T)
        self.register_buffer("w_star", 1.0 + torch.rand(d, generator=g, dtype=torch.float64))
        self.w = nn.Parameter(self.w_star.clone())

    def loss(self) -> torch.Tensor:
        e = self.w - self.w_star
        return 0.5 * e @ (self.a @ e)


def run_lockstep(real: nn.Module, opt: torch.optim.Optimizer, steps: int, **engine_kw) -> TwinEngine:
    engine = TwinEngine(real, **engine_kw)
    engine.attach_optimizer(opt)
    engine.start()
    for _ in range(steps):
        opt.zero_grad()
        real.loss().backward()
        opt.step()
        engine.backward(lambda m: m.loss())
        engine.step()
    return engine


def heavy_ball_rho(eigs: list[float], lr: float, beta: float) -> float:
    # Per mode the gap obeys e_{t+1} = (1 + β − ηλ) e_t − β e_{t−1}: roots of z² − (1+β−ηλ) z + β.
    return max(max(abs(r) for r in np.roots([1.0, -(1.0 + beta - lr * lam), beta])) for lam in eigs)


@pytest.mark.parametrize("lr", [0.25, 0.3])
def test_gd_growth_rate_matches_linear_theory(lr: float) -> None:
    eigs = [10.0, 4.0, 1.0, 0.5, 0.1]
    rho = max(abs(1 - lr * lam) for lam in eigs)
    assert rho >= 1.5
    real = Quadratic(eigs)
    engine = run_lockstep(real, torch.optim.SGD(real.parameters(), lr=lr), 70, window=20)
    r = engine.record()
    assert r.growth_rate == pytest.approx(math.log(rho), rel=0.02)
    assert r.amplification > 8  # decades


def test_gd_below_stability_does_not_grow() -> None:
    eigs = [10.0, 4.0, 1.0]
    lr = 0.15  # rho = 0.5
    real = Quadratic(eigs)
    engine = run_lockstep(real, torch.optim.SGD(real.parameters(), lr=lr), 100, window=20)
    r = engine.record()
    assert r.amplification <= 0.05
    assert not r.growth_rate > 0.01


def test_heavy_ball_growth_rate_matches_characteristic_root() -> None:
    eigs = [14.0, 3.0, 1.0, 0.3]
    lr, beta = 0.3, 0.5
    rho = heavy_ball_rho(eigs, lr, beta)
    assert rho >= 1.5
    real = Quadratic(eigs, seed=1)
    opt = torch.optim.SGD(real.parameters(), lr=lr, momentum=beta)
    engine = run_lockstep(real, opt, 70, window=20)
    assert engine.record().growth_rate == pytest.approx(math.log(rho), rel=0.02)


def test_none_stays_bitwise_equal_with_adam() -> None:
    torch.manual_seed(0)
    real = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))
    x, y = torch.randn(32, 5), torch.randn(32, 1)
    real.loss = lambda: nn.functional.mse_loss(real(x), y)  # type: ignore[attr-defined]
    opt = torch.optim.Adam(real.parameters(), lr=0.05)
    engine = TwinEngine(real, perturbation="none", layers="parameter")
    engine.twin.loss = lambda: nn.functional.mse_loss(engine.twin(x), y)  # type: ignore[attr-defined]
    engine.attach_optimizer(opt)
    engine.start()
    for _ in range(20):
        opt.zero_grad()
        real.loss().backward()
        opt.step()
        engine.backward(lambda m: m.loss())
        engine.step()
        assert engine.read().divergence == 0.0
    s = engine.summary()
    assert s["deterministic"] is True and s["first_nonzero"] is None


def test_rescale_k1_bit_identical_and_k3_differs_by_roundoff() -> None:
    torch.manual_seed(0)
    base = nn.Linear(20, 20)
    x = torch.randn(16, 20)
    for opt_cls, kw in [(torch.optim.SGD, {"momentum": 0.9, "weight_decay": 1e-3}), (torch.optim.AdamW, {})]:
        for k in (1.0, 3.0):
            real = nn.Linear(20, 20)
            real.load_state_dict(base.state_dict())
            opt = opt_cls(real.parameters(), lr=0.01, **kw)
            engine = TwinEngine(real, perturbation="rescale", rescale_k=k)
            engine.attach_optimizer(opt)
            engine.start()
            assert engine.read().divergence == 0.0  # identical start
            for _ in range(3):
                opt.zero_grad()
                real(x).square().mean().backward()
                opt.step()
                engine.backward(lambda m: m(x).square().mean())
                engine.step()
            gap = engine.read().divergence
            if k == 1.0:
                assert gap == 0.0
            else:
                assert 0.0 < gap < 1e-6


def test_rescale_refuses_nonlinear_optimizers() -> None:
    p = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match=r"rescale.*LBFGS"):
        check_rescale_supported(torch.optim.LBFGS(p))
    with pytest.raises(ValueError, match="Adagrad"):
        check_rescale_supported(torch.optim.Adagrad(p, lr_decay=0.1))
    check_rescale_supported(torch.optim.Adagrad(p))
    real = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="Rprop"):
        TwinEngine(real, perturbation="rescale").attach_optimizer(torch.optim.Rprop(real.parameters()))


def test_apply_ulp_selection() -> None:
    def fresh() -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        return {"a.weight": torch.randn(10, 10, generator=g), "b.weight": torch.randn(50, generator=g)}

    ref = fresh()
    p = fresh()
    assert apply_ulp(p) == 150
    assert torch.equal(p["a.weight"], torch.nextafter(ref["a.weight"], torch.tensor(math.inf)))
    p = fresh()
    assert apply_ulp(p, names=["b"]) == 50 and torch.equal(p["a.weight"], ref["a.weight"])
    p = fresh()
    assert apply_ulp(p, single_weight=True, seed=3) == 1
    assert sum(int((p[k] != ref[k]).sum()) for k in p) == 1
    p = fresh()
    n = apply_ulp(p, fraction=0.5, seed=1)
    assert 40 < n < 110 and sum(int((p[k] != ref[k]).sum()) for k in p) == n
    with pytest.raises(ValueError, match="match no"):
        apply_ulp(fresh(), names=["nope"])


def test_state_dict_roundtrip_weights_only_and_bitwise_continuation() -> None:
    real = Quadratic([14.0, 1.0])
    opt = torch.optim.SGD(real.parameters(), lr=0.3, momentum=0.5)
    engine = run_lockstep(real, opt, 10, window=5, layers="parameter")
    engine.record()
    buf = io.BytesIO()
    torch.save({"engine": engine.state_dict(), "real": real.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    real2 = Quadratic([14.0, 1.0])
    real2.load_state_dict(saved["real"])
    opt2 = torch.optim.SGD(real2.parameters(), lr=0.3, momentum=0.5)
    opt2.load_state_dict(saved["opt"])
    engine2 = TwinEngine(real2, window=5, layers="parameter")
    engine2.attach_optimizer(opt2)
    engine2.load_state_dict(saved["engine"])
    for e, r, o in ((engine, real, opt), (engine2, real2, opt2)):
        for _ in range(10):
            o.zero_grad()
            r.loss().backward()
            o.step()
            e.backward(lambda m: m.loss())
            e.step()
    assert torch.equal(engine.twin.w, engine2.twin.w)
    assert engine.read() == engine2.read()  # records: NaN entries compare equal
    assert engine.read().growth_rate > 0.5
    assert len(engine2.history) == 1


def test_nonfinite_is_recorded_once() -> None:
    real = Quadratic([1.0])
    opt = torch.optim.SGD(real.parameters(), lr=0.1)
    engine = TwinEngine(real)
    engine.attach_optimizer(opt)
    engine.start()
    with torch.no_grad():
        engine.twin.w.fill_(math.nan)
    engine.backward(lambda m: m.loss())
    engine.step()
    r = engine.record()
    assert r.nonfinite and r.first_step_nonfinite == 1
    assert not engine.record().nonfinite
    engine.resync(opt)
    assert engine.read().divergence > 0 and engine.resyncs == 1
    assert math.isfinite(engine.read().divergence)


def test_twin_scaler_is_its_own_and_skips_on_its_own_overflow() -> None:
    real = nn.Linear(3, 1)
    opt = torch.optim.SGD(real.parameters(), lr=0.1)
    real_scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1)
    engine = TwinEngine(real, perturbation="none")
    engine.attach_optimizer(opt)
    scaler = engine.attach_scaler(real_scaler)
    assert scaler is not None and scaler is not real_scaler
    assert scaler.state_dict() == real_scaler.state_dict()
    engine.start()
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))

    def loss_fn(m: nn.Module) -> torch.Tensor:
        return m(x).square().mean()

    engine.backward(loss_fn)
    (unscaled,) = torch.autograd.grad(loss_fn(real), [real.weight])
    assert torch.equal(engine.twin.weight.grad, 1024.0 * unscaled)  # backward on the scaled loss
    before = [p.detach().clone() for p in engine.twin.parameters()]
    engine.twin.weight.grad[0, 0] = math.inf  # the twin's gradients overflow, the real ones do not
    engine.step()
    assert all(torch.equal(a, b) for a, b in zip(before, engine.twin.parameters()))  # step skipped
    assert scaler.get_scale() == 512.0 and real_scaler.get_scale() == 1024.0  # its own back-off
    assert not engine.record().nonfinite and not engine.frozen  # not a non-finite twin
    engine.backward(loss_fn)
    engine.step()
    assert not all(torch.equal(a, b) for a, b in zip(before, engine.twin.parameters()))  # stepped
    assert scaler.get_scale() == 1024.0  # grew again (growth_interval=1)
    # Checkpoint: the twin scaler's own state (plain numbers) is restored, not the real one's.
    buf = io.BytesIO()
    torch.save(engine.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    scaler.update(new_scale=8.0)
    engine2 = TwinEngine(real, perturbation="none")
    engine2.load_state_dict(saved)
    restored = engine2.attach_scaler(torch.amp.GradScaler("cpu", init_scale=2.0), saved["scaler"])
    assert restored is not None and restored.state_dict() == saved["scaler"]
    assert restored.get_scale() == 1024.0
    assert engine2.attach_scaler(None) is None and engine2.scaler is None


# ----------------------------------------------------------------------------------- records
def test_history_state_dict_and_scalars_are_views_of_the_same_records() -> None:
    real = Quadratic([14.0, 1.0])
    opt = torch.optim.SGD(real.parameters(), lr=0.3, momentum=0.5)
    engine = run_lockstep(real, opt, 6, window=5, layers="parameter")
    r = engine.record(7, log_step=6, epoch=1)
    assert isinstance(r, TwinRecord) and engine.history == [r]
    assert (r.step, r.global_step, r.log_step, r.epoch) == (6, 7, 6, 1)
    assert math.isnan(r.d_metric) and not r.nonfinite and r.events == () and r.event_count == 0
    assert list(r.layers) == ["w"]
    # state_dict: the records' dicts, loadable with weights_only=True, rebuilding equal records
    buf = io.BytesIO()
    torch.save(engine.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert [d.keys() for d in saved["history"]] == [r.to_dict().keys()]  # plain dicts (d_metric is NaN)
    assert [TwinRecord.from_dict(d) for d in saved["history"]] == engine.history
    assert TwinRecord.from_dict({**r.to_dict(), "from_a_newer_version": 1}) == r
    # the logged scalars: finite fields only (no D without d_metric=True, no growth rate yet at step 0)
    assert r.scalars("t") == {
        "t/divergence": r.divergence,
        "t/divergence/w": r.layers["w"],
        "t/growth_rate": r.growth_rate,
        "t/growth_rate/w": r.layer_growth_rate["w"],
        "t/amplification": r.amplification,
        "t/restrained_instability": 0.0,
    }
    first = TwinEngine(Quadratic([1.0]), layers="none")
    first.start()
    assert set(first.record().scalars()) == {
        "twin/divergence",
        "twin/amplification",
        "twin/restrained_instability",
    }


def test_record_equality_treats_nan_as_equal_and_compares_every_field() -> None:
    a = TwinRecord(step=1, divergence=0.5, layers={"x": math.nan}, events=({"level": math.nan},))
    assert a == TwinRecord.from_dict(a.to_dict())
    assert a != dataclasses.replace(a, log_step=1)
    assert a != dataclasses.replace(a, layers={"x": 0.0})


# ------------------------------------------------------------------------------------ layers
class TiedRoot(nn.Module):
    """A tied embedding/head pair and a parameter owned by the root module."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.offset = nn.Parameter(torch.randn(6, generator=g))
        self.emb = nn.Embedding(6, 4)
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 6, bias=False)
        self.head.weight = self.emb.weight


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("module", ["(root)", "emb", "body"]),
        ("parameter", ["offset", "emb.weight", "body.weight", "body.bias"]),
        ("none", []),
    ],
)
def test_layers_are_those_of_lightning_eos_layers(mode: str, expected: list[str]) -> None:
    from lightning_eos.layers import layer_of_parameters

    model = TiedRoot()
    engine = TwinEngine(model, layers=mode)  # type: ignore[arg-type]
    assert engine.layer_names == expected
    if mode != "none":
        assert engine.layer_names == list(dict.fromkeys(layer_of_parameters(model, by=mode).values()))  # type: ignore[arg-type]
    engine.start()
    r = engine.record()
    assert list(r.layers) == expected and all(v > 0 for v in r.layers.values())


def test_tied_weight_enters_the_gap_once() -> None:
    model = TiedRoot()
    engine = TwinEngine(model, params=["emb"])  # ulp on the tied weight only
    engine.start()
    r = engine.record()
    w, t = model.emb.weight.detach(), engine.twin.emb.weight.detach()
    assert engine.twin.head.weight is engine.twin.emb.weight  # the twin keeps the tie
    den = sum(float(p.detach().abs().sum()) for p in model.parameters())  # unique parameters
    assert r.divergence == pytest.approx(float((t - w).abs().sum()) / den, rel=1e-6)
    assert r.layers["emb"] > 0 and r.layers["body"] == r.layers["(root)"] == 0.0


# ------------------------------------------------------------------------ hooks of a step
def test_backward_and_step_call_the_hooks_where_lightning_calls_the_modules() -> None:
    torch.manual_seed(0)
    real = nn.Linear(3, 1)
    opt = torch.optim.SGD(real.parameters(), lr=0.1)
    engine = TwinEngine(real, perturbation="none")
    engine.attach_optimizer(opt)
    engine.attach_scaler(torch.amp.GradScaler("cpu", init_scale=1024.0))
    engine.start()
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    seen: list[tuple[Any, ...]] = []

    def grad_norm() -> float:
        grads = [p.grad for p in engine.twin.parameters() if p.grad is not None]
        return float(torch.cat([g.reshape(-1) for g in grads]).norm()) if grads else 0.0

    loss = engine.backward(
        lambda m: m(x).square().mean(),
        divide_by=2,
        before_backward=lambda t: seen.append(("before_backward", float(t.detach()), grad_norm())),
        after_backward=lambda: seen.append(("after_backward", grad_norm())),
    )
    assert loss is not None
    engine.step(clip_val=1e-3, before_update=lambda o: seen.append(("before_update", o, grad_norm())))
    (_, backward_tensor, before), (_, after), (_, optimizer, unscaled) = seen
    assert backward_tensor == float(loss) / 2 * 1024.0  # the divided, scaled loss, as Lightning passes it
    assert before == 0.0 and after > 0.0
    assert optimizer is engine.optimizer
    assert unscaled == pytest.approx(after / 1024.0) and unscaled > 1e-3  # unscaled, not yet clipped


# --------------------------------------------------------------------------- torch only
def test_the_twin_core_imports_no_lightning() -> None:
    import ast
    from pathlib import Path

    import lightning_eos.records
    import lightning_eos.twin

    files = [*Path(lightning_eos.twin.__file__).parent.glob("*.py"), Path(lightning_eos.records.__file__)]
    assert len(files) >= 6
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not [n for n in names if n == "lightning" or n.startswith("lightning.")], path
