"""Torch-only curvature engine: Hessian operators, one Lanczos/power eigen-solver, spectra.

See ``docs/curvature.md``. No Lightning import anywhere in this package.
"""

from .lanczos import (
    DEFAULT_EIG_TOL,
    DEFAULT_TOL,
    EigenResult,
    ExplorationSchedule,
    eigsh,
    lanczos,
    power_iteration,
)
from .operator import (
    Batches,
    DiagonalScaledOperator,
    FunctionOperator,
    HessianBlockOperator,
    HessianOperator,
    PreconditionedOperator,
    SymmetricOperator,
    normalize_batches,
)
from .spectrum import (
    TraceEstimate,
    batch_sharpness,
    block_eigenvalues,
    hessian_eigenvalues,
    hutchinson_trace,
    layer_blocks,
    layerwise_eigenvalues,
    optimizer_preconditioner,
    preconditioned_sharpness,
)

__all__ = [
    "DEFAULT_EIG_TOL",
    "DEFAULT_TOL",
    "Batches",
    "DiagonalScaledOperator",
    "EigenResult",
    "FunctionOperator",
    "HessianBlockOperator",
    "HessianOperator",
    "PreconditionedOperator",
    "ExplorationSchedule",
    "SymmetricOperator",
    "TraceEstimate",
    "batch_sharpness",
    "block_eigenvalues",
    "eigsh",
    "hessian_eigenvalues",
    "hutchinson_trace",
    "lanczos",
    "normalize_batches",
    "layer_blocks",
    "layerwise_eigenvalues",
    "optimizer_preconditioner",
    "power_iteration",
    "preconditioned_sharpness",
]
