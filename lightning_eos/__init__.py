"""lightning-eos: edge-of-stability monitoring, floating-point sensitivity twins and stability bounds.

The public face: re-exports only, resolved on first use (so ``lightning-eos report`` and the
torch-only core do not pay for importing Lightning). The torch-only core lives in
:mod:`lightning_eos.curvature`, :mod:`lightning_eos.bounds`, :mod:`lightning_eos.pde` and
:mod:`lightning_eos.twin`; the Lightning callbacks in :mod:`lightning_eos.callbacks`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "critical_sharpness": "lightning_eos.bounds",
    "max_stable_lr": "lightning_eos.bounds",
    "register_threshold": "lightning_eos.bounds",
    "weight_decay_window": "lightning_eos.bounds",
    "AdaptiveLocalLR": "lightning_eos.callbacks",
    "LocalLRController": "lightning_eos.local_lr",
    "LocalLRRecord": "lightning_eos.local_lr",
    "SharpnessMonitor": "lightning_eos.callbacks",
    "SpaceTimeMaps": "lightning_eos.callbacks",
    "StabilityMonitor": "lightning_eos.callbacks",
    "TwinDivergence": "lightning_eos.callbacks",
    "EigenResult": "lightning_eos.curvature",
    "HessianOperator": "lightning_eos.curvature",
    "batch_sharpness": "lightning_eos.curvature",
    "block_eigenvalues": "lightning_eos.curvature",
    "hessian_eigenvalues": "lightning_eos.curvature",
    "hutchinson_trace": "lightning_eos.curvature",
    "lanczos": "lightning_eos.curvature",
    "layerwise_eigenvalues": "lightning_eos.curvature",
    "preconditioned_sharpness": "lightning_eos.curvature",
    "TwinEngine": "lightning_eos.twin",
}

__all__ = [
    "AdaptiveLocalLR",
    "EigenResult",
    "HessianOperator",
    "LocalLRController",
    "LocalLRRecord",
    "SharpnessMonitor",
    "SpaceTimeMaps",
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


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_eos' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # static analysers and IDEs see the eager imports
    from lightning_eos.bounds import (
        critical_sharpness,
        max_stable_lr,
        register_threshold,
        weight_decay_window,
    )
    from lightning_eos.callbacks import SharpnessMonitor, SpaceTimeMaps, StabilityMonitor, TwinDivergence
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
