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
3. when you want numbers: ``engine.record(step)`` (one host sync) returns a
   :class:`~lightning_eos.records.TwinRecord`, appends it to ``engine.history`` and detects
   restrained-instability events and non-finite twins.

The modules, one seam each:

* :mod:`~lightning_eos.twin.perturb` — :func:`apply_ulp`, the rescale rule (:func:`rescaled_step`,
  :data:`RESCALE_OPTIMIZERS`, :func:`check_rescale_supported`);
* :mod:`~lightning_eos.twin.pairing` — parameter alignment, layers (:mod:`lightning_eos.layers`),
  the twin's optimizer clone, mode sync (:class:`ParameterPairing`);
* :mod:`~lightning_eos.twin.gaps` — on-device gap measurement and growth (:class:`GapMeter`);
* :mod:`~lightning_eos.twin.events` — restrained-instability detection (:class:`EventDetector`);
* :mod:`~lightning_eos.twin.engine` — :class:`TwinEngine`: stepping order and serialization.
"""

from lightning_eos.twin.engine import TwinEngine
from lightning_eos.twin.events import TOTAL, EventDetector
from lightning_eos.twin.gaps import GapMeter
from lightning_eos.twin.pairing import LayerMode, ParameterPairing
from lightning_eos.twin.perturb import (
    RESCALE_OPTIMIZERS,
    Perturbation,
    apply_ulp,
    check_rescale_supported,
    rescaled_step,
)

__all__ = [
    "RESCALE_OPTIMIZERS",
    "TOTAL",
    "EventDetector",
    "GapMeter",
    "LayerMode",
    "ParameterPairing",
    "Perturbation",
    "TwinEngine",
    "apply_ulp",
    "check_rescale_supported",
    "rescaled_step",
]
