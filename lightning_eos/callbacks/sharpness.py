"""SharpnessMonitor: the training loss's top Hessian eigenvalue against the optimizer's threshold.

Every ``every_n_steps`` real optimizer steps the callback measures, on the weights just updated,

* the sharpness λ_max of the user's training loss (of P⁻¹H for the Adam family) on a probe set,
* the critical sharpness the optimizer's *applied* hyper-parameters allow (``lightning_eos.bounds``),
  their ratio (1 = edge of stability) and the largest stable learning rate,
* optionally λ_min and the coupled weight-decay window, per-layer block sharpness, and the batch
  sharpness gᵀHg/‖g‖² of the current batch (the edge indicator for minibatch SGD),

and logs them on rank zero (keys in ``docs/callbacks.md``). The real run is never touched: the loss is
the user's ``training_step`` run on a parameter-sharing replica (own buffers and carried state),
derivatives come from ``torch.autograd.grad`` (never ``.grad``), and random draws happen inside an
isolated generator state.
"""

from __future__ import annotations

import math
import re
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_eos import bounds, curvature
from lightning_eos.budget import MeasurementBudget
from lightning_eos.callbacks._lightning import (
    OptimizerStepTracker,
    StepReplica,
    allreduce_sum,
    check_supported_strategy,
    fault_group,
    guarded,
    log_metrics,
    logging_step,
    merge_custom_scalars,
)
from lightning_eos.callbacks._probe import (
    FixedProbe,
    loader_batch_size,
    probe_loss_is_finite,
    probe_objective,
    probe_precision,
)
from lightning_eos.callbacks._validation import ArgCheck
from lightning_eos.isolation import isolated_rng, rng_devices
from lightning_eos.layers import layers
from lightning_eos.records import SharpnessRecord

__all__ = ["SharpnessMonitor"]

LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]

_STATE_VERSION = 1


def _engine_exploration(explore: str) -> str:
    """The engine's ``exploration`` for a schedule choice (a cold solve ignores it)."""
    return "light" if explore == "light" else "full"


class SharpnessMonitor(Callback):
    r"""Log the sharpness of the training loss against the optimizer's critical sharpness.

    Args:
        every_n_steps: measure every this many real optimizer steps of the monitored optimizer
            (the first step is always measured); accumulation micro-batches never count. Overrides
            ``budget``. ``None`` (default): the budget decides.
        budget: the largest share of wall time the measurements may take (0.05 = 5 %): the monitor
            times its measurements and the training between them and measures at the first step
            where the share since training started stays within it (:mod:`lightning_eos.budget`;
            the first measurement too, from a cost model). Logged as ``eos/overhead``. Under DDP
            rank zero's timings decide for every rank. Wall time is not reproducible, so neither
            are the measured steps. On resume the accounting goes on from the checkpoint: the
            seconds trained and measured before it still count, the time in between does not, and
            the planned next step is kept (counted in steps since training started).
        probe: ``"fixed"``: ``probe_size`` samples drawn once (seeded, without replacement) from the
            map-style train dataset at the start of training, collated with the loader's
            ``collate_fn`` and kept on the device; ``"current"``: the current training batch.
        probe_size: number of samples of the fixed probe (global, over all DDP ranks); ``"batch"``
            (default): one training batch per rank, the cheapest probe that sees as many samples as
            a step does; ``None`` or a value ≥ the dataset size: the whole dataset (full-batch
            sharpness; each measurement then costs that many batches' worth of passes).
        probe_batch_size: the fixed probe is evaluated in chunks of this many samples (memory);
            ``None`` uses the train loader's batch size (the whole probe if it has none).
        k: number of top eigenvalues computed (``eos/sharpness`` is the largest).
        which: ``"largest"``, or ``"both"`` to also compute λ_min of the Hessian (and, for the SGD
            family, the coupled weight-decay window).
        per_layer: also log the block sharpness of each layer (the module that directly owns
            trainable parameters).
        preconditioned: ``"auto"`` measures λ_max(P⁻¹H) for the Adam family (where that is what
            the threshold bounds) and λ_max(H) otherwise; ``True``/``False`` force it.
        tol: relative residual cap of the eigen-solver (``None``: ``sqrt(eig_tol)``).
        eig_tol: target relative error of the eigenvalues: the solver stops when its Kato–Temple
            bound, residual²/gap, says the eigenvalue is this accurate. 1e-4 is ample for a
            stability ratio and, measured on the digits edge-of-stability run
            (``benchmarks/warm_refresh.py``), costs 14.7 products per cold solve and 8.3 warm
            where 1e-6 (the engine's own default) costs 18.5 and 11.8.
        max_iter: maximum Hessian-vector products per eigen-solve.
        mode: ``"train"`` measures the loss as trained (dropout on, BatchNorm batch statistics);
            ``"eval"`` with the module in eval mode.
        optimizer_idx: which optimizer of ``configure_optimizers`` to monitor (its parameters, LR
            and, under manual optimization, its ``manual_backward`` loss).
        log_prefix: prefix of every logged key.
        batch_sharpness: also log the batch sharpness gᵀHg/‖g‖² of the current batch (1 gradient +
            1 HVP per measurement), averaged over the last ``batch_sharpness_window`` measurements.
        batch_sharpness_window: number of measurements the batch sharpness is averaged over.
        warn_ratio: the first time sharpness/critical exceeds this, warn once (rank zero).
        loss_fn: ``loss_fn(model, batch) -> scalar mean loss`` (or its import path) to measure
            instead of the module's ``training_step``; ``model`` is a parameter-sharing replica.
        seed: seed of the probe draw and of the solver's start vector (never the global RNG).
        hvp: how Hessian-vector products are computed (:class:`lightning_eos.curvature.HessianOperator`):
            ``"auto"`` exact double backprop, falling back once (with a ``RuntimeWarning``) to central
            finite differences of gradients when the loss has no second derivative (custom fused
            kernels, ``@once_differentiable`` functions); ``"exact"`` raises instead;
            ``"finite_difference"`` always uses them (2 gradients per product; relative error about
            1e-9 in float64, 5e-4 in float32 for smooth losses, worse across ReLU kinks).

        warm_start: start each solve from the previous measurement's Ritz vectors (kept in the
            callback's state and checkpoint), so a refresh at a slowly changing Hessian costs fewer
            products than a cold solve. Refreshes are light (the cold solve's gap rule) with a full
            one every 4th and after a value that left its trend by 2 %
            (:class:`lightning_eos.curvature.ExplorationSchedule`): an eigenvalue that overtook the old
            top one by a few per cent can be missed by one light refresh (``converged`` says what
            was checked) and is found within the next few.
        strict: re-raise an unexpected error inside a per-step hook instead of reporting it once and
            stepping aside for the rest of the run (the default: training goes on unchanged).

    With ``maximize=True`` the optimizer descends −loss: every curvature (sharpness, λ_min, per-layer
    and batch sharpness) is then that of −loss, the objective the thresholds bound
    (:func:`lightning_eos.bounds.objective_sign`); param groups that disagree on ``maximize`` are
    refused at fit start.
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        budget: float = 0.05,
        probe: Literal["fixed", "current"] = "fixed",
        probe_size: int | Literal["batch"] | None = "batch",
        probe_batch_size: int | None = None,
        k: int = 1,
        which: Literal["largest", "both"] = "largest",
        per_layer: bool = False,
        preconditioned: bool | Literal["auto"] = "auto",
        tol: float | None = None,
        eig_tol: float = 1e-4,
        max_iter: int = 100,
        mode: Literal["train", "eval"] = "train",
        optimizer_idx: int = 0,
        log_prefix: str = "eos",
        batch_sharpness: bool = True,
        batch_sharpness_window: int = 10,
        warn_ratio: float = 1.0,
        loss_fn: Callable[..., torch.Tensor] | None = None,
        seed: int = 0,
        hvp: Literal["auto", "exact", "finite_difference"] = "auto",
        warm_start: bool = True,
        strict: bool = False,
    ) -> None:
        super().__init__()
        check = ArgCheck("SharpnessMonitor")
        check.positive_int("every_n_steps", every_n_steps, allow_none=True)
        check.open_unit_interval("budget", budget)
        check.choice("probe", probe, ("fixed", "current"))
        if probe_size != "batch":
            check.int_at_least(
                "probe_size", probe_size, 1, allow_none=True, accepted="a positive int, 'batch'"
            )
        check.positive_int("probe_batch_size", probe_batch_size, allow_none=True)
        check.positive_int("k", k)
        check.choice("which", which, ("largest", "both"))
        check.flag("per_layer", per_layer)
        check.choice("preconditioned", preconditioned, ("auto", True, False))
        if tol is not None:
            check.positive_float("tol", tol)
        check.positive_float("eig_tol", eig_tol)
        check.positive_int("max_iter", max_iter)
        check.int_at_least("max_iter", max_iter, k, accepted=f"an int >= k={k}")
        check.choice("mode", mode, ("train", "eval"))
        check.int_at_least("optimizer_idx", optimizer_idx, 0)
        check.log_prefix("log_prefix", log_prefix)
        check.flag("batch_sharpness", batch_sharpness)
        check.positive_int("batch_sharpness_window", batch_sharpness_window)
        check.positive_float("warn_ratio", warn_ratio)
        check.integer("seed", seed)
        check.choice("hvp", hvp, ("auto", "exact", "finite_difference"))
        check.flag("warm_start", warm_start)
        check.flag("strict", strict)

        self.every_n_steps = every_n_steps
        self.budget = float(budget)
        self.probe = probe
        self.probe_size = probe_size
        self.probe_batch_size = probe_batch_size
        self.k = k
        self.which = which
        self.per_layer = per_layer
        self.preconditioned = preconditioned
        self.tol = math.sqrt(eig_tol) if tol is None else float(tol)
        self.eig_tol = float(eig_tol)
        self.max_iter = max_iter
        self.mode = mode
        self.optimizer_idx = optimizer_idx
        self.log_prefix = log_prefix
        self.batch_sharpness = batch_sharpness
        self.batch_sharpness_window = batch_sharpness_window
        self.warn_ratio = float(warn_ratio)
        self.loss_fn = check.callable_or_import_path("loss_fn", loss_fn, "(model, batch) -> scalar loss")
        self.seed = seed
        self.hvp = hvp
        self.warm_start = warm_start
        self.strict = strict
        self.failure: str | None = None  # set when an unexpected error made the monitor step aside
        # Ritz vectors of the previous measurement per solve ("top", "low", "layer/<name>"), in the
        # parameters' dtype on their device: the next solve starts from them (resumable).
        self._warm: dict[str, torch.Tensor] = {}
        # Light warm refreshes, with a full one every 4th and after a jump (resumable); see
        # curvature.ExplorationSchedule for why and what each checks.
        self._refresh = curvature.ExplorationSchedule()

        self.history: list[SharpnessRecord] = []
        self._probe = FixedProbe("SharpnessMonitor", probe_size, probe_batch_size, seed)
        self._batch_window: deque[float] = deque(maxlen=batch_sharpness_window)
        self._opt_steps = 0  # real steps of the monitored optimizer seen so far (resumable)
        # Times training and measurements; decides when to measure unless every_n_steps is fixed.
        self._schedule = MeasurementBudget(self.budget, first_cost_steps=1.0)
        self._clock = 0.0  # perf_counter() at the end of the last step or measurement
        self._warned = False
        self._tracker = OptimizerStepTracker()
        self._use_preconditioned = False
        self._compare = True  # whether the bounds threshold applies to what is measured
        self._sign = 1.0  # of the objective the optimizer descends: −1 under maximize=True
        self._notes: set[str] = set()

    # ------------------------------------------------------------------ Lightning plumbing
    @property
    @override
    def state_key(self) -> str:
        # Two monitors (e.g. one per optimizer of a GAN) must not share checkpoint state.
        return self._generate_state_key(optimizer_idx=self.optimizer_idx, log_prefix=self.log_prefix)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        check_supported_strategy(trainer, type(self).__name__)
        fault_group(trainer)  # every rank, in setup: the group a failure is agreed on under DDP

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.optimizer_idx >= len(trainer.optimizers):
            raise ValueError(
                f"optimizer_idx={self.optimizer_idx} is not supported: configure_optimizers returned "
                f"{len(trainer.optimizers)} optimizer(s); accepted values: 0..{len(trainer.optimizers) - 1}."
            )
        optimizer = trainer.optimizers[self.optimizer_idx]
        name = type(optimizer).__name__
        # maximize=True descends −loss: the thresholds bound the Hessian of that objective, so that is
        # the loss measured (groups that disagree are refused here, before any step).
        self._sign = bounds.objective_sign(optimizer)
        try:
            family = bool(bounds.preconditioned_for(optimizer))
            known = True
        except bounds.UnsupportedOptimizerError as err:
            # Still worth measuring the sharpness; there is just no threshold to compare it with.
            family, known = False, False
            self._note("unsupported", f"SharpnessMonitor: no critical sharpness for {name}: {err}")
        if self.preconditioned == "auto":
            self._use_preconditioned = family
        else:
            self._use_preconditioned = bool(self.preconditioned)
            if self._use_preconditioned and not family:
                raise ValueError(
                    f"preconditioned=True is not supported for {name}: it has no diagonal "
                    "preconditioner (Adam/AdamW/RMSprop state); accepted values: 'auto', False."
                )
        # The threshold of a preconditioned optimizer bounds λ_max(P⁻¹H), not λ_max(H): comparing
        # the two would be a wrong ratio, so with preconditioned=False there is no critical value.
        self._compare = known and family == self._use_preconditioned
        if known and not self._compare:
            self._note(
                "mismatch",
                f"SharpnessMonitor(preconditioned=False) on {name}: its stability threshold applies to the "
                "preconditioned Hessian, so critical sharpness, ratio and max stable LR are logged as NaN. "
                "Use preconditioned='auto' to compare with the threshold.",
            )
        merge_custom_scalars(trainer, self._layout())

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.probe == "fixed":
            self._probe.build(trainer, pl_module)
        self._schedule.first_cost_steps = self._first_cost_steps(trainer)
        self._clock = time.perf_counter()

    @override
    @guarded
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._tracker.on_train_batch_start(trainer)

    @override
    @guarded
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # The group values now are the ones this step applies; a step scheduler moves them before
        # batch end.
        self._tracker.on_before_optimizer_step(trainer, optimizer)

    @override
    @guarded
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        applied = self._tracker.applied.get(self.optimizer_idx)
        if applied is None:  # accumulation micro-batch, or the monitored optimizer did not step
            return
        self._opt_steps += 1
        now = time.perf_counter()
        self._schedule.observe_step(now - self._clock)
        self._clock = now
        if not self._due(trainer):
            return
        device = pl_module.device
        if device.type == "cuda":
            # Only on a measured step: what the GPU still owes the training is not billed to the probe.
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        record = self._measure(trainer, pl_module, batch, applied)
        self._clock = time.perf_counter()
        self._schedule.measured(self._clock - start, agree=self._agree(trainer))
        self.history.append(record)
        metrics = self._metrics(record)
        metrics[f"{self.log_prefix}/overhead"] = self._schedule.overhead
        log_metrics(trainer, metrics, step=record.log_step)
        if not self._warned and record.ratio > self.warn_ratio:
            self._warned = True
            self._warn_edge(record)

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and primitives only (checkpoints load with ``weights_only=True``)."""
        return {
            "version": _STATE_VERSION,
            "probe_indices": self._probe.state(),
            "history": [r.to_dict() for r in self.history],
            "batch_window": list(self._batch_window),
            "opt_steps": self._opt_steps,
            "warned": self._warned,
            "schedule": self._schedule.state_dict(),
            "warm": {k: v.detach().cpu().clone() for k, v in self._warm.items()},
            "refresh": self._refresh.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._probe.restore(state_dict.get("probe_indices"))  # chunks rebuilt in on_train_start
        self.history = [SharpnessRecord.from_dict(r) for r in state_dict.get("history", [])]
        self._batch_window = deque(
            (float(v) for v in state_dict.get("batch_window", [])), maxlen=self.batch_sharpness_window
        )
        self._opt_steps = int(state_dict.get("opt_steps", 0))
        self._warned = bool(state_dict.get("warned", False))
        if state_dict.get("schedule") is not None:
            self._schedule.load_state_dict(state_dict["schedule"])
        self._warm = {str(k): torch.as_tensor(v) for k, v in (state_dict.get("warm") or {}).items()}
        self._refresh.load_state_dict(state_dict.get("refresh") or {})

    # ------------------------------------------------------------------ schedule
    def _due(self, trainer: Trainer) -> bool:
        """Whether this real step of the monitored optimizer is measured (same answer on every rank)."""
        if self.every_n_steps is not None:
            return (self._opt_steps - 1) % self.every_n_steps == 0
        return self._schedule.due(agree=self._agree(trainer))

    @staticmethod
    def _agree(trainer: Trainer) -> Callable[[int], int] | None:
        """Rank zero's scheduling decision for every rank (timings differ between ranks)."""
        if trainer.world_size <= 1:
            return None
        return lambda proposal: int(trainer.strategy.broadcast(proposal, src=0))

    def _first_cost_steps(self, trainer: Trainer) -> float:
        """Predicted cost of the first (cold) measurement in training steps: about 12 products of
        ~2 gradients each plus the graph, over the probe (in train-batch units), per solve."""
        batches = 1.0
        if self.probe == "fixed" and self._probe.weights:
            train_batch = loader_batch_size(trainer) or max(self._probe.weights)
            batches = sum(self._probe.weights) / train_batch
        solves = 1 + (1 if self.which == "both" else 0) + (2 if self.per_layer else 0)
        return 25.0 * batches * solves + (4.0 if self.batch_sharpness else 0.0)

    @property
    def overhead(self) -> float:
        """Share of the wall time since training started spent in this monitor's measurements."""
        return self._schedule.overhead

    # ------------------------------------------------------------------ public views
    @property
    def probe_indices(self) -> torch.Tensor | None:
        """The fixed probe's global dataset indices (sorted int64, shape ``(probe_size,)``), or None."""
        return self._probe.indices

    @property
    def last(self) -> SharpnessRecord | None:
        """The latest measurement, or None before the first one."""
        return self.history[-1] if self.history else None

    def summary(self, edge: float = 0.9) -> dict[str, Any]:
        """Digest of :attr:`history`.

        Returns:
            ``first_edge_step``: the first step whose ratio reached ``edge`` (None if never);
            ``edge_fraction``: fraction of finite measurements with ratio ≥ ``edge``;
            ``max_ratio`` / ``last_ratio``: largest and latest finite ratio (nan if none);
            ``max_sharpness``; ``measurements``: number of records; ``hvps``: total HVPs spent.
        """
        ratios = [(r.step, r.ratio) for r in self.history if math.isfinite(r.ratio)]
        first = next((s for s, q in ratios if q >= edge), None)
        sharp = [r.sharpness for r in self.history if math.isfinite(r.sharpness)]
        return {
            "first_edge_step": first,
            "edge_fraction": (sum(q >= edge for _, q in ratios) / len(ratios)) if ratios else 0.0,
            "max_ratio": max((q for _, q in ratios), default=float("nan")),
            "last_ratio": ratios[-1][1] if ratios else float("nan"),
            "max_sharpness": max(sharp, default=float("nan")),
            "measurements": len(self.history),
            "hvps": sum(r.hvps for r in self.history),
        }

    # ------------------------------------------------------------------ measurement
    def _measure(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, applied: list[dict[str, Any]]
    ) -> SharpnessRecord:
        optimizer = trainer.optimizers[self.optimizer_idx]
        params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        reduce = allreduce_sum(trainer)
        if self.probe == "fixed":
            probe, fixed_weights = self._probe.ensure(trainer, pl_module)
            weights: list[float] | None = fixed_weights
        else:
            # The current batch of every rank: with the all-reduce this is the global batch.
            probe, weights = [batch], None
        device = params[0].device if params else torch.device("cpu")
        solver_kw: dict[str, Any] = dict(
            params=params,
            mode=self.mode,
            reduce=reduce,
            seed=self.seed,
            tol=self.tol,
            eig_tol=self.eig_tol,
            max_iter=self.max_iter,
            hvp=self.hvp,
            return_eigenvectors=self.warm_start,
        )
        if weights is not None:
            solver_kw["weights"] = weights
        # An explicit sequence of batches for the engine (a bare list of tensors would read as one).
        batches = curvature.Batches(probe)

        values: dict[str, Any] = {}
        with isolated_rng(rng_devices(params)), probe_precision(device):

            def fresh() -> tuple[torch.nn.Module, LossFn]:
                # A new replica per evaluation: the state the module carries between steps is the
                # real one's current state, and one solver's forward passes cannot leak into the next.
                replica = StepReplica(
                    pl_module, trainer, share_parameters=True, eager=True, optimizer_idx=self.optimizer_idx
                )
                return replica.module, self._loss(replica)

            if not probe_loss_is_finite(*fresh(), batches, trainer, self.mode):
                return self._nan_record(trainer, "probe loss")
            explore = self._exploration("top")
            top_kw: dict[str, Any] = dict(
                start_vectors=self._warm.get("top"), exploration=_engine_exploration(explore)
            )
            if self._use_preconditioned:
                res = curvature.preconditioned_sharpness(
                    *fresh(), batches, optimizer, k=self.k, **top_kw, **solver_kw
                )
            else:
                which = "both" if self.which == "both" else "largest"
                res = curvature.hessian_eigenvalues(
                    *fresh(), batches, k=self.k, which=which, **top_kw, **solver_kw
                )
            self._keep_warm("top", res, params, explore)
            hvps = int(res.num_hvps)
            eig = [float(v) for v in res.eigenvalues]
            converged = bool(torch.as_tensor(res.converged).all())
            lam_min = float("nan")
            if self.which == "both":
                if self._use_preconditioned:
                    explore = self._exploration("low")
                    low = curvature.hessian_eigenvalues(
                        *fresh(),
                        batches,
                        k=1,
                        which="smallest",
                        start_vectors=self._warm.get("low"),
                        exploration=_engine_exploration(explore),
                        **solver_kw,
                    )
                    self._keep_warm("low", low, params, explore)
                    hvps += int(low.num_hvps)
                    converged = converged and bool(torch.as_tensor(low.converged).all())
                    lam_min = float(low.eigenvalues[-1])
                else:  # "both" returned the k largest then the k smallest, descending
                    lam_min = eig[-1]
                    eig = eig[: self.k]
            top = eig[0] if eig else float("nan")
            layer_values: dict[str, float] = {}
            if self.per_layer:
                model, loss_fn = fresh()
                kw = {k: v for k, v in solver_kw.items() if k != "params"}
                names = list(layers(model, params))
                warm = {n: self._warm[f"layer/{n}"] for n in names if f"layer/{n}" in self._warm}
                # One exploration for all blocks: light only when every block's sequence allows it.
                explore = self._exploration(*(f"layer/{n}" for n in names))
                blocks = curvature.layerwise_eigenvalues(
                    model,
                    loss_fn,
                    batches,
                    k=1,
                    layers=names,
                    start_vectors=warm,
                    exploration=_engine_exploration(explore),
                    **kw,
                )
                for name, block in blocks.items():
                    layer_values[name] = float(block.eigenvalues[0])
                    hvps += int(block.num_hvps)
                    self._keep_warm(f"layer/{name}", block, params, explore)
            batch_value = float("nan")
            if self.batch_sharpness:
                if self.probe == "current" or probe_loss_is_finite(*fresh(), [batch], trainer, self.mode):
                    batch_value = float(
                        curvature.batch_sharpness(
                            *fresh(),
                            batch,
                            params=params,
                            mode=self.mode,
                            reduce=reduce,
                            seed=self.seed,
                            hvp=self.hvp,
                        )
                    )
                    hvps += 1

        values.update(
            sharpness=top, eigenvalues=tuple(eig), hvps=hvps, converged=converged, lambda_min=lam_min
        )
        if not math.isfinite(top):
            return self._nan_record(trainer, "sharpness", hvps=hvps)

        # Thresholds from the hyper-parameters this step applied, compared in bounds.assess (binding
        # group: the smallest critical sharpness among the groups that train). ``top`` is of the
        # descended objective (−loss under maximize), the quantity the thresholds bound.
        critical, ratio, max_lr, lr, binding = float("nan"), float("nan"), float("nan"), float("nan"), 0
        wd_low, wd_high = float("nan"), float("nan")
        if not self._compare:
            lr = float(applied[0].get("lr", float("nan"))) if applied else float("nan")
        else:
            result = bounds.assess(top, optimizer, applied)
            binding, critical, lr = result.binding_group, result.critical, result.lr
            ratio, max_lr = result.ratio, result.max_stable_lr
            if self.which == "both" and not self._use_preconditioned:
                window = bounds.group_weight_decay_window(lam_min, top, applied[binding], lr=lr)
                wd_low, wd_high = float(window.low), float(window.high)

        if math.isfinite(batch_value):
            self._batch_window.append(batch_value)
        batch_avg = sum(self._batch_window) / len(self._batch_window) if self._batch_window else float("nan")
        return SharpnessRecord(
            step=int(trainer.global_step),
            log_step=logging_step(trainer),
            epoch=int(trainer.current_epoch),
            critical=critical,
            ratio=ratio,
            lr=lr,
            max_stable_lr=max_lr,
            binding_group=binding,
            wd_window_low=wd_low,
            wd_window_high=wd_high,
            batch_sharpness=batch_value,
            batch_sharpness_avg=batch_avg,
            batch_ratio=batch_avg / critical if critical > 0 else float("nan"),
            preconditioned=self._use_preconditioned,
            layers=layer_values,
            **values,
        )

    def _exploration(self, *keys: str) -> str:
        """``"cold"`` unless every key has warm vectors; else the refresh schedule's choice
        (``"light"`` only if it allows a light refresh for every key)."""
        if not self.warm_start or any(key not in self._warm for key in keys):
            return "cold"
        return "light" if all(self._refresh.next(key) == "light" for key in keys) else "full"

    def _keep_warm(
        self, key: str, result: curvature.EigenResult, params: list[torch.nn.Parameter], explore: str
    ) -> None:
        """Keep a solve's Ritz vectors (in the parameters' dtype) to warm-start its next solve, and
        record it (``explore``: ``"cold"``, ``"full"`` or ``"light"``) in the refresh schedule."""
        vectors = result.eigenvectors
        value = float(result.eigenvalues[0]) if result.eigenvalues.numel() else float("nan")
        if vectors is None or not bool(torch.isfinite(vectors).all()):
            self._warm.pop(key, None)  # a non-finite solve: the next one starts cold
            self._refresh.forget(key)
            return
        self._refresh.observe(key, explore, value)
        self._warm[key] = vectors.to(params[0].dtype if params[0].is_floating_point() else torch.float32)

    def _loss(self, replica: StepReplica) -> LossFn:
        """The objective the monitored optimizer descends: the training loss, negated under maximize."""
        return probe_objective(replica, self.loss_fn, self._sign)

    def _nan_record(self, trainer: Trainer, what: str, hvps: int = 0) -> SharpnessRecord:
        self._note(
            "nan",
            f"SharpnessMonitor: the {what} at step {trainer.global_step} is not finite (NaN/inf); "
            "recording NaN and continuing (warned once). The training loss has probably diverged: "
            "check the learning rate against eos/max_stable_lr in the previous measurements.",
        )
        nan = float("nan")
        batch_avg = sum(self._batch_window) / len(self._batch_window) if self._batch_window else nan
        return SharpnessRecord(
            step=int(trainer.global_step),
            log_step=logging_step(trainer),
            epoch=int(trainer.current_epoch),
            eigenvalues=(nan,) * self.k,
            hvps=hvps,
            converged=False,
            batch_sharpness_avg=batch_avg,
            preconditioned=self._use_preconditioned,
        )

    # ------------------------------------------------------------------ logging
    def _metrics(self, record: SharpnessRecord) -> dict[str, float]:
        p = self.log_prefix
        out = {
            f"{p}/sharpness": record.sharpness,
            f"{p}/critical_sharpness": record.critical,
            f"{p}/stability_ratio": record.ratio,
            f"{p}/max_stable_lr": record.max_stable_lr,
            f"{p}/hvps": float(record.hvps),
            f"{p}/converged": float(record.converged),
        }
        for i, value in enumerate(record.eigenvalues[1:], start=2):
            out[f"{p}/eigenvalue_{i}"] = value
        if self.which == "both":
            out[f"{p}/lambda_min"] = record.lambda_min
            if not record.preconditioned:
                out[f"{p}/weight_decay_window_low"] = record.wd_window_low
                out[f"{p}/weight_decay_window_high"] = record.wd_window_high
        for name, value in record.layers.items():
            out[f"{p}/sharpness/{name}"] = value
        if self.batch_sharpness:
            out[f"{p}/batch_sharpness"] = record.batch_sharpness_avg
            out[f"{p}/batch_stability_ratio"] = record.batch_ratio
        return out

    def _layout(self) -> dict[str, dict[str, list[Any]]]:
        p = re.escape(self.log_prefix)
        charts: dict[str, list[Any]] = {
            "sharpness vs critical sharpness": [
                "Multiline",
                [rf"^{p}/sharpness$", rf"^{p}/critical_sharpness$"],
            ],
            "stability ratio (1 = edge)": [
                "Multiline",
                [rf"^{p}/stability_ratio$", rf"^{p}/batch_stability_ratio$"],
            ],
            "max stable lr": ["Multiline", [rf"^{p}/max_stable_lr$"]],
        }
        if self.batch_sharpness:
            charts["batch sharpness vs critical"] = [
                "Multiline",
                [rf"^{p}/batch_sharpness$", rf"^{p}/critical_sharpness$"],
            ]
        if self.per_layer:
            charts["per-layer sharpness"] = ["Multiline", [rf"^{p}/sharpness/.*"]]
        if self.which == "both":
            charts["weight-decay window"] = [
                "Multiline",
                [rf"^{p}/weight_decay_window_low$", rf"^{p}/weight_decay_window_high$", rf"^{p}/lambda_min$"],
            ]
        return {f"{self.log_prefix}: edge of stability": charts}

    def _warn_edge(self, record: SharpnessRecord) -> None:
        rank_zero_warn(
            f"SharpnessMonitor: at step {record.step} the sharpness {record.sharpness:.4g} is "
            f"{record.ratio:.3g}x the critical sharpness {record.critical:.4g} of the applied learning "
            f"rate {record.lr:.4g}: training has reached the edge of stability. This is normal for large "
            "learning rates (the loss keeps falling, non-monotonically, while sharpness hovers at the "
            f"threshold). If the loss diverges instead, lower the LR below eos max_stable_lr "
            f"({record.max_stable_lr:.4g}) or add warm-up. (Warned once.)",
            category=UserWarning,
        )

    def _note(self, key: str, message: str) -> None:
        """One rank-zero RuntimeWarning per ``key`` and monitor (a diverged run must not spam)."""
        if key not in self._notes:
            self._notes.add(key)
            rank_zero_warn(message, category=RuntimeWarning)
