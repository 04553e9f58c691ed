"""Lightning callbacks: thin adapters over the torch-only core."""

from lightning_eos.callbacks.heatmaps import SpaceTimeMaps
from lightning_eos.callbacks.local_lr import AdaptiveLocalLR
from lightning_eos.callbacks.sharpness import SharpnessMonitor
from lightning_eos.callbacks.stability import StabilityMonitor
from lightning_eos.callbacks.twin import TwinDivergence

__all__ = ["AdaptiveLocalLR", "SharpnessMonitor", "SpaceTimeMaps", "StabilityMonitor", "TwinDivergence"]
