"""Symmetric linear operators over model parameters: the Hessian of a loss, its diagonal blocks and
its diagonally preconditioned form, plus a wrapper for any user-supplied symmetric matvec.

Every operator maps a vector of ``dim`` numbers to a vector of ``dim`` numbers. Vectors are either
flat 1-D tensors or (for the Hessian family) lists of tensors shaped like the parameters. The
eigen-solver in :mod:`lightning_eos.curvature.lanczos` only needs :class:`SymmetricOperator`.

Torch only: no Lightning import.
"""

from __future__ import annotations

import contextlib
import math
import re
import sys
import types
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_eos.isolation import isolated_forward, requires_grad, rng_devices, seeded_rng

__all__ = [
    "Batches",
    "DiagonalScaledOperator",
    "FD_ACCURACY",
    "HVP_METHODS",
    "FunctionOperator",
    "HessianBlockOperator",
    "HessianOperator",
    "MissingSecondDerivativeError",
    "PreconditionedOperator",
    "SymmetricOperator",
    "Vector",
    "finite_difference_step",
    "math_attention",
    "normalize_batches",
    "second_order_forms",
]

#: A flat 1-D tensor, or a list of tensors shaped like the operator's parameters.
Vector = torch.Tensor | Sequence[torch.Tensor]
LossFn = Callable[[nn.Module, Any], torch.Tensor]
ReduceFn = Callable[[torch.Tensor], torch.Tensor | None]

_MODES = ("train", "eval")
_BACKENDS = ("autograd", "func")
#: The values of ``hvp=``: how a Hessian-vector product is computed (see :class:`HessianOperator`).
HVP_METHODS = ("exact", "finite_difference", "auto")


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
# Second-order plumbing: attention kernels, missing double backwards, finite differences
# --------------------------------------------------------------------------------------------------


def math_attention() -> contextlib.AbstractContextManager[None]:
    """Force the math kernel of ``F.scaled_dot_product_attention`` for the block.

    The fused kernels (flash attention on CPU and CUDA, memory-efficient attention on CUDA) have a
    backward without a derivative of its own (on CPU: "derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented"); the math kernel
    is written in differentiable ops and has a double backward on every device. Same function,
    different rounding (float32: ~1e-7 relative).
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3 has no kernel choice
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def _affine_applies(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> bool:
    """Whether ``bn(x)`` is batch-statistics normalization that the affine form reproduces exactly.

    Train mode without running-stat tracking (what :func:`~lightning_eos.isolation.isolated_forward`
    sets for ``mode="train"``: ``F.batch_norm`` then gets no running buffers, so nothing is updated);
    a plain floating tensor whose dtype the parameters share (a mixed-dtype or autocast call keeps
    the native kernel, whose output dtype and accumulation differ from ``x * a + c``); not empty; no
    ``__torch_function__`` override (a tensor subclass or an active ``TorchFunctionMode`` is promised
    ``F.batch_norm``, which it may handle its own way).
    """
    if not bn.training or bn.track_running_stats:
        return False
    if not x.is_floating_point() or x.numel() == 0 or torch.overrides.has_torch_function_unary(x):
        return False
    if torch.is_autocast_enabled(x.device.type):
        return False
    return all(t is None or t.dtype == x.dtype for t in (bn.weight, bn.bias))


def _affine_bn_forward(self: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Train-mode batch normalization as the per-channel affine map ``y = x·a + c``.

    ``var, mean`` are the biased (``correction=0``) statistics over every dimension but the channel
    dimension 1, ``a = weight·rsqrt(var + eps)`` and ``c = bias − mean·a`` (``weight``/``bias`` absent
    with ``affine=False``: ``a = rsqrt(var + eps)``, ``c = −mean·a``). The same function as
    ``F.batch_norm(x, None, None, weight, bias, training=True, eps=eps)``, rounded differently
    (measured on the cnn-bn benchmark: float64 products 2e-14 relative apart; float32 ones both
    2.5e-6 from the float64 product). Why: its double backward is that of a few elementwise ops and
    one reduction to per-channel tensors, cheaper than the native kernel's ``batch_norm_backward``
    double backward (measured: ``docs/curvature.md``). Anything :func:`_affine_applies` rejects runs
    the class's own ``forward``.
    """
    if not _affine_applies(self, x):
        return type(self).forward(self, x)
    self._check_input_dim(x)  # the class's own rank check and message
    if x.numel() // x.shape[1] == 1:  # the native kernel refuses one value per channel: so do we
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.shape}")
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    var, mean = torch.var_mean(x, dims, correction=0, keepdim=True)
    scale = torch.rsqrt(var + self.eps)
    if self.weight is not None:
        scale = scale * self.weight.view(shape)
    shift = -mean * scale if self.bias is None else self.bias.view(shape) - mean * scale
    return torch.addcmul(shift, x, scale)


def _masked_relu_forward(self: nn.ReLU, x: torch.Tensor) -> torch.Tensor:
    """ReLU as ``x · m`` with the constant mask ``m = (x > 0)`` (in place for ``inplace=True``).

    Same values as ``F.relu`` (bitwise for finite inputs, NaN kept), same first derivative ``m`` and
    second derivative 0. Why: the native ReLU backward ``threshold_backward(g, y)`` has a double
    backward that materializes a zero tensor of the activation's size (and adds it) for the derivative
    in ``y``; a product by a constant mask has none (a product 1–6 % faster on the cnn and cnn-bn
    benchmark models in paired runs, bitwise the same result; measured: ``docs/curvature.md``). Inputs
    the mask would get wrong keep the class's ``forward``: ``−inf`` (``−inf · 0`` is NaN),
    non-floating or empty tensors, and tensors with a ``__torch_function__`` override (a subclass or
    an active ``TorchFunctionMode`` is promised ``F.relu``).
    """
    if (
        not x.is_floating_point()
        or x.numel() == 0
        or torch.overrides.has_torch_function_unary(x)
        or bool(torch.isneginf(x).any())
    ):
        return type(self).forward(self, x)
    mask = (x > 0).to(x.dtype)
    return x.mul_(mask) if self.inplace else x * mask


#: Module classes whose forward :func:`second_order_forms` replaces, with the replacement: exactly
#: these types (a subclass may override ``forward``; ``SyncBatchNorm`` reduces across ranks).
_SECOND_ORDER_FORMS: dict[type[nn.Module], Callable[..., torch.Tensor]] = {
    nn.BatchNorm1d: _affine_bn_forward,
    nn.BatchNorm2d: _affine_bn_forward,
    nn.BatchNorm3d: _affine_bn_forward,
    nn.ReLU: _masked_relu_forward,
}


@contextlib.contextmanager
def second_order_forms(model: nn.Module) -> Iterator[None]:
    """Within the block, ``model``'s BatchNorm and ReLU layers compute forms that are cheaper to
    differentiate twice: train-mode BatchNorm as the affine map of :func:`_affine_bn_forward`, ReLU
    as the masked product of :func:`_masked_relu_forward`.

    Used only while a gradient graph that will be differentiated again is recorded (the cached
    graph of :class:`HessianOperator`): one product through it costs about 0.5 gradients less on
    a CNN with BatchNorm (2.86 → 2.37 on cnn-bn) and 1–6 % less again with ReLU (measured:
    ``docs/curvature.md``). Each function, its first and second derivatives are those of the
    native kernel up to rounding (ReLU: bitwise).

    Which layers: submodules whose type is exactly ``nn.BatchNorm1d``/``2d``/``3d`` or ``nn.ReLU``
    and whose ``forward`` is the class's own (none set on the instance). ``SyncBatchNorm``,
    subclasses, parametrized layers, other normalizations and activations, and ``F.relu`` called
    in a ``forward`` keep their code. Per call, BatchNorm runs the class's ``forward`` unless the
    layer is in train mode *without* running-stat tracking (the
    state :func:`~lightning_eos.isolation.isolated_forward` sets for ``mode="train"``), so eval mode
    and every path that would update ``running_mean``/``running_var``/``num_batches_tracked`` are the
    native ones, as are mixed-dtype, autocast, ``__torch_function__`` (tensor subclass, active
    ``TorchFunctionMode``) and empty inputs. If ``model``
    contains a ``torch.compile``'d submodule nothing is replaced (an instance attribute would only
    invalidate its guards; such a graph has no double backward anyway).

    The replacement is an instance attribute ``forward``, removed on exit (also on an exception),
    so ``module.forward`` resolves to the class's method again. Observable differences inside the
    block: the module's ``__call__`` still runs, so forward pre-hooks, forward hooks, global module
    hooks and full backward hooks fire as before, with the same inputs and (up to rounding) outputs;
    but the output's ``grad_fn`` is an ``AddcmulBackward0`` instead of
    ``NativeBatchNormBackward0`` (ReLU: ``MulBackward0`` instead of ``ReluBackward0``), and a
    ``TorchDispatchMode`` sees ``var_mean``, ``rsqrt``, ``mul``, ``sub``, ``addcmul`` instead of
    ``native_batch_norm`` (ReLU: ``isneginf``, ``any``, ``gt``, ``_to_copy``, ``mul`` instead of
    ``relu``). A forward set on the instance inside the
    block (by the loss) is the caller's and is left in place.
    """
    # Only look for compiled modules if dynamo was loaded (it is imported by torch.compile).
    compiled_type = getattr(sys.modules.get("torch._dynamo.eval_frame"), "OptimizedModule", None)
    modules = list(model.modules())
    if compiled_type is not None and any(isinstance(m, compiled_type) for m in modules):
        yield
        return
    patched = [m for m in modules if type(m) in _SECOND_ORDER_FORMS and "forward" not in vars(m)]
    methods: list[types.MethodType] = []
    try:
        for m in patched:
            # an instance attribute shadows the class's method for this module only
            methods.append(types.MethodType(_SECOND_ORDER_FORMS[type(m)], m))
            object.__setattr__(m, "forward", methods[-1])
        yield
    finally:
        for m, method in zip(patched, methods):
            if vars(m).get("forward") is method:
                del vars(m)["forward"]


#: Phrases of the errors torch raises when an op or ``autograd.Function`` has no derivative of its
#: backward (reverse) or no forward-mode formula (``backend="func"``). Matched case-insensitively.
_MISSING_DERIVATIVE = re.compile(
    r"derivative for .* is not implemented|not implemented|not currently support double backward"
    r"|differentiate twice|once_differentiable|forward ad|does not support it",
    re.IGNORECASE,
)


def _is_missing_derivative(err: BaseException) -> bool:
    """Whether ``err`` (or the error it was raised from) says a second derivative is unavailable."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, NotImplementedError):
            return True
        if isinstance(seen, RuntimeError) and _MISSING_DERIVATIVE.search(str(seen)):
            return True
        seen = seen.__cause__
    return False


class MissingSecondDerivativeError(RuntimeError):
    """The loss has no double backward (``hvp="exact"``): use ``hvp="finite_difference"``/``"auto"``."""


def _dead_end_nodes(outputs: Sequence[torch.Tensor | None]) -> list[str]:
    """Names of the ``torch::autograd::Error`` nodes in the graph of ``outputs``.

    A backward marked ``@once_differentiable`` (and some C++ backwards) returns its gradients through
    such a node. It has no edge into the graph, so ``torch.autograd.grad(outputs, params)`` prunes it
    and *silently drops* that part of the Hessian instead of raising: it is found here, once per graph.
    """
    stack = [t.grad_fn for t in outputs if t is not None and t.grad_fn is not None]
    seen: set[int] = set()
    found: list[str] = []
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if type(node).__name__ == "Error":
            found.append(node.name())
        stack.extend(nxt for nxt, _ in node.next_functions)
    return found


#: Central-difference step ``h·‖v‖ = FD_STEP_FACTOR · cbrt(eps) · (1 + ‖θ‖)`` (see
#: :func:`finite_difference_step`). Measured (``benchmarks/bench_hvp.py --part fd``, table in
#: ``docs/curvature.md``): along random directions the error is lowest at factors 0.3–1, but along the
#: top eigenvector (where a Lanczos basis ends up) the third derivative is far larger and the error at
#: factor 1 is 10–300× worse; 0.1 gives the lowest worst case on every model and dtype measured.
FD_STEP_FACTOR = 0.1

#: Worst relative error ``‖Hv_fd − Hv‖ / ‖Hv‖`` of one finite-difference product at the default step,
#: measured on the digits MLP (tanh) and a SiLU CNN (``docs/curvature.md``: ≤ 8.6e-10 in float64,
#: ≤ 4.2e-4 in float32), rounded up; quoted in the fallback warning. Losses that are only piecewise
#: smooth (ReLU, max-pooling) are much worse: the gradient jumps where a unit changes sign.
FD_ACCURACY = {torch.float64: 1e-9, torch.float32: 5e-4}


def fd_accuracy(dtype: torch.dtype) -> float:
    """Expected relative error of one finite-difference product in a ``dtype`` model (smooth loss).

    Measured for float64/float32 (:data:`FD_ACCURACY`); other dtypes extrapolate the float32 value
    with the ``eps^(2/3)`` law of :func:`finite_difference_step` (float16 0.2, bfloat16 0.8: useless).
    """
    if dtype in FD_ACCURACY:
        return FD_ACCURACY[dtype]
    ratio = torch.finfo(dtype).eps / torch.finfo(torch.float32).eps
    return min(1.0, FD_ACCURACY[torch.float32] * ratio ** (2 / 3))


def finite_difference_step(theta_norm: float, v_norm: float, dtype: torch.dtype) -> float:
    """Step ``h`` of the central difference ``(g(θ+hv) − g(θ−hv)) / 2h`` (units: 1/units of ``v``).

    The error of the difference is ``(h‖v‖)²·τ/6`` (truncation; ``τ`` = relative change of the
    Hessian per unit step length along ``v``) plus ``eps·(‖θ‖ + γ)/(h‖v‖)`` (rounding: ``θ ± hv`` is
    stored in ``dtype``, so the realized step is off by ``eps·|θ|``, and each gradient carries
    rounding noise ``γ`` in the same units). If the loss changes on the scale of the parameters
    themselves (``τ ~ 1/(1+‖θ‖)``: a network keeps its form under a relative change of its weights),
    the two balance at a step *length* ``h‖v‖ ∝ cbrt(eps)·(1 + ‖θ‖)`` with an error ``O(eps^(2/3))``
    (4e-11 relative in float64, 2e-5 in float32). The constant, :data:`FD_STEP_FACTOR` = 0.1, is
    measured: along high-curvature directions ``τ`` is ~100× larger than that estimate. For a
    delocalized ``v`` each coordinate then moves by ``0.1·cbrt(eps)`` relative (6e-7 in float64,
    5e-4 in float32). ``theta_norm``/``v_norm``: Euclidean norms of the perturbed parameters and of ``v``.
    """
    eps = torch.finfo(dtype).eps
    return FD_STEP_FACTOR * eps ** (1 / 3) * (1.0 + theta_norm) / v_norm


class _LossCall(nn.Module):
    """``loss_fn(model, batch)`` as a module with ``model`` as child ``m``, for ``functional_call``."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.m = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.m, batch)


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


class _Graph:
    """One batch's cached ``create_graph=True`` gradient, ready for products.

    ``grads[j]``: ``∂L_i/∂θ_j`` with its graph (``None`` if ``θ_j`` is unused); ``live[j]``: whether it
    depends on the parameters (else that Hessian row block is zero). ``flat``: the live gradients
    concatenated into one graph output, so a product of the full operator is a single
    ``torch.autograd.grad`` call with one output and the flat ``v`` as its (uncopied) seed;
    ``None`` when the live gradients do not share one dtype.
    """

    def __init__(self, grads: list[torch.Tensor | None]) -> None:
        self.grads = grads
        self.live = [g is not None and g.requires_grad for g in grads]
        live = [g for g, ok in zip(grads, self.live) if ok]
        dtypes = {g.dtype for g in live if g is not None}
        self.flat = (
            torch.cat([g.reshape(-1) for g in live if g is not None]) if live and len(dtypes) == 1 else None
        )
        self.all_live = all(self.live)


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
        hvp: how a product is computed. ``"exact"``: second derivatives through ``backend``; a loss
            without a double backward (an op without a derivative of its backward, an
            ``autograd.Function`` whose backward is ``@once_differentiable``, a ``torch.compile``'d
            module) raises :class:`MissingSecondDerivativeError`. ``"finite_difference"``: central
            differences of first-order gradients, ``(g(θ+hv) − g(θ−hv)) / 2h`` with ``θ ± hv``
            swapped in through ``torch.func.functional_call`` (the real parameters are never
            written), 2 gradients per batch and product, relative error ≤ 1e-9 (float64) / ≤ 5e-4
            (float32) for smooth losses (:data:`FD_ACCURACY`; ReLU/max-pool kinks: far worse); needs
            ``loss_fn`` to read the parameters through ``model``'s attributes. ``"auto"`` (default):
            exact, and on a missing second derivative (found at construction or raised by a product)
            finite differences from then on, with one ``RuntimeWarning`` stating the expected
            accuracy. Where the exact product works, ``"auto"`` *is* ``"exact"`` (same code, same
            numbers). :attr:`hvp_method` says which one is in use.

    ``F.scaled_dot_product_attention`` runs on its math kernel while a double-backward graph is built
    (:func:`math_attention`): the fused kernels have no second derivative.

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
        hvp: str = "auto",
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        if hvp not in HVP_METHODS:
            raise ValueError(f"hvp must be one of {HVP_METHODS}, got {hvp!r}")
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
        self.hvp = hvp
        #: The product in use: ``"exact"`` or ``"finite_difference"`` (``"auto"`` may switch once).
        self.hvp_method = "finite_difference" if hvp == "finite_difference" else "exact"
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
        if backend == "func" or not cache_graphs or self.hvp_method == "finite_difference":
            n_cached = 0
        else:
            n_cached = n if max_cached_batches is None else min(n, max_cached_batches)
        self.num_cached_batches = n_cached
        self._graphs: list[_Graph] = []
        self._used: list[list[bool]] = []  # per batch: which parameters the loss reads
        self._fd_call: _LossCall | None = None
        grad_sum = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        loss_sum = 0.0
        # Build every batch's gradient once: validates the loss, gives .loss/.gradient() and, for the
        # first `n_cached` batches, keeps the create_graph=True gradient whose graph every HVP reuses.
        # Batch 0's graph is built even when nothing is cached, to check it for missing derivatives.
        for i, batch in enumerate(self.batches):
            second = self.hvp_method == "exact" and backend == "autograd" and (i < n_cached or i == 0)
            loss, grads = self._checked_gradient(i, batch, create_graph=second)
            loss_sum += w[i] * float(loss.detach().double())
            flat = torch.cat(
                [
                    (g.detach() if g is not None else torch.zeros_like(p)).reshape(-1).double()
                    for g, p in zip(grads, self.params)
                ]
            )
            grad_sum += w[i] * flat
            self._used.append([g is not None for g in grads])
            if i < self.num_cached_batches:
                self._graphs.append(_Graph(grads))
            del grads
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
        # Only a graph that is differentiated again gets the math attention kernel and the second-order
        # forms of BatchNorm and ReLU (inside isolated_forward, which sets the train-mode state the
        # BatchNorm form checks): for a first-order gradient the native kernels are the cheaper ones.
        attention = math_attention() if create_graph else contextlib.nullcontext()
        forms = second_order_forms(self.model) if create_graph else contextlib.nullcontext()
        with (
            torch.enable_grad(),
            seeded_rng(self.seed + i, rng_devices(self.params)),
            isolated_forward(self.model, self.mode, self.params),
            attention,
            forms,
        ):
            loss = self._loss(i, batch)
            grads = torch.autograd.grad(loss, self.params, create_graph=create_graph, allow_unused=True)
        return loss, list(grads)

    def _checked_gradient(
        self, i: int, batch: Any, create_graph: bool
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """:meth:`_gradient_graph` at construction; a missing second derivative is dealt with here."""
        if not create_graph:
            return self._gradient_graph(i, batch, create_graph=False)
        try:
            loss, grads = self._gradient_graph(i, batch, create_graph=True)
        except (RuntimeError, NotImplementedError) as err:  # e.g. torch.compile's AOTAutograd
            if not _is_missing_derivative(err):
                raise
            self._no_second_derivative(str(err).splitlines()[0] if str(err) else type(err).__name__, err)
            return self._gradient_graph(i, batch, create_graph=False)
        dead = _dead_end_nodes(grads)
        if dead:
            self._no_second_derivative(
                f"its gradient graph holds {len(dead)} node(s) that raise when differentiated"
                " (an autograd.Function whose backward is @once_differentiable, or a C++ backward"
                " without a derivative); torch.autograd.grad would silently drop that part of the Hessian",
                None,
            )
            return loss, [None if g is None else g.detach() for g in grads]
        return loss, grads

    def _no_second_derivative(self, why: str, err: BaseException | None) -> None:
        """``hvp="exact"``: raise; ``"auto"``: switch to finite differences with one warning."""
        if self.hvp == "exact":
            raise MissingSecondDerivativeError(
                f"the loss has no second derivative through backend={self.backend!r}: {why}. Pass"
                " hvp='finite_difference' (central differences of gradients, relative error about"
                f" {fd_accuracy(self.params[0].dtype):.0e} in {self.params[0].dtype}) or hvp='auto'."
            ) from err
        self.hvp_method = "finite_difference"
        self._graphs = []
        self.num_cached_batches = 0
        warnings.warn(
            f"lightning-eos: the loss has no second derivative ({why}). Hessian-vector products fall"
            " back to central finite differences of first-order gradients (2 gradients per batch and"
            f" product): expect a relative error of about {fd_accuracy(self.params[0].dtype):.0e} per"
            f" product in {self.params[0].dtype} (measured, docs/curvature.md), so eigenvalues are no"
            " more accurate than that. Pass hvp='finite_difference' to accept this silently or"
            " hvp='exact' to make it an error.",
            RuntimeWarning,
            stacklevel=2,
        )

    # -- products ---------------------------------------------------------------------------------

    def _hvp_from_graph(self, graph: _Graph, v: torch.Tensor, idx: Sequence[int]) -> torch.Tensor:
        """``H_i[idx, idx] v`` (flat over ``idx``, dtype :attr:`dtype`) from one batch's cached graph."""
        inputs = [self.params[j] for j in idx]
        full = len(idx) == len(self.params) and all(a == b for a, b in enumerate(idx))
        if full and graph.flat is not None:
            # One output, one seed: v itself when every row block is live (no split, no copy).
            seed = (
                v
                if graph.all_live
                else torch.cat([c for c, ok in zip(v.split(self._sizes), graph.live) if ok])
            )
            outs, seeds = [graph.flat], [seed.to(graph.flat.dtype)]
        else:
            chunks = v.split([self._sizes[j] for j in idx])
            pairs = [(graph.grads[j], c) for j, c in zip(idx, chunks) if graph.live[j]]
            outs = [g for g, _ in pairs]  # type: ignore[misc]
            seeds = [c.view(g.shape).to(g.dtype) for g, c in pairs]  # type: ignore[union-attr]
        if not outs:  # the loss is linear in these parameters (or does not use them): zero block
            return torch.zeros(v.numel(), dtype=self.dtype, device=self.device)
        try:
            with torch.enable_grad(), requires_grad(inputs):
                hv = torch.autograd.grad(
                    outs, inputs, grad_outputs=seeds, retain_graph=True, allow_unused=True
                )
        except (RuntimeError, NotImplementedError) as err:
            if _is_missing_derivative(err):
                raise _SecondDerivativeFailed(err) from err
            raise
        return self._assemble(hv, idx)

    def _assemble(self, hv: Sequence[torch.Tensor | None], idx: Sequence[int]) -> torch.Tensor:
        """Concatenate per-parameter results (``None`` = zero) into one flat vector of dtype :attr:`dtype`."""
        parts = [
            h.reshape(-1)
            if h is not None
            else torch.zeros(self._sizes[j], device=self.device, dtype=self.dtype)
            for h, j in zip(hv, idx)
        ]
        return torch.cat(parts).to(self.dtype)  # always a fresh tensor: callers update it in place

    def _hvp_func(self, i: int, batch: Any, v: torch.Tensor, idx: Sequence[int]) -> torch.Tensor:
        from torch.func import functional_call, grad, jvp

        names = ["m." + self.param_names[j] for j in idx]
        wrapper = _LossCall(self.model, self.loss_fn)

        def f(*ps: torch.Tensor) -> torch.Tensor:
            return functional_call(wrapper, dict(zip(names, ps)), (batch,)).reshape(())

        primals = tuple(self.params[j].detach() for j in idx)
        vs = tuple(
            c.view(self._shapes[j]).to(self.params[j].dtype)
            for c, j in zip(v.split([self._sizes[j] for j in idx]), idx)
        )
        with (
            torch.enable_grad(),
            seeded_rng(self.seed + i, rng_devices(self.params)),
            isolated_forward(self.model, self.mode, []),
            math_attention(),
        ):
            try:
                _, out = jvp(grad(f, argnums=tuple(range(len(idx)))), primals, vs)
            except (RuntimeError, NotImplementedError) as err:
                if _is_missing_derivative(err) and self.hvp == "auto":
                    raise _SecondDerivativeFailed(err) from err
                raise RuntimeError(
                    f"backend='func' (torch.func jvp of grad) failed on this loss: {err}. Known torch"
                    " limitations: mean-reduced F.mse_loss, ops without forward-AD formulas. Use"
                    " backend='autograd' (the default), or hvp='finite_difference' for ops without any"
                    " second derivative."
                ) from err
        return self._assemble(list(out), idx)

    # finite differences

    def _swapped_gradient(
        self, i: int, batch: Any, idx: Sequence[int], values: Sequence[torch.Tensor]
    ) -> list[torch.Tensor]:
        """``∂L_i/∂θ_idx`` at ``θ_idx = values`` (others unchanged), through ``functional_call``."""
        from torch.func import functional_call

        if self._fd_call is None:
            self._fd_call = _LossCall(self.model, self.loss_fn)
        leaves = [t.detach().requires_grad_(True) for t in values]
        names = ["m." + self.param_names[j] for j in idx]
        with (
            torch.enable_grad(),
            seeded_rng(self.seed + i, rng_devices(self.params)),  # the masks of the exact product
            isolated_forward(self.model, self.mode, []),
        ):
            loss = functional_call(self._fd_call, dict(zip(names, leaves)), (batch,))
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
                loss = None
            grads = (
                [None] * len(leaves)
                if loss is None
                else torch.autograd.grad(loss.reshape(()), leaves, allow_unused=True)
            )
        missing = [self.param_names[j] for j, g in zip(idx, grads) if g is None and self._used[i][j]]
        if loss is None or missing:
            raise RuntimeError(
                "hvp='finite_difference' evaluates loss_fn(model, batch) with the parameters swapped in"
                " through torch.func.functional_call on `model`, but the loss did not read"
                f" {missing or 'them'} (batch {i}): loss_fn must read the parameters through `model`'s own"
                " attributes, not through another module sharing the Parameter objects."
            )
        return [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, values)]

    def _hvp_fd(self, i: int, batch: Any, v: torch.Tensor, idx: Sequence[int]) -> torch.Tensor:
        """``(g(θ+hv) − g(θ−hv)) / 2h`` over ``idx`` (flat, dtype :attr:`dtype`): two gradients."""
        v_norm = float(v.double().norm())
        if not math.isfinite(v_norm):
            return torch.full_like(v, math.nan)
        if v_norm == 0.0:
            return torch.zeros_like(v)
        theta = [self.params[j].detach() for j in idx]
        theta_norm = math.sqrt(sum(float(t.double().pow(2).sum()) for t in theta))
        h = finite_difference_step(theta_norm, v_norm, _default_fd_dtype(theta))
        vs = [
            c.view(self._shapes[j]).to(self.params[j].dtype)
            for c, j in zip(v.split([self._sizes[j] for j in idx]), idx)
        ]
        plus = self._swapped_gradient(i, batch, idx, [t + h * d for t, d in zip(theta, vs)])
        minus = self._swapped_gradient(i, batch, idx, [t - h * d for t, d in zip(theta, vs)])
        diff = [(p.to(self.dtype) - m.to(self.dtype)) for p, m in zip(plus, minus)]
        return self._assemble(diff, idx).div_(2.0 * h)

    # combination

    def _batch_product(self, i: int, batch: Any, v: torch.Tensor, idx: Sequence[int]) -> torch.Tensor:
        if self.hvp_method == "finite_difference":
            return self._hvp_fd(i, batch, v, idx)
        if self.backend == "func":
            return self._hvp_func(i, batch, v, idx)
        if i < self.num_cached_batches:
            return self._hvp_from_graph(self._graphs[i], v, idx)
        # beyond the memory cap: rebuild this batch's graph (same seed → same dropout mask)
        try:
            _, grads = self._gradient_graph(i, batch, create_graph=True)
        except (RuntimeError, NotImplementedError) as err:
            if _is_missing_derivative(err):
                raise _SecondDerivativeFailed(err) from err
            raise
        return self._hvp_from_graph(_Graph(grads), v, idx)

    def _weighted_local_with(self, v: torch.Tensor, idx: Sequence[int]) -> torch.Tensor:
        acc: torch.Tensor | None = None
        for i, batch in enumerate(self.batches):
            hv = self._batch_product(i, batch, v, idx)
            if acc is None:
                acc = hv if self.weights[i] == 1.0 else hv.mul_(self.weights[i])
            else:
                acc.add_(hv, alpha=self.weights[i])
        assert acc is not None
        return acc

    def _weighted_local(self, v: torch.Tensor, idx: Sequence[int]) -> torch.Tensor:
        """``Σ_i w_i H_i[idx, idx] v`` (flat over ``idx``), summed over the local batches only."""
        if self.hvp_method == "finite_difference":
            return self._weighted_local_with(v, idx)
        try:
            return self._weighted_local_with(v, idx)
        except _SecondDerivativeFailed as failure:
            err = failure.__cause__ or failure
            self._no_second_derivative(str(err).splitlines()[0] if str(err) else type(err).__name__, err)
        return self._weighted_local_with(v, idx)  # finite differences from now on

    def _combine(self, local: torch.Tensor) -> torch.Tensor:
        return _apply_reduce(self.reduce, local).div_(self.total_weight)

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


class _SecondDerivativeFailed(Exception):
    """Internal: an exact product hit a missing second derivative (the cause holds torch's error)."""


def _default_fd_dtype(theta: Sequence[torch.Tensor]) -> torch.dtype:
    """The working precision of a finite difference: the lowest-precision parameter dtype."""
    return max((t.dtype for t in theta), key=lambda d: torch.finfo(d).eps)


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
