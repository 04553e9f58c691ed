"""``TwinDivergence``: a bit-perturbed shadow twin trained in lockstep with the real model.

A thin Lightning adapter over :class:`lightning_eos.twin.TwinEngine`. Per training batch:

* ``on_train_batch_start`` — capture the generator state the real step is about to use;
* ``on_before_optimizer_step`` — capture the hyper-parameters the real optimizer applies now
  (a step scheduler has moved the LR by ``on_train_batch_end``);
* ``on_train_batch_end`` — the twin runs the user's own ``training_step`` (through
  :class:`~lightning_eos.callbacks._lightning.StepReplica`, logging silenced) on the same batch,
  replaying that generator state (same dropout masks) inside the trainer's precision context, and
  back-propagates ``loss / accumulate_grad_batches`` as Lightning does (scaled by the twin's own
  ``GradScaler`` under ``precision="16-mixed"``). On real optimizer steps only, its gradients are
  all-reduced (mean) under DDP, unscaled (16-mixed), clipped like the real ones, and the twin's
  optimizer steps with the applied hyper-parameters (through its scaler, which may skip the step).
  The gap is measured on device; numbers reach the host only every ``every_n_steps`` twin steps,
  when a :class:`~lightning_eos.records.TwinRecord` is made and its scalars logged under ``twin/``.

The twin also receives the module's own hooks, in the order Lightning calls the real module's:
``on_train_batch_start``, ``on_before_zero_grad``, ``on_before_backward``, ``on_after_backward``,
``on_before_optimizer_step`` (with the twin's optimizer) and ``on_train_batch_end`` (with the twin's
outputs) around its step; ``on_fit_start``, ``on_train_start``, ``on_train_epoch_start``,
``on_train_epoch_end``, ``on_train_end`` from the callback's hooks of the same name; the
validation-loop hooks around its ``validation_step`` (``validation=True``). See ``docs/twin.md``.

The real module, its gradients, its optimizer, its scaler and the global RNG stream are never
touched.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable, Iterator
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loops.optimization.automatic import ClosureResult
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_eos.callbacks._lightning import (
    OptimizerStepTracker,
    StepReplica,
    allreduce_sum,
    any_rank,
    check_supported_strategy,
    extract_loss,
    fault_group,
    guarded,
    inert_optimizer,
    log_metrics,
    logging_step,
    merge_custom_scalars,
)
from lightning_eos.callbacks._validation import ArgCheck
from lightning_eos.isolation import RngState, capture_rng, isolated_rng, replay_rng, rng_devices
from lightning_eos.records import TwinRecord
from lightning_eos.twin import TwinEngine, check_rescale_supported

__all__ = ["TwinDivergence", "argmax_predict"]


def argmax_predict(module: nn.Module, batch: Any) -> torch.Tensor:
    """Default ``predict_fn``: class index ``argmax(-1)`` of ``module(x)``, ``x`` the batch's first item."""
    x = batch[0] if isinstance(batch, (list, tuple)) else batch
    return module(x).argmax(-1)


@contextlib.contextmanager
def _at_global_step(module: pl.LightningModule, step: int) -> Iterator[None]:
    """In the block, the replica's trainer view (see :class:`StepReplica`) reports ``global_step = step``.

    The replica takes its step in ``on_train_batch_end``, after the real update has counted; the real
    module's ``training_step`` and hooks up to ``on_before_optimizer_step`` saw the count of the batch
    start, and a module may branch on it (``if self.global_step % k == 0``). Only the view changes:
    writes to it never reach the real trainer.
    """
    view = vars(module._trainer)
    view["global_step"] = step
    try:
        yield
    finally:
        view.pop("global_step", None)


def _grad_scaler(trainer: pl.Trainer) -> torch.amp.GradScaler | None:
    """The real run's ``GradScaler`` (``precision="16-mixed"``), or None.

    Read by attribute: the standalone ``pytorch_lightning`` package's ``MixedPrecision`` is another
    class than ``lightning.pytorch``'s, and its fp16 scaler must be cloned all the same.
    """
    scaler = getattr(trainer.precision_plugin, "scaler", None)  # None under bf16 and 32-true
    return scaler if isinstance(scaler, torch.amp.GradScaler) else None


class TwinDivergence(Callback):
    """Train a one-ulp-perturbed twin of the model in lockstep and log how far it drifts.

    Args:
        perturbation: ``"ulp"`` — the twin's floating parameters start one ulp higher
            (``torch.nextafter`` toward +inf); ``"rescale"`` — identical start, each twin update
            computed as ``(k·lr)·(step/k)``; ``"none"`` — no perturbation: a determinism self-check
            (any nonzero gap is reported with the first step and layer).
        params: ``"ulp"`` only on these parameter names or module prefixes (default: all).
        fraction: ``"ulp"`` only on this random (seeded) fraction of the selected entries, in (0, 1].
        single_weight: ``"ulp"`` on exactly one (seeded, random) weight: the "one bit" experiment.
        seed: seed of the ``fraction`` / ``single_weight`` draw (private generator).
        rescale_k: the ``k`` of ``"rescale"`` (> 0; 1 is bit-identical to ``"none"``).
        every_n_steps: log and record every this many optimizer steps (≥ 1).
        layers: per-layer gaps by owning ``"module"``, by ``"parameter"`` tensor, or ``"none"``.
        window: steps the growth rate (1/step) is fitted over (≥ 2).
        threshold: gap level whose first crossing step is kept (``first_step_above``), > 0.
        event_decades: restrained-instability event: growth by at least this many decades ...
        saturation_decades: ... then less than this many decades of growth over one window.
        d_metric: also log the paper's ``D = 2·mean(|w−w'|/(|w|+|w'|))``.
        validation: log ``twin/val_disagreement`` and ``twin/val_loss_gap`` after each validation
            epoch during ``fit``.
        predict_fn: ``predict_fn(module, batch) -> predicted labels`` for the disagreement
            (default :func:`argmax_predict`).
        resync_on_nonfinite: when the twin becomes NaN/Inf, copy the real model into it and
            perturb again (True) instead of freezing it (False).
        log_prefix: prefix of every logged key (default ``twin``); give each of several twins in one
            run its own.
        strict: re-raise an unexpected error inside a per-step hook instead of reporting it once and
            stepping aside for the rest of the run (the default: training goes on unchanged).
    """

    def __init__(
        self,
        perturbation: Literal["ulp", "rescale", "none"] = "ulp",
        params: list[str] | None = None,
        fraction: float = 1.0,
        single_weight: bool = False,
        seed: int = 0,
        rescale_k: float = 3.0,
        every_n_steps: int = 10,
        layers: Literal["module", "parameter", "none"] = "module",
        window: int = 50,
        threshold: float = 1e-4,
        event_decades: float = 3.0,
        saturation_decades: float = 0.1,
        d_metric: bool = False,
        validation: bool = True,
        predict_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
        resync_on_nonfinite: bool = False,
        log_prefix: str = "twin",
        strict: bool = False,
    ) -> None:
        check = ArgCheck("TwinDivergence")
        check.choice("perturbation", perturbation, ("ulp", "rescale", "none"))
        check.names("params", params, "parameter/module names")
        check.unit_fraction("fraction", fraction)
        check.flag("single_weight", single_weight)
        check.integer("seed", seed)
        check.positive_float("rescale_k", rescale_k)
        check.positive_int("every_n_steps", every_n_steps)
        check.choice("layers", layers, ("module", "parameter", "none"))
        check.int_at_least("window", window, 2)
        check.positive_float("threshold", threshold)
        check.positive_float("event_decades", event_decades)
        check.positive_float("saturation_decades", saturation_decades)
        check.flag("d_metric", d_metric)
        check.flag("validation", validation)
        check.optional_callable("predict_fn", predict_fn, "(module, batch) -> labels")
        check.flag("resync_on_nonfinite", resync_on_nonfinite)
        check.log_prefix("log_prefix", log_prefix)
        check.flag("strict", strict)
        self.perturbation = perturbation
        self.params = list(params) if params is not None else None
        self.fraction = float(fraction)
        self.single_weight = bool(single_weight)
        self.seed = int(seed)
        self.rescale_k = float(rescale_k)
        self.every_n_steps = every_n_steps
        self.layers = layers
        self.window = window
        self.threshold = float(threshold)
        self.event_decades = float(event_decades)
        self.saturation_decades = float(saturation_decades)
        self.d_metric = bool(d_metric)
        self.validation = bool(validation)
        self.predict_fn = predict_fn or argmax_predict
        self.resync_on_nonfinite = bool(resync_on_nonfinite)
        self.log_prefix = log_prefix
        self.strict = strict
        self.failure: str | None = None  # set when an unexpected error made the twin step aside

        self.engine: TwinEngine | None = None
        self._replica: StepReplica | None = None
        self._tracker = OptimizerStepTracker()
        self._rng: RngState | None = None
        self._batch_start_step = 0  # trainer.global_step at on_train_batch_start
        self._rng_devices: list[int] = []  # CUDA generators the real step draws from (set at fit start)
        self._pending: dict[str, Any] | None = None  # callback state loaded before on_fit_start
        self._val_real: StepReplica | None = None
        self._val_active = False
        self._val_metrics: list[Any] = []
        self.validation_history: list[dict[str, Any]] = []
        self._warned_nondeterministic = False
        self._predict_failed = False  # the default predict_fn does not fit this model's batches

    @property
    @override
    def state_key(self) -> str:
        # Several twins (e.g. "ulp" next to a "none" determinism check) must not share checkpoint state.
        return self._generate_state_key(
            perturbation=self.perturbation,
            params=self.params,
            fraction=self.fraction,
            single_weight=self.single_weight,
            seed=self.seed,
            rescale_k=self.rescale_k,
            log_prefix=self.log_prefix,
        )

    # ------------------------------------------------------------------------------ set up
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # As early as the other callbacks: before a strategy's own set-up checks of the module.
        check_supported_strategy(trainer, "TwinDivergence")
        fault_group(trainer)  # every rank, in setup: the group a failure is agreed on under DDP

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_supported_strategy(trainer, "TwinDivergence")
        if not pl_module.automatic_optimization:
            raise RuntimeError(
                "TwinDivergence supports automatic optimization only: under manual optimization the "
                "callback cannot know which losses, steps and clipping the twin must replay."
            )
        if len(trainer.optimizers) != 1:
            raise RuntimeError(f"TwinDivergence needs exactly one optimizer, got {len(trainer.optimizers)}")
        if self.perturbation == "rescale":
            check_rescale_supported(trainer.optimizers[0])
        self._rng_devices = rng_devices(pl_module.parameters())
        # Built here, not in setup: on resume the real weights are restored only after setup.
        self._replica = StepReplica(pl_module, trainer, share_parameters=False)
        self._val_real = None  # a replica of this fit's module (the callback may be reused)
        self.engine = TwinEngine(
            pl_module,
            self._replica.module,
            perturbation=self.perturbation,
            params=self.params,
            fraction=self.fraction,
            single_weight=self.single_weight,
            seed=self.seed,
            rescale_k=self.rescale_k,
            layers=self.layers,
            window=self.window,
            threshold=self.threshold,
            event_decades=self.event_decades,
            saturation_decades=self.saturation_decades,
            d_metric=self.d_metric,
        )
        if self._pending is not None:
            self.engine.load_state_dict(self._pending["engine"], load_optimizer=False)
            self.validation_history = list(self._pending.get("validation_history", []))
        else:
            self.engine.start()  # first record in on_train_start, at the step training starts from
            self.validation_history = []  # a new twin: its history starts over with the engine's
        self._install_optimizer_views(trainer)
        # The replica is a copy of the module made before the module's own on_fit_start runs.
        self._forward("on_fit_start")
        p = re.escape(self.log_prefix)
        merge_custom_scalars(
            trainer,
            {
                f"Twin ({self.log_prefix})" if self.log_prefix != "twin" else "Twin": {
                    "divergence": ["Multiline", [rf"{p}/divergence(/.*)?$"]],
                    "growth rate": ["Multiline", [rf"{p}/growth_rate(/.*)?$"]],
                    "validation": ["Multiline", [rf"{p}/val_.*"]],
                }
            },
        )
        if self.validation:
            from torchmetrics import MeanMetric

            # nan_strategy="disable": the default NaN check reads the device (a sync per batch).
            self._val_metrics = [MeanMetric(nan_strategy="disable").to(pl_module.device) for _ in range(3)]

    def _install_optimizer_views(self, trainer: pl.Trainer) -> None:
        """The replica's ``self.optimizers()`` is the twin's optimizer (an inert stand-in for the real
        one before the twin's exists; its ``self.lr_schedulers()`` step nothing): a module hook that
        edits or steps its optimizer changes the twin's, never the real run's (the twin follows the
        real schedule through the applied hyper-parameters)."""
        assert self._replica is not None and self.engine is not None
        engine = self.engine
        self._replica.route_optimizers(
            lambda: engine.optimizer or inert_optimizer(trainer.optimizers[0], trainer)
        )

    def _forward(self, name: str, *args: Any) -> None:
        """Call the twin replica's own LightningModule hook ``name`` (logging silenced).

        For the hooks Lightning calls on the module right after this callback's hook of the same name:
        run from the present generator states without advancing them, the replica draws the random
        numbers the real module's hook is about to draw.
        """
        if self._replica is None or self.engine is None or self.engine.frozen:
            return
        if not self._replica.overrides(name):
            return
        with isolated_rng(self._rng_devices):
            self._replica.call_hook(name, *args)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The real optimizer's and scaler's states are restored between on_fit_start and here.
        engine = self.engine
        assert engine is not None
        saved = self._pending["engine"] if self._pending is not None else {}
        if self._pending is None:
            # A new twin: record its start here, not in on_fit_start, since a resumed run's step
            # count (and epoch) is restored in between: this record is at the resume point, not step 0.
            engine.record(trainer.global_step, log_step=logging_step(trainer), epoch=trainer.current_epoch)
        engine.attach_optimizer(trainer.optimizers[0])
        if saved.get("optimizer") is not None:
            assert engine.optimizer is not None
            engine.optimizer.load_state_dict(saved["optimizer"])
        # 16-mixed: the twin's own GradScaler, cloned from the real one (or its saved state).
        engine.attach_scaler(_grad_scaler(trainer), saved.get("scaler"))
        self._pending = None
        self._forward("on_train_start")

    @override
    @guarded
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._forward("on_train_epoch_start")

    @override
    @guarded
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._forward("on_train_epoch_end")

    @override
    @guarded
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._forward("on_train_end")

    # ---------------------------------------------------------------------------- training
    @override
    @guarded
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._tracker.on_train_batch_start(trainer)
        self._batch_start_step = trainer.global_step
        if self.engine is not None and not self.engine.frozen:
            self._rng = capture_rng(self._rng_devices)

    @override
    @guarded
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._tracker.on_before_optimizer_step(trainer, optimizer)

    @override
    @guarded
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        engine, replica = self.engine, self._replica
        if engine is None or replica is None or engine.frozen:
            return
        precision = trainer.precision_plugin
        accumulate = trainer.accumulate_grad_batches
        optimizer = engine.optimizer
        hook = replica.call_hook
        produced: list[Any] = []

        def twin_loss(module: nn.Module) -> torch.Tensor | None:
            # The real step's autocast (bf16/16-mixed); backward and scaling run outside it. A
            # training_step returning None gets no backward, in the twin as in the real run.
            with precision.train_step_context():
                output = hook("training_step", batch, batch_idx)
            produced.append(output)
            if batch_idx % accumulate == 0:  # Lightning: first micro-batch only, after training_step
                hook("on_before_zero_grad", optimizer)
            return None if output is None else extract_loss(output)

        stepped = self._tracker.stepped(trainer)
        algorithm = trainer.gradient_clip_algorithm
        clip_algorithm: Literal["norm", "value"] = (
            "value" if algorithm is not None and algorithm.value == "value" else "norm"
        )
        # One replay for the whole replica step, hooks included: they draw what the real ones drew.
        with replay_rng(self._rng) if self._rng is not None else contextlib.nullcontext():
            # Up to the update the real module saw the step count of the batch start.
            with _at_global_step(replica.module, self._batch_start_step):
                hook("on_train_batch_start", batch, batch_idx)
                loss = engine.backward(
                    twin_loss,
                    divide_by=accumulate,
                    before_backward=functools.partial(hook, "on_before_backward"),
                    after_backward=functools.partial(hook, "on_after_backward"),
                )
                if stepped:  # else an accumulation micro-batch: gradients accumulate as in the real run
                    engine.step(
                        self._tracker.applied.get(0),
                        clip_val=trainer.gradient_clip_val,
                        clip_algorithm=clip_algorithm,
                        grad_transform=self._ddp_mean(trainer),
                        loss=loss,
                        # Under a GradScaler Lightning makes no update when the last training_step
                        # returned None (its outputs are then empty).
                        skip_update=not outputs and engine.scaler is not None,
                        before_update=functools.partial(hook, "on_before_optimizer_step"),
                    )
            hook("on_train_batch_end", self._step_outputs(produced, accumulate), batch, batch_idx)
        if stepped and engine.steps % self.every_n_steps == 0:
            self._record_and_log(trainer)

    @staticmethod
    def _step_outputs(produced: list[Any], accumulate: int) -> Any:
        """The replica's ``outputs`` for ``on_train_batch_end``, built from its own ``training_step``
        output as Lightning builds the real ones (``{"loss": loss / N detached, **extra}``, or ``{}``)."""
        with torch.no_grad():
            result = ClosureResult.from_training_step_output(produced[0] if produced else None, accumulate)
        return {} if result.loss is None else result.asdict()

    @staticmethod
    def _ddp_mean(trainer: pl.Trainer) -> Callable[[list[torch.Tensor]], None] | None:
        """The twin's gradient all-reduce: divide by the world size, then sum, as DDP's reducer does.

        With ``find_unused_parameters=True`` a parameter may have no gradient on some rank: it takes
        part with zeros, so every rank reduces the same tensors, and keeps ``.grad = None`` only if no
        rank produced a gradient for it, as DDP's reducer does. Knowing that takes a host read of one
        count per parameter, which DDP itself makes in that mode; without it (the default) every rank
        has every gradient (DDP raises otherwise) and nothing is read.
        """
        reduce = allreduce_sum(trainer)
        if reduce is None:
            return None
        world = trainer.world_size
        ddp_kwargs = getattr(trainer.strategy, "_ddp_kwargs", None) or {}
        track_unused = bool(ddp_kwargs.get("find_unused_parameters", False))

        def mean(params: list[torch.Tensor]) -> None:
            by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
            for p in params:
                by_dtype.setdefault(p.dtype, []).append(p)
            for group in by_dtype.values():  # one collective per dtype, not per tensor
                if not track_unused:
                    group = [p for p in group if p.grad is not None]
                    if not group:
                        continue
                parts = [
                    torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
                    if p.grad is None
                    else p.grad.reshape(-1) / world
                    for p in group
                ]
                if track_unused:
                    # One extra entry per parameter counts the ranks that produced a gradient for it.
                    has_grad = [float(p.grad is not None) for p in group]
                    parts.append(torch.tensor(has_grad, dtype=group[0].dtype, device=group[0].device))
                flat = reduce(torch.cat(parts))
                counts = flat[-len(group) :].tolist() if track_unused else [1.0] * len(group)
                offset = 0
                for p, count in zip(group, counts):
                    chunk = flat[offset : offset + p.numel()].view_as(p)
                    offset += p.numel()
                    if count == 0:
                        p.grad = None
                    elif p.grad is None:
                        p.grad = chunk.clone()
                    else:
                        p.grad.copy_(chunk)

        return mean

    def _record_and_log(self, trainer: pl.Trainer) -> None:
        engine = self.engine
        assert engine is not None
        r = engine.record(trainer.global_step, log_step=logging_step(trainer), epoch=trainer.current_epoch)
        if any_rank(trainer, r.nonfinite):
            action = "re-synced to the real model" if self.resync_on_nonfinite else "frozen"
            rank_zero_warn(
                f"TwinDivergence: the twin's loss or weights became non-finite at twin step "
                f"{r.first_step_nonfinite}; the twin is {action}. The real training is unaffected."
            )
            if self.resync_on_nonfinite:
                engine.resync(trainer.optimizers[0], _grad_scaler(trainer))
            else:
                engine.frozen = True
        if engine.first_nonzero is not None and not self._warned_nondeterministic:
            self._warned_nondeterministic = True
            rank_zero_warn(
                "TwinDivergence(perturbation='none'): the unperturbed twin diverged from the real "
                f"model at twin step {engine.first_nonzero['step']} (first in "
                f"{engine.first_nonzero['layer']!r}): the training pipeline is not deterministic."
            )
        log_metrics(trainer, r.scalars(self.log_prefix), step=r.log_step)

    # -------------------------------------------------------------------------- validation
    def _validating(self, trainer: pl.Trainer) -> bool:
        return (
            self.validation
            and self.engine is not None
            and not self.engine.frozen
            and not trainer.sanity_checking
            and trainer.state.fn == "fit"
        )

    def _val_replicas(self) -> list[StepReplica]:
        """The two replicas a validation pass runs: the real model's copy and the twin."""
        return [r for r in (self._val_real, self._replica) if r is not None]

    def _forward_val(self, name: str, *args: Any) -> None:
        """Call validation hook ``name`` on both validation replicas (their own hooks, logging silenced),
        leaving the generator states as they were."""
        with isolated_rng(self._rng_devices):
            for replica in self._val_replicas():
                replica.call_hook(name, *args)

    @override
    @guarded
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._validating(trainer):
            return
        if self._val_real is None:
            # Shares the real weights and owns copies of its buffers and carried state: eval forwards
            # that cannot touch the real module. Built once; buffers refreshed every validation.
            self._val_real = StepReplica(pl_module, trainer, share_parameters=True)
        with torch.no_grad():
            for mine, real in zip(self._val_real.module.buffers(), pl_module.buffers()):
                mine.copy_(real)
        self._val_active = True
        self._forward_val("on_validation_start")

    @override
    @guarded
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._validating(trainer) and self._val_active:
            self._forward_val("on_validation_epoch_start")

    @override
    @guarded
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        replica = self._replica
        if not self._validating(trainer) or not self._val_active or self._val_real is None or replica is None:
            return
        engine = self.engine
        assert engine is not None
        real, twin = self._val_real.module, engine.twin
        engine.sync_modes()
        for m_real, m_copy in zip(pl_module.modules(), real.modules()):
            m_copy.training = m_real.training
        extra = (dataloader_idx,) if len(trainer.num_val_batches) > 1 else ()
        disagree, loss_real, loss_twin = self._val_metrics
        pred_real = pred_twin = None
        with isolated_rng(self._rng_devices), torch.no_grad():
            # Each replica gets the real module's per-batch sequence: batch start, step, batch end.
            for r in (self._val_real, replica):
                r.call_hook("on_validation_batch_start", batch, batch_idx, *extra)
            with trainer.precision_plugin.val_step_context():
                if not self._predict_failed:
                    try:
                        pred_real = self.predict_fn(real, batch)
                        pred_twin = self.predict_fn(twin, batch)
                    except Exception as err:
                        if self.predict_fn is not argmax_predict:
                            raise
                        # The default guesses the input (first item of the batch) and the output
                        # (logits): a dict batch or a model returning a structure breaks that. It
                        # must not stop the user's training: measure the loss gap only.
                        self._predict_failed = True
                        rank_zero_warn(
                            "TwinDivergence: the default predict_fn (argmax of module(batch[0])) failed "
                            f"on this validation batch ({type(err).__name__}: {err}); "
                            f"{self.log_prefix}/val_disagreement is not measured. Pass "
                            "predict_fn=(module, batch) -> labels, or validation=False."
                        )
                out_real = self._val_real.call_hook("validation_step", batch, batch_idx, *extra)
                out_twin = replica.call_hook("validation_step", batch, batch_idx, *extra)
            self._val_real.call_hook("on_validation_batch_end", out_real, batch, batch_idx, *extra)
            replica.call_hook("on_validation_batch_end", out_twin, batch, batch_idx, *extra)
        if pred_real is not None and pred_twin is not None:
            disagree.update((pred_real != pred_twin).float())
        try:
            loss_real.update(extract_loss(out_real).detach().float())
            loss_twin.update(extract_loss(out_twin).detach().float())
        except ValueError:
            pass  # validation_step returns no loss: only the disagreement is measured

    @override
    @guarded
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._validating(trainer) or not self._val_active:
            return
        self._forward_val("on_validation_epoch_end")
        disagree, loss_real, loss_twin = self._val_metrics
        # compute() syncs across ranks (a collective): every rank must call the same ones, so the
        # rank-local reasons to skip one (the default predict_fn failed, no loss) are agreed first.
        self._predict_failed = any_rank(trainer, self._predict_failed)
        has_loss = any_rank(trainer, loss_real.update_count > 0)
        metrics: dict[str, float] = {}
        if not self._predict_failed:
            metrics[f"{self.log_prefix}/val_disagreement"] = float(disagree.compute())
        if has_loss:
            metrics[f"{self.log_prefix}/val_loss_gap"] = abs(
                float(loss_twin.compute()) - float(loss_real.compute())
            )
        for m in self._val_metrics:
            m.reset()
        self.validation_history.append({"global_step": trainer.global_step, **metrics})
        log_metrics(trainer, metrics, step=logging_step(trainer))

    @override
    @guarded
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._validating(trainer) or not self._val_active:
            return
        self._val_active = False
        self._forward_val("on_validation_end")

    # ------------------------------------------------------------------------ state/results
    @property
    def history(self) -> list[TwinRecord]:
        """The records, one per logged step (the first is step 0, right after the perturbation); the
        logged scalars are :meth:`TwinRecord.scalars` of these, the checkpoint holds their dicts."""
        return self.engine.history if self.engine is not None else []

    def summary(self) -> dict[str, Any]:
        """Plain summary: gap start/end/max, decades, growth rate, events, non-finite, determinism."""
        if self.engine is None:
            return {}
        out = self.engine.summary()
        if self.validation_history:
            out["validation"] = dict(self.validation_history[-1])
        return out

    @override
    def state_dict(self) -> dict[str, Any]:
        if self.engine is None:
            return dict(self._pending) if self._pending is not None else {}
        return {"engine": self.engine.state_dict(), "validation_history": list(self.validation_history)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Applied in on_fit_start / on_train_start, once the twin and its optimizer exist.
        self._pending = dict(state_dict) if state_dict else None
