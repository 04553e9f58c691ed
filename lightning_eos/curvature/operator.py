"""Symmetric linear operators over model parameters: the Hessian of a loss, its diagonal blocks and
its diagonally preconditioned form, plus a wrapper for any user-supplied symmetric matvec.

Every operator maps a vector of ``dim`` numbers to a vector of ``dim`` numbers. Vectors are either
flat 1-D tensors or (for the Hessian family) lists of tensors shaped like the parameters. The
eigen-solver in :mod:`lightning_eos.curvature.lanczos` only needs :class:`SymmetricOperator`.

Torch only: no Lightning import.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_eos.isolation import isolated_forward, requires_grad, rng_devices, seeded_rng

__all__ = [
    "Batches",
    "DiagonalScaledOperator",
    "FunctionOperator",
    "HessianBlockOperator",
    "HessianOperator",
    "PreconditionedOperator",
    "SymmetricOperator",
    "Vector",
    "normalize_batches",
]

#: A flat 1-D tensor, or a list of tensors shaped like the operator's parameters.
Vector = torch.Tensor | Sequence[torch.Tensor]
LossFn = Callable[[nn.Module, Any], torch.Tensor]
ReduceFn = Callable[[torch.Tensor], torch.Tensor | None]

_MODES = ("train", "eval")
_BACKENDS = ("autograd", "func")


class SymmetricOperator:
    """A symmetric linear map ``R^dim -> R^dim`` known only through its products ``v -> A v``.

    Subclasses implement :meth:`_matvec` on flat vectors of dtype :attr:`dtype`. The public
    :meth:`matvec` (and ``op @ v``) validates the shape, casts, counts products in :attr:`num_hvps`
    and returns a flat tensor of dtype :attr:`dtype` on :attr:`device`.
    """

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device | str) -> None:
        if dim < 1:
            raise ValueError(f"an operator needs dim >= 1, got dim={dim}")
        self._dim = int(dim)
        self._dtype = dtype
        self._device = torch.device(device)
        self.num_hvps = 0

    @property
    def dim(self) -> int:
        """Number of rows (= columns) of the operator."""
        return self._dim

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the vectors :meth:`matvec` returns (the accumulation dtype)."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        """Device of the vectors :meth:`matvec` returns."""
        return self._device

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_flat(self, v: torch.Tensor) -> torch.Tensor:
        if v.dim() != 1 or v.numel() != self.dim:
            raise ValueError(f"expected a flat vector of {self.dim} entries, got shape {tuple(v.shape)}")
        return v.to(device=self.device, dtype=self.dtype)

    def matvec(self, v: Vector) -> Vector:
        """``A v`` for a flat 1-D tensor ``v`` of ``dim`` entries (returns flat, dtype :attr:`dtype`)."""
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{type(self).__name__} takes a flat 1-D tensor, got {type(v).__name__}")
        out = self._matvec(self._check_flat(v))
        self.num_hvps += 1
        return out

    def __matmul__(self, v: Vector) -> Vector:
        return self.matvec(v)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim}, dtype={self.dtype}, device={self.device})"


class FunctionOperator(SymmetricOperator):
    """Wrap a function ``matvec_fn(v) -> A v`` on flat tensors as a :class:`SymmetricOperator`.

    The caller promises that ``A`` is symmetric; nothing checks it (the solver's residuals will be
    honest but its eigenvalues meaningless for a non-symmetric map). Used e.g. for ``PᵀP`` of a
    convolution, built from ``conv2d`` and its transpose.
    """

    def __init__(
        self,
        matvec_fn: Callable[[torch.Tensor], torch.Tensor],
        dim: int,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(dim, dtype, device)
        self._fn = matvec_fn

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        out = self._fn(v)
        if not isinstance(out, torch.Tensor) or out.numel() != self.dim:
            raise ValueError(f"matvec_fn must return a tensor of {self.dim} entries")
        return out.reshape(-1).to(dtype=self.dtype, device=self.device)


# --------------------------------------------------------------------------------------------------
# Input normalization
# --------------------------------------------------------------------------------------------------


class Batches(list):  # type: ignore[type-arg]
    """An explicit sequence of batches: ``Batches([x1, x2])`` is two batches even if each is a tensor.

    Only needed for batches that are bare tensors; see :func:`normalize_batches` for the rule.
    """


def normalize_batches(batches: Any) -> list[Any]:
    """The batching rule shared by every curvature function. Returns the list of batches.

    * a :class:`Batches` → a sequence of batches (always);
    * a ``list`` whose first element is a tensor → **one** collated batch (``[x, y]`` as a
      ``DataLoader``/Lightning yields it);
    * any other ``list`` → a sequence of batches (``[(x1, y1), (x2, y2)]``, ``[[x1, y1], ...]``,
      list of dicts);
    * anything else (tuple, dict, tensor, custom object) → one batch.
    """
    if batches is None:
        raise ValueError("batches is None: give one batch or a list of batches")
    if isinstance(batches, list):
        if len(batches) == 0:
            raise ValueError("batches is an empty list: give at least one batch")
        if isinstance(batches, Batches) or not isinstance(batches[0], torch.Tensor):
            return list(batches)
    return [batches]


def _first_tensor(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        for item in obj:
            t = _first_tensor(item)
            if t is not None:
                return t
    return None


def _batch_weight(batch: Any, index: int) -> float:
    t = _first_tensor(batch)
    if t is None or t.dim() == 0:
        raise ValueError(
            f"cannot infer the sample count of batch {index} (no tensor with a leading dimension found):"
            " pass weights=[...] explicitly"
        )
    if t.shape[0] == 0:
        raise ValueError(f"batch {index} is empty (its first tensor has leading dimension 0)")
    return float(t.shape[0])


def _resolve_params(
    model: nn.Module, params: Iterable[nn.Parameter | str] | None
) -> tuple[list[nn.Parameter], list[str]]:
    """``params`` -> (parameter objects, their dotted names in ``model``), in the given order."""
    named = list(model.named_parameters())
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
        if not chosen:
            raise ValueError("the model has no parameter with requires_grad=True")
        return [p for _, p in chosen], [n for n, _ in chosen]
    by_name = dict(named)
    by_id = {id(p): n for n, p in named}
    out: list[nn.Parameter] = []
    names: list[str] = []
    for item in params:
        if isinstance(item, str):
            if item not in by_name:
                raise ValueError(f"params: {item!r} is not a parameter name of the model")
            p, n = by_name[item], item
        elif isinstance(item, torch.Tensor):
            if id(item) not in by_id:
                raise ValueError(
                    f"params: a tensor of shape {tuple(item.shape)} is not a parameter of the model"
                )
            p, n = item, by_id[id(item)]
        else:
            raise TypeError(f"params must hold nn.Parameter objects or names, got {type(item).__name__}")
        if any(p is q for q in out):
            raise ValueError(f"params: parameter {n!r} given twice")
        out.append(p)  # type: ignore[arg-type]
        names.append(n)
    if not out:
        raise ValueError("params is empty: choose at least one parameter")
    return out, names


def _default_dtype(params: Sequence[torch.Tensor]) -> torch.dtype:
    # float32 or higher: bfloat16/float16 models are accumulated in float32.
    dt = torch.float32
    for p in params:
        if p.dtype == torch.float64:
            dt = torch.float64
    return dt


def _apply_reduce(reduce: ReduceFn | None, t: torch.Tensor) -> torch.Tensor:
    if reduce is None:
        return t
    out = reduce(t)
    return t if out is None else out


# --------------------------------------------------------------------------------------------------
# The Hessian
# --------------------------------------------------------------------------------------------------


class _ParamOperator(SymmetricOperator):
    """A :class:`SymmetricOperator` over a list of parameter tensors: also takes/returns lists."""

    params: list[nn.Parameter]
    param_names: list[str]

    def _setup_params(self, params: list[nn.Parameter], names: list[str]) -> None:
        self.params = params
        self.param_names = names
        self._shapes = [p.shape for p in params]
        self._sizes = [p.numel() for p in params]

    def flatten(self, vs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Concatenate tensors shaped like :attr:`params` into one flat vector (dtype :attr:`dtype`)."""
        if len(vs) != len(self.params):
            raise ValueError(f"expected a list of {len(self.params)} tensors, got {len(vs)}")
        for v, s in zip(vs, self._shapes):
            if v.shape != s:
                raise ValueError(f"expected a tensor of shape {tuple(s)}, got {tuple(v.shape)}")
        return torch.cat([v.reshape(-1).to(device=self.device, dtype=self.dtype) for v in vs])

    def unflatten(self, v: torch.Tensor) -> list[torch.Tensor]:
        """Split a flat vector into views shaped like :attr:`params`."""
        return [c.view(s) for c, s in zip(v.split(self._sizes), self._shapes)]

    def matvec(self, v: Vector) -> Vector:
        """``A v``: flat 1-D tensor in → flat out; list of tensors shaped like ``params`` in → list out."""
        if isinstance(v, torch.Tensor):
            out = self._matvec(self._check_flat(v))
            self.num_hvps += 1
            return out
        if isinstance(v, (list, tuple)):
            out = self._matvec(self.flatten(v))
            self.num_hvps += 1
            return self.unflatten(out)
        raise TypeError(f"expected a flat tensor or a list of tensors, got {type(v).__name__}")


class HessianOperator(_ParamOperator):
    """``v -> H v``, the Hessian of the sample-weighted mean loss over ``batches`` w.r.t. ``params``.

    With batches ``B_1..B_n`` of weights ``w_i`` (default: leading dimension of the first tensor found
    in the batch, searched recursively through tuples/lists/dicts) and mean losses ``L_i``, the
    operator is the Hessian of ``L = Σ w_i L_i / Σ w_i``.

    Args:
        model: the module whose parameters are differentiated.
        loss_fn: ``loss_fn(model, batch) -> scalar mean loss``. It may run the model however it likes
            (even through a replica that shares the parameter objects); it only has to read ``params``.
        batches: one batch or a ``list`` of batches (rule: :func:`normalize_batches`): a list of
            tuples/lists/dicts is a sequence of batches; a list starting with a tensor (``[x, y]``)
            is one batch; tuples, dicts, tensors are one batch; ``Batches([...])`` forces a
            sequence.
        params: ``None`` (every parameter with ``requires_grad``), or an iterable of parameters or of
            their names in ``model``; anything not in the model is a ``ValueError``.
        mode: ``"train"`` (BatchNorm uses batch statistics, running statistics untouched; dropout
            masks drawn once per batch from a private generator seeded by ``seed``) or ``"eval"``.
        weights: explicit per-batch weights (positive numbers), overriding the sample counts.
        reduce: all-reduce SUM over data-parallel ranks (returns the summed tensor or sums in
            place). Applied once to the total weight at construction and to the weighted sum of local
            HVPs in every product, so every rank gets the Hessian of the global weighted mean loss.
            A collective: every rank must make the same calls.
        dtype: accumulation/output dtype; default float64 for float64 models, else float32.
        backend: ``"autograd"`` (double backprop through a cached gradient graph: the default, the
            fastest measured) or ``"func"`` (``torch.func.jvp`` over ``torch.func.grad``; recomputes
            the forward per product; needs ``loss_fn`` to read the parameters through ``model``'s
            own attributes; fails for mean-reduced ``F.mse_loss`` and losses without forward-AD
            formulas in torch 2.13).
        cache_graphs: keep each batch's gradient graph for reuse by every product (autograd backend).
        max_cached_batches: cache at most this many graphs (the first ones); the rest are rebuilt
            on every product (memory cap: each cached graph holds the activations of one
            double-backward pass).
        seed: seed of the per-batch dropout generators (batch ``i`` uses ``seed + i``).

    The operator is side-effect free: parameters, ``.grad``, buffers, training and requires_grad
    flags and the global CPU/CUDA RNG states are exactly as before after construction and after
    every product.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: Any,
        params: Iterable[nn.Parameter | str] | None = None,
        mode: str = "train",
        weights: Sequence[float] | torch.Tensor | None = None,
        reduce: ReduceFn | None = None,
        dtype: torch.dtype | None = None,
        backend: str = "autograd",
        cache_graphs: bool = True,
        max_cached_batches: int | None = None,
        seed: int = 0,
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        if max_cached_batches is not None and max_cached_batches < 0:
            raise ValueError(f"max_cached_batches must be >= 0 or None, got {max_cached_batches}")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(model, batch)")
        plist, names = _resolve_params(model, params)
        acc = dtype if dtype is not None else _default_dtype(plist)
        if not acc.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {acc}")
        super().__init__(sum(p.numel() for p in plist), acc, plist[0].device)
        self._setup_params(plist, names)
        self.model = model
        self.loss_fn = loss_fn
        self.mode = mode
        self.backend = backend
        self.seed = int(seed)
        self.reduce = reduce
        self.batches = normalize_batches(batches)
        n = len(self.batches)
        if weights is None:
            w = [_batch_weight(b, i) for i, b in enumerate(self.batches)]
        else:
            w = [float(x) for x in (weights.tolist() if isinstance(weights, torch.Tensor) else weights)]
            if len(w) != n:
                raise ValueError(f"weights has {len(w)} entries for {n} batches")
            if any(not math.isfinite(x) or x <= 0 for x in w):
                raise ValueError(f"weights must be finite and positive, got {w}")
        self.weights = w
        local_total = torch.tensor(sum(w), dtype=torch.float64, device=self.device)
        self.total_weight = float(_apply_reduce(reduce, local_total).item())
        if not self.total_weight > 0:
            raise ValueError(f"the total sample weight must be positive, got {self.total_weight}")
        if backend == "func" or not cache_graphs:
            n_cached = 0
        else:
            n_cached = n if max_cached_batches is None else min(n, max_cached_batches)
        self.num_cached_batches = n_cached
        self._graphs: list[list[torch.Tensor | None]] = []
        grad_sum = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        loss_sum = 0.0
        # Build every batch's gradient once: validates the loss, gives .loss/.gradient() and, for the
        # first `n_cached` batches, keeps the create_graph=True gradient whose graph every HVP reuses.
        for i, batch in enumerate(self.batches):
            loss, grads = self._gradient_graph(i, batch, create_graph=i < n_cached)
            loss_sum += w[i] * float(loss.detach().double())
            flat = torch.cat(
                [
                    (g.detach() if g is not None else torch.zeros_like(p)).reshape(-1).double()
                    for g, p in zip(grads, self.params)
                ]
            )
            grad_sum += w[i] * flat
            if i < n_cached:
                self._graphs.append(grads)
        self._local_loss_sum = loss_sum
        self._local_grad_sum = grad_sum
        self._global_loss: float | None = None
        self._global_grad: torch.Tensor | None = None

    # -- construction helpers -------------------------------------------------------------------

    def _loss(self, i: int, batch: Any) -> torch.Tensor:
        loss = self.loss_fn(self.model, batch)
        if not isinstance(loss, torch.Tensor):
            raise ValueError(f"loss_fn must return a scalar tensor, got {type(loss).__name__} (batch {i})")
        if loss.numel() != 1:
            raise ValueError(
                f"loss_fn must return a scalar (mean) loss, got a tensor of shape {tuple(loss.shape)}"
                f" (batch {i})"
            )
        if not loss.requires_grad:
            raise ValueError(
                f"loss_fn returned a loss that does not require grad (batch {i}): it must be computed"
                " from the chosen parameters, outside torch.no_grad()/inference_mode"
            )
        if not torch.isfinite(loss.detach()).all():
            raise ValueError(f"loss_fn returned a non-finite loss ({float(loss.detach())}) for batch {i}")
        return loss.reshape(())

    def _gradient_graph(
        self, i: int, batch: Any, create_graph: bool
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        with (
            torch.enable_grad(),
            seeded_rng(self.seed + i, rng_devices(self.params)),
            isolated_forward(self.model, self.mode, self.params),
        ):
            loss = self._loss(i, batch)
            grads = torch.autograd.grad(loss, self.params, create_graph=create_graph, allow_unused=True)
        return loss, list(grads)

    # -- products ---------------------------------------------------------------------------------

    def _hvp_from_graph(
        self, grads: Sequence[torch.Tensor | None], vs: Sequence[torch.Tensor], idx: Sequence[int]
    ) -> list[torch.Tensor | None]:
        """Products of rows ``idx`` of one batch's Hessian with ``vs`` (tensors for params ``idx``)."""
        outs = [grads[j] for j in idx]
        live = [(o, v) for o, v in zip(outs, vs) if o is not None and o.requires_grad]
        if not live:  # loss linear in these parameters (or unused): zero block
            return [None] * len(idx)
        with torch.enable_grad(), requires_grad([self.params[j] for j in idx]):
            return list(
                torch.autograd.grad(
                    [o for o, _ in live],
                    [self.params[j] for j in idx],
                    grad_outputs=[v for _, v in live],
                    retain_graph=True,
                    allow_unused=True,
                )
            )

    def _hvp_func(
        self, i: int, batch: Any, vs: Sequence[torch.Tensor], idx: Sequence[int]
    ) -> list[torch.Tensor]:
        from torch.func import functional_call, grad, jvp

        names = [self.param_names[j] for j in idx]
        model, loss_fn = self.model, self.loss_fn

        class _Call(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.m = model

            def forward(self, b: Any) -> torch.Tensor:
                return loss_fn(self.m, b)

        wrapper = _Call()

        def f(*ps: torch.Tensor) -> torch.Tensor:
            return functional_call(wrapper, {"m." + n: p for n, p in zip(names, ps)}, (batch,)).reshape(())

        primals = tuple(self.params[j].detach() for j in idx)
        with (
            torch.enable_grad(),
            seeded_rng(self.seed + i, rng_devices(self.params)),
            isolated_forward(self.model, self.mode, []),
        ):
            try:
                _, out = jvp(grad(f, argnums=tuple(range(len(idx)))), primals, tuple(vs))
            except (RuntimeError, NotImplementedError) as err:
                raise RuntimeError(
                    f"backend='func' (torch.func jvp of grad) failed on this loss: {err}. Known torch"
                    " limitations: mean-reduced F.mse_loss, ops without forward-AD formulas. Use"
                    " backend='autograd' (the default)."
                ) from err
        return list(out)

    def _weighted_local(self, v: torch.Tensor, idx: Sequence[int]) -> torch.Tensor:
        """``Σ_i w_i H_i[idx, idx] v`` (flat over ``idx``), summed over the local batches only."""
        sizes = [self._sizes[j] for j in idx]
        vs = [c.view(self._shapes[j]).to(self.params[j].dtype) for c, j in zip(v.split(sizes), idx)]
        acc = torch.zeros(v.numel(), dtype=self.dtype, device=self.device)
        for i, batch in enumerate(self.batches):
            if self.backend == "func":
                hv: list[torch.Tensor | None] = list(self._hvp_func(i, batch, vs, idx))
            elif i < self.num_cached_batches:
                hv = self._hvp_from_graph(self._graphs[i], vs, idx)
            else:  # beyond the memory cap: rebuild this batch's graph (same seed → same dropout mask)
                _, grads = self._gradient_graph(i, batch, create_graph=True)
                hv = self._hvp_from_graph(grads, vs, idx)
                del grads
            parts = [
                (h if h is not None else torch.zeros(s, device=self.device)).reshape(-1).to(self.dtype)
                for h, s in zip(hv, sizes)
            ]
            acc.add_(torch.cat(parts), alpha=self.weights[i])
        return acc

    def _combine(self, local: torch.Tensor) -> torch.Tensor:
        return _apply_reduce(self.reduce, local) / self.total_weight

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self._combine(self._weighted_local(v, range(len(self.params))))

    # -- extras -----------------------------------------------------------------------------------

    @property
    def loss(self) -> float:
        """The (global, when ``reduce`` is given: a collective) weighted mean loss at construction."""
        if self._global_loss is None:
            t = torch.tensor(self._local_loss_sum, dtype=torch.float64, device=self.device)
            self._global_loss = float(_apply_reduce(self.reduce, t).item()) / self.total_weight
        return self._global_loss

    def gradient(self) -> torch.Tensor:
        """Flat gradient of the (global) weighted mean loss, float64, shape ``(dim,)``.

        Computed at construction from the same graphs (no extra pass). With ``reduce``, the first
        call is a collective.
        """
        if self._global_grad is None:
            self._global_grad = _apply_reduce(self.reduce, self._local_grad_sum.clone()) / self.total_weight
        return self._global_grad.clone()

    def restrict(self, params: Iterable[nn.Parameter | str]) -> HessianBlockOperator:
        """The diagonal block ``H[params, params]``, sharing this operator's cached graphs."""
        return HessianBlockOperator(self, params)

    def release(self) -> None:
        """Drop the cached gradient graphs (frees memory; later products rebuild them per call)."""
        self._graphs = []
        self.num_cached_batches = 0


class HessianBlockOperator(_ParamOperator):
    """The diagonal block of a :class:`HessianOperator` for a subset of its parameters.

    Products backpropagate only into the block's parameters through the parent's cached graphs,
    so a per-layer sweep costs one forward pass in total, not one per layer.
    """

    def __init__(self, parent: HessianOperator, params: Iterable[nn.Parameter | str]) -> None:
        items = list(params)
        if not items:
            raise ValueError("params is empty: choose at least one parameter of the block")
        idx: list[int] = []
        for item in items:
            if isinstance(item, str):
                if item not in parent.param_names:
                    raise ValueError(f"params: {item!r} is not a parameter of the parent operator")
                j = parent.param_names.index(item)
            else:
                hits = [k for k, p in enumerate(parent.params) if p is item]
                if not hits:
                    raise ValueError("params: a tensor is not a parameter of the parent operator")
                j = hits[0]
            if j in idx:
                raise ValueError(f"params: {parent.param_names[j]!r} given twice")
            idx.append(j)
        super().__init__(sum(parent._sizes[j] for j in idx), parent.dtype, parent.device)
        self._setup_params([parent.params[j] for j in idx], [parent.param_names[j] for j in idx])
        self.parent = parent
        self._idx = idx

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.parent._combine(self.parent._weighted_local(v, self._idx))


class DiagonalScaledOperator(SymmetricOperator):
    """``v -> S A S v`` with ``S = diag(scale)``: symmetric whenever ``A`` is."""

    def __init__(self, base: SymmetricOperator, scale: torch.Tensor) -> None:
        scale = scale.reshape(-1)
        if scale.numel() != base.dim:
            raise ValueError(f"scale has {scale.numel()} entries for an operator of dim {base.dim}")
        super().__init__(base.dim, base.dtype, base.device)
        self.base = base
        self.scale = scale.to(device=base.device, dtype=base.dtype)

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        out = self.base.matvec(self.scale * v)
        assert isinstance(out, torch.Tensor)
        return self.scale * out


class PreconditionedOperator(DiagonalScaledOperator):
    """``P^{-1/2} A P^{-1/2}`` for a positive diagonal preconditioner ``P`` (flat, ``dim`` entries).

    Its eigenvalues are those of ``P^{-1} A`` (similar matrices): the "preconditioned sharpness"
    of an adaptive optimizer whose update is ``-lr · P^{-1} · m``.
    """

    def __init__(self, base: SymmetricOperator, preconditioner: torch.Tensor) -> None:
        p = preconditioner.reshape(-1).to(torch.float64)
        if not bool((p > 0).all()) or not bool(torch.isfinite(p).all()):
            raise ValueError("the preconditioner must be finite and strictly positive")
        super().__init__(base, p.rsqrt())
        self.preconditioner = p
