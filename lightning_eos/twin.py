"""The bit-perturbed twin: a shadow copy of a model trained in lockstep with it.

A *twin* is a private copy of the model with its own optimizer (same class, same param-group
structure, state cloned from the real optimizer). It starts from weights that differ from the real
ones by one floating-point ulp (``perturbation="ulp"``), or from identical weights but with an update
computed in a rounding-different way (``"rescale"``), or with no difference at all (``"none"``, a
determinism self-check). It then takes exactly the steps the real model takes: same batches, same
dropout masks, same hyper-parameters, same clipping. How far the two drift apart measures how much
the discretized training dynamics amplify round-off (theory §5 and §7 of the project notes: for a
quadratic loss the gap obeys the linearized update, ``e ← (I − ηH) e``).

Everything here is torch only (no Lightning), so the Lightning callback, a report command or an
LR controller can drive the same :class:`TwinEngine`:

1. ``engine = TwinEngine(real_model, perturbation="ulp")``; ``engine.attach_optimizer(real_opt)``;
   ``engine.start()`` (perturbs and takes the step-0 measurement).
2. per real optimizer step: compute the twin's gradients (``engine.backward(loss_fn, rng)`` — or
   fill ``engine.twin``'s ``.grad`` yourself), then ``engine.step(hparams=..., clip_val=...)``. The
   step measures the gap **on device**; nothing is copied to the host.
3. when you want numbers: ``engine.record(step)`` (one host sync) returns a plain dict, appends it to
   ``engine.history`` and detects restrained-instability events and non-finite twins.

Gaps (all dimensionless):

* relative L1 gap ``Σ|w − w'| / Σ|w|`` over all floating parameters and per layer;
* the paper's ``D = 2·mean(|w − w'| / (|w| + |w'|))`` (``0/0`` counted as 0), optional;
* growth rate: least-squares slope of ``ln gap`` per optimizer step over a sliding window of the
  last ``window`` steps (a finite-time Lyapunov exponent, units 1/step);
* amplification: ``log10(gap / gap_ref)`` in decades, ``gap_ref`` the first nonzero gap.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from lightning_eos.isolation import RngState, replay_rng, replicate

__all__ = [
    "RESCALE_OPTIMIZERS",
    "TwinEngine",
    "apply_ulp",
    "check_rescale_supported",
    "layer_of",
]

Perturbation = Literal["ulp", "rescale", "none"]
LayerMode = Literal["parameter", "module", "none"]

# Optimizers whose update is ``lr · u`` with ``u`` and the optimizer state independent of lr, so that
# ``p_old + (step with k·lr)/k`` equals the real update in exact arithmetic (see ``_rescaled_step``).
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


def _assign_hparam(current: Any, value: Any) -> Any:
    """``value`` in the form the twin's group holds it: a tensor hyper-parameter (``lr=torch.tensor``)
    stays a tensor, filled in place as torch's schedulers do, so the optimizer takes the same
    code path (tensor arithmetic rounds differently from Python floats) as the real one."""
    if isinstance(current, torch.Tensor) and not isinstance(value, torch.Tensor):
        current.fill_(value)
        return current
    if isinstance(current, tuple) and isinstance(value, tuple) and len(current) == len(value):
        return tuple(_assign_hparam(c, v) for c, v in zip(current, value))
    return value


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


def layer_of(name: str, mode: LayerMode) -> str | None:
    """The layer key a parameter ``name`` is reported under (None: no per-layer report)."""
    if mode == "none":
        return None
    if mode == "module":
        return name.rsplit(".", 1)[0] if "." in name else name
    return name


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


class TwinEngine:
    """A twin of ``real`` stepped in lockstep, with its gap to ``real`` measured on device.

    Args:
        real: the real model (read only: the engine never writes to it, its grads or its buffers).
        twin: a private copy of ``real`` with the same parameter names (default: a deep copy).
        perturbation: ``"ulp"``, ``"rescale"`` or ``"none"`` (see the module docstring).
        params / fraction / single_weight / seed: the ``"ulp"`` selection (:func:`apply_ulp`).
        rescale_k: the ``k`` of ``"rescale"`` (``k = 1`` is bit-identical to ``"none"``).
        layers: per-layer gaps by ``"parameter"`` tensor, by owning ``"module"``, or ``"none"``.
        window: number of most recent steps the growth rate is fitted over (≥ 2).
        threshold: the gap level whose first crossing step is recorded (``first_step_above``).
        event_decades: a restrained-instability event is a growth by at least this many decades ...
        saturation_decades: ... followed by a window over which the gap grew less than this.
        d_metric: also compute the paper's D (one more pass over the weights per step).
    """

    def __init__(
        self,
        real: nn.Module,
        twin: nn.Module | None = None,
        *,
        perturbation: Perturbation = "ulp",
        params: Sequence[str] | None = None,
        fraction: float = 1.0,
        single_weight: bool = False,
        seed: int = 0,
        rescale_k: float = 3.0,
        layers: LayerMode = "module",
        window: int = 50,
        threshold: float = 1e-4,
        event_decades: float = 3.0,
        saturation_decades: float = 0.1,
        d_metric: bool = False,
    ) -> None:
        if perturbation not in ("ulp", "rescale", "none"):
            raise ValueError(f"perturbation={perturbation!r}; accepted: 'ulp', 'rescale', 'none'")
        if window < 2:
            raise ValueError(f"window={window}; accepted: an int >= 2")
        self.real = real
        self.twin = twin if twin is not None else replicate(real, share_parameters=False)
        self.perturbation: Perturbation = perturbation
        self.ulp_names = list(params) if params is not None else None
        self.fraction = fraction
        self.single_weight = single_weight
        self.seed = seed
        self.rescale_k = float(rescale_k)
        self.layer_mode: LayerMode = layers
        self.window = window
        self.threshold = threshold
        self.event_decades = event_decades
        self.saturation_decades = saturation_decades
        self.d_metric = d_metric

        real_named = {n: p for n, p in real.named_parameters() if p.is_floating_point()}
        twin_named = dict(self.twin.named_parameters())
        missing = [n for n in real_named if n not in twin_named]
        if missing:
            raise ValueError(f"the twin lacks parameters {missing}: it must be a copy of the real model")
        self.names = list(real_named)
        self._real_params = [real_named[n] for n in self.names]
        self._twin_params = [twin_named[n] for n in self.names]
        # Layer index per parameter; the last row of every per-layer buffer is the total.
        keys: list[str] = []
        self._layer_index: list[int] = []
        for n in self.names:
            key = layer_of(n, layers)
            if key is not None and key not in keys:
                keys.append(key)
            self._layer_index.append(keys.index(key) if key is not None else -1)
        self.layer_names = keys
        self.optimizer: torch.optim.Optimizer | None = None
        self._real_optimizer: torch.optim.Optimizer | None = None
        self.scaler: torch.amp.GradScaler | None = None
        self.frozen = False
        self.steps = 0  # optimizer steps the twin has taken
        self.resyncs = 0
        self.history: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self._event_base: list[float | None] = [None] * (len(keys) + 1)  # log10 gap the growth is from
        self._event_since: list[int] = [-1] * (len(keys) + 1)
        self.nonfinite_step: int | None = None
        self.first_nonzero: dict[str, Any] | None = None
        self._init_buffers()

    # ----------------------------------------------------------------------------------- set up
    @property
    def device(self) -> torch.device:
        return self._real_params[0].device if self._real_params else torch.device("cpu")

    def _acc_dtype(self) -> torch.dtype:
        # float64 accumulators so that a 1e-16 gap of a float64 model is resolved; MPS has none.
        return torch.float32 if self.device.type == "mps" else torch.float64

    def _init_buffers(self) -> None:
        n, dev, dt = len(self.layer_names) + 1, self.device, self._acc_dtype()
        self._gap = torch.zeros(n, dtype=dt, device=dev)  # relative L1 gap, last row = total
        self._d = torch.zeros((), dtype=dt, device=dev)
        self._ref = torch.zeros(n, dtype=dt, device=dev)  # first nonzero gap
        self._log_ring = torch.full((self.window, n), math.nan, dtype=dt, device=dev)  # ln gap
        self._step_ring = torch.full((self.window,), math.nan, dtype=dt, device=dev)
        self._first_nonzero = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self._first_above = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self._first_nonfinite = torch.full((), -1, dtype=torch.int64, device=dev)
        self._max_gap = torch.zeros(n, dtype=dt, device=dev)

    def attach_optimizer(self, real_optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Build the twin's optimizer: same class, same groups, state cloned from ``real_optimizer``.

        A deep copy whose memo maps each real parameter to its twin, so param groups keep their
        structure and per-group keys, and per-parameter state (momentum, Adam moments, step
        counters) is cloned and re-keyed to the twin's parameters. Custom optimizers work too as
        long as they deep-copy.
        """
        if self.perturbation == "rescale":
            check_rescale_supported(real_optimizer)
        twin_of = dict(zip(self._real_params, self._twin_params))
        memo: dict[int, Any] = {}
        for group in real_optimizer.param_groups:
            for p in group["params"]:
                if p not in twin_of:
                    raise ValueError("the optimizer holds a parameter that is not in the real model")
                memo[id(p)] = twin_of[p]
        self.optimizer = copy.deepcopy(real_optimizer, memo)
        self._real_optimizer = real_optimizer
        return self.optimizer

    def attach_scaler(
        self, real_scaler: torch.amp.GradScaler | None, state: Mapping[str, Any] | None = None
    ) -> torch.amp.GradScaler | None:
        """Give the twin its own ``GradScaler`` (fp16 mixed precision), cloned from ``real_scaler``.

        The twin's scaler starts from the real one's present scale and growth tracker (or from
        ``state``, a saved :meth:`torch.amp.GradScaler.state_dict`) and from then on decides by
        itself: it backs off and skips a step when *the twin's* gradients overflow, exactly as the
        real scaler does for the real ones. ``None`` (or a disabled scaler): no scaling.
        """
        if real_scaler is None or not real_scaler.is_enabled():
            self.scaler = None
            return None
        device = getattr(real_scaler, "_device", "cuda")
        self.scaler = torch.amp.GradScaler(device)
        self.scaler.load_state_dict(dict(state) if state else real_scaler.state_dict())
        return self.scaler

    def start(self) -> None:
        """Apply the initial perturbation and take the step-0 measurement."""
        if self.perturbation == "ulp":
            apply_ulp(
                dict(zip(self.names, self._twin_params)),
                names=self.ulp_names,
                fraction=self.fraction,
                single_weight=self.single_weight,
                seed=self.seed + self.resyncs,
            )
        self.measure()

    def resync(
        self,
        real_optimizer: torch.optim.Optimizer | None = None,
        real_scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        """Copy the real weights, buffers, optimizer and scaler state into the twin and perturb again.

        Used after the twin became non-finite. Measurements restart (step-0 reference, growth
        window); the history and the event list are kept.
        """
        self.resyncs += 1
        with torch.no_grad():
            self.twin.load_state_dict(self.real.state_dict())
        if real_optimizer is not None:
            self.attach_optimizer(real_optimizer)
        elif self.optimizer is not None:
            self.optimizer.state.clear()
        if real_scaler is not None:
            self.attach_scaler(real_scaler)  # else the twin keeps its own scaler (if any) as it is
        self.frozen = False
        self.nonfinite_step = None
        self._event_base = [None] * (len(self.layer_names) + 1)
        self._event_since = [-1] * (len(self.layer_names) + 1)
        self._init_buffers()
        self.start()

    # ------------------------------------------------------------------------------- stepping
    def sync_modes(self) -> None:
        """Give every twin submodule the train/eval mode, and every twin parameter the
        ``requires_grad`` flag, of its real counterpart (fine-tuning callbacks unfreeze layers)."""
        for m_real, m_twin in zip(self.real.modules(), self.twin.modules()):
            m_twin.training = m_real.training
        for p_real, p_twin in zip(self._real_params, self._twin_params):
            if p_twin.requires_grad != p_real.requires_grad:
                p_twin.requires_grad_(p_real.requires_grad)

    def _sync_param_groups(self) -> None:
        """Give the twin's optimizer the param groups added to the real one since it was attached
        (``add_param_group``, e.g. by Lightning's ``BaseFinetuning`` when it unfreezes a layer)."""
        real_opt, opt = self._real_optimizer, self.optimizer
        if real_opt is None or opt is None or len(real_opt.param_groups) <= len(opt.param_groups):
            return
        twin_of = dict(zip(self._real_params, self._twin_params))
        for group in real_opt.param_groups[len(opt.param_groups) :]:
            new = {k: copy.deepcopy(v) for k, v in group.items() if k != "params"}
            new["params"] = [twin_of[p] for p in group["params"]]
            opt.add_param_group(new)

    def backward(
        self,
        loss_fn: Callable[[nn.Module], torch.Tensor | None],
        rng: RngState | None = None,
        divide_by: int = 1,
    ) -> torch.Tensor | None:
        """Accumulate the twin's gradients of ``loss_fn(twin) / divide_by`` (one micro-batch).

        ``rng`` is the generator state captured before the real forward pass of the same
        micro-batch: the twin then draws the same dropout masks, and the global stream is left as
        it was. With a scaler attached (:meth:`attach_scaler`) the divided loss is scaled before the
        backward pass, as Lightning's mixed-precision plugin does. Returns the (detached, undivided)
        loss; a ``loss_fn`` that returns None (no loss for this micro-batch) gives None and no
        backward pass.
        """
        self.sync_modes()
        ctx = replay_rng(rng) if rng is not None else contextlib.nullcontext()
        with ctx, torch.enable_grad():
            loss = loss_fn(self.twin)
            if loss is None:
                return None
            # Same ops as Lightning's accumulation (``loss / N``, not in place) so bits agree.
            scaled = loss / divide_by
            if self.scaler is not None:
                scaled = self.scaler.scale(scaled)
            scaled.backward()
        return loss.detach()

    def trainable_twin_params(self) -> list[torch.Tensor]:
        """The twin's parameters that require gradients, in the real model's parameter order."""
        return [p for p in self._twin_params if p.requires_grad]

    def step(
        self,
        hparams: Sequence[Mapping[str, Any]] | None = None,
        *,
        clip_val: float | None = None,
        clip_algorithm: Literal["norm", "value"] = "norm",
        grad_transform: Callable[[list[torch.Tensor]], None] | None = None,
        loss: torch.Tensor | None = None,
        skip_update: bool = False,
    ) -> None:
        """One twin optimizer step on the gradients in the twin's ``.grad``, then a measurement.

        With a scaler attached the order is Lightning's: ``grad_transform`` (on the scaled
        gradients, like DDP's all-reduce) → ``scaler.unscale_`` → clipping → ``scaler.step`` (skipped
        by the twin's own scaler if the twin's gradients are not finite) → ``scaler.update``.

        Args:
            hparams: per param group, the hyper-parameters the real optimizer applied in this step
                (``lr``, ``momentum``, ... as read just before the real update): they are written
                into the twin's groups first, so any scheduler is followed.
            clip_val / clip_algorithm: the real run's gradient clipping (over all the optimizer's
                parameters, as Lightning does it); ``None`` or ``<= 0``: none.
            grad_transform: called with the twin's trainable parameters (``.grad`` may be None)
                before clipping: the DDP all-reduce goes here, and may set or clear ``.grad``.
            loss: the twin's loss, only checked for finiteness.
            skip_update: the real run made no update in this step although it counts as one
                (Lightning under a ``GradScaler`` when the last ``training_step`` returned None):
                the gradients are dropped, the step is counted and measured.
        """
        if self.optimizer is None:
            raise RuntimeError("call attach_optimizer() before step()")
        self._sync_param_groups()
        opt = self.optimizer
        if self.frozen:
            opt.zero_grad(set_to_none=True)
            return
        if grad_transform is not None:
            grad_transform(self.trainable_twin_params())
        if hparams is not None:
            for group, applied in zip(opt.param_groups, hparams):
                for key, value in applied.items():
                    if key != "params":
                        group[key] = _assign_hparam(group.get(key), value)
        scaler = self.scaler
        if scaler is not None and not skip_update and not getattr(opt, "_step_supports_amp_scaling", False):
            scaler.unscale_(opt)  # before clipping, as Lightning does (fused optimizers unscale in step)
        if clip_val is not None and clip_val > 0:
            params = [p for g in opt.param_groups for p in g["params"]]
            if clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, clip_value=clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(params, clip_val)
        if not skip_update:
            step_fn: Callable[[], Any] = opt.step if scaler is None else lambda: scaler.step(opt)
            if self.perturbation == "rescale" and self.rescale_k != 1.0:
                self._rescaled_step(opt, step_fn)
            else:
                step_fn()
            if scaler is not None:
                scaler.update()
        opt.zero_grad(set_to_none=True)
        self.steps += 1
        self.measure(loss)

    def _rescaled_step(self, opt: torch.optim.Optimizer, step_fn: Callable[[], Any]) -> None:
        """The paper's perturbation ``(k·lr)·(step/k)``, generically.

        Take the optimizer step with ``lr ← k·lr`` and then set ``p ← p_old + (p − p_old)/k``. For
        every optimizer in :data:`RESCALE_OPTIMIZERS` the update is ``lr·u`` with ``u`` and the
        state (momentum buffers, Adam moments, step counts) independent of lr — for SGD
        ``u = buf`` (momentum, weight decay and Nesterov included), for Adam/AdamW ``u = m̂/(√v̂+ε)``
        (+ ``wd·p`` for AdamW's decoupled decay, which is also ``lr``-linear), for RMSprop
        ``u = g/(√v+ε)`` or its momentum buffer — so the result equals the real update in exact
        arithmetic and differs only by the roundings of the multiply, subtract and divide.
        """
        k = self.rescale_k
        with torch.no_grad():
            old = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
            saved = [g["lr"] for g in opt.param_groups]
            for g in opt.param_groups:
                g["lr"] = g["lr"] * k
            try:
                step_fn()  # a step skipped by the scaler leaves p = p_old: the update below is 0
            finally:
                for g, lr in zip(opt.param_groups, saved):
                    g["lr"] = lr
            i = 0
            for g in opt.param_groups:
                for p in g["params"]:
                    p.copy_(old[i] + (p - old[i]) / k)
                    i += 1

    # ---------------------------------------------------------------------------- measuring
    @torch.no_grad()
    def measure(self, loss: torch.Tensor | None = None) -> None:
        """Update the on-device gap buffers for the present step (no host sync)."""
        n_layers = len(self.layer_names)
        dt, dev = self._acc_dtype(), self.device
        real = [p.detach() for p in self._real_params]
        twin = [p.detach() for p in self._twin_params]
        diff = torch._foreach_sub(twin, real)
        num_p = torch.stack([x.to(dt) for x in torch._foreach_norm(diff, 1)])
        den_p = torch.stack([x.to(dt) for x in torch._foreach_norm(real, 1)])
        index = self._index_tensor()
        num = torch.zeros(n_layers + 1, dtype=dt, device=dev).index_add_(0, index, num_p)
        den = torch.zeros(n_layers + 1, dtype=dt, device=dev).index_add_(0, index, den_p)
        num[-1], den[-1] = num_p.sum(), den_p.sum()
        # 0/0 (all-zero layer, identical twin) is a zero gap, not NaN.
        ratio = num / den.clamp_min(torch.finfo(dt).tiny)
        gap = torch.where(den > 0, ratio, torch.where(num > 0, math.inf, 0.0))
        self._gap = gap
        if self.d_metric:
            abs_sum = torch._foreach_add(torch._foreach_abs(twin), torch._foreach_abs(real))
            total, count = torch.zeros((), dtype=dt, device=dev), 0
            for d, s in zip(diff, abs_sum):
                total = total + torch.where(s > 0, d.abs() / s, torch.zeros_like(s)).sum().to(dt)
                count += d.numel()
            self._d = 2.0 * total / max(count, 1)
        step = self.steps
        bad = ~torch.isfinite(num[-1])
        if loss is not None:
            bad = bad | ~torch.isfinite(loss.detach()).all()
        self._first_nonfinite = torch.where((self._first_nonfinite < 0) & bad, step, self._first_nonfinite)
        pos = (gap > 0) & torch.isfinite(gap)
        self._ref = torch.where((self._ref == 0) & pos, gap, self._ref)
        self._first_nonzero = torch.where((self._first_nonzero < 0) & (gap > 0), step, self._first_nonzero)
        self._first_above = torch.where(
            (self._first_above < 0) & (gap > self.threshold), step, self._first_above
        )
        self._max_gap = torch.maximum(self._max_gap, torch.where(torch.isfinite(gap), gap, 0.0))
        slot = step % self.window
        self._log_ring[slot] = torch.where(pos, gap.log(), math.nan)
        self._step_ring[slot] = float(step)

    def _index_tensor(self) -> torch.Tensor:
        # Built once per device: a per-step host-to-device copy would cost a sync on accelerators.
        cached = getattr(self, "_index", None)
        if cached is None or cached.device != self.device:
            n_layers = len(self.layer_names)
            cached = torch.tensor([i if i >= 0 else n_layers for i in self._layer_index], device=self.device)
            self._index = cached
        return cached

    def _growth(self) -> torch.Tensor:
        """Least-squares slope of ln gap per step over the window, per layer (NaN if < 2 points)."""
        y = self._log_ring
        x = self._step_ring.unsqueeze(1).expand_as(y)
        m = torch.isfinite(y) & torch.isfinite(x)
        cnt = m.sum(0).to(y.dtype)
        xs = torch.where(m, x, 0.0)
        ys = torch.where(m, y, 0.0)
        xm = xs.sum(0) / cnt.clamp_min(1)
        ym = ys.sum(0) / cnt.clamp_min(1)
        dx = torch.where(m, x - xm, 0.0)
        sxx = (dx * dx).sum(0)
        sxy = (dx * torch.where(m, y - ym, 0.0)).sum(0)
        return torch.where((cnt >= 2) & (sxx > 0), sxy / sxx.clamp_min(1e-300), math.nan)

    def read(self) -> dict[str, Any]:
        """All present measurements as plain Python numbers (one host sync)."""
        n = len(self.layer_names) + 1
        growth = self._growth()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            amp = torch.where(self._ref > 0, torch.log10(self._gap / self._ref), math.nan)
        packed = torch.cat(
            [
                self._gap,
                growth,
                amp,
                self._ref,
                self._max_gap,
                self._d.reshape(1).to(self._gap.dtype),
                self._first_nonzero.to(self._gap.dtype),
                self._first_above.to(self._gap.dtype),
                self._first_nonfinite.reshape(1).to(self._gap.dtype),
            ]
        ).tolist()
        gap, growth_l, amp_l = packed[:n], packed[n : 2 * n], packed[2 * n : 3 * n]
        ref, max_gap = packed[3 * n : 4 * n], packed[4 * n : 5 * n]
        d = packed[5 * n]
        first_nz = [int(v) for v in packed[5 * n + 1 : 6 * n + 1]]
        first_above = [int(v) for v in packed[6 * n + 1 : 7 * n + 1]]
        first_nonfinite = int(packed[7 * n + 1])
        layers = self.layer_names
        out: dict[str, Any] = {
            "step": self.steps,
            "divergence": gap[-1],
            "growth_rate": growth_l[-1],
            "amplification": amp_l[-1],
            "reference": ref[-1],
            "max_divergence": max_gap[-1],
            "first_step_nonzero": first_nz[-1],
            "first_step_above": first_above[-1],
            "first_step_nonfinite": first_nonfinite,
            "layers": {k: gap[i] for i, k in enumerate(layers)},
            "layer_growth_rate": {k: growth_l[i] for i, k in enumerate(layers)},
            "layer_amplification": {k: amp_l[i] for i, k in enumerate(layers)},
            "layer_first_step_nonzero": {k: first_nz[i] for i, k in enumerate(layers)},
        }
        if self.d_metric:
            out["d_metric"] = d
        return out

    def record(self, label_step: int | None = None) -> dict[str, Any]:
        """Read, detect events and non-finite twins, append to :attr:`history` and return the record.

        Args:
            label_step: the caller's step number stored with the record (e.g. the trainer's
                ``global_step``); default the twin's own step count.
        """
        r = self.read()
        r["global_step"] = self.steps if label_step is None else int(label_step)
        r["events"] = self._detect_events(r)
        if r["first_step_nonfinite"] >= 0 and self.nonfinite_step is None:
            self.nonfinite_step = r["first_step_nonfinite"]
            r["nonfinite"] = True
        if self.first_nonzero is None and r["first_step_nonzero"] >= 0 and self.perturbation == "none":
            first = min(
                ((v, k) for k, v in r["layer_first_step_nonzero"].items() if v >= 0),
                default=(r["first_step_nonzero"], "(total)"),
            )
            self.first_nonzero = {"step": first[0], "layer": first[1]}
        self.history.append(r)
        return r

    def _detect_events(self, r: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Restrained instability: ≥ ``event_decades`` of growth, then a window of saturation."""
        found = []
        keys = [*self.layer_names, "(total)"]
        gaps = [*r["layers"].values(), r["divergence"]]
        rates = [*r["layer_growth_rate"].values(), r["growth_rate"]]
        refs = [*(None for _ in self.layer_names), r["reference"]]
        for i, (key, gap, rate) in enumerate(zip(keys, gaps, rates)):
            if not (math.isfinite(gap) and gap > 0):
                continue
            if self._event_base[i] is None:
                ref = refs[i]
                self._event_base[i] = math.log10(ref if ref else gap)
            base = self._event_base[i]
            assert base is not None
            amp = math.log10(gap) - base
            if amp >= 1.0 and self._event_since[i] < 0:
                self._event_since[i] = r["step"]
            window_growth = rate * (self.window - 1) / math.log(10) if math.isfinite(rate) else math.inf
            if amp >= self.event_decades and window_growth < self.saturation_decades:
                event = {
                    "event": "restrained_instability",
                    "layer": key,
                    "start_step": self._event_since[i],
                    "end_step": r["step"],
                    "decades": amp,
                    "level": gap,
                }
                self.events.append(event)
                found.append(event)
                self._event_base[i] = math.log10(gap)  # a later event must grow again from here
                self._event_since[i] = -1
        return found

    def summary(self) -> dict[str, Any]:
        """A plain summary of the run so far (reads the device once)."""
        r = self.read()
        return {
            "perturbation": self.perturbation,
            "steps": self.steps,
            "divergence": r["divergence"],
            "start_divergence": r["reference"],
            "max_divergence": r["max_divergence"],
            "amplification_decades": r["amplification"],
            "growth_rate": r["growth_rate"],
            "first_step_above_threshold": r["first_step_above"],
            "threshold": self.threshold,
            "restrained_instability_events": len(self.events),
            "events": list(self.events),
            "nonfinite_step": self.nonfinite_step,
            "frozen": self.frozen,
            "resyncs": self.resyncs,
            "deterministic": (self.first_nonzero is None and r["first_step_nonzero"] < 0)
            if self.perturbation == "none"
            else None,
            "first_nonzero": self.first_nonzero,
        }

    def measurement_buffers(self) -> list[torch.Tensor]:
        """The on-device measurement state (for memory accounting; ``O(window × layers)``)."""
        return [getattr(self, name) for name in _BUFFERS]

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and primitives only (loads with ``torch.load(weights_only=True)``)."""
        return {
            "twin": {k: v.detach().clone() for k, v in self.twin.state_dict().items()},
            "optimizer": copy.deepcopy(self.optimizer.state_dict()) if self.optimizer is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "steps": self.steps,
            "resyncs": self.resyncs,
            "frozen": self.frozen,
            "nonfinite_step": self.nonfinite_step,
            "first_nonzero": dict(self.first_nonzero) if self.first_nonzero else None,
            "history": copy.deepcopy(self.history),
            "events": copy.deepcopy(self.events),
            "event_base": list(self._event_base),
            "event_since": list(self._event_since),
            "buffers": {name: getattr(self, name).detach().clone() for name in _BUFFERS},
        }

    def load_state_dict(self, state: Mapping[str, Any], *, load_optimizer: bool = True) -> None:
        """Restore :meth:`state_dict`.

        The optimizer and scaler parts are restored only if ``load_optimizer`` and they are
        attached; otherwise pass them to :meth:`attach_scaler` / ``optimizer.load_state_dict`` later.
        """
        with torch.no_grad():
            self.twin.load_state_dict(state["twin"])
        if load_optimizer and state.get("optimizer") is not None and self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if load_optimizer and state.get("scaler") and self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.steps = int(state["steps"])
        self.resyncs = int(state["resyncs"])
        self.frozen = bool(state["frozen"])
        self.nonfinite_step = state["nonfinite_step"]
        self.first_nonzero = state["first_nonzero"]
        self.history = list(state["history"])
        self.events = list(state["events"])
        self._event_base = list(state["event_base"])
        self._event_since = list(state["event_since"])
        for name, value in state["buffers"].items():
            setattr(self, name, value.to(self.device))


_BUFFERS = (
    "_gap",
    "_d",
    "_ref",
    "_log_ring",
    "_step_ring",
    "_first_nonzero",
    "_first_above",
    "_first_nonfinite",
    "_max_gap",
)
