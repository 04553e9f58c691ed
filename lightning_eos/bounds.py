"""Critical sharpness: the stability threshold of the optimizer actually in use.

Near a minimum the loss is locally quadratic with Hessian ``H``; one optimizer step is then a linear
map and every eigen-direction of ``H`` (with eigenvalue ``λ``) evolves independently. The step is
stable in that direction iff ``λ`` lies below a *critical sharpness* that depends only on the
optimizer's hyper-parameters. Gradient descent with learning rate ``η`` is stable iff ``λ < 2/η``;
momentum, Nesterov, dampening, coupled weight decay and adaptive preconditioning move the edge.
Training at the "edge of stability" means the top eigenvalue hovers at that edge.

This module holds ONE registry of rules, keyed by optimizer class (resolved through the MRO, so
subclasses inherit their parent's rule). Every monitor asks it through:

* :func:`critical_sharpness` -- the threshold for the top Hessian eigenvalue, read from the live
  ``optimizer.param_groups[group]`` (so it follows the LR schedule);
* :func:`max_stable_lr` -- the inverse question: the largest LR at which a given sharpness is stable;
* :func:`preconditioned_for` -- whether the threshold applies to the preconditioned Hessian
  ``P⁻¹H`` (Adam, AdamW, RMSprop) rather than to ``H`` itself;
* :func:`assess` -- the one comparison of a measured sharpness with every param group's threshold
  (binding group, ratio, max stable LR, per-group LR margins), shared by the monitors and the LR
  controller;
* :func:`weight_decay_window` -- the interval of coupled weight decay that stabilizes a spectrum;
* :func:`optimizer_preconditioner` -- the diagonal ``P`` of an adaptive optimizer (the one copy of
  that formula: the curvature engine and :func:`coupled_decay_bracket` both use it);
* :func:`register_threshold` -- how users add rules for their own optimizers.

Built-in rules (``η`` = lr, ``μ`` = momentum, ``d`` = dampening, ``α`` = coupled weight decay,
``λ_wd`` = decoupled weight decay; derivations in ``docs/theory.md``):

================================  ==========================================  ================
optimizer                         threshold                                   applies to
================================  ==========================================  ================
SGD                               ``2/η − α``                                 ``λ_max(H)``
SGD heavy ball (PyTorch form)     ``(2 + 2μ)/((1 − d)η) − α``                 ``λ_max(H)``
SGD Nesterov                      ``(2 + 2μ)/((1 + 2μ)η) − α``                ``λ_max(H)``
Adam (coupled ``α``)              ``(2 + 2β1)/((1 − β1)η)``                   ``λ_max(P⁻¹(H + αI))``
AdamW / Adam decoupled            ``(2 + 2β1)(1 − ηλ_wd/2)/((1 − β1)η)``      ``λ_max(P⁻¹H)``
RMSprop (coupled ``α``)           ``(2 + 2μ)/η``  (``2/η`` without momentum)  ``λ_max(P⁻¹(H + αI))``
================================  ==========================================  ================

``P = diag(√v̂ + ε)`` is the optimizer's current denominator (``√(v − ḡ²) + ε`` for centered
RMSprop), treated as frozen: the thresholds are those of the linear map with that ``P``.

Adam/RMSprop with *coupled* weight decay: the decay gradient ``αw`` is preconditioned too, so the
operator is ``P⁻¹(H + αI) = P⁻¹H + αP⁻¹``. Because ``αP⁻¹`` is not a multiple of the identity, the
decay cannot be subtracted from the threshold as a scalar (it can for SGD). The rule therefore
returns the threshold for ``λ_max(P⁻¹(H + αI))`` -- exact when the monitor's Hessian includes the
decay term -- and :func:`coupled_decay_bracket` gives the interval ``[T − α·max P⁻¹, T − α·min P⁻¹]``
that the threshold for ``λ_max(P⁻¹H)`` alone must lie in (Weyl's inequality).

``maximize=True``: PyTorch negates the gradient *before* adding the coupled decay, so the optimizer
descends ``−loss (+ decay)``. The threshold returned is unchanged and applies to the Hessian of the
objective being descended, i.e. to ``−H`` (``λ_max(−H) = −λ_min(H)``). :func:`objective_sign` gives
the sign of the descended objective (−1 under ``maximize=True``; an error when groups disagree): the
monitors measure the Hessian of ``objective_sign · loss`` and hand its sharpness to :func:`assess`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch

__all__ = [
    "MissingState",
    "StabilityAssessment",
    "ThresholdRule",
    "UnsupportedOptimizerError",
    "WeightDecayWindow",
    "assess",
    "coupled_decay_bracket",
    "critical_sharpness",
    "is_maximizing",
    "max_stable_lr",
    "objective_sign",
    "optimizer_preconditioner",
    "preconditioned_for",
    "register_threshold",
    "rule_for",
    "stability_constant",
    "unregister_threshold",
    "group_weight_decay_window",
    "weight_decay_window",
]

GroupFn = Callable[[Mapping[str, Any]], float]
"""A threshold rule body: maps a param-group dict (``optimizer.param_groups[i]``) to a float."""


class UnsupportedOptimizerError(TypeError):
    """Raised when no threshold rule is registered for an optimizer class (nor any of its bases)."""


@dataclass(frozen=True)
class ThresholdRule:
    """A registered stability rule for one optimizer class.

    Attributes:
        threshold: ``fn(group) -> float``, the critical sharpness (units: 1/lr, same units as Hessian
            eigenvalues of the loss) for the param group ``group``.
        preconditioned: True when the threshold applies to the top eigenvalue of the preconditioned
            Hessian ``P⁻¹H`` instead of ``H``.
        max_lr: optional closed form ``fn(sharpness, group) -> float`` of the largest stable LR. When
            None, :func:`max_stable_lr` solves ``threshold(group with lr) = sharpness`` by bisection,
            assuming the threshold decreases with lr.
    """

    threshold: GroupFn
    preconditioned: bool = False
    max_lr: Callable[[float, Mapping[str, Any]], float] | None = None


_REGISTRY: dict[type, ThresholdRule] = {}


# ---------------------------------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------------------------------


def _as_float(value: Any, name: str) -> float:
    """Convert a float / int / 0-d (or 1-element) tensor to a finite Python float, else ValueError."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{name} must be a scalar (float or 1-element tensor), got shape {tuple(value.shape)}"
            )
        value = value.detach().reshape(()).item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a real number, got {type(value).__name__}")
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {out}")
    return out


def _check_lr(lr: Any, name: str = "lr") -> float:
    out = _as_float(lr, name)
    if out <= 0.0:
        raise ValueError(f"{name} must be > 0 (a positive finite step size), got {out}")
    return out


def _check_unit_interval(value: Any, name: str) -> float:
    """Momentum-like coefficients must lie in [0, 1): at 1 the linear recurrence is never contracting."""
    out = _as_float(value, name)
    if not 0.0 <= out < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {out}")
    return out


def _group(optimizer: torch.optim.Optimizer, group: int | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(group, Mapping):
        return group  # a snapshot: the hyper-parameters a step applied, before a scheduler moved them
    groups = getattr(optimizer, "param_groups", None)
    if groups is None:
        raise ValueError(
            f"optimizer must be a torch.optim.Optimizer with param_groups, got {type(optimizer)!r}"
        )
    if isinstance(group, bool) or not isinstance(group, int) or not -len(groups) <= group < len(groups):
        raise ValueError(f"group must be an int in [0, {len(groups)}) for this optimizer, got {group!r}")
    return groups[group]


# ---------------------------------------------------------------------------------------------------
# The one place that knows the step constants
# ---------------------------------------------------------------------------------------------------


def stability_constant(momentum: float = 0.0, nesterov: bool = False, dampening: float = 0.0) -> float:
    """The dimensionless constant ``c`` of the SGD family: stable iff ``0 ≤ η(λ + α) ≤ c``.

    ``c = 2`` (plain GD), ``(2 + 2μ)/(1 − d)`` (heavy ball, PyTorch form with dampening ``d``) or
    ``(2 + 2μ)/(1 + 2μ)`` (Nesterov, PyTorch form; PyTorch requires ``d = 0`` for Nesterov).
    The same constants serve the PDE windows in :mod:`lightning_eos.pde`.

    Raises:
        ValueError: momentum or dampening outside [0, 1), or Nesterov with dampening.
    """
    mu = _check_unit_interval(momentum, "momentum")
    d = _check_unit_interval(dampening, "dampening")
    if nesterov:
        if d != 0.0:
            raise ValueError(f"dampening must be 0 with nesterov=True (as in torch.optim.SGD), got {d}")
        # Nesterov's characteristic polynomial z² − (1+μ)(1−x)z + μ(1−x) has a root at −1 when
        # x = ηλ̃ = (2+2μ)/(1+2μ); at μ = 0 it reduces to plain GD.
        return (2.0 + 2.0 * mu) / (1.0 + 2.0 * mu)
    # Heavy ball: z² − (1 + μ − (1−d)ηλ̃)z + μ has a root at −1 when (1−d)ηλ̃ = 2 + 2μ.
    return (2.0 + 2.0 * mu) / (1.0 - d)


# ---------------------------------------------------------------------------------------------------
# Built-in rules
# ---------------------------------------------------------------------------------------------------


def _sgd_parts(group: Mapping[str, Any]) -> tuple[float, float, float]:
    """(lr, c, coupled decay α) of an SGD param group."""
    lr = _check_lr(group["lr"])
    alpha = _as_float(group.get("weight_decay", 0.0), "weight_decay")
    c = stability_constant(
        group.get("momentum", 0.0), bool(group.get("nesterov", False)), group.get("dampening", 0.0)
    )
    return lr, c, alpha


def _sgd_threshold(group: Mapping[str, Any]) -> float:
    lr, c, alpha = _sgd_parts(group)
    return c / lr - alpha


def _inverse_c_over_lr(c: float, shift: float, sharpness: float) -> float:
    """Largest η with ``sharpness + shift ≤ c/η``; inf when ``sharpness + shift ≤ 0`` (never unstable
    at the top edge: such a mode is decaying or, if negative, growing for every η)."""
    total = sharpness + shift
    return math.inf if total <= 0.0 else c / total


def _sgd_max_lr(sharpness: float, group: Mapping[str, Any]) -> float:
    _, c, alpha = _sgd_parts(group)
    return _inverse_c_over_lr(c, alpha, sharpness)


def _adam_parts(group: Mapping[str, Any]) -> tuple[float, float, float]:
    """(lr, β1, decoupled decay λ_wd or 0) of an Adam/AdamW param group."""
    lr = _check_lr(group["lr"])
    betas = group.get("betas", (0.9, 0.999))
    beta1 = _check_unit_interval(betas[0], "betas[0]")
    decay = _as_float(group.get("weight_decay", 0.0), "weight_decay")
    decoupled = bool(group.get("decoupled_weight_decay", False))
    return lr, beta1, (decay if decoupled else 0.0)


def _adam_threshold(group: Mapping[str, Any]) -> float:
    lr, beta1, wd = _adam_parts(group)
    # Per eigen-mode κ of P⁻¹H (frozen P, bias corrections → 1):
    #   m ← β1 m + (1−β1) κ w;  w ← (1 − ηλ_wd) w − η m
    # gives z² − (q + β1 − η(1−β1)κ) z + β1 q with q = 1 − ηλ_wd; the root reaches −1 at
    # η(1−β1)κ = (1+β1)(1+q). With λ_wd = 0 this is Cohen et al.'s (2+2β1)/((1−β1)η).
    return (2.0 + 2.0 * beta1) * (1.0 - lr * wd / 2.0) / ((1.0 - beta1) * lr)


def _adam_max_lr(sharpness: float, group: Mapping[str, Any]) -> float:
    _, beta1, wd = _adam_parts(group)
    if sharpness <= 0.0:
        return math.inf
    # Solve S = C(1/η − λ_wd/2), C = (2+2β1)/(1−β1), for η.
    const = (2.0 + 2.0 * beta1) / (1.0 - beta1)
    return 1.0 / (sharpness / const + wd / 2.0)


def _rmsprop_threshold(group: Mapping[str, Any]) -> float:
    lr = _check_lr(group["lr"])
    mu = _check_unit_interval(group.get("momentum", 0.0), "momentum")
    # RMSprop's buffer is buf ← μ buf + P⁻¹g (no dampening): heavy ball on the preconditioned problem.
    return (2.0 + 2.0 * mu) / lr


def _rmsprop_max_lr(sharpness: float, group: Mapping[str, Any]) -> float:
    mu = _check_unit_interval(group.get("momentum", 0.0), "momentum")
    return _inverse_c_over_lr(2.0 + 2.0 * mu, 0.0, sharpness)


# ---------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------


def register_threshold(
    optimizer_cls: type,
    fn: GroupFn,
    preconditioned: bool = False,
    *,
    max_lr: Callable[[float, Mapping[str, Any]], float] | None = None,
) -> ThresholdRule:
    """Register (or replace) the stability rule for ``optimizer_cls`` and its subclasses.

    Args:
        optimizer_cls: the optimizer class (e.g. ``torch.optim.Adagrad`` or your own).
        fn: ``fn(group) -> float`` returning the critical sharpness for a param-group dict.
        preconditioned: True when ``fn``'s threshold applies to the preconditioned Hessian.
        max_lr: optional closed-form inverse ``max_lr(sharpness, group) -> float``.

    Returns:
        The stored :class:`ThresholdRule`.

    Example::

        register_threshold(torch.optim.Adagrad, lambda g: 2.0 / float(g["lr"]), preconditioned=True)
    """
    if not isinstance(optimizer_cls, type):
        raise ValueError(f"optimizer_cls must be a class, got {optimizer_cls!r}")
    if not callable(fn):
        raise ValueError(f"fn must be callable as fn(group: dict) -> float, got {fn!r}")
    rule = ThresholdRule(threshold=fn, preconditioned=bool(preconditioned), max_lr=max_lr)
    _REGISTRY[optimizer_cls] = rule
    return rule


def unregister_threshold(optimizer_cls: type) -> ThresholdRule | None:
    """Remove the rule registered for exactly ``optimizer_cls``; returns it (None if absent)."""
    return _REGISTRY.pop(optimizer_cls, None)


def rule_for(optimizer: torch.optim.Optimizer | type) -> ThresholdRule:
    """The rule for an optimizer (instance or class), the most specific class in its MRO winning.

    Raises:
        UnsupportedOptimizerError: no class in the MRO has a rule.
    """
    cls = optimizer if isinstance(optimizer, type) else type(optimizer)
    for klass in cls.__mro__:
        if klass in _REGISTRY:
            return _REGISTRY[klass]
    raise UnsupportedOptimizerError(
        f"No stability threshold is known for optimizer {cls.__module__}.{cls.__qualname__}. Register one "
        f"with lightning_eos.bounds.register_threshold({cls.__qualname__}, fn, preconditioned=...), where "
        "fn(group: dict) -> float returns the critical sharpness for a param group (subclasses resolve "
        f"through the MRO). Built-in rules: {', '.join(sorted(k.__qualname__ for k in _REGISTRY))}."
    )


def critical_sharpness(optimizer: torch.optim.Optimizer, group: int | Mapping[str, Any] = 0) -> float:
    """Threshold for the top Hessian eigenvalue under the optimizer's current hyper-parameters.

    Read from the live ``optimizer.param_groups[group]`` (so it follows schedulers; a tensor lr is
    accepted), or from ``group`` itself when it is a param-group mapping: a snapshot of the
    hyper-parameters a step applied, which a step-interval scheduler has moved on from by the time a
    callback measures. The optimizer then only selects the rule.

    Units: those of Hessian eigenvalues of the loss (1/lr). For optimizers where
    :func:`preconditioned_for` is True the threshold applies to ``λ_max(P⁻¹H)`` (see module docs for
    coupled decay in adaptive optimizers and for ``maximize=True``).

    Raises:
        UnsupportedOptimizerError: unknown optimizer class (message says how to register a rule).
        ValueError: group out of range, negative or non-finite lr, momentum/betas outside [0, 1).

    Returns ``math.inf`` for ``lr == 0``.
    """
    rule = rule_for(optimizer)
    grp = _group(optimizer, group)
    if _as_float(grp["lr"], "lr") == 0.0:
        # A zero step (warm-up start, a schedule annealed to 0) moves nothing: no curvature is unstable.
        return math.inf
    return float(rule.threshold(grp))


def preconditioned_for(optimizer: torch.optim.Optimizer | type) -> bool:
    """True when the optimizer's threshold applies to the preconditioned Hessian ``P⁻¹H``."""
    return rule_for(optimizer).preconditioned


def is_maximizing(optimizer: torch.optim.Optimizer, group: int | Mapping[str, Any] = 0) -> bool:
    """True when the group (index, or a param-group snapshot) has ``maximize=True``: the descended
    objective is −loss, so the threshold is compared with ``λ_max(−H) = −λ_min(H)``."""
    return bool(_group(optimizer, group).get("maximize", False))


def objective_sign(
    optimizer: torch.optim.Optimizer, groups: Sequence[Mapping[str, Any]] | None = None
) -> float:
    """Sign ``s`` of the objective ``s · loss`` the optimizer descends: −1.0 under ``maximize=True``.

    The thresholds of this module bound ``λ_max`` of the Hessian of that objective, so a monitor
    measures ``s · loss``. ``groups``: param-group snapshots (default: the live ``param_groups``).

    Raises:
        ValueError: the groups disagree on ``maximize`` (no single objective is descended).
    """
    grps = list(optimizer.param_groups if groups is None else groups)
    flags = [bool(g.get("maximize", False)) for g in grps]
    if len(set(flags)) > 1:
        raise ValueError(
            f"maximize={flags} (per param group of {type(optimizer).__name__}) is not supported: the "
            "groups descend different objectives (loss and −loss), so no single Hessian has the "
            "thresholds; accepted values: the same maximize in every param group."
        )
    return -1.0 if flags and flags[0] else 1.0


def max_stable_lr(
    sharpness: float, optimizer: torch.optim.Optimizer, group: int | Mapping[str, Any] = 0
) -> float:
    """Largest lr at which a mode of curvature ``sharpness`` is stable, other hyper-parameters fixed.

    ``sharpness`` is in the same terms as :func:`critical_sharpness` (preconditioned for adaptive
    optimizers). Returns ``math.inf`` when ``sharpness`` plus the coupled decay is ≤ 0: such a mode never
    crosses the top edge (a negative total curvature grows at every lr -- an instability no lr fixes).
    For SGD: ``c/(sharpness + α)``; Adam/AdamW: ``1/(S(1−β1)/(2+2β1) + λ_wd/2)``.

    Raises:
        ValueError: non-finite sharpness, bad group, bad hyper-parameters.
        UnsupportedOptimizerError: unknown optimizer class.
    """
    s = _as_float(sharpness, "sharpness")
    rule = rule_for(optimizer)
    grp = _group(optimizer, group)
    if _as_float(grp["lr"], "lr") == 0.0:
        grp = {**grp, "lr": 1.0}  # the answer does not depend on the live lr; 0 would stall the search
    if rule.max_lr is not None:
        return float(rule.max_lr(s, grp))
    return _bisect_lr(rule.threshold, s, grp)


def _bisect_lr(fn: GroupFn, sharpness: float, group: Mapping[str, Any]) -> float:
    """Solve ``fn(group with lr=η) = sharpness`` for the largest η, assuming fn decreases in η."""

    def thr(lr: float) -> float:
        return float(fn({**group, "lr": lr}))

    lo, hi = 1e-300, _check_lr(group["lr"])
    if thr(lo) < sharpness:
        return 0.0
    # Expand until unstable, in decades; if it never becomes unstable the answer is unbounded.
    for _ in range(700):
        if thr(hi) < sharpness:
            break
        lo, hi = hi, hi * 10.0
    else:
        return math.inf
    for _ in range(200):  # geometric bisection: lr spans many decades
        mid = math.sqrt(lo * hi)
        if thr(mid) >= sharpness:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * hi:
            break
    return lo


@dataclass(frozen=True)
class StabilityAssessment:
    """A sharpness compared with the threshold of every param group (see :func:`assess`).

    Curvatures (``sharpness``, ``critical*``) are in Hessian-eigenvalue units (1/lr); learning rates in
    the optimizer's units; ratios and margins are dimensionless (1 = at the edge of stability).
    Per-group tuples are in ``optimizer.param_groups`` order. Fields that need a sharpness are NaN
    when none was given.

    Attributes:
        sharpness: the compared sharpness: ``λ_max`` of the Hessian of the descended objective
            (:func:`objective_sign`), of ``P⁻¹H`` when ``preconditioned``; NaN if none was given.
        preconditioned: whether the thresholds apply to the preconditioned Hessian (Adam family).
        critical_per_group: critical sharpness of each group's applied hyper-parameters.
        lr_per_group: the learning rate each group applied.
        trained: whether each group holds a parameter with ``requires_grad=True``.
        ratio_per_group: ``sharpness / critical`` per group (``inf`` for a critical ≤ 0).
        max_stable_lr_per_group: the largest LR of each group at which ``sharpness`` is stable.
        lr_margin_per_group: ``lr / max_stable_lr`` per group (``inf`` when no LR is stable).
        binding_group: index of the group with the smallest critical sharpness among the trained
            groups (all groups when none is trained): the first to go unstable as sharpness rises.
        critical: ``critical_per_group[binding_group]``.
        lr: ``lr_per_group[binding_group]``.
        ratio: ``ratio_per_group[binding_group]``.
        max_stable_lr: ``max_stable_lr_per_group[binding_group]``.
    """

    sharpness: float
    preconditioned: bool
    critical_per_group: tuple[float, ...]
    lr_per_group: tuple[float, ...]
    trained: tuple[bool, ...]
    ratio_per_group: tuple[float, ...]
    max_stable_lr_per_group: tuple[float, ...]
    lr_margin_per_group: tuple[float, ...]
    binding_group: int
    critical: float
    lr: float
    ratio: float
    max_stable_lr: float


def assess(
    sharpness: float | None,
    optimizer: torch.optim.Optimizer,
    groups: Sequence[Mapping[str, Any]] | None = None,
) -> StabilityAssessment:
    """Compare a sharpness with the critical sharpness of every param group of ``optimizer``.

    The one threshold comparison of the package: the monitors and the LR controller all call it.

    Args:
        sharpness: ``λ_max`` of the Hessian of the objective the optimizer descends (``−loss`` under
            ``maximize=True``, see :func:`objective_sign`), preconditioned when
            :func:`preconditioned_for` is True; ``None`` when nothing was measured (only the
            thresholds are computed).
        optimizer: selects the rule; its ``param_groups`` say which groups hold trainable parameters.
        groups: the hyper-parameters each group applied (snapshots, one per param group, as the
            callbacks' ``OptimizerStepTracker`` captures them before a step scheduler moves them);
            default: the live ``optimizer.param_groups``.

    Raises:
        ValueError: ``groups`` of the wrong length, a non-finite or non-numeric ``sharpness``, bad
            hyper-parameters.
        UnsupportedOptimizerError: no rule for the optimizer's class.
    """
    live = list(optimizer.param_groups)
    grps = live if groups is None else list(groups)
    if len(grps) != len(live) or not grps:
        raise ValueError(
            f"groups must hold one hyper-parameter mapping per param group ({len(live)} param groups "
            f"in {type(optimizer).__name__}), got {len(grps)}"
        )
    s = None if sharpness is None else _as_float(sharpness, "sharpness")
    preconditioned = preconditioned_for(optimizer)
    nan = math.nan
    critical = tuple(float(critical_sharpness(optimizer, group=g)) for g in grps)
    lrs = tuple(_as_float(g["lr"], "lr") for g in grps)
    trained = tuple(any(p.requires_grad for p in g["params"]) for g in live)
    if s is None:
        ratios = max_lrs = margins = (nan,) * len(grps)
    else:
        ratios = tuple(s / c if c > 0 else math.inf for c in critical)
        max_lrs = tuple(float(max_stable_lr(s, optimizer, group=g)) for g in grps)
        margins = tuple(lr / m if m > 0 else math.inf for lr, m in zip(lrs, max_lrs))
    candidates = [i for i, t in enumerate(trained) if t] or list(range(len(grps)))
    binding = min(candidates, key=lambda i: critical[i])
    return StabilityAssessment(
        sharpness=nan if s is None else s,
        preconditioned=preconditioned,
        critical_per_group=critical,
        lr_per_group=lrs,
        trained=trained,
        ratio_per_group=ratios,
        max_stable_lr_per_group=max_lrs,
        lr_margin_per_group=margins,
        binding_group=binding,
        critical=critical[binding],
        lr=lrs[binding],
        ratio=ratios[binding],
        max_stable_lr=max_lrs[binding],
    )


def coupled_decay_bracket(optimizer: torch.optim.Optimizer, group: int = 0) -> tuple[float, float]:
    """For Adam/RMSprop with coupled weight decay α: bounds on the threshold for ``λ_max(P⁻¹H)``.

    The exact operator is ``P⁻¹H + αP⁻¹`` (symmetrized: ``P^{-1/2}HP^{-1/2} + αP⁻¹``). Weyl's
    inequality gives ``λ_max(P⁻¹H) + α·min P⁻¹ ≤ λ_max(P⁻¹(H + αI)) ≤ λ_max(P⁻¹H) + α·max P⁻¹``, so
    the threshold for ``λ_max(P⁻¹H)`` lies in ``[T − α·max P⁻¹, T − α·min P⁻¹]`` with
    ``T = critical_sharpness(optimizer, group)``. ``P`` is :func:`optimizer_preconditioner` over the
    group's trainable parameters (a frozen one never moves: it is no mode of the step). Returns
    ``(T, T)`` when α = 0, the decay is decoupled or the optimizer is not preconditioned, and
    ``(-inf, T)`` while a trainable parameter has no state yet (no step taken).

    Raises:
        ValueError: bad group; the optimizer's state is not one :func:`optimizer_preconditioner` knows.
    """
    t = critical_sharpness(optimizer, group)
    grp = _group(optimizer, group)
    alpha = _as_float(grp.get("weight_decay", 0.0), "weight_decay")
    if not preconditioned_for(optimizer) or alpha == 0.0 or grp.get("decoupled_weight_decay", False):
        return (t, t)
    inv_max, inv_min = -math.inf, math.inf
    for p in grp["params"]:
        if not p.requires_grad:
            continue
        denom = _preconditioner_of(p, optimizer.state.get(p, {}), grp)
        if denom is None:
            return (-math.inf, t)
        inv = 1.0 / denom
        inv_max = max(inv_max, float(inv.max()))
        inv_min = min(inv_min, float(inv.min()))
    if inv_max == -math.inf:  # no trainable parameter: nothing is preconditioned
        return (t, t)
    return (t - alpha * inv_max, t - alpha * inv_min)


# ---------------------------------------------------------------------------------------------------
# The one preconditioner
# ---------------------------------------------------------------------------------------------------

MissingState = Literal["error", "identity"]
"""What :func:`optimizer_preconditioner` does for a parameter without optimizer state."""


def _preconditioner_of(
    p: torch.Tensor, state: Mapping[str, Any], group: Mapping[str, Any]
) -> torch.Tensor | None:
    """The frozen diagonal ``P`` (float64, ``p``'s shape) the optimizer applies to ``p``, or None
    when no step has been taken for it yet. The formulas are listed in :func:`optimizer_preconditioner`.

    Raises:
        ValueError: state keys of no known adaptive optimizer.
    """
    if not state or float(state.get("step", 1)) <= 0:
        return None  # allocated but no step taken (Adam lazily, Adagrad in __init__): none yet
    # torch's adaptive optimizers all carry eps in their groups; a group without one adds none.
    eps = _as_float(group.get("eps", 0.0), "eps")
    if "exp_avg_sq" in state:
        v = state["max_exp_avg_sq"] if group.get("amsgrad", False) else state["exp_avg_sq"]
        step = float(state["step"])
        beta2 = _as_float(group.get("betas", (0.9, 0.999))[1], "betas[1]")
        return (v.detach().double() / (1.0 - beta2**step)).sqrt() + eps
    if "square_avg" in state:
        v = state["square_avg"].detach().double()
        # torch creates grad_avg when a centered group takes its first step; a group switched to
        # centered later has tracked no mean, so the uncentered second moment is all there is.
        if group.get("centered", False) and "grad_avg" in state:
            v = v - state["grad_avg"].detach().double().pow(2)
        return v.clamp_min(0.0).sqrt() + eps
    if "sum" in state:
        return state["sum"].detach().double().sqrt() + eps
    raise ValueError(
        f"unsupported optimizer state keys {sorted(state)} for a parameter of shape {tuple(p.shape)}: "
        "expected Adam/AdamW (exp_avg_sq), RMSprop (square_avg) or Adagrad (sum)"
    )


def optimizer_preconditioner(
    optimizer: torch.optim.Optimizer,
    params: Sequence[torch.Tensor] | None = None,
    missing_state: MissingState = "error",
) -> torch.Tensor:
    """The diagonal preconditioner ``P`` an adaptive optimizer applies, flat float64 in ``params`` order.

    The one implementation in the package (``lightning_eos.curvature.optimizer_preconditioner`` is this
    function). Read from ``optimizer.state`` and each parameter's param group, treated as frozen:

    * Adam/AdamW (state ``exp_avg_sq``, ``step``): ``P = sqrt(v / (1 − β2^t)) + eps`` (with
      ``amsgrad``: ``max_exp_avg_sq`` instead of ``v``), as in Cohen et al. 2022.
    * RMSprop (``square_avg``): ``P = sqrt(v) + eps``; centered: ``sqrt(v − grad_avg²) + eps``.
    * Adagrad (``sum``): ``P = sqrt(sum) + eps``.

    ``eps`` is the group's (0 when the group has none). Units: those of the gradient.

    Args:
        optimizer: the optimizer whose state is read.
        params: the parameters, in the order of the flat result; default: every trainable parameter
            of the optimizer, in group order.
        missing_state: for a parameter without state yet (no step taken): ``"error"`` raises a
            ``ValueError``, ``"identity"`` uses ``P = 1`` for it.

    Raises:
        ValueError: bad ``missing_state``; a parameter the optimizer does not manage; missing state
            under ``"error"``; state of no known adaptive optimizer.
    """
    if missing_state not in ("error", "identity"):
        raise ValueError(
            f"missing_state={missing_state!r} is not supported; accepted values: 'error', 'identity'."
        )
    group_of: dict[int, Mapping[str, Any]] = {}
    for grp in optimizer.param_groups:
        for p in grp["params"]:
            group_of.setdefault(id(p), grp)
    if params is None:
        params = [p for grp in optimizer.param_groups for p in grp["params"] if p.requires_grad]
    parts: list[torch.Tensor] = []
    for p in params:
        if id(p) not in group_of:
            raise ValueError(f"a parameter of shape {tuple(p.shape)} is not managed by the optimizer")
        P = _preconditioner_of(p, optimizer.state.get(p, {}), group_of[id(p)])
        if P is None:
            if missing_state == "error":
                raise ValueError(
                    f"the optimizer has no state for a parameter of shape {tuple(p.shape)} (no step taken"
                    " yet?): take a step first or pass missing_state='identity'"
                )
            P = torch.ones(p.shape, dtype=torch.float64, device=p.device)
        parts.append(P.reshape(-1).to(p.device))
    if not parts:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat(parts)


register_threshold(torch.optim.SGD, _sgd_threshold, preconditioned=False, max_lr=_sgd_max_lr)
# AdamW subclasses Adam in torch ≥ 2.6 (decoupled_weight_decay=True in its groups); registering both
# keeps older torch versions, where AdamW is a separate class, working with the same rule.
register_threshold(torch.optim.Adam, _adam_threshold, preconditioned=True, max_lr=_adam_max_lr)
register_threshold(torch.optim.AdamW, _adam_threshold, preconditioned=True, max_lr=_adam_max_lr)
register_threshold(torch.optim.RMSprop, _rmsprop_threshold, preconditioned=True, max_lr=_rmsprop_max_lr)


# ---------------------------------------------------------------------------------------------------
# Weight-decay window
# ---------------------------------------------------------------------------------------------------


class WeightDecayWindow(NamedTuple):
    """Interval ``(low, high)`` of coupled weight decay α keeping every eigenvalue of ``H + αI`` in
    the stable band ``[0, c/η]``. Iterates as ``(low, high)``; ``empty`` when ``low ≥ high``.

    Both edges are marginal (|amplification| = 1): at ``low`` the softest mode is neutral, at
    ``high`` the stiffest mode flips sign without decaying.
    """

    low: float
    high: float

    @property
    def empty(self) -> bool:
        """True when no α stabilizes the whole spectrum."""
        return not self.low < self.high

    @property
    def message(self) -> str:
        """A human-readable description, saying why when the window is empty."""
        if self.empty:
            return (
                f"empty weight-decay window: need alpha > {self.low:.6g} (to lift the smallest eigenvalue "
                f"to 0) but alpha < {self.high:.6g} (to keep the largest below c/lr); the spread of the "
                "spectrum exceeds c/lr -- lower the learning rate"
            )
        return f"stable for {self.low:.6g} < alpha < {self.high:.6g}"

    def __contains__(self, alpha: object) -> bool:
        """``alpha in window``: strictly inside the (open) window."""
        return isinstance(alpha, (int, float)) and self.low < float(alpha) < self.high

    def __str__(self) -> str:
        return self.message


def weight_decay_window(
    lambda_min: float,
    lambda_max: float,
    lr: float,
    momentum: float = 0.0,
    nesterov: bool = False,
    dampening: float = 0.0,
) -> WeightDecayWindow:
    """Interval of coupled weight decay α for which every eigenvalue of ``H + αI`` is stable.

    Stability of the SGD family needs ``0 ≤ η(λ + α) ≤ c`` for every eigenvalue ``λ`` of ``H``
    (``c`` from :func:`stability_constant`), i.e. ``−λ_min < α < c/η − λ_max``.

    Args:
        lambda_min, lambda_max: extreme eigenvalues of the Hessian (units 1/lr), ``lambda_min ≤ lambda_max``.
        lr: learning rate / time step η > 0.
        momentum, nesterov, dampening: PyTorch SGD hyper-parameters.

    Returns:
        :class:`WeightDecayWindow` ``(−λ_min, c/η − λ_max)``; ``.empty`` says when no α works.
    """
    lo = _as_float(lambda_min, "lambda_min")
    hi = _as_float(lambda_max, "lambda_max")
    if lo > hi:
        raise ValueError(f"lambda_min must be <= lambda_max, got lambda_min={lo}, lambda_max={hi}")
    eta = _check_lr(lr)
    c = stability_constant(momentum, nesterov, dampening)
    return WeightDecayWindow(low=-lo, high=c / eta - hi)


def group_weight_decay_window(
    lambda_min: float, lambda_max: float, group: Mapping[str, Any], lr: float | None = None
) -> WeightDecayWindow:
    """:func:`weight_decay_window` for an SGD param group (or a snapshot of one): its momentum,
    Nesterov flag and dampening, and its ``lr`` unless ``lr`` is given (e.g. a scaled one)."""
    return weight_decay_window(
        lambda_min,
        lambda_max,
        _as_float(group["lr"], "lr") if lr is None else lr,
        momentum=float(group.get("momentum", 0.0) or 0.0),
        nesterov=bool(group.get("nesterov", False)),
        dampening=float(group.get("dampening", 0.0) or 0.0),
    )
