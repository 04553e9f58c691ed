"""``TwinEngine``: a twin of a model stepped in lockstep with it, its gap measured on device.

The engine composes the pieces of :mod:`lightning_eos.twin`: a :class:`~.pairing.ParameterPairing`
(matched parameters, layers, the twin's optimizer), the perturbation (:mod:`~.perturb`), a
:class:`~.gaps.GapMeter` (on-device gaps and growth) and an :class:`~.events.EventDetector`; it owns
the stepping order and the serialization. Its readings are :class:`lightning_eos.records.TwinRecord`.

Torch only: no Lightning import.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from lightning_eos.isolation import RngState, replay_rng, replicate
from lightning_eos.records import TwinRecord
from lightning_eos.twin.events import TOTAL, EventDetector
from lightning_eos.twin.gaps import GapMeter
from lightning_eos.twin.pairing import LayerMode, ParameterPairing
from lightning_eos.twin.perturb import Perturbation, apply_ulp, check_rescale_supported, rescaled_step

__all__ = ["TwinEngine"]


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


class TwinEngine:
    """A twin of ``real`` stepped in lockstep, with its gap to ``real`` measured on device.

    Args:
        real: the real model (read only: the engine never writes to it, its grads or its buffers).
        twin: a private copy of ``real`` with the same parameter names (default: a deep copy).
        perturbation: ``"ulp"``, ``"rescale"`` or ``"none"`` (see :mod:`lightning_eos.twin`).
        params / fraction / single_weight / seed: the ``"ulp"`` selection (:func:`apply_ulp`).
        rescale_k: the ``k`` of ``"rescale"`` (``k = 1`` is bit-identical to ``"none"``).
        layers: per-layer gaps by ``"parameter"`` tensor, by owning ``"module"`` (the layers of
            :mod:`lightning_eos.layers`), or ``"none"``.
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

        self.pairing = ParameterPairing(real, self.twin, layers)
        self.names = self.pairing.names
        self.layer_names = self.pairing.layer_names
        self.gaps = GapMeter(
            self.layer_names,
            self.pairing.layer_index,
            self.pairing.device,
            window=window,
            threshold=threshold,
            d_metric=d_metric,
        )
        self.detector = EventDetector(
            self.layer_names,
            window=window,
            event_decades=event_decades,
            saturation_decades=saturation_decades,
        )
        self.optimizer: torch.optim.Optimizer | None = None
        self._real_optimizer: torch.optim.Optimizer | None = None
        self.scaler: torch.amp.GradScaler | None = None
        self.frozen = False
        self.steps = 0  # optimizer steps the twin has taken
        self.resyncs = 0
        self.history: list[TwinRecord] = []
        self.nonfinite_step: int | None = None
        self.first_nonzero: dict[str, Any] | None = None

    # ----------------------------------------------------------------------------------- set up
    @property
    def device(self) -> torch.device:
        """The device the measurements live on (the real model's)."""
        return self.pairing.device

    @property
    def events(self) -> list[dict[str, Any]]:
        """Every restrained-instability event found so far (plain dicts)."""
        return self.detector.events

    def attach_optimizer(self, real_optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Build the twin's optimizer: same class, same groups, state cloned from ``real_optimizer``
        (see :meth:`ParameterPairing.clone_optimizer`)."""
        if self.perturbation == "rescale":
            check_rescale_supported(real_optimizer)
        self.optimizer = self.pairing.clone_optimizer(real_optimizer)
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
                self.pairing.twin_params(),
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
        self.detector.reset()
        self.gaps.reset()
        self.start()

    # ------------------------------------------------------------------------------- stepping
    def sync_modes(self) -> None:
        """Give every twin submodule the train/eval mode, and every twin parameter the
        ``requires_grad`` flag, of its real counterpart (fine-tuning callbacks unfreeze layers)."""
        self.pairing.sync_modes()

    def backward(
        self,
        loss_fn: Callable[[nn.Module], torch.Tensor | None],
        rng: RngState | None = None,
        divide_by: int = 1,
        *,
        before_backward: Callable[[torch.Tensor], None] | None = None,
        after_backward: Callable[[], None] | None = None,
    ) -> torch.Tensor | None:
        """Accumulate the twin's gradients of ``loss_fn(twin) / divide_by`` (one micro-batch).

        ``rng`` is the generator state captured before the real forward pass of the same
        micro-batch: the twin then draws the same dropout masks, and the global stream is left as
        it was (None: the caller replays it, or no randomness is involved). With a scaler attached
        (:meth:`attach_scaler`) the divided loss is scaled before the backward pass, as Lightning's
        mixed-precision plugin does. ``before_backward(tensor)`` is called with the (divided,
        scaled) tensor about to be back-propagated and ``after_backward()`` after, where Lightning
        calls its ``on_before_backward``/``on_after_backward`` hooks. Returns the (detached,
        undivided) loss; a ``loss_fn`` that returns None (no loss for this micro-batch) gives None
        and no backward pass.
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
            if before_backward is not None:
                before_backward(scaled)
            scaled.backward()
            if after_backward is not None:
                after_backward()
        return loss.detach()

    def trainable_twin_params(self) -> list[torch.Tensor]:
        """The twin's parameters that require gradients, in the real model's parameter order."""
        return self.pairing.trainable_twin()

    def step(
        self,
        hparams: Sequence[Mapping[str, Any]] | None = None,
        *,
        clip_val: float | None = None,
        clip_algorithm: Literal["norm", "value"] = "norm",
        grad_transform: Callable[[list[torch.Tensor]], None] | None = None,
        loss: torch.Tensor | None = None,
        skip_update: bool = False,
        before_update: Callable[[torch.optim.Optimizer], None] | None = None,
    ) -> None:
        """One twin optimizer step on the gradients in the twin's ``.grad``, then a measurement.

        The order is Lightning's: ``grad_transform`` (on the scaled gradients, like DDP's
        all-reduce) → the applied ``hparams`` → ``scaler.unscale_`` (with a scaler) →
        ``before_update(optimizer)`` → clipping → ``optimizer.step`` (``scaler.step``, skipped by the
        twin's own scaler if the twin's gradients are not finite) → ``scaler.update``.

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
            before_update: called with the twin's optimizer where Lightning calls
                ``on_before_optimizer_step`` (unscaled, unclipped gradients).
        """
        if self.optimizer is None:
            raise RuntimeError("call attach_optimizer() before step()")
        opt = self.optimizer
        if self._real_optimizer is not None:
            self.pairing.add_new_groups(self._real_optimizer, opt)
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
        if before_update is not None:
            before_update(opt)
        if clip_val is not None and clip_val > 0:
            params = [p for g in opt.param_groups for p in g["params"]]
            if clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, clip_value=clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(params, clip_val)
        if not skip_update:
            step_fn: Callable[[], Any] = opt.step if scaler is None else lambda: scaler.step(opt)
            if self.perturbation == "rescale" and self.rescale_k != 1.0:
                rescaled_step(opt, step_fn, self.rescale_k)
            else:
                step_fn()
            if scaler is not None:
                scaler.update()
        opt.zero_grad(set_to_none=True)
        self.steps += 1
        self.measure(loss)

    # ---------------------------------------------------------------------------- measuring
    def measure(self, loss: torch.Tensor | None = None) -> None:
        """Update the on-device gap buffers for the present step (no host sync)."""
        self.gaps.measure(self.pairing.real, self.pairing.twin, self.steps, loss)

    def read(self) -> TwinRecord:
        """All present measurements as a record of plain numbers (one host sync); not appended to
        :attr:`history`, no event detection (see :meth:`record`)."""
        return TwinRecord(
            step=self.steps,
            global_step=self.steps,
            log_step=self.steps,
            event_count=len(self.events),
            **self.gaps.read(),
        )

    def record(
        self, label_step: int | None = None, *, log_step: int | None = None, epoch: int = 0
    ) -> TwinRecord:
        """Read, detect events and non-finite twins, append to :attr:`history` and return the record.

        Args:
            label_step: the caller's step number stored with the record as ``global_step`` (e.g. the
                trainer's ``global_step``); default the twin's own step count.
            log_step: the x-axis value the caller logs the record at (default ``global_step``).
            epoch: the caller's epoch.
        """
        r = self.read()
        global_step = self.steps if label_step is None else int(label_step)
        r = dataclasses.replace(
            r,
            global_step=global_step,
            log_step=global_step if log_step is None else int(log_step),
            epoch=epoch,
        )
        events = self.detector.detect(r)
        nonfinite = r.first_step_nonfinite >= 0 and self.nonfinite_step is None
        if nonfinite:
            self.nonfinite_step = r.first_step_nonfinite
        if self.first_nonzero is None and r.first_step_nonzero >= 0 and self.perturbation == "none":
            first = min(
                ((v, k) for k, v in r.layer_first_step_nonzero.items() if v >= 0),
                default=(r.first_step_nonzero, TOTAL),
            )
            self.first_nonzero = {"step": first[0], "layer": first[1]}
        r = dataclasses.replace(
            r, events=tuple(dict(e) for e in events), event_count=len(self.events), nonfinite=nonfinite
        )
        self.history.append(r)
        return r

    def summary(self) -> dict[str, Any]:
        """A plain summary of the run so far (reads the device once)."""
        r = self.read()
        return {
            "perturbation": self.perturbation,
            "steps": self.steps,
            "divergence": r.divergence,
            "start_divergence": r.reference,
            "max_divergence": r.max_divergence,
            "amplification_decades": r.amplification,
            "growth_rate": r.growth_rate,
            "first_step_above_threshold": r.first_step_above,
            "threshold": self.threshold,
            "restrained_instability_events": len(self.events),
            "events": [dict(e) for e in self.events],
            "nonfinite_step": self.nonfinite_step,
            "frozen": self.frozen,
            "resyncs": self.resyncs,
            "deterministic": (self.first_nonzero is None and r.first_step_nonzero < 0)
            if self.perturbation == "none"
            else None,
            "first_nonzero": self.first_nonzero,
        }

    def measurement_buffers(self) -> list[torch.Tensor]:
        """The on-device measurement state (for memory accounting; ``O(window × layers)``)."""
        return self.gaps.buffers()

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
            "history": [r.to_dict() for r in self.history],
            **self.detector.state_dict(),  # events, event_base, event_since
            "buffers": self.gaps.state_dict(),
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
        self.history = [TwinRecord.from_dict(r) for r in state["history"]]
        self.detector.load_state_dict(state)
        self.gaps.load_state_dict(state["buffers"])
