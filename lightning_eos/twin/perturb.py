"""How the twin is made to differ from the real model: the one-ulp start and the rescaled update.

* :func:`apply_ulp` moves selected parameter entries one ulp toward +inf (``perturbation="ulp"``);
* :func:`rescaled_step` takes an optimizer step as ``(k·lr)·(step/k)`` (``perturbation="rescale"``),
  defined for the optimizers in :data:`RESCALE_OPTIMIZERS` (:func:`check_rescale_supported`).

Torch only: no Lightning import.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch

__all__ = [
    "RESCALE_OPTIMIZERS",
    "Perturbation",
    "apply_ulp",
    "check_rescale_supported",
    "rescaled_step",
]

Perturbation = Literal["ulp", "rescale", "none"]

# Optimizers whose update is ``lr · u`` with ``u`` and the optimizer state independent of lr, so that
# ``p_old + (step with k·lr)/k`` equals the real update in exact arithmetic (see ``rescaled_step``).
# Not in the list on purpose: LBFGS (line search), Rprop (lr is only the initial step size), ASGD
# (lr enters its averaging state), schedule-free / parameter-free methods.
RESCALE_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
    torch.optim.Adadelta,
)


def check_rescale_supported(optimizer: torch.optim.Optimizer) -> None:
    """Raise ``ValueError`` if ``perturbation="rescale"`` is undefined for ``optimizer``."""
    ok = isinstance(optimizer, RESCALE_OPTIMIZERS)
    if ok and isinstance(optimizer, torch.optim.Adagrad):
        # Adagrad's effective lr is lr / (1 + (t−1)·lr_decay): not linear in lr unless lr_decay = 0.
        ok = all(float(g.get("lr_decay", 0.0)) == 0.0 for g in optimizer.param_groups)
    if not ok:
        names = ", ".join(c.__name__ for c in RESCALE_OPTIMIZERS)
        raise ValueError(
            f"perturbation='rescale' is undefined for {type(optimizer).__name__}: it needs an update "
            f"linear in lr with lr-independent state. Supported: {names} (Adagrad with lr_decay=0). "
            "Use perturbation='ulp' instead."
        )


def _matches(name: str, patterns: Sequence[str]) -> bool:
    # A pattern selects a parameter by its full name or by the name of any module that owns it.
    return any(name == p or name.startswith(p + ".") for p in patterns)


def apply_ulp(
    params: Mapping[str, torch.Tensor],
    *,
    names: Sequence[str] | None = None,
    fraction: float = 1.0,
    single_weight: bool = False,
    seed: int = 0,
) -> int:
    """Move selected entries of ``params`` one ulp toward +inf, in place (``torch.nextafter``).

    Args:
        params: name → floating tensor (the twin's parameters).
        names: restrict to these parameter names or module prefixes (None: all).
        fraction: of the selected entries, perturb each with this probability (seeded).
        single_weight: perturb exactly one entry, drawn uniformly (seeded) from the selection
            (the "one bit" experiment).
        seed: seed of the private generator used for ``fraction`` / ``single_weight``.

    Returns:
        the number of entries moved.
    """
    selected = [(n, p) for n, p in params.items() if p.is_floating_point()]
    if names is not None:
        unknown = [q for q in names if not any(_matches(n, [q]) for n, _ in selected)]
        if unknown:
            raise ValueError(
                f"params={list(names)}: {unknown} match no floating parameter; "
                f"available: {[n for n, _ in selected]}"
            )
        selected = [(n, p) for n, p in selected if _matches(n, names)]
    gen = torch.Generator().manual_seed(seed)  # private: never touches the global stream
    moved = 0
    with torch.no_grad():
        if single_weight:
            sizes = [p.numel() for _, p in selected]
            index = int(torch.randint(sum(sizes), (1,), generator=gen))
            for (_, p), size in zip(selected, sizes):
                if index < size:
                    flat = p.view(-1)
                    flat[index] = torch.nextafter(
                        flat[index], torch.tensor(math.inf, dtype=p.dtype, device=p.device)
                    )
                    return 1
                index -= size
            return 0
        for _, p in selected:
            up = torch.nextafter(p, torch.full_like(p, math.inf))
            if fraction >= 1.0:
                p.copy_(up)
                moved += p.numel()
            else:
                mask = (torch.rand(p.shape, generator=gen) < fraction).to(p.device)
                p.copy_(torch.where(mask, up, p))
                moved += int(mask.sum())
    return moved


def rescaled_step(opt: torch.optim.Optimizer, step_fn: Callable[[], Any], k: float) -> None:
    """The paper's perturbation ``(k·lr)·(step/k)``, generically.

    Take the optimizer step (``step_fn``) with ``lr ← k·lr`` and then set ``p ← p_old + (p − p_old)/k``.
    For every optimizer in :data:`RESCALE_OPTIMIZERS` the update is ``lr·u`` with ``u`` and the state
    (momentum buffers, Adam moments, step counts) independent of lr — for SGD ``u = buf`` (momentum,
    weight decay and Nesterov included), for Adam/AdamW ``u = m̂/(√v̂+ε)`` (+ ``wd·p`` for AdamW's
    decoupled decay, which is also ``lr``-linear), for RMSprop ``u = g/(√v+ε)`` or its momentum
    buffer — so the result equals the real update in exact arithmetic and differs only by the
    roundings of the multiply, subtract and divide. A step skipped by a ``GradScaler`` leaves
    ``p = p_old``: the update is then 0 too.
    """
    with torch.no_grad():
        old = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
        saved = [g["lr"] for g in opt.param_groups]
        for g in opt.param_groups:
            g["lr"] = g["lr"] * k
        try:
            step_fn()
        finally:
            for g, lr in zip(opt.param_groups, saved):
                g["lr"] = lr
        i = 0
        for g in opt.param_groups:
            for p in g["params"]:
                p.copy_(old[i] + (p - old[i]) / k)
                i += 1
