"""Learning rates adapted locally in space (layers) and time (steps): the controller's logic.

The paper's remedy for training at the edge of stability is a learning rate that is local: each
layer gets the step size its own curvature allows, re-estimated as training moves. This module
holds that controller, torch only (the Lightning adapter is
:class:`lightning_eos.callbacks.AdaptiveLocalLR`).

**Signal.** On each refresh the diagonal Hessian block ``H_ll`` of every layer ``l``
(:mod:`lightning_eos.layers`) gives its block sharpness ``λ_l`` -- for the Adam family the block
of ``P^{-1/2}(H + A)P^{-1/2}`` with ``P`` the optimizer's preconditioner and ``A`` its coupled weight
decay -- warm-started from the previous refresh's eigenvector. The upper estimate ``θ + residual``
of the solver's Ritz pair is used, so an inexact solve errs on the stable side. ``bounds.max_stable_lr`` turns
it into the layer's largest stable LR ``η*_l``.

**Multipliers.** With user LR ``η_g`` for param group ``g`` the layer's multiplier is

    u_l = min(ceiling, safety · min_g η*_l(g) / η_g) · twin_l,   ceiling = 1 ("cap"), max_multiplier ("fill")

recomputed on *every* step from the stored curvature and the live ``param_groups`` (so a warm-up or
decay schedule moves the multipliers at once, the effective LR ``s_l·η_g`` stays at the cap).

**Coupled check.** Per-layer caps do not make the coupled system stable. With
``D = diag(η_p / c_p)`` (per parameter: effective LR over the optimizer's dimensionless constant
``c``, e.g. ``2`` for GD, ``2 + 2μ`` heavy ball, ``(2 + 2β1)/(1 − β1)`` Adam, read from
:mod:`lightning_eos.bounds`) the linearized step is stable iff

    ρ = λ_max(D^{1/2} Q (H + A) Q D^{1/2}) ≤ 1        (Q = P^{-1/2}, or I for the SGD family)

On each refresh one solve on that operator gives ``ρ_ref``; when ``ρ > safety`` every multiplier is
scaled by ``safety/ρ``. Between refreshes ``ρ`` is bounded without products: if every entry of
``D`` grew at most by a factor ``r`` since the refresh, ``ρ ≤ r·ρ_ref`` (for ``ρ_ref > 0``).
Exact for SGD (any momentum, coupled decay) and Adam/RMSprop with coupled decay; for decoupled decay
(AdamW) the constant depends on the LR and the rescaling is slightly conservative.

**Time.** The curvature used is smoothed and rate limited: an increase of ``λ_l`` (a lower bound)
is applied at once; a decrease is an exponential average (``smoothing``) and at most a factor
``max_change`` per refresh, so a bound rises by at most about ``max_change`` per refresh.

**Applying them.** :class:`LayerUpdateScaler` scales each layer's *update* inside the optimizer step
(torch ``register_step_pre_hook`` snapshots, ``register_step_post_hook`` sets
``p ← p_old + s_l·(p_new − p_old)``); ``param_groups`` are never edited, so every scheduler,
``LearningRateMonitor`` and checkpoint sees the user's LRs. This equals a per-layer LR ``s_l·η``
exactly (up to rounding) for optimizers whose update is ``η × (something independent of η)``: SGD
(momentum, Nesterov, dampening and coupled decay: torch's momentum buffer does not contain ``η``),
Adam/AdamW (decoupled decay ``∝ η`` too), RMSprop, Adagrad with ``lr_decay=0``, Adamax, NAdam,
RAdam, Adadelta. Others are refused (:func:`check_linear_update`). A layer whose multiplier is
exactly 1 is not touched at all: with every multiplier 1 a run is bitwise the run without it.

Torch only: no Lightning import.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from lightning_eos import bounds
from lightning_eos.curvature.lanczos import eigsh
from lightning_eos.curvature.operator import (
    DiagonalScaledOperator,
    HessianOperator,
    SymmetricOperator,
)
from lightning_eos.layers import layer_of_parameters
from lightning_eos.layers import layers as layers_of
from lightning_eos.records import Record

__all__ = [
    "GLOBAL_LAYER",
    "RISE_WINDOW",
    "LayerUpdateScaler",
    "LocalLRController",
    "LocalLRRecord",
    "Plan",
    "RefreshSchedule",
    "check_linear_update",
    "controlled_layers",
    "coupled_operator",
]

#: Layer name of the single multiplier of ``layers="global"`` (one multiplier for all parameters).
GLOBAL_LAYER = "(global)"

#: Relative slack of the coupled check: ``ρ ≤ safety·(1 + deadband)`` counts as on target. Without
#: it a block-diagonal problem, whose ρ equals the largest capped block ratio (= safety) up to the
#: solver's error, would rescale every layer by 0.9999.
COUPLED_DEADBAND = 1e-2

#: Refreshes a curvature rise is measured against (the largest of the last this many measurements).
RISE_WINDOW = 4

#: Smallest twin factor (a layer cut on every refresh stops at this fraction of its curvature value).
TWIN_FLOOR = 1e-3

Mode = Literal["cap", "fill"]
LayersSpec = Literal["module", "parameter", "global"] | Mapping[str, str]

# ---------------------------------------------------------------------------------------------------
# Which optimizers a scaled update represents exactly
# ---------------------------------------------------------------------------------------------------

#: Update = lr × (lr-independent direction): scaling the update is scaling the layer's lr.
_LINEAR_UPDATE: tuple[type, ...] = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.Adadelta,
)

#: Known optimizers whose update is not linear in the lr, with the reason (class names, so that the
#: third-party ones need not be importable).
_NONLINEAR_REASONS: dict[str, str] = {
    "LBFGS": "it runs a line search (several closure evaluations) whose steps are not lr × a fixed direction",
    "Rprop": "its step sizes adapt multiplicatively from the initial lr; the update is not lr × "
    "(something lr-independent)",
    "ASGD": "its effective step lr/(1 + λ·lr·t)^α and the averaging are nonlinear in lr",
    "SparseAdam": "it updates only the rows of sparse gradients; the controller needs dense updates",
    "SGDScheduleFree": "schedule-free methods interpolate between iterate sequences with lr-dependent "
    "weights",
    "AdamWScheduleFree": "schedule-free methods interpolate between iterate sequences with lr-dependent "
    "weights",
    "RAdamScheduleFree": "schedule-free methods interpolate between iterate sequences with lr-dependent "
    "weights",
    "SGDScheduleFreeClosure": "schedule-free methods interpolate between iterate sequences",
    "AdamWScheduleFreeClosure": "schedule-free methods interpolate between iterate sequences",
    "Prodigy": "it estimates its own step size d from past updates, which depend on lr",
    "DAdaptAdam": "D-Adaptation estimates its own step size from past updates, which depend on lr",
    "DAdaptSGD": "D-Adaptation estimates its own step size from past updates, which depend on lr",
    "DAdaptAdaGrad": "D-Adaptation estimates its own step size from past updates, which depend on lr",
    "DAdaptAdan": "D-Adaptation estimates its own step size from past updates, which depend on lr",
    "DAdaptLion": "D-Adaptation estimates its own step size from past updates, which depend on lr",
}


def check_linear_update(optimizer: torch.optim.Optimizer) -> None:
    """Refuse optimizers whose update a per-layer rescaling does not turn into a per-layer LR.

    The controller applies ``s_l`` by rescaling the update, ``p ← p_old + s_l·(p_new − p_old)``,
    which equals running that layer at lr ``s_l·η`` only when the update is ``η × (something that
    does not depend on η)`` (see the module docstring for the accepted list). Also requires a
    stability rule in :mod:`lightning_eos.bounds` (for ``η*``).

    Raises:
        lightning_eos.bounds.UnsupportedOptimizerError: with the reason.
    """
    cls = type(optimizer)
    names = [k.__name__ for k in cls.__mro__]
    reason = next((_NONLINEAR_REASONS[n] for n in names if n in _NONLINEAR_REASONS), None)
    accepted = ", ".join(k.__name__ for k in _LINEAR_UPDATE)
    if reason is None and not isinstance(optimizer, _LINEAR_UPDATE):
        reason = (
            "it is not known to update by lr × (an lr-independent direction); if it does, subclass one "
            "of the accepted optimizers or wrap it"
        )
    if reason is None and isinstance(optimizer, torch.optim.Adagrad):
        decays = [float(g.get("lr_decay", 0.0)) for g in optimizer.param_groups]
        if any(d != 0.0 for d in decays):
            reason = f"lr_decay={decays} makes its step lr/(1 + (t − 1)·lr_decay), not linear in lr"
    if reason is not None:
        raise bounds.UnsupportedOptimizerError(
            f"AdaptiveLocalLR cannot control {cls.__name__}: {reason}. The per-layer learning rates are "
            "applied by scaling each layer's update, which is exact only for optimizers whose update is "
            f"lr × (something independent of lr). Accepted: {accepted}."
        )
    bounds.rule_for(optimizer)  # UnsupportedOptimizerError with registration instructions


# ---------------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------------


def controlled_layers(
    model: nn.Module, optimizer: torch.optim.Optimizer, layers: LayersSpec = "module"
) -> dict[str, list[nn.Parameter]]:
    """The layers the controller gives a multiplier each: ``{name: [parameters]}``.

    Only trainable parameters of ``optimizer`` count (a frozen one never moves).

    Args:
        model: the module holding the optimizer's parameters (names come from it).
        optimizer: whose parameters are controlled.
        layers: ``"module"`` (the owning module, :func:`lightning_eos.layers.layers`),
            ``"parameter"`` (each tensor), ``"global"`` (one multiplier for everything, named
            :data:`GLOBAL_LAYER`), or a mapping ``{parameter name or module prefix: layer label}``
            (longest prefix wins; parameters it does not cover keep their module layer).

    Raises:
        ValueError: bad ``layers``; an optimizer parameter that is not a parameter of ``model``; a
            mapping key matching no parameter.
    """
    trainable = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    if not trainable:
        raise ValueError("the optimizer has no parameter with requires_grad=True: nothing to control")
    names = {id(p): n for n, p in model.named_parameters()}
    missing = [tuple(p.shape) for p in trainable if id(p) not in names]
    if missing:
        raise ValueError(
            f"the optimizer holds {len(missing)} parameter(s) that are not parameters of the model "
            f"(shapes {missing[:3]}): the controller names layers by the model's parameter names"
        )
    if isinstance(layers, str):
        if layers not in ("module", "parameter", "global"):
            raise ValueError(
                f"layers={layers!r} is not supported; accepted values: 'module', 'parameter', 'global' or "
                "a mapping {parameter name or module prefix: layer label}."
            )
        if layers == "global":
            by_id = {id(p): p for p in trainable}
            return {GLOBAL_LAYER: [by_id[id(p)] for _, p in model.named_parameters() if id(p) in by_id]}
        by_name = dict(model.named_parameters())
        return {
            name: [by_name[n] for n in pnames]
            for name, pnames in layers_of(model, trainable, by=layers).items()  # type: ignore[arg-type]
        }
    if not isinstance(layers, Mapping) or not all(
        isinstance(k, str) and k and isinstance(v, str) and v for k, v in layers.items()
    ):
        raise ValueError(
            f"layers={layers!r} is not supported; accepted values: 'module', 'parameter', 'global' or a "
            "mapping of non-empty str {parameter name or module prefix: layer label}."
        )
    module_layer = layer_of_parameters(model, "module")
    keep = {id(p) for p in trainable}
    used: set[str] = set()
    out: dict[str, list[nn.Parameter]] = {}
    for pname, p in model.named_parameters():
        if id(p) not in keep:
            continue
        hits = [k for k in layers if pname == k or pname.startswith(k + ".")]
        if hits:
            key = max(hits, key=len)
            used.add(key)
            label = layers[key]
        else:
            label = module_layer[pname]
        out.setdefault(label, []).append(p)
    unused = [k for k in layers if k not in used]
    if unused:
        raise ValueError(
            f"layers: {unused} match no trainable parameter of the optimizer; accepted keys: parameter "
            f"names or module prefixes such as {list(module_layer)[:4]}."
        )
    return out


# ---------------------------------------------------------------------------------------------------
# Operators
# ---------------------------------------------------------------------------------------------------


class _PlusDiagonal(SymmetricOperator):
    """``v -> A v + diag(shift) v`` (symmetric when ``A`` is)."""

    def __init__(self, base: SymmetricOperator, shift: torch.Tensor) -> None:
        super().__init__(base.dim, base.dtype, base.device)
        if shift.numel() != base.dim:
            raise ValueError(f"shift has {shift.numel()} entries for an operator of dim {base.dim}")
        self.base = base
        self.shift = shift.reshape(-1).to(device=base.device, dtype=base.dtype)

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        out = self.base.matvec(v)
        assert isinstance(out, torch.Tensor)
        return out + self.shift * v


def coupled_operator(
    hessian: SymmetricOperator,
    scale: torch.Tensor,
    shift: torch.Tensor | None = None,
) -> SymmetricOperator:
    """``diag(scale) · H · diag(scale) + diag(shift)``: the operators of the controller.

    With ``scale = (D Q²)^{1/2}`` and ``shift = D·Q²·a`` this is ``D^{1/2} Q (H + diag(a)) Q D^{1/2}``
    (``Q`` the inverse square root of the preconditioner, ``a`` the coupled weight decay per
    parameter); with ``D = I`` the (preconditioned) block whose top eigenvalue is a layer's sharpness.

    Args:
        hessian: any symmetric operator of dimension ``n`` (a Hessian or one of its blocks).
        scale: flat, ``n`` entries (≥ 0).
        shift: flat, ``n`` entries, or None (no diagonal term).
    """
    op: SymmetricOperator = DiagonalScaledOperator(hessian, scale)
    if shift is not None and bool((shift != 0).any()):
        op = _PlusDiagonal(op, shift)
    return op


# ---------------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class LocalLRRecord(Record):
    """One refresh of :class:`LocalLRController`. Per-layer fields map layer name -> value.

    Curvatures are Hessian-eigenvalue units (1/lr; of ``P^{-1/2}(H + A)P^{-1/2}`` for the Adam
    family), learning rates the optimizer's units, multipliers and ratios dimensionless.

    Attributes:
        step: optimizer steps taken when the refresh was made (the multipliers apply from the next).
        log_step: the caller's x-axis value for logged scalars.
        sharpness: the solver's Ritz value of each block.
        error_bound: the residual of its Ritz pair, an upper estimate of its error (``curvature``
            uses ``sharpness + error_bound``).
        lambda_min: smallest eigenvalue of each block (``check_weight_decay`` only, else empty).
        curvature: the smoothed, rate-limited curvature the bounds are computed from.
        bound: ``η*_l``, the largest stable LR of the layer in its binding group (the group with the
            smallest ``η*/η``).
        target: the multiplier before the coupled check (``u_l``).
        multiplier: the multiplier after it, at the refresh's LRs.
        effective_lr: ``multiplier × η`` of the binding group.
        twin: the twin factor of each layer (1 without twin signal).
        coupled_ratio_raw: ``ρ`` at the targets (before the common rescaling).
        coupled_ratio: ``ρ`` at the applied multipliers (``≤ safety·(1 + deadband)``).
        scale: the common factor ``γ`` the coupled check applied (1 when within target).
        hvps: operator products spent.
        converged: every solve passed its stopping test.
        preconditioned: the curvature is of the preconditioned Hessian.
        curvature_rise: the largest relative rise of a block's measured curvature (``sharpness +
            error_bound``) over the largest of its previous ``RISE_WINDOW`` measurements (nan at the
            first refresh): what :class:`RefreshSchedule` adapts the interval to.
    """

    step: int
    log_step: int = 0
    sharpness: Mapping[str, float] = dataclasses.field(default_factory=dict)
    error_bound: Mapping[str, float] = dataclasses.field(default_factory=dict)
    lambda_min: Mapping[str, float] = dataclasses.field(default_factory=dict)
    curvature: Mapping[str, float] = dataclasses.field(default_factory=dict)
    bound: Mapping[str, float] = dataclasses.field(default_factory=dict)
    target: Mapping[str, float] = dataclasses.field(default_factory=dict)
    multiplier: Mapping[str, float] = dataclasses.field(default_factory=dict)
    effective_lr: Mapping[str, float] = dataclasses.field(default_factory=dict)
    twin: Mapping[str, float] = dataclasses.field(default_factory=dict)
    coupled_ratio_raw: float = math.nan
    coupled_ratio: float = math.nan
    scale: float = 1.0
    hvps: int = 0
    converged: bool = True
    preconditioned: bool = False
    curvature_rise: float = math.nan

    @property
    def min_multiplier(self) -> float:
        """The smallest multiplier of the refresh (nan without layers)."""
        return min(self.multiplier.values(), default=math.nan)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The multipliers for one step, computed from the controller's state and the live LRs.

    Attributes:
        multiplier: ``s_l`` per layer.
        effective_lr: ``s_l × η`` of the layer's binding group.
        bound: ``η*_l`` of the binding group (``inf`` before any curvature is known).
        target: ``u_l`` (before the common coupled factor).
        scale: the common factor ``γ``.
        coupled_ratio: the bound ``r·ρ_ref`` on ``ρ`` at the targets (nan before any coupled solve).
    """

    multiplier: dict[str, float]
    effective_lr: dict[str, float]
    bound: dict[str, float]
    target: dict[str, float]
    scale: float
    coupled_ratio: float


# ---------------------------------------------------------------------------------------------------
# Applying multipliers
# ---------------------------------------------------------------------------------------------------


class LayerUpdateScaler:
    """Scale each layer's optimizer update by its multiplier, inside ``optimizer.step``.

    A step pre-hook asks ``multipliers()`` for ``{layer: s_l}`` and snapshots the parameters of the
    layers with ``s_l != 1``; the post-hook sets ``p ← p_old + s_l·(p_new − p_old)``
    (``torch.lerp``). ``param_groups`` and the optimizer state are never touched; layers with
    ``s_l == 1`` are not touched at all (bitwise the unscaled step).

    Args:
        optimizer: the optimizer whose steps are scaled.
        layers: ``{layer: [parameters]}``.
        multipliers: called once per step (in the pre-hook); returns ``{layer: s_l}`` (missing
            layers: 1).

    Attributes:
        last: the multipliers the latest completed step applied (empty before the first).
        steps: completed steps.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        layers: Mapping[str, Sequence[torch.Tensor]],
        multipliers: Callable[[], Mapping[str, float]],
    ) -> None:
        self.optimizer = optimizer
        self.layers = {k: list(v) for k, v in layers.items()}
        self.multipliers = multipliers
        self.last: dict[str, float] = {}
        self.steps = 0
        self._pending: dict[str, float] | None = None
        self._buffers: dict[int, torch.Tensor] = {}
        self._handles: list[Any] = []

    @property
    def attached(self) -> bool:
        """Whether the hooks are installed."""
        return bool(self._handles)

    def attach(self) -> None:
        """Install the step hooks (idempotent)."""
        if not self._handles:
            self._handles = [
                self.optimizer.register_step_pre_hook(self._pre),
                self.optimizer.register_step_post_hook(self._post),
            ]

    def detach(self) -> None:
        """Remove the step hooks and free the snapshot buffers."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._buffers = {}
        self._pending = None

    def _pre(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        s = {k: float(v) for k, v in self.multipliers().items()}
        self._pending = s
        with torch.no_grad():
            for name, params in self.layers.items():
                if s.get(name, 1.0) == 1.0:
                    continue
                for p in params:
                    buf = self._buffers.get(id(p))
                    if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
                        buf = torch.empty_like(p, memory_format=torch.preserve_format)
                        self._buffers[id(p)] = buf
                    buf.copy_(p.detach())

    def _post(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        s = self._pending
        if s is None:
            return
        self._pending = None
        with torch.no_grad():
            for name, params in self.layers.items():
                factor = s.get(name, 1.0)
                if factor == 1.0:
                    continue
                for p in params:
                    buf = self._buffers[id(p)]
                    buf.lerp_(p.detach(), factor)  # p_old + s·(p_new − p_old)
                    p.detach().copy_(buf)
        self.last = {name: s.get(name, 1.0) for name in self.layers}
        self.steps += 1


# ---------------------------------------------------------------------------------------------------
# When to refresh
# ---------------------------------------------------------------------------------------------------


class RefreshSchedule:
    """Refresh steps that adapt to how fast the curvature moves.

    The first refresh is at step 0 with interval ``min_interval``. After each refresh the interval
    halves when some block's curvature rose by more than ``tolerance`` (relative) since the previous
    refresh, and doubles otherwise, within ``[min_interval, max_interval]``. Early training (and a
    large LR's catapult) moves the curvature within a few steps: a fixed long interval reacts too late
    (measured on digits with momentum 0.9 at lr 1: divergence at step 18 with refreshes every 25
    steps, none with the adaptive interval). ``adaptive=False``: every ``max_interval`` steps.

    Steps are optimizer steps counted by the caller (0-based, the refresh happening before that step).
    """

    def __init__(
        self, max_interval: int, min_interval: int = 1, tolerance: float = 0.1, adaptive: bool = True
    ) -> None:
        if not (isinstance(max_interval, int) and not isinstance(max_interval, bool) and max_interval >= 1):
            raise ValueError(f"max_interval={max_interval!r} is not supported; accepted values: an int >= 1.")
        if not (isinstance(min_interval, int) and not isinstance(min_interval, bool)) or not (
            1 <= min_interval <= max_interval
        ):
            raise ValueError(
                f"min_interval={min_interval!r} is not supported; accepted values: an int in "
                "[1, max_interval]."
            )
        if not (_real(tolerance) and tolerance > 0):
            raise ValueError(f"tolerance={tolerance!r} is not supported; accepted values: a float > 0.")
        self.max_interval = max_interval
        self.min_interval = min_interval
        self.tolerance = float(tolerance)
        self.adaptive = bool(adaptive)
        self.interval = min_interval if adaptive else max_interval
        self.next_step = 0

    def due(self, step: int) -> bool:
        """Whether to refresh before optimizer step ``step``."""
        return step >= self.next_step

    def refreshed(self, step: int, rise: float) -> None:
        """Account a refresh made before ``step`` whose curvature rose by ``rise`` (nan: unknown)."""
        if self.adaptive and math.isfinite(rise):  # unknown (the first refresh): keep the interval
            if rise > self.tolerance:
                self.interval = max(self.min_interval, self.interval // 2)
            else:
                self.interval = min(self.max_interval, self.interval * 2)
        self.next_step = step + self.interval

    def state_dict(self) -> dict[str, Any]:
        """Plain numbers."""
        return {"interval": self.interval, "next_step": self.next_step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.interval = int(state["interval"])
        self.next_step = int(state["next_step"])


# ---------------------------------------------------------------------------------------------------
# The controller
# ---------------------------------------------------------------------------------------------------


def _check(cond: bool, name: str, value: Any, accepted: str) -> None:
    if not cond:
        raise ValueError(
            f"LocalLRController: {name}={value!r} is not supported; accepted values: {accepted}."
        )


def _real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _lr_of(group: Mapping[str, Any]) -> float:
    lr = group["lr"]
    return float(lr.item() if isinstance(lr, torch.Tensor) else lr)


class LocalLRController:
    """Per-layer learning-rate multipliers from block curvature, with a coupled stability check.

    Torch only. Give it the optimizer and the layers; call :meth:`refresh` with a Hessian operator
    of the training loss every so often (the Lightning callback does this on a schedule); call
    :meth:`attach` once so that every ``optimizer.step()`` applies :meth:`plan`'s multipliers.
    See the module docstring for the maths.

    Args:
        optimizer: the user's optimizer (:func:`check_linear_update` must accept it).
        layers: ``{layer name: [parameters]}`` (e.g. :func:`controlled_layers`); every parameter
            must belong to the optimizer.
        mode: ``"cap"`` only lowers the user's LR (multipliers ≤ 1); ``"fill"`` also raises layers
            whose bound lies above the base LR, up to ``max_multiplier``.
        safety: the fraction of the edge aimed at, in (0, 1]: ``s_l·η ≤ safety·η*_l`` and
            ``ρ ≤ safety``.
        max_multiplier: ceiling of ``"fill"`` (≥ 1).
        max_change: a layer's curvature may fall (its bound rise) by at most this factor per
            refresh; also the twin recovery factor (> 1).
        smoothing: weight of the previous curvature in the exponential average of decreasing
            curvature, in [0, 1) (0: none).
        coupled: run the coupled check (one extra solve per refresh when there are several layers
            or param groups).
        tol: relative accuracy of the solves: residual ``≤ tol·θ`` and estimated eigenvalue error
            ``≤ tol·θ``; the curvature used is ``θ + residual`` (an upper estimate).
        max_iter: products per solve at most.
        warm_start: start each solve from the previous refresh's eigenvector (kept in the state).
        check_weight_decay: also measure each block's smallest eigenvalue and warn once per layer
            whose coupled weight decay (if any: groups without decay are not checked) lies outside
            its window ``−λ_min < α < c/η − λ_max`` at the applied LR (SGD family only). The upper
            side is rarely hit: the controller's bound already accounts for ``α``.
        twin_threshold: :meth:`update_twin` cuts layers whose gap grows faster than this
            (units of ``ln gap`` per step, > 0).
        twin_cut: factor applied to an amplifying layer, in (0, 1).
        freeze_after: ``None`` (default): adapt for the whole run. An int ``n >= 1``: after ``n``
            refreshes the measured state (curvatures, coupled reference, twin factors) is frozen:
            later :meth:`refresh` calls spend no products and return None, :meth:`update_twin`
            is ignored, and :meth:`plan` keeps applying the frozen bounds to the live LRs (at a
            constant LR: static per-layer multipliers). The ablation "is adapting in time worth
            it?"; :attr:`frozen` says when it applies.
        seed: seed of the solvers' random start components.
        warn: how warnings are emitted (``warnings.warn``-like; the callback passes a rank-zero one).

    Raises:
        ValueError: bad arguments (named, with the accepted values).
        lightning_eos.bounds.UnsupportedOptimizerError: an optimizer the update scaling cannot
            represent, or without a stability rule.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        layers: Mapping[str, Sequence[nn.Parameter]],
        *,
        mode: Mode = "cap",
        safety: float = 0.8,
        max_multiplier: float = 10.0,
        max_change: float = 2.0,
        smoothing: float = 0.5,
        coupled: bool = True,
        tol: float = 1e-2,
        max_iter: int = 50,
        warm_start: bool = True,
        check_weight_decay: bool = False,
        twin_threshold: float = 0.01,
        twin_cut: float = 0.5,
        freeze_after: int | None = None,
        seed: int = 0,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        _check(mode in ("cap", "fill"), "mode", mode, "'cap', 'fill'")
        _check(_real(safety) and 0.0 < safety <= 1.0, "safety", safety, "a float in (0, 1]")
        _check(
            _real(max_multiplier) and max_multiplier >= 1.0, "max_multiplier", max_multiplier, "a float >= 1"
        )
        _check(_real(max_change) and max_change > 1.0, "max_change", max_change, "a float > 1")
        _check(_real(smoothing) and 0.0 <= smoothing < 1.0, "smoothing", smoothing, "a float in [0, 1)")
        _check(isinstance(coupled, bool), "coupled", coupled, "True, False")
        _check(_real(tol) and tol > 0, "tol", tol, "a finite float > 0")
        _check(
            isinstance(max_iter, int) and not isinstance(max_iter, bool) and max_iter >= 2,
            "max_iter",
            max_iter,
            "an int >= 2",
        )
        _check(isinstance(warm_start, bool), "warm_start", warm_start, "True, False")
        _check(isinstance(check_weight_decay, bool), "check_weight_decay", check_weight_decay, "True, False")
        _check(_real(twin_threshold) and twin_threshold > 0, "twin_threshold", twin_threshold, "a float > 0")
        _check(_real(twin_cut) and 0.0 < twin_cut < 1.0, "twin_cut", twin_cut, "a float in (0, 1)")
        _check(
            freeze_after is None
            or (isinstance(freeze_after, int) and not isinstance(freeze_after, bool) and freeze_after >= 1),
            "freeze_after",
            freeze_after,
            "None or an int >= 1 (refreshes)",
        )
        _check(isinstance(seed, int) and not isinstance(seed, bool), "seed", seed, "an int")
        check_linear_update(optimizer)
        self.optimizer = optimizer
        self.preconditioned = bool(bounds.preconditioned_for(optimizer))
        if check_weight_decay and self.preconditioned:
            raise ValueError(
                "LocalLRController: check_weight_decay=True is not supported for "
                f"{type(optimizer).__name__}: the weight-decay window (bounds.weight_decay_window) is "
                "derived for the SGD family; accepted values: False."
            )
        group_of: dict[int, int] = {}
        for i, g in enumerate(optimizer.param_groups):
            for p in g["params"]:
                group_of.setdefault(id(p), i)
        if not isinstance(layers, Mapping) or not layers:
            raise ValueError("LocalLRController: layers must be a non-empty mapping {name: [parameters]}")
        self.layers: dict[str, list[nn.Parameter]] = {}
        seen: set[int] = set()
        for name, params in layers.items():
            plist = list(params)
            if not plist:
                raise ValueError(f"LocalLRController: layer {name!r} has no parameters")
            for p in plist:
                if id(p) not in group_of:
                    raise ValueError(
                        f"LocalLRController: layer {name!r} holds a parameter of shape {tuple(p.shape)} that "
                        "the optimizer does not manage"
                    )
                if id(p) in seen:
                    raise ValueError(
                        f"LocalLRController: a parameter appears in two layers (again in {name!r})"
                    )
                seen.add(id(p))
            self.layers[name] = plist
        self._group_of = group_of
        #: per layer: (group index, parameters of the layer in that group), in layer order
        self._layer_groups: dict[str, list[int]] = {
            name: list(dict.fromkeys(group_of[id(p)] for p in ps)) for name, ps in self.layers.items()
        }
        self.mode: Mode = mode
        self.safety = float(safety)
        self.max_multiplier = float(max_multiplier)
        self.max_change = float(max_change)
        self.smoothing = float(smoothing)
        self.coupled = coupled
        self.tol = float(tol)
        self.max_iter = max_iter
        self.warm_start = warm_start
        self.check_weight_decay = check_weight_decay
        self.twin_threshold = float(twin_threshold)
        self.twin_cut = float(twin_cut)
        self.freeze_after = freeze_after
        self.seed = seed
        self._warn = warn or (lambda msg: warnings.warn(msg, RuntimeWarning, stacklevel=3))

        # -- state (state_dict) --
        self.curvature: dict[str, float | None] = dict.fromkeys(self.layers)
        self.twin: dict[str, float] = dict.fromkeys(self.layers, 1.0)
        self._rho_ref = math.nan
        self._d_ref: dict[str, list[float]] = {}  # layer -> D per group of the layer at the refresh
        self._vectors: dict[str, torch.Tensor] = {}  # warm starts: per layer, and "coupled"
        self._wd_warned: set[str] = set()
        self._measured: dict[str, list[float]] = {}  # the last measured (unsmoothed) curvatures per layer
        self.refreshes = 0  # refreshes that updated the curvature (counted against freeze_after)
        self.history: list[LocalLRRecord] = []
        #: The plan the latest optimizer step applied (made in its pre-hook), None before any.
        self.last_plan: Plan | None = None
        self.scaler = LayerUpdateScaler(optimizer, self.layers, self._step_multipliers)

    # ------------------------------------------------------------------ applying
    def attach(self) -> None:
        """Install the optimizer step hooks: from now on every step applies :meth:`plan`."""
        self.scaler.attach()

    def detach(self) -> None:
        """Remove the hooks: steps are the user's again."""
        self.scaler.detach()

    @property
    def frozen(self) -> bool:
        """Whether ``freeze_after`` refreshes were made: the state no longer changes."""
        return self.freeze_after is not None and self.refreshes >= self.freeze_after

    def _step_multipliers(self) -> dict[str, float]:
        self.last_plan = self.plan()
        return self.last_plan.multiplier

    # ------------------------------------------------------------------ per-group terms
    def _groups(self, groups: Sequence[Mapping[str, Any]] | None) -> list[Mapping[str, Any]]:
        live = self.optimizer.param_groups
        if groups is None:
            return list(live)
        grps = list(groups)
        if len(grps) != len(live):
            raise ValueError(f"groups must hold one mapping per param group ({len(live)}), got {len(grps)}")
        return grps

    def _constant(self, group: Mapping[str, Any], lr: float) -> tuple[float, float]:
        """``(c, a)``: the dimensionless constant at step size ``lr`` and the coupled decay that goes
        into the coupled operator. The registry's SGD rule is ``c/η − α`` for ``λ(H)``; its
        preconditioned rules bound ``λ(P⁻¹(H + α))`` with ``c = critical·η``."""
        alpha = float(group.get("weight_decay", 0.0) or 0.0)
        coupled_alpha = 0.0 if group.get("decoupled_weight_decay", False) else alpha
        crit = bounds.critical_sharpness(self.optimizer, group={**group, "lr": lr})
        c = crit * lr if self.preconditioned else (crit + alpha) * lr
        return float(c), coupled_alpha

    def plan(self, groups: Sequence[Mapping[str, Any]] | None = None) -> Plan:
        """The multipliers for a step taken with the hyper-parameters ``groups`` (default: the live
        ``param_groups``), from the stored curvature, twin factors and coupled reference."""
        grps = self._groups(groups)
        lrs = [_lr_of(g) for g in grps]
        ceiling = 1.0 if self.mode == "cap" else self.max_multiplier
        target: dict[str, float] = {}
        bound: dict[str, float] = {}
        binding: dict[str, int] = {}
        for name, gidx in self._layer_groups.items():
            lam = self.curvature[name]
            if lam is None:
                target[name] = min(1.0, ceiling) * self.twin[name]
                bound[name] = math.inf
                binding[name] = gidx[0]
                continue
            res = bounds.assess(lam, self.optimizer, grps)
            best, best_ratio = gidx[0], math.inf
            for i in gidx:
                ratio = res.max_stable_lr_per_group[i] / lrs[i] if lrs[i] > 0 else math.inf
                if ratio < best_ratio:
                    best, best_ratio = i, ratio
            binding[name] = best
            bound[name] = float(res.max_stable_lr_per_group[best])
            target[name] = min(ceiling, self.safety * best_ratio) * self.twin[name]
        scale, rho = 1.0, math.nan
        if math.isfinite(self._rho_ref) and self._d_ref:
            r = 0.0
            for name, gidx in self._layer_groups.items():
                ref = self._d_ref.get(name)
                if ref is None:
                    continue
                for j, i in enumerate(gidx):
                    d_now = self._d(target[name], lrs[i], grps[i])
                    r = max(r, d_now / ref[j] if ref[j] > 0 else (math.inf if d_now > 0 else 0.0))
            rho = self._rho_ref * r if self._rho_ref > 0 else self._rho_ref
            if rho > self.safety * (1.0 + COUPLED_DEADBAND):
                scale = self.safety / rho
        mult = {name: u * scale for name, u in target.items()}
        eff = {name: mult[name] * lrs[binding[name]] for name in mult}
        return Plan(mult, eff, bound, target, scale, rho)

    def _d(self, u: float, lr: float, group: Mapping[str, Any]) -> float:
        """``D = η_eff / c`` of a (layer, group) pair (nominal lr 1 for a group at lr 0)."""
        eta = u * (lr if lr > 0 else 1.0)
        if eta <= 0:
            return 0.0
        c, _ = self._constant(group, eta)
        return eta / c if c > 0 else math.inf

    # ------------------------------------------------------------------ signals
    def update_twin(self, growth: Mapping[str, float]) -> None:
        """Use a twin's per-layer growth rates (``ln gap`` per step): a layer growing faster than
        ``twin_threshold`` is cut by ``twin_cut``; one at or below it recovers by ``max_change``
        toward its curvature value (factor 1). Layers without a finite rate are left as they are.
        Ignored once :attr:`frozen`."""
        if self.frozen:
            return
        for name in self.layers:
            g = growth.get(name)
            if g is None or not math.isfinite(float(g)):
                continue
            if float(g) > self.twin_threshold:
                self.twin[name] = max(TWIN_FLOOR, self.twin[name] * self.twin_cut)
            else:
                self.twin[name] = min(1.0, self.twin[name] * self.max_change)

    def _solve(self, op: SymmetricOperator, key: str, which: str) -> tuple[float, float, float, int, bool]:
        """Top (and for ``which="both"`` bottom) eigenvalue of ``op``:
        ``(θ_max, error_bound, θ_min, products, converged)``."""
        if op.dim == 1:  # too small for a Krylov solver: the 1x1 matrix itself
            v = torch.ones(1, dtype=op.dtype, device=op.device)
            out = op.matvec(v)
            assert isinstance(out, torch.Tensor)
            value = float(out.double()[0])
            return value, 0.0, value, 1, math.isfinite(value)
        if which == "both" and op.dim < 2:
            which = "largest"
        start = self._vectors.get(key) if self.warm_start else None
        if start is not None and (start.shape[0] != op.dim or (which == "both") != (start.dim() == 2)):
            start = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # unconverged: reported in the record
            res = eigsh(
                op,
                k=1,
                which=which,
                tol=self.tol,
                eig_tol=self.tol,
                max_iter=min(self.max_iter, op.dim),
                seed=self.seed,
                return_eigenvectors=self.warm_start,
                start_vectors=start,
            )
        vals = [float(v) for v in res.eigenvalues]
        top = vals[0]
        # The residual, not the (Kato-Temple) error bound: the Ritz value lies within the residual of
        # an eigenvalue, while the error bound's gap estimate can be far too optimistic in the first
        # products (measured: bound 1e-3 for a true error of 3e-2 on a digits block at residual 0.1).
        err = float(res.residuals[0]) if res.residuals.numel() else 0.0
        if self.warm_start and res.eigenvectors is not None and math.isfinite(top):
            vec = res.eigenvectors.detach()
            self._vectors[key] = vec if which == "both" else vec[:, 0]
        return top, err if math.isfinite(err) else 0.0, vals[-1], int(res.num_hvps), bool(res.all_converged)

    def _smooth(self, name: str, new: float) -> float:
        prev = self.curvature[name]
        if prev is None:
            return new
        value = max(new, self.smoothing * prev + (1.0 - self.smoothing) * new)
        if prev > 0:
            value = max(value, prev / self.max_change)
        return value

    def refresh(
        self,
        hessian: HessianOperator,
        step: int = 0,
        log_step: int | None = None,
        groups: Sequence[Mapping[str, Any]] | None = None,
    ) -> LocalLRRecord | None:
        """Measure every layer's block sharpness (and the coupled ratio) and update the state.

        Args:
            hessian: the Hessian of the training loss over (at least) every controlled parameter,
                at the current weights. Its blocks are solved through :meth:`HessianOperator.restrict`
                (one shared graph).
            step: optimizer steps taken so far (stored in the record).
            log_step: the caller's x-axis value (default ``step``).
            groups: the hyper-parameters the next step will apply (default: live ``param_groups``).

        Returns:
            The record (also appended to :attr:`history`), or None when an adaptive optimizer has no
            state yet (nothing to precondition with: no step taken) or the controller is
            :attr:`frozen` (no product is spent).
        """
        if self.frozen:
            return None
        grps = self._groups(groups)
        all_params = [p for ps in self.layers.values() for p in ps]
        if self.preconditioned:
            if not any(self.optimizer.state.get(p) for p in all_params):
                return None
            P = bounds.optimizer_preconditioner(self.optimizer, all_params, missing_state="identity")
            q_all = P.rsqrt()
        else:
            q_all = None
        # Per parameter: coupled decay of its group.
        alpha_all = torch.cat(
            [
                torch.full(
                    (p.numel(),),
                    0.0
                    if grps[self._group_of[id(p)]].get("decoupled_weight_decay", False)
                    else float(grps[self._group_of[id(p)]].get("weight_decay", 0.0) or 0.0),
                    dtype=torch.float64,
                    device=p.device,
                )
                for p in all_params
            ]
        )
        sizes = {name: sum(p.numel() for p in ps) for name, ps in self.layers.items()}
        offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for name in self.layers:
            offsets[name] = (start, start + sizes[name])
            start += sizes[name]

        hvps, converged = 0, True
        sharp: dict[str, float] = {}
        errs: dict[str, float] = {}
        lam_min: dict[str, float] = {}
        which = "both" if self.check_weight_decay else "largest"
        for name, ps in self.layers.items():
            a, b = offsets[name]
            block: SymmetricOperator = hessian.restrict(ps)
            if q_all is not None:
                q = q_all[a:b]
                block = coupled_operator(block, q, alpha_all[a:b] * q * q)
            top, err, bottom, n, ok = self._solve(block, name, which)
            hvps += n
            converged = converged and ok
            sharp[name], errs[name] = top, err
            if self.check_weight_decay:
                lam_min[name] = bottom
        if not all(math.isfinite(v) for v in sharp.values()):
            self._warn(
                f"LocalLRController: a block sharpness at step {step} is not finite ({sharp}); the "
                "multipliers keep their previous values."
            )
            rec = LocalLRRecord(
                step=step,
                log_step=step if log_step is None else log_step,
                sharpness=sharp,
                hvps=hvps,
                converged=False,
                preconditioned=self.preconditioned,
            )
            self.history.append(rec)
            return rec
        rise = math.nan
        for name in self.layers:
            measured = sharp[name] + errs[name]
            # Against the largest of the last RISE_WINDOW measurements: a noisy but flat series (the
            # current minibatch's curvature) rarely beats its own recent maximum by the tolerance.
            recent = self._measured.get(name, [])
            prev = max(recent) if recent else None
            if prev is not None and prev > 0:
                rise = max(measured / prev - 1.0, rise if math.isfinite(rise) else -math.inf)
            self._measured[name] = [*recent, measured][-RISE_WINDOW:]
            self.curvature[name] = self._smooth(name, measured)
        self.refreshes += 1

        # Coupled check at the targets.
        lrs = [_lr_of(g) for g in grps]
        pre = self.plan(grps)
        rho_raw = math.nan
        self._rho_ref, self._d_ref = math.nan, {}
        pairs = [(name, i) for name, gidx in self._layer_groups.items() for i in gidx]
        d_ref = {
            name: [self._d(pre.target[name], lrs[i], grps[i]) for i in gidx]
            for name, gidx in self._layer_groups.items()
        }
        if all(math.isfinite(d) for ds in d_ref.values() for d in ds):
            if len(pairs) == 1:
                # One layer, one group: D is uniform and the block solve already gave ρ.
                name = pairs[0][0]
                lam = self.curvature[name]
                assert lam is not None
                shift = 0.0 if self.preconditioned else float(alpha_all[0])
                rho_raw = d_ref[name][0] * (lam + shift)
            elif self.coupled:
                d_all = torch.cat(
                    [
                        torch.full(
                            (p.numel(),),
                            d_ref[name][gidx.index(self._group_of[id(p)])],
                            dtype=torch.float64,
                            device=p.device,
                        )
                        for name, gidx in self._layer_groups.items()
                        for p in self.layers[name]
                    ]
                )
                qq = torch.ones_like(d_all) if q_all is None else q_all * q_all
                full = hessian.restrict(all_params)
                op = coupled_operator(full, (d_all * qq).sqrt(), d_all * qq * alpha_all)
                top, err, _, n, ok = self._solve(op, "(coupled)", "largest")
                hvps += n
                converged = converged and ok
                rho_raw = top + err if math.isfinite(top) else math.nan
            if math.isfinite(rho_raw):
                self._rho_ref, self._d_ref = rho_raw, d_ref
        final = self.plan(grps)
        if self.check_weight_decay:
            self._check_windows(lam_min, sharp, final, grps)
        rec = LocalLRRecord(
            step=step,
            log_step=step if log_step is None else log_step,
            sharpness=sharp,
            error_bound=errs,
            lambda_min=lam_min,
            curvature={k: float(v) for k, v in self.curvature.items() if v is not None},
            bound=final.bound,
            target=final.target,
            multiplier=final.multiplier,
            effective_lr=final.effective_lr,
            twin=dict(self.twin),
            coupled_ratio_raw=rho_raw,
            coupled_ratio=rho_raw * final.scale if math.isfinite(rho_raw) else math.nan,
            scale=final.scale,
            hvps=hvps,
            converged=converged,
            preconditioned=self.preconditioned,
            curvature_rise=rise,
        )
        self.history.append(rec)
        return rec

    def _check_windows(
        self,
        lam_min: Mapping[str, float],
        lam_max: Mapping[str, float],
        plan: Plan,
        grps: Sequence[Mapping[str, Any]],
    ) -> None:
        for name, gidx in self._layer_groups.items():
            if name in self._wd_warned or name not in lam_min:
                continue
            lo, hi = lam_min[name], lam_max[name]
            if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
                continue
            for i in gidx:
                g = grps[i]
                eta = plan.multiplier[name] * _lr_of(g)
                if eta <= 0:
                    continue
                window = bounds.group_weight_decay_window(lo, hi, g, lr=eta)
                alpha = float(g.get("weight_decay", 0.0) or 0.0)
                if alpha > 0.0 and alpha not in window:
                    self._wd_warned.add(name)
                    self._warn(
                        f"LocalLRController: layer {name!r} (param group {i}): coupled "
                        f"weight_decay={alpha:.6g} lies outside its stable window at the applied lr "
                        f"{eta:.6g} "
                        f"(block eigenvalues [{lo:.6g}, {hi:.6g}]): {window.message}. (Warned once per "
                        "layer.)"
                    )
                    break

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and primitives (loads with ``torch.load(..., weights_only=True)``)."""
        return {
            "version": 1,
            "layers": list(self.layers),
            "curvature": {k: v for k, v in self.curvature.items()},
            "twin": dict(self.twin),
            "rho_ref": self._rho_ref,
            "d_ref": {k: list(v) for k, v in self._d_ref.items()},
            "vectors": {k: v.detach().cpu().clone() for k, v in self._vectors.items()},
            "wd_warned": sorted(self._wd_warned),
            "measured": {k: list(v) for k, v in self._measured.items()},
            "refreshes": self.refreshes,
            "history": [r.to_dict() for r in self.history],
        }

    def shared_state(self) -> dict[str, Any]:
        """What decides the multipliers (no eigenvectors, no history): data-parallel ranks broadcast
        rank zero's so that every rank applies the same multipliers."""
        return {
            "curvature": dict(self.curvature),
            "twin": dict(self.twin),
            "rho_ref": self._rho_ref,
            "d_ref": {k: list(v) for k, v in self._d_ref.items()},
        }

    def load_shared_state(self, state: Mapping[str, Any]) -> None:
        """Adopt :meth:`shared_state` (e.g. rank zero's)."""
        self.curvature = {k: (None if v is None else float(v)) for k, v in state["curvature"].items()}
        self.twin = {k: float(v) for k, v in state["twin"].items()}
        self._rho_ref = float(state["rho_ref"])
        self._d_ref = {k: [float(x) for x in v] for k, v in state["d_ref"].items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; the layer names must match.

        Raises:
            ValueError: the state was saved for other layers.
        """
        names = list(state.get("layers", []))
        if names != list(self.layers):
            raise ValueError(
                f"the saved LocalLRController state is for layers {names}, this model has "
                f"{list(self.layers)}: resume with the same model and `layers` setting"
            )
        self.load_shared_state(state)
        device = next(iter(self.layers.values()))[0].device
        self._vectors = {k: torch.as_tensor(v).to(device) for k, v in state.get("vectors", {}).items()}
        self._wd_warned = set(state.get("wd_warned", []))
        self._measured = {k: [float(x) for x in v] for k, v in state.get("measured", {}).items()}
        self.history = [LocalLRRecord.from_dict(r) for r in state.get("history", [])]
        # States saved before the counter existed: every record with finite curvature counted.
        default = sum(1 for r in self.history if r.curvature)
        self.refreshes = int(state.get("refreshes", default))
