"""Curvature quantities of a model's loss: Hessian eigenvalues (whole, per block, per layer),
preconditioned sharpness for adaptive optimizers, Hutchinson trace and batch sharpness.

Every function builds one :class:`~lightning_eos.curvature.operator.HessianOperator` (so the same
batching, weighting, train/eval and side-effect rules apply) and hands it to the one solver in
:mod:`lightning_eos.curvature.lanczos`.

Torch only: no Lightning import.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from lightning_eos.bounds import optimizer_preconditioner
from lightning_eos.layers import ROOT_LAYER
from lightning_eos.layers import layers as layers_of

from .lanczos import DEFAULT_EIG_TOL, DEFAULT_TOL, EigenResult, check_choices, eigsh, wants
from .operator import (
    Batches,
    HessianOperator,
    LossFn,
    PreconditionedOperator,
    ReduceFn,
    SymmetricOperator,
)

__all__ = [
    "EigenResult",
    "TraceEstimate",
    "batch_sharpness",
    "block_eigenvalues",
    "hessian_eigenvalues",
    "hutchinson_trace",
    "layer_blocks",
    "layerwise_eigenvalues",
    "optimizer_preconditioner",
    "preconditioned_sharpness",
]


@dataclass(frozen=True)
class _Solve:
    """The solver arguments the eigenvalue functions share; ``which``/``method`` are checked on
    creation, before any (costly) operator is built. Calling it runs :func:`eigsh` on an operator."""

    k: int
    which: str
    method: str
    tol: float
    max_iter: int | None
    seed: int
    return_eigenvectors: bool
    block_size: int
    eig_tol: float | None = DEFAULT_EIG_TOL
    start_vectors: torch.Tensor | None = None
    exploration: str = "full"

    def __post_init__(self) -> None:
        check_choices(self.which, self.method, self.exploration)

    def fits(self, dim: int) -> bool:
        """Whether an operator of size ``dim`` has room for the request (``k < dim``, ``2k <= dim``)."""
        return self.k < dim and wants(self.k, self.which) <= dim

    def __call__(self, operator: SymmetricOperator, start_vectors: torch.Tensor | None = None) -> EigenResult:
        """Solve on ``operator``, warm-started from ``start_vectors`` (else this request's own)."""
        kwargs = {f.name: getattr(self, f.name) for f in fields(self)}  # no deep copy of tensors
        if start_vectors is not None:
            kwargs["start_vectors"] = start_vectors
        warm = kwargs["start_vectors"]
        if warm is not None and warm.shape[0] != operator.dim:
            kwargs["start_vectors"] = None  # a different parameter set since: start cold
        return eigsh(operator, **kwargs)


def hessian_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Any,
    k: int = 1,
    which: str = "largest",
    params: Iterable[nn.Parameter | str] | None = None,
    method: str = "lanczos",
    tol: float = DEFAULT_TOL,
    max_iter: int | None = None,
    mode: str = "train",
    seed: int = 0,
    return_eigenvectors: bool = False,
    reduce: ReduceFn | None = None,
    weights: Sequence[float] | torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    backend: str = "autograd",
    max_cached_batches: int | None = None,
    block_size: int = 1,
    hvp: str = "auto",
    eig_tol: float | None = DEFAULT_EIG_TOL,
    start_vectors: torch.Tensor | None = None,
    exploration: str = "full",
) -> EigenResult:
    """Extreme eigenvalues of the Hessian of the sample-weighted mean loss over ``batches``.

    ``which="largest"``: the ``k`` algebraically largest; ``"smallest"``: the ``k`` smallest;
    ``"both"``: the ``k`` largest then the ``k`` smallest. ``.eigenvalues`` is float64 and always
    descending. Operator arguments (``params``, ``mode``, ``weights``, ``reduce``, ``dtype``,
    ``backend``, ``max_cached_batches``, ``hvp``) are those of
    :class:`~lightning_eos.curvature.operator.HessianOperator`; solver arguments (``tol``,
    ``max_iter``, ``seed`` for the start vector and the dropout masks, ``eig_tol`` the target
    relative eigenvalue error, ``start_vectors`` a previous solve's Ritz vectors to warm-start from,
    ``exploration`` how much a warm solve checks) those of
    :func:`~lightning_eos.curvature.lanczos.lanczos` (``block_size`` > 1 for exactly repeated
    eigenvalues).
    """
    solve = _Solve(
        k,
        which,
        method,
        tol,
        max_iter,
        seed,
        return_eigenvectors,
        block_size,
        eig_tol,
        start_vectors,
        exploration,
    )
    op = HessianOperator(
        model,
        loss_fn,
        batches,
        params=params,
        mode=mode,
        weights=weights,
        reduce=reduce,
        dtype=dtype,
        backend=backend,
        max_cached_batches=max_cached_batches,
        seed=seed,
        hvp=hvp,
    )
    return solve(op)


def _block_params(model: nn.Module, block: Any) -> list[nn.Parameter]:
    """A module (object or dotted path), a parameter (object or name), or a list of those."""
    items = block if isinstance(block, (list, tuple)) else [block]
    out: list[nn.Parameter] = []
    names = dict(model.named_parameters())
    modules = dict(model.named_modules())
    for item in items:
        if isinstance(item, str):
            if item in names:
                found = [names[item]]
            elif item in modules:
                found = [p for p in modules[item].parameters() if p.requires_grad]
            elif item == ROOT_LAYER:
                found = [p for p in model.parameters(recurse=False) if p.requires_grad]
            else:
                raise ValueError(f"block: {item!r} is neither a parameter nor a module name of the model")
        elif isinstance(item, nn.Module):
            if all(item is not m for m in modules.values()):
                raise ValueError(f"block: the {type(item).__name__} module is not part of the model")
            found = [p for p in item.parameters() if p.requires_grad]
        elif isinstance(item, torch.Tensor):
            found = [item]  # type: ignore[list-item]
        else:
            raise TypeError(f"block items must be modules, parameters or names, got {type(item).__name__}")
        if not found:
            raise ValueError(f"block: {item!r} has no trainable parameter")
        for p in found:
            if all(p is not q for q in out):
                out.append(p)
    return out


def block_eigenvalues(
    model: nn.Module, loss_fn: LossFn, batches: Any, block: Any, **kwargs: Any
) -> EigenResult:
    """Eigenvalues of one diagonal block ``H[block, block]`` of the Hessian.

    ``block``: a module (object or dotted path such as ``"net.0"``: all its trainable parameters,
    recursively), a parameter (object or name such as ``"net.0.weight"``), or a list of those.
    Other keyword arguments as for :func:`hessian_eigenvalues`.
    """
    return hessian_eigenvalues(model, loss_fn, batches, params=_block_params(model, block), **kwargs)


def layer_blocks(model: nn.Module) -> dict[str, list[str]]:
    """The model's layers: ``{layer name: [names of its trainable parameters]}``.

    The package's one definition of a layer (:func:`lightning_eos.layers.layers`): the module that
    directly owns a parameter, tied parameters counted once (first owner), root-owned parameters under
    :data:`lightning_eos.layers.ROOT_LAYER`.
    """
    return layers_of(model)


def layerwise_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Any,
    k: int = 1,
    which: str = "largest",
    method: str = "lanczos",
    tol: float = DEFAULT_TOL,
    max_iter: int | None = None,
    mode: str = "train",
    seed: int = 0,
    return_eigenvectors: bool = False,
    reduce: ReduceFn | None = None,
    weights: Sequence[float] | torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    max_cached_batches: int | None = None,
    layers: Sequence[str] | None = None,
    block_size: int = 1,
    hvp: str = "auto",
    eig_tol: float | None = DEFAULT_EIG_TOL,
    start_vectors: Mapping[str, torch.Tensor] | None = None,
    exploration: str = "full",
) -> dict[str, EigenResult]:
    """Per-layer diagonal-block spectra ``{layer path: EigenResult}`` (see :func:`layer_blocks`).

    One forward/gradient graph over all layer parameters is built and shared by every block (each
    block's products only backpropagate into its own parameters). Layers too small for ``k``
    (``k >= dim``, or ``2k > dim`` for ``"both"``) are skipped. ``layers`` restricts the sweep.
    ``hvp``: see :class:`~lightning_eos.curvature.operator.HessianOperator`; ``start_vectors``:
    ``{layer: previous Ritz vectors}`` to warm-start each block's solve (``exploration`` as for
    :func:`~lightning_eos.curvature.lanczos.lanczos`).
    """
    solve = _Solve(
        k, which, method, tol, max_iter, seed, return_eigenvectors, block_size, eig_tol, None, exploration
    )
    warm = dict(start_vectors or {})
    blocks = layer_blocks(model)
    if layers is not None:
        unknown = [name for name in layers if name not in blocks]
        if unknown:
            raise ValueError(f"layers: {unknown} are not layers of the model; known: {list(blocks)}")
        blocks = {name: blocks[name] for name in layers}
    if not blocks:
        raise ValueError("the model has no module that directly owns trainable parameters")
    all_names = [n for names in blocks.values() for n in names]
    op = HessianOperator(
        model,
        loss_fn,
        batches,
        params=all_names,
        mode=mode,
        weights=weights,
        reduce=reduce,
        dtype=dtype,
        max_cached_batches=max_cached_batches,
        seed=seed,
        hvp=hvp,
    )
    out: dict[str, EigenResult] = {}
    for name, pnames in blocks.items():
        block = op.restrict(pnames)
        if solve.fits(block.dim):
            out[name] = solve(block, warm.get(name))
    return out


def preconditioned_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Any,
    optimizer: torch.optim.Optimizer,
    k: int = 1,
    params: Iterable[nn.Parameter | str] | None = None,
    which: str = "largest",
    method: str = "lanczos",
    tol: float = DEFAULT_TOL,
    max_iter: int | None = None,
    mode: str = "train",
    seed: int = 0,
    return_eigenvectors: bool = False,
    reduce: ReduceFn | None = None,
    weights: Sequence[float] | torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    missing_state: str = "error",
    block_size: int = 1,
    hvp: str = "auto",
    eig_tol: float | None = DEFAULT_EIG_TOL,
    start_vectors: torch.Tensor | None = None,
    exploration: str = "full",
) -> EigenResult:
    """Eigenvalues of ``P^{-1/2} H P^{-1/2}`` with ``P`` read from ``optimizer`` by
    :func:`lightning_eos.bounds.optimizer_preconditioner` (re-exported here): the preconditioned
    sharpness of Cohen et al. 2022, to compare with ``2/lr`` (Adam: ``(2 + 2β1)/((1 − β1)·lr)``).
    Eigenvectors, if requested, are those of the symmetric form (map back with ``P^{-1/2}``); they
    are what ``start_vectors`` takes to warm-start the next solve (``exploration`` as for
    :func:`~lightning_eos.curvature.lanczos.lanczos`).
    """
    solve = _Solve(
        k,
        which,
        method,
        tol,
        max_iter,
        seed,
        return_eigenvectors,
        block_size,
        eig_tol,
        start_vectors,
        exploration,
    )
    op = HessianOperator(
        model,
        loss_fn,
        batches,
        params=params,
        mode=mode,
        weights=weights,
        reduce=reduce,
        dtype=dtype,
        seed=seed,
        hvp=hvp,
    )
    P = optimizer_preconditioner(optimizer, op.params, missing_state=missing_state)
    return solve(PreconditionedOperator(op, P))


@dataclass
class TraceEstimate:
    """Hutchinson estimate of ``tr(H)``: ``trace`` (loss units per parameter²) ± ``std_error``."""

    trace: float
    std_error: float
    num_samples: int
    num_hvps: int

    def __float__(self) -> float:
        return self.trace


def hutchinson_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Any,
    num_samples: int = 64,
    seed: int = 0,
    params: Iterable[nn.Parameter | str] | None = None,
    mode: str = "train",
    reduce: ReduceFn | None = None,
    weights: Sequence[float] | torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
    hvp: str = "auto",
) -> TraceEstimate:
    """Hutchinson's estimate ``tr(H) ≈ mean_s zₛᵀ H zₛ`` with Rademacher probes ``zₛ ∈ {±1}^dim``.

    Probes come from a private generator seeded with ``seed`` (identical on every rank, so with
    ``reduce`` all ranks agree). One product per sample; the standard error is the sample standard
    deviation over ``sqrt(num_samples)`` (``nan`` for one sample). ``hvp``: see
    :class:`~lightning_eos.curvature.operator.HessianOperator`.
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    op = HessianOperator(
        model,
        loss_fn,
        batches,
        params=params,
        mode=mode,
        weights=weights,
        reduce=reduce,
        dtype=dtype,
        seed=seed,
        hvp=hvp,
    )
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    vals = []
    for _ in range(num_samples):
        z = (torch.randint(0, 2, (op.dim,), generator=gen, dtype=torch.int8) * 2 - 1).to(op.dtype)
        z = z.to(op.device)
        hz = op.matvec(z)
        assert isinstance(hz, torch.Tensor)
        vals.append(float(torch.dot(z.double(), hz.double())))
    t = torch.tensor(vals, dtype=torch.float64)
    if not bool(torch.isfinite(t).all()):
        warnings.warn(
            "hutchinson_trace: a Hessian-vector product was not finite (NaN/Inf in the loss or its "
            "derivatives); the trace estimate is NaN.",
            RuntimeWarning,
            stacklevel=2,
        )
        t = torch.full_like(t, math.nan)
    se = float(t.std() / math.sqrt(num_samples)) if num_samples > 1 else float("nan")
    return TraceEstimate(trace=float(t.mean()), std_error=se, num_samples=num_samples, num_hvps=op.num_hvps)


def batch_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    params: Iterable[nn.Parameter | str] | None = None,
    mode: str = "train",
    reduce: ReduceFn | None = None,
    seed: int = 0,
    hvp: str = "auto",
) -> float:
    """``gᵀ H g / gᵀ g`` for the minibatch loss at its own gradient ``g`` (one product, reusing the
    gradient graph). The curvature along the step direction of plain gradient descent; ``nan`` when
    ``g = 0``. With ``reduce``, ``g`` and ``H`` are those of the global (all-rank) batch. ``hvp``:
    see :class:`~lightning_eos.curvature.operator.HessianOperator`.
    """
    # `batch` is one batch whatever its type (a collated list included): wrap it explicitly.
    op = HessianOperator(
        model, loss_fn, Batches([batch]), params=params, mode=mode, reduce=reduce, seed=seed, hvp=hvp
    )
    g = op.gradient()
    gg = float(torch.dot(g, g))
    if gg == 0.0:
        return float("nan")
    hg = op.matvec(g.to(op.dtype))
    assert isinstance(hg, torch.Tensor)
    return float(torch.dot(g, hg.double())) / gg
