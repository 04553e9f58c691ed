"""Lightning callbacks: thin adapters over the torch-only core."""

from lightning_eos.callbacks.sharpness import SharpnessMonitor
from lightning_eos.callbacks.stability import StabilityMonitor

__all__ = ["SharpnessMonitor", "StabilityMonitor"]
