"""Plain measurement records shared by the callbacks, their history, checkpoints and reports.

A record is a frozen dataclass of numbers, strings and (for per-layer values) a ``dict[str, float]``.
:meth:`Record.to_dict` gives exactly those primitives, so a list of records stored in a callback's
``state_dict`` round-trips through ``torch.load(..., weights_only=True)``; :meth:`Record.from_dict`
rebuilds the record and ignores keys it does not know (records written by a newer version load).

Torch only in spirit: nothing here imports Lightning (or even torch).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, TypeVar

__all__ = ["Record", "SharpnessRecord", "TwinRecord"]

RecordT = TypeVar("RecordT", bound="Record")

_NAN = float("nan")


def _same(a: Any, b: Any) -> bool:
    """Equality in which NaN equals NaN ("not measured" is the same in both records)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


@dataclasses.dataclass(frozen=True, eq=False)
class Record:
    """Base class: a frozen dataclass with a lossless primitive ``dict`` view.

    Equality compares every field with NaN equal to NaN, so a history restored from a checkpoint
    compares equal to the one saved. Subclasses should be declared with
    ``@dataclasses.dataclass(frozen=True, eq=False)`` to keep this equality.
    """

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(_same(getattr(self, f.name), getattr(other, f.name)) for f in dataclasses.fields(self))

    __hash__ = None  # type: ignore[assignment]  # records may hold a dict: not hashable

    def to_dict(self) -> dict[str, Any]:
        """Field name -> value; dict-valued fields are copied (no shared mutable state)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = dict(value) if isinstance(value, Mapping) else value
        return out

    @classmethod
    def from_dict(cls: type[RecordT], data: Mapping[str, Any]) -> RecordT:
        """Inverse of :meth:`to_dict`; unknown keys are ignored, missing ones take their defaults."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclasses.dataclass(frozen=True, eq=False)
class SharpnessRecord(Record):
    """One sharpness measurement of :class:`lightning_eos.callbacks.SharpnessMonitor`.

    Curvatures are in loss units per squared parameter unit (1/lr units); a value of ``nan`` means
    "not measured" (e.g. ``lambda_min`` without ``which="both"``) or "the probe loss was not finite".

    Attributes:
        step: optimizer steps applied to the measured weights (``trainer.global_step``).
        log_step: x-axis value the scalars were logged at (Lightning's ``_batches_that_stepped``).
        epoch: training epoch of the measurement.
        sharpness: top eigenvalue of the (preconditioned, if ``preconditioned``) training-loss
            Hessian on the probe, plus nothing else (coupled weight decay is in ``critical``).
        eigenvalues: the top-k eigenvalues, descending (length k).
        critical: critical sharpness of the binding param group for the applied hyper-parameters.
        ratio: ``sharpness / critical`` (1 = at the edge of stability).
        lr: learning rate the binding group applied in the measured step.
        max_stable_lr: largest LR of the binding group that keeps ``sharpness`` stable.
        binding_group: index of the param group with the smallest critical sharpness.
        lambda_min: smallest eigenvalue of the (plain) Hessian, ``which="both"`` only.
        wd_window_low, wd_window_high: coupled weight-decay window (SGD family, ``which="both"``).
        hvps: Hessian-vector products spent on this measurement (all solver calls).
        converged: whether every requested eigenpair met the tolerance.
        batch_sharpness: gᵀHg/‖g‖² on the current batch (this measurement only).
        batch_sharpness_avg: mean of ``batch_sharpness`` over the averaging window.
        batch_ratio: ``batch_sharpness_avg / critical``.
        preconditioned: True when ``sharpness`` is λ_max(P⁻¹H) (Adam family).
        layers: per-layer block sharpness, module path -> top eigenvalue (``per_layer=True``).
    """

    step: int
    log_step: int = 0
    epoch: int = 0
    sharpness: float = _NAN
    eigenvalues: tuple[float, ...] = ()
    critical: float = _NAN
    ratio: float = _NAN
    lr: float = _NAN
    max_stable_lr: float = _NAN
    binding_group: int = 0
    lambda_min: float = _NAN
    wd_window_low: float = _NAN
    wd_window_high: float = _NAN
    hvps: int = 0
    converged: bool = False
    batch_sharpness: float = _NAN
    batch_sharpness_avg: float = _NAN
    batch_ratio: float = _NAN
    preconditioned: bool = False
    layers: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["eigenvalues"] = list(self.eigenvalues)  # lists load everywhere, tuples as lists anyway
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SharpnessRecord:
        rec = super().from_dict(data)
        return dataclasses.replace(
            rec, eigenvalues=tuple(float(v) for v in rec.eigenvalues), layers=dict(rec.layers)
        )

    @property
    def finite(self) -> bool:
        """True when the measurement produced a finite sharpness."""
        return math.isfinite(self.sharpness)


@dataclasses.dataclass(frozen=True, eq=False)
class TwinRecord(Record):
    """One reading of the bit-perturbed twin (:class:`lightning_eos.twin.TwinEngine`, logged by
    :class:`lightning_eos.callbacks.TwinDivergence`).

    Gaps are dimensionless; growth rates are in 1/step; amplifications in decades. A value of ``nan``
    means "not measured" (``d_metric`` without ``d_metric=True``) or "not defined yet" (a growth rate
    before two nonzero gaps); a first-step field of ``-1`` means "not yet".

    Attributes:
        step: optimizer steps the twin has taken (0: right after the perturbation).
        global_step: the caller's step label (the trainer's ``global_step``).
        log_step: x-axis value the scalars were logged at (Lightning's ``_batches_that_stepped``).
        epoch: training epoch of the reading.
        divergence: relative L1 gap ``Σ|w − w'| / Σ|w|`` over all floating parameters.
        growth_rate: least-squares slope of ``ln divergence`` over the last ``window`` steps.
        amplification: ``log10(divergence / reference)``.
        reference: the first nonzero gap (the step-0 gap for ``"ulp"``), 0 if none yet.
        max_divergence: the largest finite gap so far.
        d_metric: the paper's ``D = 2·mean(|w − w'| / (|w| + |w'|))`` (``d_metric=True`` only).
        first_step_nonzero: first twin step with a nonzero gap.
        first_step_above: first twin step with a gap above the engine's ``threshold``.
        first_step_nonfinite: first twin step whose loss or weights were not finite.
        nonfinite: True on the one record at which a non-finite twin was first noticed.
        event_count: restrained-instability events found up to and including this record.
        events: the events found at this record (plain dicts, see
            :class:`lightning_eos.twin.EventDetector`).
        layers: per-layer gap, layer name (:mod:`lightning_eos.layers`) -> divergence.
        layer_growth_rate / layer_amplification / layer_first_step_nonzero: the same per layer.
    """

    step: int
    global_step: int = 0
    log_step: int = 0
    epoch: int = 0
    divergence: float = _NAN
    growth_rate: float = _NAN
    amplification: float = _NAN
    reference: float = 0.0
    max_divergence: float = _NAN
    d_metric: float = _NAN
    first_step_nonzero: int = -1
    first_step_above: int = -1
    first_step_nonfinite: int = -1
    nonfinite: bool = False
    event_count: int = 0
    events: tuple[Mapping[str, Any], ...] = ()
    layers: Mapping[str, float] = dataclasses.field(default_factory=dict)
    layer_growth_rate: Mapping[str, float] = dataclasses.field(default_factory=dict)
    layer_amplification: Mapping[str, float] = dataclasses.field(default_factory=dict)
    layer_first_step_nonzero: Mapping[str, int] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["events"] = [dict(e) for e in self.events]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TwinRecord:
        rec = super().from_dict(data)
        return dataclasses.replace(
            rec,
            events=tuple(dict(e) for e in rec.events),
            layers=dict(rec.layers),
            layer_growth_rate=dict(rec.layer_growth_rate),
            layer_amplification=dict(rec.layer_amplification),
            layer_first_step_nonzero=dict(rec.layer_first_step_nonzero),
        )

    def scalars(self, prefix: str = "twin") -> dict[str, float]:
        """The scalars this record is logged as, ``{prefix}/...`` -> value (finite values only).

        ``divergence`` and ``divergence/<layer>``, ``d_metric`` (when measured), ``growth_rate`` and
        ``growth_rate/<layer>``, ``amplification``, ``restrained_instability`` (the event count) and
        ``nonfinite`` (1, on the record that noticed a non-finite twin).
        """
        p = prefix
        pairs: list[tuple[str, float]] = [(f"{p}/divergence", self.divergence)]
        pairs += [(f"{p}/divergence/{k}", v) for k, v in self.layers.items()]
        pairs.append((f"{p}/d_metric", self.d_metric))
        pairs.append((f"{p}/growth_rate", self.growth_rate))
        pairs += [(f"{p}/growth_rate/{k}", v) for k, v in self.layer_growth_rate.items()]
        pairs.append((f"{p}/amplification", self.amplification))
        pairs.append((f"{p}/restrained_instability", float(self.event_count)))
        if self.nonfinite:
            pairs.append((f"{p}/nonfinite", 1.0))
        return {k: float(v) for k, v in pairs if math.isfinite(v)}
