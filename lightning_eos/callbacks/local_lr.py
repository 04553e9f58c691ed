"""AdaptiveLocalLR: per-layer learning rates that keep training below the edge of stability.

A thin adapter over :class:`lightning_eos.local_lr.LocalLRController` (the maths, the update
scaling, the state). This callback decides *when* to refresh (every ``every_n_steps`` optimizer steps
or inside a wall-time ``budget``), builds the Hessian of the user's own ``training_step`` on a
parameter-sharing replica (:class:`~lightning_eos.callbacks._lightning.StepReplica`: no logging, no
buffer or RNG side effects, all-reduced over DDP ranks), feeds an attached
:class:`~lightning_eos.callbacks.TwinDivergence`'s per-layer growth rates to the controller, logs, and
checkpoints.

Where things happen in a training step (automatic optimization):

1. ``on_train_batch_start`` (first micro-batch of a step): refresh if due, on the weights and the
   LRs the coming step will use (a step scheduler moved them at the end of the previous batch).
2. ``optimizer.step``: the torch pre-hook computes the multipliers from the live LRs and snapshots
   the layers that are scaled; the update runs untouched; the post-hook rescales each layer's update.
3. ``on_train_batch_end``: log what the step applied.

``param_groups`` are never edited: schedulers, ``LearningRateMonitor`` and checkpoints see the user's
LRs; a checkpoint saved with the callback resumes without it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_eos import bounds, curvature
from lightning_eos.budget import MeasurementBudget
from lightning_eos.callbacks._lightning import (
    StepReplica,
    allreduce_sum,
    check_supported_strategy,
    log_metrics,
    logging_step,
    merge_custom_scalars,
)
from lightning_eos.callbacks._probe import FixedProbe, probe_loss_is_finite, probe_objective, probe_precision
from lightning_eos.callbacks._validation import ArgCheck
from lightning_eos.isolation import isolated_rng, rng_devices
from lightning_eos.local_lr import (
    LayerUpdateScaler,
    LocalLRController,
    LocalLRRecord,
    RefreshSchedule,
    check_linear_update,
    controlled_layers,
)

__all__ = ["AdaptiveLocalLR"]

_STATE_VERSION = 1
LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]


class AdaptiveLocalLR(Callback):
    r"""Adapt the learning rate layer by layer (space) and refresh it on a schedule (time).

    Each layer ``l`` gets a multiplier ``s_l`` of the user's LR: ``safety`` times its largest stable
    LR ``η*_l = bounds.max_stable_lr(λ_l, optimizer, group)`` from its block sharpness ``λ_l``
    (preconditioned for the Adam family), capped at 1 (``mode="cap"``) or ``max_multiplier``
    (``"fill"``), then all scaled together when the coupled ratio
    ``λ_max(D^{1/2} H D^{1/2}) / constant`` exceeds ``safety``. See :mod:`lightning_eos.local_lr`.

    Args:
        every_n_steps: the longest interval between refreshes, in optimizer steps (the first
            refresh is before step 0; Adam-family optimizers from the first step with optimizer
            state). ``None`` with ``budget``.
        adaptive_interval: start at an interval of 1 step, halve it when some layer's curvature
            rose by more than ``rise_tolerance`` over its recent maximum and double it otherwise,
            up to ``every_n_steps`` (:class:`lightning_eos.local_lr.RefreshSchedule`); ``False``:
            exactly every ``every_n_steps``.
        rise_tolerance: see ``adaptive_interval`` (relative, > 0).
        budget: instead, keep the refreshes' share of wall time at most this fraction, in (0, 1)
            (:class:`lightning_eos.budget.MeasurementBudget`); requires ``every_n_steps=None``.
        mode: ``"cap"`` only lowers the user's LR; ``"fill"`` also raises layers whose bound lies
            far above it, up to ``max_multiplier``.
        safety: fraction of the edge aimed at, in (0, 1].
        max_multiplier: the ceiling of ``"fill"`` (≥ 1).
        max_change: a layer's bound rises by at most this factor per refresh (> 1); decreases are
            applied at once.
        smoothing: weight of the previous curvature in the average of decreasing curvatures, [0, 1).
        layers: ``"module"`` (the owning module, as every lightning-eos key), ``"parameter"`` (each
            tensor), ``"global"`` (one multiplier: the ablation), or a mapping ``{parameter name or
            module prefix: layer label}`` (uncovered parameters keep their module layer).
        coupled: run the coupled check (one extra eigen-solve per refresh).
        probe: ``"current"``: the Hessian of the batch the coming step trains on (all ranks'
            batches under DDP); ``"fixed"``: of ``probe_size`` samples drawn once from the map-style
            train dataset.
        probe_size: samples of the fixed probe (global over ranks); ``None``: the whole dataset.
        probe_batch_size: the fixed probe is evaluated in chunks of this many samples (default: the
            loader's batch size).
        probe_mode: ``"train"`` (dropout on with a private seeded mask, BatchNorm batch statistics,
            running statistics untouched) or ``"eval"``.
        tol: relative accuracy of each solve (residual and eigenvalue error ≤ tol·θ; the curvature
            used is θ + residual, an upper estimate).
        max_iter: products per solve at most (≥ 2).
        warm_start: start each solve from the previous refresh's eigenvector (saved in checkpoints:
            about one copy of the controlled parameters).
        twin: use a :class:`~lightning_eos.callbacks.TwinDivergence` in ``trainer.callbacks``:
            ``"auto"`` if one is present with the same layer naming, ``True`` require one, ``False``
            never. A layer whose twin gap grows faster than ``twin_threshold`` (``ln gap`` per step)
            is cut by ``twin_cut`` at a refresh; otherwise it recovers toward its curvature value.
        twin_threshold: see ``twin`` (> 0).
        twin_cut: see ``twin``, in (0, 1).
        freeze_after: ``None`` (default) adapts for the whole run; an int ``n >= 1`` stops refreshing
            after ``n`` refreshes and keeps the bounds measured by then (static per-layer multipliers
            at a constant LR: the "is adapting in time worth it?" ablation).
        check_weight_decay: also measure each block's λ_min and warn once per layer whose coupled
            weight decay lies outside its window (``bounds.weight_decay_window``; SGD family only).
        optimizer_idx: which optimizer of ``configure_optimizers`` to control.
        log_prefix: prefix of the logged keys.
        loss_fn: ``loss_fn(model, batch) -> scalar mean loss`` (or its import path) instead of the
            module's ``training_step``; ``model`` is a parameter-sharing replica.
        seed: seed of the fixed probe draw, the dropout masks and the solvers (never the global RNG).

    Logged (``<p>`` = ``log_prefix``): ``<p>/multiplier/<layer>``, ``<p>/effective_lr/<layer>``
    (multiplier × the LR the step applied) and ``<p>/min_multiplier`` at every refresh and every
    ``log_every_n_steps``; at refreshes ``<p>/bound/<layer>`` (η*_l), ``<p>/curvature/<layer>``
    (λ_l), ``<p>/coupled_ratio`` (at the applied multipliers), ``<p>/coupled_ratio_raw`` (before the
    common rescaling), ``<p>/hvps``.
    """

    def __init__(
        self,
        every_n_steps: int | None = 25,
        adaptive_interval: bool = True,
        rise_tolerance: float = 0.1,
        budget: float | None = None,
        mode: Literal["cap", "fill"] = "cap",
        safety: float = 0.8,
        max_multiplier: float = 10.0,
        max_change: float = 2.0,
        smoothing: float = 0.5,
        layers: Literal["module", "parameter", "global"] | dict[str, str] = "module",
        coupled: bool = True,
        probe: Literal["current", "fixed"] = "current",
        probe_size: int | None = 1024,
        probe_batch_size: int | None = None,
        probe_mode: Literal["train", "eval"] = "train",
        tol: float = 1e-2,
        max_iter: int = 50,
        warm_start: bool = True,
        twin: bool | Literal["auto"] = "auto",
        twin_threshold: float = 0.01,
        twin_cut: float = 0.5,
        freeze_after: int | None = None,
        check_weight_decay: bool = False,
        optimizer_idx: int = 0,
        log_prefix: str = "local_lr",
        loss_fn: Callable[..., torch.Tensor] | str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check = ArgCheck("AdaptiveLocalLR")
        check.positive_int("every_n_steps", every_n_steps, allow_none=True)
        if budget is not None and (
            isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < budget < 1.0
        ):
            raise check.fail("budget", budget, "None or a float in (0, 1)")
        if (every_n_steps is None) == (budget is None):
            raise check.fail(
                "every_n_steps",
                every_n_steps,
                f"a positive int with budget=None, or None with a budget (got budget={budget!r}): choose "
                "one schedule",
            )
        check.flag("adaptive_interval", adaptive_interval)
        check.positive_float("rise_tolerance", rise_tolerance)
        check.choice("mode", mode, ("cap", "fill"))
        check.unit_fraction("safety", safety)
        check.positive_float("max_multiplier", max_multiplier)
        if max_multiplier < 1.0:
            raise check.fail("max_multiplier", max_multiplier, "a float >= 1")
        check.positive_float("max_change", max_change)
        if max_change <= 1.0:
            raise check.fail("max_change", max_change, "a float > 1")
        if (
            isinstance(smoothing, bool)
            or not isinstance(smoothing, (int, float))
            or not 0.0 <= smoothing < 1.0
        ):
            raise check.fail("smoothing", smoothing, "a float in [0, 1)")
        if isinstance(layers, str):
            check.choice("layers", layers, ("module", "parameter", "global"))
        elif (
            not isinstance(layers, Mapping)
            or not layers
            or not all(isinstance(k, str) and k and isinstance(v, str) and v for k, v in layers.items())
        ):
            raise check.fail(
                "layers",
                layers,
                "'module', 'parameter', 'global' or a non-empty dict {param/module name: label}",
            )
        check.flag("coupled", coupled)
        check.choice("probe", probe, ("current", "fixed"))
        check.positive_int("probe_size", probe_size, allow_none=True)
        check.positive_int("probe_batch_size", probe_batch_size, allow_none=True)
        check.choice("probe_mode", probe_mode, ("train", "eval"))
        check.positive_float("tol", tol)
        check.int_at_least("max_iter", max_iter, 2)
        check.flag("warm_start", warm_start)
        check.choice("twin", twin, ("auto", True, False))
        check.positive_float("twin_threshold", twin_threshold)
        if isinstance(twin_cut, bool) or not isinstance(twin_cut, (int, float)) or not 0.0 < twin_cut < 1.0:
            raise check.fail("twin_cut", twin_cut, "a float in (0, 1)")
        check.positive_int("freeze_after", freeze_after, allow_none=True)
        check.flag("check_weight_decay", check_weight_decay)
        check.int_at_least("optimizer_idx", optimizer_idx, 0)
        check.log_prefix("log_prefix", log_prefix)
        check.integer("seed", seed)

        self.every_n_steps = every_n_steps
        self.adaptive_interval = adaptive_interval
        self.rise_tolerance = float(rise_tolerance)
        self.budget = None if budget is None else float(budget)
        self.mode = mode
        self.safety = float(safety)
        self.max_multiplier = float(max_multiplier)
        self.max_change = float(max_change)
        self.smoothing = float(smoothing)
        self.layers = dict(layers) if isinstance(layers, Mapping) else layers
        self.coupled = coupled
        self.probe = probe
        self.probe_size = probe_size
        self.probe_batch_size = probe_batch_size
        self.probe_mode = probe_mode
        self.tol = float(tol)
        self.max_iter = max_iter
        self.warm_start = warm_start
        self.twin = twin
        self.twin_threshold = float(twin_threshold)
        self.twin_cut = float(twin_cut)
        self.freeze_after = freeze_after
        self.check_weight_decay = check_weight_decay
        self.optimizer_idx = optimizer_idx
        self.log_prefix = log_prefix
        self.loss_fn = check.callable_or_import_path("loss_fn", loss_fn, "(model, batch) -> scalar loss")
        self.seed = seed

        self.controller: LocalLRController | None = None
        self._pending: dict[str, Any] | None = None  # state loaded before on_fit_start
        self._budget: MeasurementBudget | None = None
        self._schedule: RefreshSchedule | None = None
        self._opt_steps = 0  # optimizer steps started (resumable): the refresh schedule counts these
        self._retry = False  # a due refresh had nothing to measure yet (Adam before its first step)
        self._last_start_step = -1
        self._last_twin_step: int | None = None
        self._twin_cb: Any = None
        self._sign = 1.0
        self._probe = FixedProbe("AdaptiveLocalLR", probe_size, probe_batch_size, seed)
        self._refreshed_this_step: LocalLRRecord | None = None
        self._logged_scaler_steps = 0
        self._clock: float | None = None
        self._refresh_seconds = 0.0
        self._notes: set[str] = set()

    # ------------------------------------------------------------------ Lightning plumbing
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(optimizer_idx=self.optimizer_idx, log_prefix=self.log_prefix)

    @property
    def history(self) -> list[LocalLRRecord]:
        """One record per refresh (empty before ``fit``)."""
        return self.controller.history if self.controller is not None else []

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        check_supported_strategy(trainer, type(self).__name__)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.controller is not None:
            self.controller.detach()
        n_opt = len(trainer.optimizers)
        if self.optimizer_idx >= n_opt:
            raise ValueError(
                f"AdaptiveLocalLR: optimizer_idx={self.optimizer_idx} is not supported: configure_optimizers "
                f"returned {n_opt} optimizer(s); accepted values: 0..{n_opt - 1}."
            )
        optimizer = trainer.optimizers[self.optimizer_idx]
        check_linear_update(optimizer)  # refuses LBFGS, schedule-free, Prodigy, ... with the reason
        self._sign = bounds.objective_sign(optimizer)
        layer_map = controlled_layers(pl_module, optimizer, self.layers)  # type: ignore[arg-type]
        self.controller = LocalLRController(
            optimizer,
            layer_map,
            mode=self.mode,
            safety=self.safety,
            max_multiplier=self.max_multiplier,
            max_change=self.max_change,
            smoothing=self.smoothing,
            coupled=self.coupled,
            tol=self.tol,
            max_iter=self.max_iter,
            warm_start=self.warm_start,
            check_weight_decay=self.check_weight_decay,
            twin_threshold=self.twin_threshold,
            twin_cut=self.twin_cut,
            freeze_after=self.freeze_after,
            seed=self.seed,
            warn=lambda msg: rank_zero_warn(msg, category=RuntimeWarning),
        )
        self._twin_cb = self._find_twin(trainer)
        self._twin_scalers: dict[int, LayerUpdateScaler] = {}  # per TwinDivergence: its mirrored scaling
        if self.budget is not None:
            n_layers = len(layer_map)
            self._budget = MeasurementBudget(self.budget, first_cost_steps=1.0 + 15.0 * (n_layers + 1))
        else:
            assert self.every_n_steps is not None
            self._schedule = RefreshSchedule(
                self.every_n_steps, tolerance=self.rise_tolerance, adaptive=self.adaptive_interval
            )
        pending, self._pending = self._pending, None
        if pending is not None:
            self.controller.load_state_dict(pending["controller"])
            self._opt_steps = int(pending["opt_steps"])
            self._retry = bool(pending["retry"])
            self._last_twin_step = pending.get("last_twin_step")
            if self._budget is not None and pending.get("budget") is not None:
                self._budget.load_state_dict(pending["budget"])
            if self._schedule is not None and pending.get("schedule") is not None:
                self._schedule.load_state_dict(pending["schedule"])
        self._last_start_step = -1
        self._logged_scaler_steps = 0
        self._clock = None
        self.controller.attach()
        merge_custom_scalars(trainer, self._layout())

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.probe == "fixed":
            self._probe.build(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.controller is None or trainer.global_step == self._last_start_step:
            return  # an accumulation micro-batch after the first: the step's refresh is done
        self._mirror_into_twins(trainer)
        self._last_start_step = trainer.global_step
        self._refreshed_this_step = None
        now = time.perf_counter()
        if self._budget is not None and self._clock is not None:
            self._budget.observe_step(now - self._clock - self._refresh_seconds)
        elif self._budget is not None and self._budget.steps < self._opt_steps:
            # Resumed: the step before the checkpoint was never timed (its end is timed at the next
            # batch start, in the interrupted run). Count it at the mean step time, so the budget
            # counts the optimizer's steps and its planned step stays the same step of training.
            self._budget.observe_step(self._budget.step_time)
        self._clock, self._refresh_seconds = now, 0.0
        if self._due(trainer):
            start = time.perf_counter()
            record = self._refresh(trainer, pl_module, batch)
            self._refresh_seconds = time.perf_counter() - start
            self._retry = record is None
            if record is not None:
                self._refreshed_this_step = record
                if self._budget is not None:
                    self._budget.measured(self._refresh_seconds, self._agree(trainer))
                if self._schedule is not None:
                    self._schedule.refreshed(self._opt_steps, record.curvature_rise)
                log_metrics(trainer, self._refresh_metrics(record), step=logging_step(trainer))
        self._opt_steps += 1

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        ctl = self.controller
        if ctl is None or ctl.scaler.steps == self._logged_scaler_steps or ctl.last_plan is None:
            return
        self._logged_scaler_steps = ctl.scaler.steps
        every = max(int(getattr(trainer, "log_every_n_steps", 50) or 1), 1)
        if self._refreshed_this_step is None and logging_step(trainer) % every != 0:
            return
        plan = ctl.last_plan
        p = self.log_prefix
        metrics: dict[str, float] = {f"{p}/min_multiplier": min(plan.multiplier.values())}
        for name, value in plan.multiplier.items():
            metrics[f"{p}/multiplier/{name}"] = value
            metrics[f"{p}/effective_lr/{name}"] = plan.effective_lr[name]
        log_metrics(trainer, metrics, step=logging_step(trainer))

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.controller is not None:
            self.controller.detach()

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.controller is not None:
            self.controller.detach()

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and primitives only (checkpoints load with ``weights_only=True``)."""
        if self.controller is None:
            return dict(self._pending) if self._pending is not None else {}
        return {
            "version": _STATE_VERSION,
            "controller": self.controller.state_dict(),
            "opt_steps": self._opt_steps,
            "retry": self._retry,
            "last_twin_step": self._last_twin_step,
            "budget": None if self._budget is None else self._budget.state_dict(),
            "schedule": None if self._schedule is None else self._schedule.state_dict(),
            "probe_indices": self._probe.state(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied in on_fit_start, once the controller (which needs the optimizer) exists.
        self._pending = dict(state_dict)
        self._probe.restore(state_dict.get("probe_indices"))

    # ------------------------------------------------------------------ schedule
    def _due(self, trainer: Trainer) -> bool:
        if self.controller is not None and self.controller.frozen:
            return False  # freeze_after reached: the bounds stay as measured, no more products
        if self._retry:
            return True
        if self._schedule is not None:
            return self._schedule.due(self._opt_steps)
        assert self._budget is not None
        if self._opt_steps == 0:
            return True  # the initial curvature, before the first step
        return self._budget.due(self._agree(trainer))

    @staticmethod
    def _agree(trainer: Trainer) -> Callable[[int], int] | None:
        if trainer.world_size <= 1:
            return None
        return lambda proposal: int(trainer.strategy.broadcast(int(proposal), src=0))

    # ------------------------------------------------------------------ twin
    def _mirror_into_twins(self, trainer: Trainer) -> None:
        """Every TwinDivergence's optimizer applies the multipliers the real step applied.

        A twin steps after the real step of the same batch (in its ``on_train_batch_end``): its own
        :class:`LayerUpdateScaler` reads ``controller.scaler.last``, so the twin takes the same
        scaled update and stays in lockstep (an unperturbed twin stays exactly on the real model).
        A twin re-synced after a non-finite step has a new optimizer: it is wired again.
        """
        from lightning_eos.callbacks.twin import TwinDivergence

        controller = self.controller
        assert controller is not None
        for cb in trainer.callbacks:  # type: ignore[attr-defined]
            engine = getattr(cb, "engine", None) if isinstance(cb, TwinDivergence) else None
            if engine is None or engine.optimizer is None:
                continue
            wired = self._twin_scalers.get(id(cb))
            if wired is not None and wired.optimizer is engine.optimizer:
                continue
            if wired is not None:
                wired.detach()
            layers = {name: [engine.pairing.twin_of(p) for p in ps] for name, ps in controller.layers.items()}
            mirror = LayerUpdateScaler(engine.optimizer, layers, lambda: dict(controller.scaler.last))
            mirror.attach()
            self._twin_scalers[id(cb)] = mirror

    def _find_twin(self, trainer: Trainer) -> Any:
        if self.twin is False:
            return None
        from lightning_eos.callbacks.twin import TwinDivergence

        found = [cb for cb in trainer.callbacks if isinstance(cb, TwinDivergence)]  # type: ignore[attr-defined]
        compatible = [cb for cb in found if isinstance(self.layers, str) and cb.layers == self.layers]
        if self.twin is True and not compatible:
            raise ValueError(
                "AdaptiveLocalLR: twin=True needs a TwinDivergence in trainer.callbacks with the same layer "
                f"naming (layers={self.layers!r}); found "
                f"{[cb.layers for cb in found] or 'none'}. Accepted values: 'auto', False, or add "
                f"TwinDivergence(layers={self.layers!r})."
            )
        if found and not compatible:
            self._note(
                "twin",
                f"AdaptiveLocalLR: the TwinDivergence's layers ({found[0].layers!r}) do not name the same "
                f"layers as layers={self.layers!r}; its growth rates are not used.",
            )
        return compatible[0] if compatible else None

    def _twin_growth(self) -> tuple[int, Mapping[str, float]] | None:
        twin = self._twin_cb
        if twin is None or not twin.history:
            return None
        rec = twin.history[-1]

        def get(key: str, default: Any = None) -> Any:
            return rec.get(key, default) if isinstance(rec, Mapping) else getattr(rec, key, default)

        step = get("global_step", None)
        step = get("step", 0) if step is None else step
        return int(step), dict(get("layer_growth_rate", {}) or {})

    # ------------------------------------------------------------------ refresh
    def _refresh(self, trainer: Trainer, pl_module: LightningModule, batch: Any) -> LocalLRRecord | None:
        ctl = self.controller
        assert ctl is not None
        growth = self._twin_growth()
        if growth is not None and growth[0] != self._last_twin_step:
            self._last_twin_step = growth[0]
            ctl.update_twin(growth[1])
        params = [p for ps in ctl.layers.values() for p in ps]
        reduce = allreduce_sum(trainer)
        if self.probe == "fixed":
            probe, fixed_weights = self._probe.ensure(trainer, pl_module)
            weights: list[float] | None = fixed_weights
        else:
            probe, weights = [batch], None
        device = params[0].device
        sign = self._sign
        record: LocalLRRecord | None = None
        with isolated_rng(rng_devices(params)), probe_precision(device):
            replica = StepReplica(
                pl_module, trainer, share_parameters=True, eager=True, optimizer_idx=self.optimizer_idx
            )
            loss_fn = probe_objective(replica, self.loss_fn, sign)

            if probe_loss_is_finite(replica.module, loss_fn, probe, trainer, self.probe_mode):
                op = curvature.HessianOperator(
                    replica.module,
                    loss_fn,
                    curvature.Batches(probe),
                    params=params,
                    mode=self.probe_mode,
                    weights=weights,
                    reduce=reduce,
                    seed=self.seed,
                )
                record = ctl.refresh(op, step=int(trainer.global_step), log_step=logging_step(trainer))
                op.release()
            else:
                self._note(
                    "nan",
                    f"AdaptiveLocalLR: the probe loss at step {trainer.global_step} is not finite; the "
                    "multipliers keep their previous values (warned once).",
                )
        if trainer.world_size > 1:
            # Every rank applies rank zero's multipliers (the all-reduced products make them equal
            # already; the broadcast makes it certain).
            shared = trainer.strategy.broadcast(ctl.shared_state(), src=0)
            ctl.load_shared_state(shared)
        return record

    # ------------------------------------------------------------------ logging
    def _refresh_metrics(self, record: LocalLRRecord) -> dict[str, float]:
        p = self.log_prefix
        out: dict[str, float] = {
            f"{p}/coupled_ratio": record.coupled_ratio,
            f"{p}/coupled_ratio_raw": record.coupled_ratio_raw,
            f"{p}/hvps": float(record.hvps),
        }
        for name, value in record.bound.items():
            out[f"{p}/bound/{name}"] = value
        for name, value in record.curvature.items():
            out[f"{p}/curvature/{name}"] = value
        return out

    def _layout(self) -> dict[str, dict[str, list[Any]]]:
        p = re.escape(self.log_prefix)
        return {
            f"{self.log_prefix}: local learning rates": {
                "multiplier per layer": ["Multiline", [rf"^{p}/multiplier/.*", rf"^{p}/min_multiplier$"]],
                "effective lr vs bound": ["Multiline", [rf"^{p}/effective_lr/.*", rf"^{p}/bound/.*"]],
                "coupled ratio (1 = edge)": [
                    "Multiline",
                    [rf"^{p}/coupled_ratio$", rf"^{p}/coupled_ratio_raw$"],
                ],
                "block curvature": ["Multiline", [rf"^{p}/curvature/.*"]],
            }
        }

    def _note(self, key: str, message: str) -> None:
        if key not in self._notes:
            self._notes.add(key)
            rank_zero_warn(message, category=RuntimeWarning)
