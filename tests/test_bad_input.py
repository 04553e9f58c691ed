"""The bad-input catalogue: every public constructor and function, wrong types, out-of-range numbers,
unknown option strings, empty sets, models without trainable parameters, layers that do not exist.

Each case must raise ``ValueError``/``TypeError`` whose message names the argument (and, for the
callbacks, the value and what is accepted). The callback part is complete by construction: every
``__init__`` parameter of every public callback must have a case here, so a new argument without one
fails :func:`test_every_callback_argument_has_a_bad_input_case`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from lightning_eos import bounds, curvature, layers
from lightning_eos.budget import MeasurementBudget
from lightning_eos.callbacks import (
    AdaptiveLocalLR,
    SharpnessMonitor,
    SpaceTimeMaps,
    StabilityMonitor,
    TwinDivergence,
)
from lightning_eos.twin import TwinEngine, apply_ulp

# callback -> {argument: [bad values]}; arguments whose every value is legal are listed with [].
CALLBACK_CASES: dict[type, dict[str, list[Any]]] = {
    SharpnessMonitor: {
        "every_n_steps": [0, -1, 1.5, True, "10"],
        "budget": [0.0, 1.0, -0.1, "5%", True],
        "probe": ["all", 1, None],
        "probe_size": [0, -3, "half", 2.5],
        "probe_batch_size": [0, "32"],
        "k": [0, 1.0, None],
        "which": ["smallest", "top", 2],
        "per_layer": ["yes", 1],
        "preconditioned": ["always", 1, None],
        "tol": [0.0, -1e-3, float("nan"), "1e-3"],
        "eig_tol": [0.0, float("inf"), None],
        "max_iter": [0, 1.5],
        "mode": ["test", True],
        "optimizer_idx": [-1, 0.5],
        "log_prefix": ["", "eos/", 3],
        "batch_sharpness": ["no"],
        "batch_sharpness_window": [0],
        "warn_ratio": [0.0, -1.0],
        "loss_fn": [3, "not_a_module_path", "lightning_eos.no_such_function"],
        "seed": [1.5, "0"],
        "hvp": ["fd", None],
        "warm_start": ["yes"],
        "strict": [1],
    },
    StabilityMonitor: {
        "every_n_steps": [0, True],
        "per_layer": ["yes"],
        "log_prefix": ["", "a/"],
        "strict": ["no"],
    },
    TwinDivergence: {
        "perturbation": ["bit", None],
        "params": ["net.0", [], [""], [1]],
        "fraction": [0.0, 1.5],
        "single_weight": [1],
        "seed": [0.5],
        "rescale_k": [0.0, -3.0],
        "every_n_steps": [0],
        "layers": ["block"],
        "window": [1, 2.5],
        "threshold": [0.0],
        "event_decades": [-1.0],
        "saturation_decades": [0.0],
        "d_metric": ["yes"],
        "validation": [1],
        "predict_fn": [3],
        "resync_on_nonfinite": ["no"],
        "log_prefix": ["", "twin/"],
        "strict": [0],
    },
    AdaptiveLocalLR: {
        "every_n_steps": [0, 1.5],
        "adaptive_interval": ["yes"],
        "rise_tolerance": [-0.1, "0.1"],
        "budget": [0.0, 1.0],
        "mode": ["raise", None],
        "safety": [0.0, 1.5],
        "max_multiplier": [0.5, 0.0],
        "max_change": [0.5, 1.0],
        "smoothing": [-0.1, 1.0],
        "layers": ["block", 3, {"net.0": 1}],
        "coupled": ["no"],
        "probe": ["all"],
        "probe_size": [0],
        "probe_batch_size": [0],
        "probe_mode": ["test"],
        "tol": [0.0],
        "max_iter": [0],
        "warm_start": [1],
        "twin": ["sometimes"],
        "twin_threshold": [0.0],
        "twin_cut": [0.0, 1.5],
        "freeze_after": [0, 2.5, True],
        "check_weight_decay": ["yes"],
        "optimizer_idx": [-1],
        "log_prefix": [""],
        "loss_fn": [3, "lightning_eos.no_such_function"],
        "seed": [0.5],
    },
    SpaceTimeMaps: {
        "every_n_steps": [0],
        "maps": ["twin_gap", [], ["heat"]],
        "tag_prefix": [""],
        "at_fit_end": ["yes"],
        "max_columns": [0],
    },
}

_MODULE_PATH_OK = {"loss_fn"}  # may also fail on import: the message names the argument


@pytest.mark.parametrize(
    ("cls", "name", "value"),
    [
        pytest.param(cls, name, value, id=f"{cls.__name__}-{name}-{value!r}")
        for cls, cases in CALLBACK_CASES.items()
        for name, values in cases.items()
        for value in values
    ],
)
def test_callback_rejects_bad_values_at_construction(cls: type, name: str, value: Any) -> None:
    with pytest.raises((ValueError, TypeError)) as err:
        cls(**{name: value})
    message = str(err.value)
    assert name in message and cls.__name__ in message, message
    if name not in _MODULE_PATH_OK:
        assert "accepted values" in message, message


@pytest.mark.parametrize("cls", list(CALLBACK_CASES))
def test_every_callback_argument_has_a_bad_input_case(cls: type) -> None:
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    missing = [p for p in params if p not in CALLBACK_CASES[cls]]
    assert not missing, f"{cls.__name__}: add bad-input cases for {missing}"
    assert all(CALLBACK_CASES[cls][p] for p in params), "every argument needs at least one bad value"


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def _loss(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    return x, torch.randn(5, 2, generator=g, dtype=torch.float64)


def _args() -> tuple[nn.Module, Callable[[nn.Module, Any], torch.Tensor], Any]:
    """(model, loss_fn, batch) of a small float64 MLP."""
    return _mlp(), _loss, _batch()


def _frozen() -> nn.Module:
    model = _mlp()
    model.requires_grad_(False)
    return model


def _sgd(**kw: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(_mlp().parameters(), **kw)


FUNCTION_CASES: list[tuple[str, Callable[[], Any], str]] = [
    ("k=0", lambda: curvature.hessian_eigenvalues(*_args(), k=0), "k"),
    ("k>=dim", lambda: curvature.hessian_eigenvalues(*_args(), k=100), "k"),
    ("which", lambda: curvature.hessian_eigenvalues(*_args(), which="top"), "which"),
    ("method", lambda: curvature.hessian_eigenvalues(*_args(), method="arpack"), "method"),
    ("tol", lambda: curvature.hessian_eigenvalues(*_args(), tol=-1.0), "tol"),
    ("eig_tol", lambda: curvature.hessian_eigenvalues(*_args(), eig_tol=0.0), "eig_tol"),
    ("mode", lambda: curvature.HessianOperator(*_args(), mode="test"), "mode"),
    ("backend", lambda: curvature.HessianOperator(*_args(), backend="jax"), "backend"),
    ("hvp", lambda: curvature.HessianOperator(*_args(), hvp="fd"), "hvp"),
    (
        "no trainable parameter",
        lambda: curvature.HessianOperator(_frozen(), _loss, _batch()),
        "requires_grad",
    ),
    ("empty params", lambda: curvature.HessianOperator(*_args(), params=[]), "params"),
    ("unknown param", lambda: curvature.HessianOperator(*_args(), params=["w"]), "params"),
    ("empty batches", lambda: curvature.HessianOperator(_mlp(), _loss, []), "batches"),
    ("weights", lambda: curvature.HessianOperator(*_args(), weights=[1.0, 2.0]), "weights"),
    (
        "unknown layer",
        lambda: curvature.layerwise_eigenvalues(*_args(), layers=["9"]),
        "layers",
    ),
    ("unknown block", lambda: curvature.block_eigenvalues(*_args(), "head"), "block"),
    (
        "trace samples",
        lambda: curvature.hutchinson_trace(*_args(), num_samples=0),
        "num_samples",
    ),
    (
        "start_vectors",
        lambda: curvature.hessian_eigenvalues(*_args(), start_vectors=torch.full((26,), float("nan"))),
        "start_vectors",
    ),
    ("layer name", lambda: layers.layer_parameters(_mlp(), "head"), "layer"),
    ("layers by", lambda: layers.layers(_mlp(), by="tensor"), "by"),  # type: ignore[arg-type]
    ("negative lr", lambda: bounds.critical_sharpness(_sgd(lr=0.1), group={"lr": -1.0}), "lr"),
    (
        "momentum",
        lambda: bounds.critical_sharpness(_sgd(lr=0.1), group={"lr": 0.1, "momentum": 1.5}),
        "momentum",
    ),
    ("group index", lambda: bounds.critical_sharpness(_sgd(lr=0.1), group=3), "group"),
    ("sharpness", lambda: bounds.max_stable_lr(float("nan"), _sgd(lr=0.1)), "sharpness"),
    ("unknown optimizer", lambda: bounds.critical_sharpness(torch.optim.LBFGS(_mlp().parameters())), "LBFGS"),
    ("budget", lambda: MeasurementBudget(1.5, first_cost_steps=10.0), "budget"),
    ("first cost", lambda: MeasurementBudget(0.05, first_cost_steps=0.0), "first_cost_steps"),
    ("plan_after", lambda: MeasurementBudget(0.05, first_cost_steps=1.0, plan_after=0), "plan_after"),
    ("ulp names", lambda: apply_ulp(dict(_mlp().named_parameters()), names=["head"]), "head"),
    ("twin perturbation", lambda: TwinEngine(_mlp(), perturbation="bit"), "perturbation"),  # type: ignore[arg-type]
    ("twin window", lambda: TwinEngine(_mlp(), window=1), "window"),
]


@pytest.mark.parametrize(("case", "call", "name"), FUNCTION_CASES, ids=[c[0] for c in FUNCTION_CASES])
def test_core_rejects_bad_input_naming_the_argument(case: str, call: Callable[[], Any], name: str) -> None:
    with pytest.raises((ValueError, TypeError)) as err:
        call()
    assert name in str(err.value), str(err.value)
