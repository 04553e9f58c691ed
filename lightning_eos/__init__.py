"""lightning-eos: edge-of-stability monitoring, floating-point sensitivity twins and stability bounds.

The public face: re-exports only. The torch-only core lives in :mod:`lightning_eos.curvature`,
:mod:`lightning_eos.bounds`, :mod:`lightning_eos.pde` and :mod:`lightning_eos.twin`; the Lightning
callbacks in :mod:`lightning_eos.callbacks`.
"""

from lightning_eos.bounds import (
    critical_sharpness,
    max_stable_lr,
    register_threshold,
    weight_decay_window,
)
from lightning_eos.callbacks import SharpnessMonitor, StabilityMonitor, TwinDivergence
from lightning_eos.curvature import (
    EigenResult,
    HessianOperator,
    batch_sharpness,
    block_eigenvalues,
    hessian_eigenvalues,
    hutchinson_trace,
    lanczos,
    layerwise_eigenvalues,
    preconditioned_sharpness,
)
from lightning_eos.twin import TwinEngine

__version__ = "0.1.0"

__all__ = [
    "EigenResult",
    "HessianOperator",
    "SharpnessMonitor",
    "StabilityMonitor",
    "TwinDivergence",
    "TwinEngine",
    "__version__",
    "batch_sharpness",
    "block_eigenvalues",
    "critical_sharpness",
    "hessian_eigenvalues",
    "hutchinson_trace",
    "lanczos",
    "layerwise_eigenvalues",
    "max_stable_lr",
    "preconditioned_sharpness",
    "register_threshold",
    "weight_decay_window",
]
