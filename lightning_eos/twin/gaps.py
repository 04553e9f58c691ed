"""On-device measurement of the gap between a model and its twin, and of its growth.

:class:`GapMeter` keeps every number it tracks in small device tensors (``O(window × layers)``) and
updates them after each twin step without a host sync; :meth:`GapMeter.read` brings them all to the
host in one transfer. Gaps (all dimensionless):

* relative L1 gap ``Σ|w − w'| / Σ|w|`` over all floating parameters and per layer;
* the paper's ``D = 2·mean(|w − w'| / (|w| + |w'|))`` (``0/0`` counted as 0), optional;
* growth rate: least-squares slope of ``ln gap`` per optimizer step over a sliding window of the
  last ``window`` steps (a finite-time Lyapunov exponent, units 1/step);
* amplification: ``log10(gap / gap_ref)`` in decades, ``gap_ref`` the first nonzero gap.

Torch only: no Lightning import.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["GapMeter"]

# The device tensors a meter holds (also the keys of its state_dict).
_BUFFERS = (
    "_gap",
    "_d",
    "_ref",
    "_log_ring",
    "_step_ring",
    "_first_nonzero",
    "_first_above",
    "_first_nonfinite",
    "_max_gap",
)


class GapMeter:
    """Gap, growth and first-crossing steps between two parameter lists, tracked on device.

    Args:
        layer_names: the layers; the last row of every per-layer buffer is the total.
        layer_index: per parameter, its index in ``layer_names`` (-1: counted in the total only).
        device: where the buffers live (the models' device).
        window: number of most recent steps the growth rate is fitted over (≥ 2).
        threshold: the gap level whose first crossing step is tracked.
        d_metric: also compute the paper's D (one more pass over the weights per step).
    """

    def __init__(
        self,
        layer_names: Sequence[str],
        layer_index: Sequence[int],
        device: torch.device,
        *,
        window: int = 50,
        threshold: float = 1e-4,
        d_metric: bool = False,
    ) -> None:
        if window < 2:
            raise ValueError(f"window={window}; accepted: an int >= 2")
        self.layer_names = list(layer_names)
        self.layer_index = list(layer_index)
        self.device = device
        self.window = window
        self.threshold = threshold
        self.d_metric = d_metric
        self._index: torch.Tensor | None = None
        self.reset()

    def _acc_dtype(self) -> torch.dtype:
        # float64 accumulators so that a 1e-16 gap of a float64 model is resolved; MPS has none.
        return torch.float32 if self.device.type == "mps" else torch.float64

    def reset(self) -> None:
        """Forget every measurement (step-0 reference, growth window, first steps)."""
        n, dev, dt = len(self.layer_names) + 1, self.device, self._acc_dtype()
        self._gap = torch.zeros(n, dtype=dt, device=dev)  # relative L1 gap, last row = total
        self._d = torch.zeros((), dtype=dt, device=dev)
        self._ref = torch.zeros(n, dtype=dt, device=dev)  # first nonzero gap
        self._log_ring = torch.full((self.window, n), math.nan, dtype=dt, device=dev)  # ln gap
        self._step_ring = torch.full((self.window,), math.nan, dtype=dt, device=dev)
        self._first_nonzero = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self._first_above = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self._first_nonfinite = torch.full((), -1, dtype=torch.int64, device=dev)
        self._max_gap = torch.zeros(n, dtype=dt, device=dev)

    def _index_tensor(self) -> torch.Tensor:
        # Built once per device: a per-step host-to-device copy would cost a sync on accelerators.
        cached = self._index
        if cached is None or cached.device != self.device:
            n_layers = len(self.layer_names)
            cached = torch.tensor([i if i >= 0 else n_layers for i in self.layer_index], device=self.device)
            self._index = cached
        return cached

    @torch.no_grad()
    def measure(
        self,
        real: Sequence[torch.Tensor],
        twin: Sequence[torch.Tensor],
        step: int,
        loss: torch.Tensor | None = None,
    ) -> None:
        """Update the buffers for the gap between ``twin`` and ``real`` at ``step`` (no host sync).

        ``loss``: the twin's loss at this step, only checked for finiteness.
        """
        n_layers = len(self.layer_names)
        dt, dev = self._acc_dtype(), self.device
        real = [p.detach() for p in real]
        twin = [p.detach() for p in twin]
        diff = torch._foreach_sub(twin, real)
        num_p = torch.stack([x.to(dt) for x in torch._foreach_norm(diff, 1)])
        den_p = torch.stack([x.to(dt) for x in torch._foreach_norm(real, 1)])
        index = self._index_tensor()
        num = torch.zeros(n_layers + 1, dtype=dt, device=dev).index_add_(0, index, num_p)
        den = torch.zeros(n_layers + 1, dtype=dt, device=dev).index_add_(0, index, den_p)
        num[-1], den[-1] = num_p.sum(), den_p.sum()
        # 0/0 (all-zero layer, identical twin) is a zero gap, not NaN.
        ratio = num / den.clamp_min(torch.finfo(dt).tiny)
        gap = torch.where(den > 0, ratio, torch.where(num > 0, math.inf, 0.0))
        self._gap = gap
        if self.d_metric:
            abs_sum = torch._foreach_add(torch._foreach_abs(twin), torch._foreach_abs(real))
            total, count = torch.zeros((), dtype=dt, device=dev), 0
            for d, s in zip(diff, abs_sum):
                total = total + torch.where(s > 0, d.abs() / s, torch.zeros_like(s)).sum().to(dt)
                count += d.numel()
            self._d = 2.0 * total / max(count, 1)
        bad = ~torch.isfinite(num[-1])
        if loss is not None:
            bad = bad | ~torch.isfinite(loss.detach()).all()
        self._first_nonfinite = torch.where((self._first_nonfinite < 0) & bad, step, self._first_nonfinite)
        pos = (gap > 0) & torch.isfinite(gap)
        self._ref = torch.where((self._ref == 0) & pos, gap, self._ref)
        self._first_nonzero = torch.where((self._first_nonzero < 0) & (gap > 0), step, self._first_nonzero)
        self._first_above = torch.where(
            (self._first_above < 0) & (gap > self.threshold), step, self._first_above
        )
        self._max_gap = torch.maximum(self._max_gap, torch.where(torch.isfinite(gap), gap, 0.0))
        slot = step % self.window
        self._log_ring[slot] = torch.where(pos, gap.log(), math.nan)
        self._step_ring[slot] = float(step)

    def growth(self) -> torch.Tensor:
        """Least-squares slope of ln gap per step over the window, per layer (NaN if < 2 points)."""
        y = self._log_ring
        x = self._step_ring.unsqueeze(1).expand_as(y)
        m = torch.isfinite(y) & torch.isfinite(x)
        cnt = m.sum(0).to(y.dtype)
        xs = torch.where(m, x, 0.0)
        ys = torch.where(m, y, 0.0)
        xm = xs.sum(0) / cnt.clamp_min(1)
        ym = ys.sum(0) / cnt.clamp_min(1)
        dx = torch.where(m, x - xm, 0.0)
        sxx = (dx * dx).sum(0)
        sxy = (dx * torch.where(m, y - ym, 0.0)).sum(0)
        return torch.where((cnt >= 2) & (sxx > 0), sxy / sxx.clamp_min(1e-300), math.nan)

    def read(self) -> dict[str, Any]:
        """All present measurements as plain Python numbers (one host sync), named as the fields of
        :class:`lightning_eos.records.TwinRecord`; ``d_metric`` is NaN unless it is measured."""
        n = len(self.layer_names) + 1
        growth = self.growth()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            amp = torch.where(self._ref > 0, torch.log10(self._gap / self._ref), math.nan)
        packed = torch.cat(
            [
                self._gap,
                growth,
                amp,
                self._ref,
                self._max_gap,
                self._d.reshape(1).to(self._gap.dtype),
                self._first_nonzero.to(self._gap.dtype),
                self._first_above.to(self._gap.dtype),
                self._first_nonfinite.reshape(1).to(self._gap.dtype),
            ]
        ).tolist()
        gap, growth_l, amp_l = packed[:n], packed[n : 2 * n], packed[2 * n : 3 * n]
        ref, max_gap = packed[3 * n : 4 * n], packed[4 * n : 5 * n]
        first_nz = [int(v) for v in packed[5 * n + 1 : 6 * n + 1]]
        first_above = [int(v) for v in packed[6 * n + 1 : 7 * n + 1]]
        layers = self.layer_names
        return {
            "divergence": gap[-1],
            "growth_rate": growth_l[-1],
            "amplification": amp_l[-1],
            "reference": ref[-1],
            "max_divergence": max_gap[-1],
            "d_metric": packed[5 * n] if self.d_metric else math.nan,
            "first_step_nonzero": first_nz[-1],
            "first_step_above": first_above[-1],
            "first_step_nonfinite": int(packed[7 * n + 1]),
            "layers": {k: gap[i] for i, k in enumerate(layers)},
            "layer_growth_rate": {k: growth_l[i] for i, k in enumerate(layers)},
            "layer_amplification": {k: amp_l[i] for i, k in enumerate(layers)},
            "layer_first_step_nonzero": {k: first_nz[i] for i, k in enumerate(layers)},
        }

    def buffers(self) -> list[torch.Tensor]:
        """The on-device measurement state (for memory accounting; ``O(window × layers)``)."""
        return [getattr(self, name) for name in _BUFFERS]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The buffers, cloned (plain tensors)."""
        return {name: getattr(self, name).detach().clone() for name in _BUFFERS}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict` onto this meter's device."""
        for name, value in state.items():
            setattr(self, name, value.to(self.device))
