"""Restrained-instability detection: a gap that grew by orders of magnitude and then saturated.

:class:`EventDetector` looks at the records the engine reads (host numbers, at the logged steps):
a layer (or the total, reported as ``"(total)"``) whose gap grew by at least ``event_decades``
since its reference and whose growth over the last ``window`` steps is below
``saturation_decades`` is an event. The reference then moves to the saturation level, so a later
event needs new growth.

Torch only in spirit: nothing here imports Lightning (or even torch).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from lightning_eos.records import TwinRecord

__all__ = ["TOTAL", "EventDetector"]

#: The name events of the total gap (all layers together) are reported under.
TOTAL = "(total)"


class EventDetector:
    """Finds restrained-instability events in successive :class:`TwinRecord` readings.

    Args:
        layer_names: the per-layer keys of the records, in order.
        window: the growth-rate window of the records (steps).
        event_decades: an event is a growth by at least this many decades ...
        saturation_decades: ... followed by a window over which the gap grew less than this.

    Attributes:
        events: every event found so far (plain dicts: ``event``, ``layer``, ``start_step``,
            ``end_step``, ``decades``, ``level``).
    """

    def __init__(
        self,
        layer_names: Sequence[str],
        *,
        window: int = 50,
        event_decades: float = 3.0,
        saturation_decades: float = 0.1,
    ) -> None:
        self.keys = [*layer_names, TOTAL]
        self.window = window
        self.event_decades = event_decades
        self.saturation_decades = saturation_decades
        self.events: list[dict[str, Any]] = []
        self.reset()

    def reset(self) -> None:
        """Forget the references growth is measured from (after a resync); the events are kept."""
        self._base: list[float | None] = [None] * len(self.keys)  # log10 gap the growth is from
        self._since: list[int] = [-1] * len(self.keys)

    def detect(self, r: TwinRecord) -> list[dict[str, Any]]:
        """The events completed at record ``r`` (also appended to :attr:`events`)."""
        found = []
        gaps = [*r.layers.values(), r.divergence]
        rates = [*r.layer_growth_rate.values(), r.growth_rate]
        refs = [*(None for _ in self.keys[:-1]), r.reference]
        for i, (key, gap, rate) in enumerate(zip(self.keys, gaps, rates)):
            if not (math.isfinite(gap) and gap > 0):
                continue
            if self._base[i] is None:
                ref = refs[i]
                self._base[i] = math.log10(ref if ref else gap)
            base = self._base[i]
            assert base is not None
            amp = math.log10(gap) - base
            if amp >= 1.0 and self._since[i] < 0:
                self._since[i] = r.step
            window_growth = rate * (self.window - 1) / math.log(10) if math.isfinite(rate) else math.inf
            if amp >= self.event_decades and window_growth < self.saturation_decades:
                event = {
                    "event": "restrained_instability",
                    "layer": key,
                    "start_step": self._since[i],
                    "end_step": r.step,
                    "decades": amp,
                    "level": gap,
                }
                self.events.append(event)
                found.append(event)
                self._base[i] = math.log10(gap)  # a later event must grow again from here
                self._since[i] = -1
        return found

    def state_dict(self) -> dict[str, Any]:
        """Plain lists and dicts: ``events``, ``event_base``, ``event_since``."""
        return {
            "events": [dict(e) for e in self.events],
            "event_base": list(self._base),
            "event_since": list(self._since),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.events = [dict(e) for e in state["events"]]
        self._base = list(state["event_base"])
        self._since = list(state["event_since"])
