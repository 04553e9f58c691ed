"""Small models and dense float64 references (torch.func.hessian) shared by the curvature tests."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.func import functional_call, hessian

from lightning_eos.curvature import FunctionOperator


def mlp(
    seed: int = 0, d_in: int = 5, hidden: int = 6, d_out: int = 3, dtype: torch.dtype = torch.float64
) -> nn.Module:
    """A tiny tanh MLP (5-6-3: 57 parameters)."""
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out)).to(dtype)


def bn_net(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    """Linear → BatchNorm1d → tanh → (dropout) → linear, float64."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        layers: list[nn.Module] = [nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(5, 3))
        return nn.Sequential(*layers).double()


def data(n: int, seed: int = 1, d_in: int = 5, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g, dtype=torch.float64), torch.randint(
        0, classes, (n,), generator=g
    )


def ce(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


class _ManualBatchNorm(nn.Module):
    """Train-mode BatchNorm1d/2d written out: ``(x − mean) / sqrt(biased var + eps) · weight + bias``."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = bn.weight, bn.bias, bn.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = [0, *range(2, x.dim())]  # all but the channel dimension
        shape = [1, -1] + [1] * (x.dim() - 2)
        mean = x.mean(dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dims, keepdim=True)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight.view(shape) + self.bias.view(shape)


def dense_hessian(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    batches: Sequence[Any],
    weights: Sequence[float],
    names: Sequence[str] | None = None,
    train: bool = False,
    rows: bool = False,
) -> torch.Tensor:
    """Dense Hessian (float64) of ``Σ w_i L_i / Σ w_i`` w.r.t. parameters ``names`` via torch.func.

    ``torch.func.hessian`` (or ``torch.autograd.functional.hessian`` row by row with ``rows=True``).
    Independent of the operator under test: a float64 deep copy evaluated with ``functional_call``;
    train-mode BatchNorm uses batch statistics (copy with ``track_running_stats=False``).
    """
    ref = copy.deepcopy(model).double()
    ref.train(train)
    if train:
        # torch.func.hessian (vmapped jacfwd over jacrev) of the native train-mode batch_norm kernel
        # disagrees with finite differences in torch 2.13: the reference spells it out by hand.
        for name, m in list(ref.named_modules()):
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                parent = ref.get_submodule(name.rsplit(".", 1)[0]) if "." in name else ref
                setattr(parent, name.rsplit(".", 1)[-1], _ManualBatchNorm(m))
    all_named = dict(ref.named_parameters())
    names = list(names) if names is not None else [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = [all_named[n].shape for n in names]
    sizes = [all_named[n].numel() for n in names]
    flat0 = torch.cat([all_named[n].detach().reshape(-1) for n in names])
    total = float(sum(weights))

    def f(flat: torch.Tensor) -> torch.Tensor:
        parts = dict(zip(names, [c.view(s) for c, s in zip(flat.split(sizes), shapes)]))

        class Bound(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.inner = ref

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return functional_call(self.inner, parts, (x,))

        bound = Bound()
        out = 0.0
        for w, b in zip(weights, batches):
            out = out + w * loss_fn(lambda x: bound(x), b)  # type: ignore[arg-type]
        return out / total

    if rows:  # larger models: row by row (torch.autograd.functional, no vmap: bounded memory)
        return torch.autograd.functional.hessian(f, flat0)
    return hessian(f)(flat0)


def quadratic(eigs: Sequence[float] | torch.Tensor, seed: int = 0) -> tuple[FunctionOperator, torch.Tensor]:
    """A ``FunctionOperator`` for ``Q diag(eigs) Qᵀ`` with a random orthogonal ``Q`` (float64)."""
    lam = torch.as_tensor(eigs, dtype=torch.float64)
    n = lam.numel()
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    a = (q * lam) @ q.T
    a = 0.5 * (a + a.T)
    return FunctionOperator(lambda v: a @ v, n), a


class OnceTanh(torch.autograd.Function):
    """tanh whose backward is ``@once_differentiable`` (like many fused custom kernels): no second
    derivative."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        y = x.tanh()
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return g * (1 - y * y)
