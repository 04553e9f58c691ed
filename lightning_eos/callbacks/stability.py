"""StabilityMonitor: the learning rate each param group applied and the curvature it can tolerate.

Every real optimizer step, at no extra forward/backward cost, for every optimizer and param group:
the LR the step applied (read in ``on_before_optimizer_step``, before a step scheduler moves it), the
critical sharpness those hyper-parameters imply and, when a
:class:`~lightning_eos.callbacks.SharpnessMonitor` of that optimizer has measured, the margin
``lr / max_stable_lr`` (1 = at the edge of stability). Both come from
:func:`lightning_eos.bounds.assess`, the comparison the SharpnessMonitor makes too, with the
SharpnessMonitor's sharpness: that of the objective the optimizer descends (``−loss`` under
``maximize=True``). With ``per_layer=True`` and a per-layer SharpnessMonitor it also logs each layer's
local CFL number: the layer's block sharpness over the critical sharpness of the group that holds its
parameters (layers as :mod:`lightning_eos.layers` defines them).
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_eos import bounds
from lightning_eos.callbacks._lightning import (
    OptimizerStepTracker,
    check_supported_strategy,
    fault_group,
    guarded,
    log_metrics,
    logging_step,
    merge_custom_scalars,
)
from lightning_eos.callbacks._validation import ArgCheck
from lightning_eos.callbacks.sharpness import SharpnessMonitor
from lightning_eos.layers import layer_parameters

__all__ = ["StabilityMonitor"]


class StabilityMonitor(Callback):
    """Log applied LR, critical sharpness and LR margin per optimizer and param group, every step.

    Args:
        every_n_steps: log every this many stepping batches (1 = every real optimizer step);
            ``None`` (default) follows the Trainer's ``log_every_n_steps``, as Lightning's own step
            metrics do (the values are cheap, the logging of one key per group and step is not).
        per_layer: also log each layer's local CFL number ``λ_layer / critical(group of the layer)``
            from the last measurement of a ``SharpnessMonitor(per_layer=True)``.
        log_prefix: prefix of every logged key.
        strict: re-raise an unexpected error inside a per-step hook instead of reporting it once and
            stepping aside for the rest of the run (the default: training goes on unchanged).

    Keys (``<tag>`` is ``pg<j>`` or the group's ``"name"``, prefixed by ``opt<i>/`` when there are
    several optimizers): ``<prefix>/lr/<tag>``, ``<prefix>/critical_sharpness/<tag>``,
    ``<prefix>/lr_margin/<tag>`` (needs a SharpnessMonitor), ``<prefix>/cfl/<layer>`` (per_layer).
    The margin uses the SharpnessMonitor's *latest* measurement; list the StabilityMonitor after the
    SharpnessMonitor in ``callbacks`` so that a step's margin uses that same step's measurement.
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        per_layer: bool = False,
        log_prefix: str = "eos",
        strict: bool = False,
    ) -> None:
        super().__init__()
        check = ArgCheck("StabilityMonitor")
        check.positive_int("every_n_steps", every_n_steps, allow_none=True)
        check.flag("per_layer", per_layer)
        check.log_prefix("log_prefix", log_prefix)
        check.flag("strict", strict)
        self.every_n_steps = every_n_steps
        self.per_layer = per_layer
        self.log_prefix = log_prefix
        self.strict = strict
        self.failure: str | None = None  # set when an unexpected error made the monitor step aside
        self.last_metrics: dict[str, float] = {}  # what the latest logged step logged
        self._tracker = OptimizerStepTracker()
        self._warned: set[str] = set()

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(log_prefix=self.log_prefix)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        check_supported_strategy(trainer, type(self).__name__)
        fault_group(trainer)  # every rank, in setup: the group a failure is agreed on under DDP

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        p = re.escape(self.log_prefix)
        charts: dict[str, list[Any]] = {
            "applied lr": ["Multiline", [rf"^{p}/lr/.*"]],
            "lr margin = lr / max stable lr (1 = edge)": ["Multiline", [rf"^{p}/lr_margin/.*"]],
        }
        if self.per_layer:
            charts["local CFL number per layer (1 = edge)"] = ["Multiline", [rf"^{p}/cfl/.*"]]
        merge_custom_scalars(trainer, {f"{self.log_prefix}: stability": charts})

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
        # The values this update applies; a step-interval scheduler changes them before batch end.
        self._tracker.on_before_optimizer_step(trainer, optimizer)

    @override
    @guarded
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        applied = self._tracker.applied
        if not applied:  # accumulation micro-batch: nothing was applied
            return
        every = self.every_n_steps if self.every_n_steps is not None else trainer.log_every_n_steps
        if logging_step(trainer) % max(every, 1) != 0:
            return
        metrics = self._metrics(trainer, pl_module, applied)
        self.last_metrics = metrics
        log_metrics(trainer, metrics)

    def _metrics(
        self, trainer: Trainer, pl_module: LightningModule, applied: dict[int, list[dict[str, Any]]]
    ) -> dict[str, float]:
        p = self.log_prefix
        several = len(trainer.optimizers) > 1
        monitors = {
            cb.optimizer_idx: cb
            for cb in trainer.callbacks
            if isinstance(cb, SharpnessMonitor)  # type: ignore[attr-defined]
        }
        out: dict[str, float] = {}
        critical_of_param: dict[int, float] = {}
        for idx, groups in sorted(applied.items()):
            optimizer = trainer.optimizers[idx]
            tags = []
            for j, group in enumerate(groups):
                name = group.get("name")
                tag = name if isinstance(name, str) and name else f"pg{j}"
                tags.append(f"opt{idx}/{tag}" if several else tag)
                out[f"{p}/lr/{tags[-1]}"] = float(group.get("lr", math.nan))
            try:
                preconditioned = bounds.preconditioned_for(optimizer)
            except bounds.UnsupportedOptimizerError as err:
                self._warn_once(type(optimizer).__name__, f"StabilityMonitor: no critical sharpness: {err}")
                continue
            # The threshold of the Adam family bounds λ(P⁻¹H): it is compared only with a sharpness
            # of the same kind (block sharpness is always of H: no local CFL there).
            monitor = monitors.get(idx)
            last = monitor.last if monitor is not None else None
            sharpness: float | None = None
            if last is not None and math.isfinite(last.sharpness) and last.preconditioned == preconditioned:
                sharpness = last.sharpness
            result = bounds.assess(sharpness, optimizer, groups)
            for j, tag in enumerate(tags):
                out[f"{p}/critical_sharpness/{tag}"] = result.critical_per_group[j]
                if sharpness is not None:
                    out[f"{p}/lr_margin/{tag}"] = result.lr_margin_per_group[j]
                if not preconditioned:
                    for param in optimizer.param_groups[j]["params"]:
                        critical_of_param[id(param)] = result.critical_per_group[j]
            if preconditioned and self.per_layer:
                self._warn_once(
                    f"cfl{idx}",
                    "StabilityMonitor(per_layer=True): no local CFL number for "
                    f"{type(optimizer).__name__}: its threshold bounds the preconditioned Hessian, "
                    "block sharpness is of the Hessian.",
                )
        if self.per_layer:
            out.update(self._cfl(pl_module, monitors, critical_of_param))
        return out

    def _cfl(
        self,
        pl_module: LightningModule,
        monitors: dict[int, SharpnessMonitor],
        critical_of_param: dict[int, float],
    ) -> dict[str, float]:
        """Local CFL number of every layer a per-layer SharpnessMonitor measured.

        A layer is :func:`lightning_eos.layers.layers`'s: the module that directly owns the parameters
        (a tied parameter belongs to its first owner only), root-owned ones under ``"(root)"`` -- the
        same definition the SharpnessMonitor's per-layer blocks use, so every measured block has its
        parameters here.
        """
        out: dict[str, float] = {}
        for monitor in monitors.values():
            last = monitor.last
            if last is None or not last.layers:
                continue
            for layer, sharpness in last.layers.items():
                try:
                    members = layer_parameters(pl_module, layer)
                except ValueError:  # not a layer of this module (a record restored from another model)
                    continue
                crit = [critical_of_param[id(q)] for q in members if id(q) in critical_of_param]
                if crit:
                    # A layer split over groups is bound by its most restrictive group.
                    out[f"{self.log_prefix}/cfl/{layer}"] = (
                        sharpness / min(crit) if min(crit) > 0 else math.inf
                    )
        if not out and not any(m.per_layer for m in monitors.values()):
            self._warn_once(
                "per_layer",
                "StabilityMonitor(per_layer=True) needs a SharpnessMonitor(per_layer=True) among the "
                "callbacks.",
            )
        return out

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message, category=RuntimeWarning)
