"""The summary table of a run: edge of stability, twin amplification, events and a verdict per layer.

Everything is computed from the logged series (:class:`lightning_eos.report.reader.RunData`), so a
report can be made from the event files alone, long after training:

* **edge-of-stability onset**: the first step with ``eos/stability_ratio ≥ edge_ratio`` (0.9, as
  ``SharpnessMonitor.summary()``), the fraction of measured steps at the edge and the largest ratio;
* **twin amplification** per layer, in decades: ``log10(final gap / first nonzero gap)`` of
  ``twin/divergence/<layer>``;
* **restrained-instability events**, found by :func:`restrained_instability_events` in each
  per-layer gap series (and the total), with the rule of ``TwinDivergence``;
* the final prediction disagreement ``twin/val_disagreement``;
* a plain **verdict** per layer (see :func:`layer_verdict`).

Steps are TensorBoard's x-axis (the step ``self.log`` uses), like every curve of the run.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from lightning_eos.plots import lr_changes
from lightning_eos.report.reader import Prefixes, RunData, Series

__all__ = [
    "EDGE_RATIO",
    "TOTAL",
    "VERDICTS",
    "InstabilityEvent",
    "LayerSummary",
    "RunSummary",
    "amplification_decades",
    "layer_verdict",
    "markdown",
    "restrained_instability_events",
    "summarize",
]

#: Stability ratio from which a measurement counts as "at the edge" (as ``SharpnessMonitor``).
EDGE_RATIO = 0.9
#: Layer name of the whole-model gap ``twin/divergence`` in event lists (as ``TwinDivergence``).
TOTAL = "(total)"
#: The verdicts, from calm to alarming.
VERDICTS = ("stable", "at the edge", "amplifying")


@dataclasses.dataclass(frozen=True)
class InstabilityEvent:
    """One restrained-instability episode of one layer's twin gap.

    Attributes:
        layer: the layer (``"(total)"`` for the whole-model gap).
        start_step: first step whose gap is ≥ 1 decade above the reference the growth is counted from.
        end_step: the step at which the saturation was detected.
        decades: growth from the reference to the gap at ``end_step``.
        level: the gap at ``end_step`` (where it saturated).
    """

    layer: str
    start_step: int
    end_step: int
    decades: float
    level: float

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers and strings."""
        return dataclasses.asdict(self)


def _window_growth(steps: np.ndarray, log_gap: np.ndarray, i: int, window: int) -> float:
    """Decades the least-squares line through the points of the last ``window`` steps rises over
    ``window - 1`` steps (``TwinDivergence``'s growth rate × (window − 1) / ln 10); inf if < 2 points."""
    lo = int(np.searchsorted(steps, steps[i] - window, side="right"))
    x = steps[lo : i + 1].astype(np.float64)
    y = log_gap[lo : i + 1]
    keep = np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size < 2:
        return math.inf
    dx = x - x.mean()
    sxx = float((dx * dx).sum())
    if sxx <= 0:
        return math.inf
    slope = float((dx * (y - y.mean())).sum()) / sxx  # decades per step
    return slope * (window - 1)


def restrained_instability_events(
    steps: Sequence[int] | np.ndarray,
    gaps: Sequence[float] | np.ndarray,
    *,
    layer: str = TOTAL,
    window: int = 50,
    event_decades: float = 3.0,
    saturation_decades: float = 0.1,
) -> list[InstabilityEvent]:
    """Restrained-instability events in one twin-gap series: ≥ ``event_decades`` of growth, then
    saturation.

    The rule of ``TwinDivergence`` (its ``window``, ``event_decades`` and ``saturation_decades``),
    applied to the logged points: the growth is counted from the first positive gap; the episode
    starts at the first point ≥ 1 decade above it; it is an event at the first point that is
    ≥ ``event_decades`` above it while the least-squares line of ``log10 gap`` over the last
    ``window`` steps rises less than ``saturation_decades`` over the window. The reference then moves
    to that level, so a later event needs new growth. With a gap logged every step this is exactly
    the callback's computation; with sparser logging the window line is fitted to the logged points.

    Args:
        steps: increasing steps of the points.
        gaps: the gap at each step (zeros and non-finite values are skipped).
        layer: name stored in the events.
        window: steps the saturation line is fitted over (≥ 2).
        event_decades: growth an event needs (> 0).
        saturation_decades: growth over the window below which the gap counts as saturated (> 0).

    Returns:
        The events in order.

    Raises:
        ValueError: mismatched lengths or an out-of-range argument.
    """
    s = np.asarray(steps, dtype=np.int64)
    g = np.asarray(gaps, dtype=np.float64)
    if s.shape != g.shape or s.ndim != 1:
        raise ValueError(f"steps {s.shape} and gaps {g.shape} must be 1-d sequences of the same length.")
    if window < 2:
        raise ValueError(f"window={window} is not supported; accepted values: an int >= 2.")
    if not event_decades > 0 or not saturation_decades > 0:
        raise ValueError(
            f"event_decades={event_decades}, saturation_decades={saturation_decades}: both must be > 0."
        )
    if s.size > 1 and np.any(np.diff(s) <= 0):
        raise ValueError("steps must be strictly increasing.")
    positive = np.isfinite(g) & (g > 0)
    log_gap = np.full(g.shape, np.nan)
    log_gap[positive] = np.log10(g[positive])
    events: list[InstabilityEvent] = []
    base: float | None = None
    since = -1
    for i in np.flatnonzero(positive).tolist():
        level = float(log_gap[i])
        if base is None:
            base = level
        amp = level - base
        if amp >= 1.0 and since < 0:
            since = int(s[i])
        # The window line is only needed once the growth is large enough (cheap on long runs).
        if amp >= event_decades and _window_growth(s, log_gap, i, window) < saturation_decades:
            start = since if since >= 0 else int(s[i])
            events.append(InstabilityEvent(layer, start, int(s[i]), amp, float(g[i])))
            base, since = level, -1
    return events


def amplification_decades(gaps: Series | None) -> float:
    """``log10(final gap / first positive gap)``; NaN without two usable points."""
    if gaps is None:
        return math.nan
    v = gaps.values[np.isfinite(gaps.values) & (gaps.values > 0)]
    if v.size < 1 or not (math.isfinite(gaps.last) and gaps.last > 0):
        return math.nan
    return math.log10(gaps.last / float(v[0]))


@dataclasses.dataclass(frozen=True)
class LayerSummary:
    """The per-layer row of the summary.

    Attributes:
        layer: layer name (:mod:`lightning_eos.layers`).
        max_ratio / final_ratio: largest and last block sharpness ÷ critical sharpness (NaN when the
            layer's sharpness was not logged).
        first_gap / final_gap: first positive and last twin gap of the layer (NaN without a twin).
        amplification: ``log10(final_gap / first_gap)`` in decades.
        events: restrained-instability events of the layer.
        verdict: ``"stable"``, ``"at the edge"`` or ``"amplifying"`` (:func:`layer_verdict`).
    """

    layer: str
    max_ratio: float
    final_ratio: float
    first_gap: float
    final_gap: float
    amplification: float
    events: int
    verdict: str

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers and strings."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class RunSummary:
    """The whole summary of a run (see the module docstring for the definitions).

    ``onset_step`` is None when the ratio never reached ``edge_ratio``; every float is NaN when the
    series it comes from was not logged.
    """

    logdir: str
    files: int
    last_step: int
    measurements: int
    edge_ratio: float
    onset_step: int | None
    edge_fraction: float
    max_ratio: float
    max_ratio_step: int | None
    final_ratio: float
    amplification: float
    final_divergence: float
    final_disagreement: float
    logged_events: float
    events: tuple[InstabilityEvent, ...]
    layers: tuple[LayerSummary, ...]
    lr_changes: tuple[int, ...]
    verdict: str

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers, strings, lists and dicts."""
        out = dataclasses.asdict(self)
        out["events"] = [e.to_dict() for e in self.events]
        out["layers"] = [layer.to_dict() for layer in self.layers]
        out["lr_changes"] = list(self.lr_changes)
        return out

    def rows(self) -> list[tuple[str, str]]:
        """``(quantity, formatted value)`` rows of the run table (shared by HTML and Markdown)."""
        if self.measurements:
            onset = (
                str(self.onset_step)
                if self.onset_step is not None
                else f"never (ratio stayed below {self.edge_ratio:g})"
            )
            at_edge = round(self.edge_fraction * self.measurements)
            fraction = f"{self.edge_fraction:.0%} ({at_edge} of {self.measurements} measurements)"
            max_ratio = f"{self.max_ratio:.3f} (step {self.max_ratio_step})"
        else:
            onset = fraction = max_ratio = "— (no eos/stability_ratio)"
        n_events = f"{len(self.events)}"
        if math.isfinite(self.logged_events):
            n_events += f" (the twin counted {self.logged_events:.0f})"
        return [
            ("verdict", self.verdict),
            (f"edge-of-stability onset step (first ratio ≥ {self.edge_ratio:g})", onset),
            (f"steps at the edge (ratio ≥ {self.edge_ratio:g})", fraction),
            ("max stability ratio", max_ratio),
            ("final stability ratio", _num(self.final_ratio)),
            ("twin amplification, whole model (decades)", _num(self.amplification, 2)),
            ("final twin gap", _gap(self.final_divergence)),
            ("restrained-instability events", n_events),
            ("final prediction disagreement", _pct(self.final_disagreement)),
            ("learning-rate changes at steps", ", ".join(map(str, self.lr_changes)) or "none"),
            ("steps logged", str(self.last_step + 1) if self.last_step >= 0 else "—"),
        ]

    def layer_rows(self) -> list[list[str]]:
        """Rows of the per-layer table, in the order of :data:`LAYER_COLUMNS`."""
        return [
            [
                row.layer,
                _num(row.max_ratio),
                _num(row.final_ratio),
                _gap(row.first_gap),
                _gap(row.final_gap),
                _num(row.amplification, 2),
                str(row.events),
                row.verdict,
            ]
            for row in self.layers
        ]

    def event_rows(self) -> list[list[str]]:
        """Rows of the events table, in the order of :data:`EVENT_COLUMNS`."""
        return [
            [e.layer, str(e.start_step), str(e.end_step), _num(e.decades, 2), _gap(e.level)]
            for e in self.events
        ]


#: Column headers of :meth:`RunSummary.layer_rows`.
LAYER_COLUMNS = (
    "layer",
    "max sharpness ÷ critical",
    "final sharpness ÷ critical",
    "first twin gap",
    "final twin gap",
    "amplification (decades)",
    "events",
    "verdict",
)
#: Column headers of :meth:`RunSummary.event_rows`.
EVENT_COLUMNS = ("layer", "start step", "end step", "growth (decades)", "saturation level")


def _num(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) and math.isfinite(x) else "—"


def _gap(x: float) -> str:
    return f"{x:.2e}" if isinstance(x, (int, float)) and math.isfinite(x) else "—"


def _pct(x: float) -> str:
    return f"{x:.2%}" if isinstance(x, (int, float)) and math.isfinite(x) else "—"


def layer_verdict(
    max_ratio: float,
    amplification: float,
    events: int,
    *,
    run_max_ratio: float = math.nan,
    edge_ratio: float = EDGE_RATIO,
    amplifying_decades: float = 1.0,
) -> str:
    """The plain verdict of one layer.

    * ``"amplifying"``: its twin gap grew by ≥ ``amplifying_decades`` (round-off amplified ≥ 10×) or
      went through a restrained-instability event;
    * ``"at the edge"``: otherwise, its block sharpness reached ``edge_ratio`` × the critical
      sharpness — or, when its block sharpness was not logged, the whole model's did;
    * ``"stable"``: neither.
    """
    if events > 0 or (math.isfinite(amplification) and amplification >= amplifying_decades):
        return "amplifying"
    ratio = max_ratio if math.isfinite(max_ratio) else run_max_ratio
    if math.isfinite(ratio) and ratio >= edge_ratio:
        return "at the edge"
    return "stable"


def _aligned_ratio(block: Series, critical: Series | None) -> Series:
    """``block sharpness / critical sharpness`` at the steps where both were logged."""
    if critical is None:
        return Series(block.steps, np.full(block.values.shape, np.nan))
    common, bi, ci = np.intersect1d(block.steps, critical.steps, return_indices=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = block.values[bi] / critical.values[ci]
    return Series(common.astype(np.int64), np.where(np.isfinite(ratio), ratio, np.nan))


def layer_ratios(run: RunData, prefixes: Prefixes | None = None) -> dict[str, Series]:
    """Per-layer block sharpness ÷ critical sharpness, ``{layer: Series}``.

    The StabilityMonitor's local CFL number ``eos/cfl/<layer>`` (divided by the critical sharpness
    of the layer's own param group) when logged, else ``eos/sharpness/<layer>`` ÷
    ``eos/critical_sharpness`` of the binding group.
    """
    p = prefixes or Prefixes()
    cfl = run.family(f"{p.eos}/cfl")
    critical = run.get(f"{p.eos}/critical_sharpness")
    out = {layer: s for layer, s in cfl.items()}
    for layer, block in run.family(f"{p.eos}/sharpness").items():
        out.setdefault(layer, _aligned_ratio(block, critical))
    return out


def layer_names(run: RunData, prefixes: Prefixes | None = None) -> list[str]:
    """Every layer of the run's per-layer keys, in the order they first appear."""
    p = prefixes or Prefixes()
    names: dict[str, None] = {}
    for family in (
        f"{p.eos}/sharpness",
        f"{p.eos}/cfl",
        f"{p.twin}/divergence",
        f"{p.twin}/growth_rate",
        f"{p.local_lr}/multiplier",
    ):
        names.update(dict.fromkeys(run.family(family)))
    return list(names)


def summarize(
    run: RunData,
    *,
    edge_ratio: float = EDGE_RATIO,
    window: int = 50,
    event_decades: float = 3.0,
    saturation_decades: float = 0.1,
    amplifying_decades: float = 1.0,
    prefixes: Prefixes | None = None,
) -> RunSummary:
    """The summary of a run read by :func:`lightning_eos.report.reader.read_run`.

    Args:
        run: the run's series.
        edge_ratio: stability ratio from which a measurement is "at the edge".
        window: the event rule's saturation window (use the value the run's ``TwinDivergence`` was
            given; the defaults are its defaults).
        event_decades: the event rule's growth threshold.
        saturation_decades: the event rule's saturation threshold.
        amplifying_decades: twin growth (decades) from which a layer is "amplifying".
        prefixes: the callbacks' ``log_prefix`` values.
    """
    p = prefixes or Prefixes()
    ratio = run.get(f"{p.eos}/stability_ratio")
    ratio_f = ratio.finite() if ratio is not None else Series(np.zeros(0, np.int64), np.zeros(0))
    measurements = len(ratio_f)
    if measurements:
        at_edge = ratio_f.values >= edge_ratio
        onset = int(ratio_f.steps[np.argmax(at_edge)]) if at_edge.any() else None
        edge_fraction = float(at_edge.mean())
        k = int(np.argmax(ratio_f.values))
        max_ratio, max_step, final_ratio = float(ratio_f.values[k]), int(ratio_f.steps[k]), ratio_f.last
    else:
        onset, edge_fraction, max_ratio, max_step, final_ratio = None, math.nan, math.nan, None, math.nan

    rule = {"window": window, "event_decades": event_decades, "saturation_decades": saturation_decades}
    gaps = run.family(f"{p.twin}/divergence")
    ratios = layer_ratios(run, p)
    events: list[InstabilityEvent] = []
    rows: list[LayerSummary] = []
    for layer in layer_names(run, p):
        gap = gaps.get(layer)
        found = restrained_instability_events(gap.steps, gap.values, layer=layer, **rule) if gap else []
        events.extend(found)
        r = ratios.get(layer)
        rf = r.finite() if r is not None else None
        layer_max = float(rf.values.max()) if rf is not None and len(rf) else math.nan
        layer_final = rf.last if rf is not None and len(rf) else math.nan
        positive = gap.values[np.isfinite(gap.values) & (gap.values > 0)] if gap else np.zeros(0)
        amp = amplification_decades(gap)
        verdict = layer_verdict(
            layer_max,
            amp,
            len(found),
            run_max_ratio=max_ratio,
            edge_ratio=edge_ratio,
            amplifying_decades=amplifying_decades,
        )
        rows.append(
            LayerSummary(
                layer=layer,
                max_ratio=layer_max,
                final_ratio=layer_final,
                first_gap=float(positive[0]) if positive.size else math.nan,
                final_gap=gap.last if gap else math.nan,
                amplification=amp,
                events=len(found),
                verdict=verdict,
            )
        )
    total = run.get(f"{p.twin}/divergence")
    if total is not None:
        events.extend(restrained_instability_events(total.steps, total.values, layer=TOTAL, **rule))
    events.sort(key=lambda e: (e.end_step, e.layer == TOTAL))
    amplification = amplification_decades(total)
    disagreement = run.get(f"{p.twin}/val_disagreement")
    logged_events = run.get(f"{p.twin}/restrained_instability")
    lr_series = list(run.family(f"{p.eos}/lr").values())
    if not lr_series:  # Lightning's LearningRateMonitor, when the StabilityMonitor was not attached
        lr_series = [s for tag, s in run.scalars.items() if tag.startswith("lr-") and "momentum" not in tag]

    run_verdicts = [row.verdict for row in rows]
    run_verdicts.append(
        layer_verdict(
            max_ratio,
            amplification,
            sum(e.layer == TOTAL for e in events),
            edge_ratio=edge_ratio,
            amplifying_decades=amplifying_decades,
        )
    )
    verdict = max(run_verdicts, key=VERDICTS.index)
    library_steps = [
        int(s.steps[-1]) for tag, s in run.scalars.items() if len(s) and tag.startswith(_heads(p))
    ]
    return RunSummary(
        logdir=str(run.logdir),
        files=len(run.files),
        last_step=max(library_steps, default=-1),
        measurements=measurements,
        edge_ratio=edge_ratio,
        onset_step=onset,
        edge_fraction=edge_fraction,
        max_ratio=max_ratio,
        max_ratio_step=max_step,
        final_ratio=final_ratio,
        amplification=amplification,
        final_divergence=total.last if total is not None else math.nan,
        final_disagreement=disagreement.last if disagreement is not None else math.nan,
        logged_events=logged_events.last if logged_events is not None else math.nan,
        events=tuple(events),
        layers=tuple(rows),
        lr_changes=tuple(lr_changes(lr_series)),
        verdict=verdict,
    )


def _heads(p: Prefixes) -> tuple[str, ...]:
    return tuple(x + "/" for x in p.all())


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def _md_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows]
    return lines


def markdown(summary: RunSummary) -> str:
    """The summary as Markdown: the run table, the per-layer table and the events table."""
    lines = [f"## lightning-eos report: `{summary.logdir}`", ""]
    lines += _md_table(("quantity", "value"), summary.rows())
    if summary.layers:
        lines += ["", "### Layers", ""]
        lines += _md_table(LAYER_COLUMNS, summary.layer_rows())
    lines += ["", "### Restrained-instability events", ""]
    if summary.events:
        lines += _md_table(EVENT_COLUMNS, summary.event_rows())
    else:
        lines.append("none")
    return "\n".join(lines) + "\n"
