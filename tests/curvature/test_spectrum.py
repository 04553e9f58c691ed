"""Spectra of real (tiny) models against dense float64 references: whole Hessian, blocks, layers,
preconditioned sharpness, batch sharpness, Hutchinson trace, NaN and bad-input handling."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from torch import nn

from lightning_eos.curvature import (
    EigenResult,
    HessianOperator,
    batch_sharpness,
    block_eigenvalues,
    hessian_eigenvalues,
    hutchinson_trace,
    layer_blocks,
    layerwise_eigenvalues,
    optimizer_preconditioner,
    preconditioned_sharpness,
)
from lightning_eos.curvature.operator import MissingSecondDerivativeError

from ._helpers import OnceTanh, bn_net, ce, data, dense_hessian, mlp

Batch = tuple[torch.Tensor, torch.Tensor]
Problem = tuple[nn.Module, Batch, torch.Tensor]


@pytest.fixture(scope="module")
def problem() -> Problem:
    model, batch = mlp(), data(30)
    return model, batch, torch.linalg.eigvalsh(dense_hessian(model, ce, [batch], [30.0]))


@pytest.mark.parametrize(
    ("method", "which", "k"),
    [
        ("lanczos", "largest", 1),
        ("lanczos", "largest", 3),
        ("lanczos", "smallest", 2),
        ("lanczos", "both", 2),
        # power: k=1 only here (block power on this clustered spectrum is slow; k>1 on quadratics)
        ("power", "largest", 1),
        ("power", "smallest", 1),
    ],
)
def test_eigenvalues_match_eigvalsh(problem: Problem, method: str, which: str, k: int) -> None:
    model, batch, ev = problem
    res = hessian_eigenvalues(model, ce, batch, k=k, which=which, method=method, tol=1e-7)
    desc = ev.flip(0)
    want = {"largest": desc[:k], "smallest": desc[-k:], "both": torch.cat([desc[:k], desc[-k:]])}[which]
    assert isinstance(res, EigenResult) and res.eigenvalues.dtype == torch.float64
    torch.testing.assert_close(res.eigenvalues, want, rtol=1e-9, atol=1e-11)
    assert bool(res.converged.all()) and res.converged.dtype == torch.bool
    assert res.residuals.shape == want.shape and res.num_hvps > 0


def test_default_tol_accuracy_and_eigenvectors(problem: Problem) -> None:
    model, batch, ev = problem
    res = hessian_eigenvalues(model, ce, batch, return_eigenvectors=True)
    assert abs(res.max - float(ev[-1])) <= 1e-6 * abs(float(ev[-1]))
    assert res.num_hvps <= 30
    op = HessianOperator(model, ce, batch)
    y = res.eigenvectors[:, 0]
    assert float((op @ y - res.eigenvalues[0] * y).norm()) <= float(res.residuals[0]) * 1.01 + 1e-13


def test_blocks_and_layers_match_dense_sub_blocks() -> None:
    model, batch = mlp(), data(30)
    assert layer_blocks(model) == {"0": ["0.weight", "0.bias"], "2": ["2.weight", "2.bias"]}
    H = dense_hessian(model, ce, [batch], [30.0])
    idx0, idx2 = torch.arange(0, 36), torch.arange(36, 57)
    ev0 = torch.linalg.eigvalsh(H[idx0][:, idx0]).flip(0)
    ev2 = torch.linalg.eigvalsh(H[idx2][:, idx2]).flip(0)
    by_name = block_eigenvalues(model, ce, batch, "0", k=2, tol=1e-8)
    by_module = block_eigenvalues(model, ce, batch, model[0], k=2, tol=1e-8)
    torch.testing.assert_close(by_name.eigenvalues, ev0[:2], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(by_module.eigenvalues, ev0[:2], rtol=1e-9, atol=1e-12)
    w_only = block_eigenvalues(model, ce, batch, "2.weight", tol=1e-8)
    H_w = H[36:54][:, 36:54]
    assert abs(w_only.max - float(torch.linalg.eigvalsh(H_w)[-1])) < 1e-9
    layers = layerwise_eigenvalues(model, ce, batch, k=1, which="both", tol=1e-8)
    assert list(layers) == ["0", "2"]
    torch.testing.assert_close(layers["0"].eigenvalues, ev0[[0, -1]], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(layers["2"].eigenvalues, ev2[[0, -1]], rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="neither a parameter nor a module"):
        block_eigenvalues(model, ce, batch, "net.7")
    with pytest.raises(ValueError, match="not layers"):
        layerwise_eigenvalues(model, ce, batch, layers=["9"])


def _train(model: nn.Module, opt: torch.optim.Optimizer, batch: Batch, steps: int = 3) -> None:
    for _ in range(steps):
        opt.zero_grad()
        ce(model, batch).backward()
        opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("kind", ["adam", "adamw_amsgrad", "rmsprop", "rmsprop_centered"])
def test_preconditioned_sharpness_matches_dense(kind: str) -> None:
    model, batch = mlp(), data(30)
    params = list(model.parameters())
    opt = {
        "adam": lambda: torch.optim.Adam(params, lr=1e-2, betas=(0.9, 0.99), eps=1e-6),
        "adamw_amsgrad": lambda: torch.optim.AdamW(params, lr=1e-2, amsgrad=True),
        "rmsprop": lambda: torch.optim.RMSprop(params, lr=1e-3),
        "rmsprop_centered": lambda: torch.optim.RMSprop(params, lr=1e-3, centered=True),
    }[kind]()
    _train(model, opt, batch)
    H = dense_hessian(model, ce, [batch], [30.0])
    # the preconditioner spelled out from the optimizer's formulas
    group = opt.param_groups[0]
    parts = []
    for p in params:
        st = opt.state[p]
        if kind.startswith("adam"):
            v = st["max_exp_avg_sq"] if group["amsgrad"] else st["exp_avg_sq"]
            parts.append((v / (1 - group["betas"][1] ** float(st["step"]))).sqrt() + group["eps"])
        else:
            v = st["square_avg"] - (st["grad_avg"] ** 2 if group["centered"] else 0)
            parts.append(v.sqrt() + group["eps"])
    P = torch.cat([t.reshape(-1) for t in parts]).double()
    torch.testing.assert_close(optimizer_preconditioner(opt, params), P)
    d = P.rsqrt()
    ev = torch.linalg.eigvalsh(d[:, None] * H * d[None, :])
    res = preconditioned_sharpness(model, ce, batch, opt, k=2, tol=1e-8)
    torch.testing.assert_close(res.eigenvalues, ev.flip(0)[:2], rtol=1e-8, atol=1e-10)


def test_preconditioner_missing_state() -> None:
    model, batch = mlp(), data(10)
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="no state"):
        preconditioned_sharpness(model, ce, batch, opt)
    res = preconditioned_sharpness(model, ce, batch, opt, missing_state="identity", tol=1e-8)
    assert abs(res.max - hessian_eigenvalues(model, ce, batch, tol=1e-8).max) < 1e-9
    with pytest.raises(ValueError, match="unsupported optimizer state"):
        sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        _train(model, sgd, batch, steps=1)
        optimizer_preconditioner(sgd, list(model.parameters()))


def test_adagrad_without_a_step_has_no_preconditioner_yet() -> None:
    # Adagrad allocates its state (sum = 0, step = 0) in __init__: that is not a preconditioner
    # (P would be eps = 1e-10, inflating the sharpness 1e10-fold), so it counts as missing state.
    model, batch = mlp(), data(10)
    opt = torch.optim.Adagrad(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="no state"):
        optimizer_preconditioner(opt, list(model.parameters()))
    P = optimizer_preconditioner(opt, list(model.parameters()), missing_state="identity")
    assert torch.equal(P, torch.ones(57, dtype=torch.float64))
    _train(model, opt, batch, steps=2)
    want = torch.cat([opt.state[p]["sum"].reshape(-1) for p in model.parameters()]).double().sqrt()
    torch.testing.assert_close(optimizer_preconditioner(opt, list(model.parameters())), want + 1e-10)


class _TiedNet(nn.Module):
    """Two linear layers sharing one weight matrix (tied weights, as in language models)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.dec = mlp()[0], nn.Linear(6, 5).double()
        self.sq = nn.Linear(6, 6).double()
        self.sq2 = nn.Linear(6, 6).double()
        self.sq2.weight = self.sq.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(torch.tanh(self.sq2(torch.tanh(self.sq(torch.tanh(self.enc(x)))))))


def test_layerwise_with_tied_weights_lists_each_parameter_once() -> None:
    model, batch = _TiedNet(), data(20)
    loss_fn = lambda m, b: (m(b[0]) - b[0]).pow(2).mean()  # noqa: E731
    blocks = layer_blocks(model)
    # the shared weight belongs to the first module that registers it, as in named_parameters()
    assert blocks["sq"] == ["sq.weight", "sq.bias"] and blocks["sq2"] == ["sq2.bias"]
    layers = layerwise_eigenvalues(model, loss_fn, batch, tol=1e-8)
    assert list(layers) == ["enc", "dec", "sq", "sq2"]
    names = [n for n, _ in model.named_parameters()]
    H = dense_hessian(model, loss_fn, [batch], [20.0], names=names)
    sizes = [p.numel() for p in model.parameters()]
    start = sum(sizes[: names.index("sq.weight")])
    idx = torch.arange(start, start + 42)  # sq.weight (36) and sq.bias (6)
    ev = torch.linalg.eigvalsh(H[idx][:, idx])
    assert abs(layers["sq"].max - float(ev[-1])) < 1e-9 * abs(float(ev[-1]))


def test_bfloat16_model_eigenvalues_match_float64_reference() -> None:
    # A bfloat16 model (products accurate to ~1e-2, accumulated in float32) against the dense
    # float64 Hessian of the same weights: both ends, k = 2, tol at bfloat16's precision.
    model, batch = mlp(dtype=torch.bfloat16), data(64)
    ev = torch.linalg.eigvalsh(dense_hessian(model, ce, [batch], [64.0])).flip(0)

    def ce_bf16(m: nn.Module, b: Batch) -> torch.Tensor:
        return ce(m, (b[0].bfloat16(), b[1]))

    res = hessian_eigenvalues(model, ce_bf16, batch, k=2, which="both", tol=1e-2)
    assert res.eigenvalues.dtype == torch.float64 and bool(res.converged.all())
    torch.testing.assert_close(res.eigenvalues, torch.cat([ev[:2], ev[-2:]]), rtol=1e-2, atol=0)


def test_batch_sharpness_matches_dense() -> None:
    model, batch = bn_net(), data(20, d_in=4)
    H = dense_hessian(model, ce, [batch], [20.0], train=True)
    # reference gradient: a train-mode copy whose BatchNorm does not track statistics
    ref = copy.deepcopy(model).train()
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.track_running_stats = False
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(ce(ref, batch), list(ref.parameters()))])
    want = float(g @ H @ g / (g @ g))
    assert abs(batch_sharpness(model, ce, batch) - want) < 1e-9 * abs(want)
    assert batch_sharpness(model, ce, list(batch)) == batch_sharpness(model, ce, batch)  # collated list


def test_hutchinson_close_to_dense_trace() -> None:
    model, batch = mlp(), data(30)
    tr = float(torch.trace(dense_hessian(model, ce, [batch], [30.0])))
    est = hutchinson_trace(model, ce, batch, num_samples=300, seed=1)
    assert est.num_hvps == 300 and est.num_samples == 300
    assert abs(est.trace - tr) < 4 * est.std_error + 1e-12
    assert est.std_error < 0.2 * abs(tr)
    assert (
        float(hutchinson_trace(model, ce, batch, num_samples=10, seed=1))
        == hutchinson_trace(model, ce, batch, num_samples=10, seed=1).trace
    )


def test_nan_hessian_gives_nan_eigenvalues_and_warning() -> None:
    w = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    model = nn.Module()
    model.w = w

    def loss_fn(m: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return (m.w.pow(2).sqrt() * batch).sum() + 1.0  # finite loss, NaN derivatives at 0

    with pytest.warns(RuntimeWarning, match="non-finite"):
        res = hessian_eigenvalues(model, loss_fn, torch.ones(4, dtype=torch.float64), k=1)
    assert bool(torch.isnan(res.eigenvalues).all()) and not bool(res.converged.any())
    with pytest.warns(RuntimeWarning, match="not finite"):
        est = hutchinson_trace(model, loss_fn, torch.ones(4, dtype=torch.float64), num_samples=3)
    assert math.isnan(est.trace)


def test_bad_arguments() -> None:
    model, batch = mlp(), data(8)
    for kw, match in [
        ({"k": 0}, "k must be"),
        ({"k": 57}, "k must be < dim"),
        ({"which": "top"}, "which must be one of"),
        ({"method": "arpack"}, "method must be one of"),
        ({"mode": "test"}, "mode must be one of"),
        ({"params": ["x.weight"]}, "not a parameter name"),
    ]:
        with pytest.raises(ValueError, match=match):
            hessian_eigenvalues(model, ce, batch, **kw)
    with pytest.raises(ValueError, match="empty"):
        hessian_eigenvalues(model, ce, [])
    with pytest.raises(ValueError, match="num_samples"):
        hutchinson_trace(model, ce, batch, num_samples=0)


# --------------------------------------------------------------------------------------------------
# hvp=: every public function takes it; finite-difference spectra against the dense reference
# --------------------------------------------------------------------------------------------------


class OnceTanhModule(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return OnceTanh.apply(x)


def test_finite_difference_spectrum_matches_eigvalsh(problem: Problem) -> None:
    model, batch, ev = problem
    res = hessian_eigenvalues(model, ce, batch, k=2, which="both", tol=1e-6, hvp="finite_difference")
    desc = ev.flip(0)
    want = torch.cat([desc[:2], desc[-2:]])
    # one FD product is ~1e-10 relative here: the eigenvalues are as good as the solver's tolerance
    torch.testing.assert_close(res.eigenvalues, want, rtol=1e-7, atol=1e-9)


def _every_function(
    model: nn.Module, opt: torch.optim.Optimizer, batch: Batch, **kw: Any
) -> dict[str, torch.Tensor]:
    """One number (or a few) from each public curvature function, with the operator arguments ``kw``."""
    return {
        "hessian_eigenvalues": hessian_eigenvalues(model, ce, batch, tol=1e-8, **kw).eigenvalues,
        "block_eigenvalues": block_eigenvalues(model, ce, batch, "0", tol=1e-8, **kw).eigenvalues,
        "layerwise_eigenvalues": layerwise_eigenvalues(model, ce, batch, tol=1e-8, **kw)["2"].eigenvalues,
        "preconditioned_sharpness": preconditioned_sharpness(
            model, ce, batch, opt, tol=1e-8, **kw
        ).eigenvalues,
        "hutchinson_trace": torch.tensor(hutchinson_trace(model, ce, batch, 8, **kw).trace),
        "batch_sharpness": torch.tensor(batch_sharpness(model, ce, batch, **kw)),
    }


def test_hvp_reaches_every_public_function() -> None:
    plain, batch = mlp(), data(30)
    custom = copy.deepcopy(plain)
    custom[1] = OnceTanhModule()
    opt = torch.optim.Adam(list(plain.parameters()), lr=1e-2)
    _train(plain, opt, batch)
    custom.load_state_dict(plain.state_dict())
    opt_c = torch.optim.Adam(list(custom.parameters()), lr=1e-2)
    opt_c.load_state_dict(opt.state_dict())
    exact = _every_function(plain, opt, batch)
    fd = _every_function(custom, opt_c, batch, hvp="finite_difference")
    with pytest.warns(RuntimeWarning, match="finite differences") as record:
        auto = _every_function(custom, opt_c, batch)  # the default falls back, with a warning
    assert sum(issubclass(w.category, RuntimeWarning) for w in record) == len(exact)  # one per operator
    for name in exact:
        torch.testing.assert_close(fd[name], exact[name], rtol=1e-6, atol=1e-9, msg=name)
        torch.testing.assert_close(auto[name], fd[name], rtol=1e-12, atol=1e-14, msg=name)
    for fn in (hessian_eigenvalues, layerwise_eigenvalues, hutchinson_trace, batch_sharpness):
        with pytest.raises(MissingSecondDerivativeError, match="hvp='finite_difference'"):
            fn(custom, ce, batch, hvp="exact")
    with pytest.raises(MissingSecondDerivativeError, match="hvp='finite_difference'"):
        preconditioned_sharpness(custom, ce, batch, opt_c, hvp="exact")
