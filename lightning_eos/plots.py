"""Matplotlib figures of a run: curves and layers × steps space-time maps.

Shared by the report (:mod:`lightning_eos.report`) and the
:class:`~lightning_eos.callbacks.heatmaps.SpaceTimeMaps` callback. Every function takes plain series
— anything with ``.steps`` and ``.values`` (a :class:`lightning_eos.report.Series`) or a
``(steps, values)`` pair — and returns a
:class:`matplotlib.figure.Figure` drawn on its own Agg canvas: no pyplot state, no GUI backend, no
change to the user's matplotlib backend, safe in a training process.

* :func:`sharpness_figure` — sharpness against the critical sharpness, the region above the bound
  shaded;
* :func:`stability_ratio_figure` — sharpness ÷ critical sharpness with the edge band;
* :func:`twin_gap_figure` — the twin gap of every layer on a log scale;
* :func:`space_time_figure` — a heat map, layers (rows, input at the top) × steps (columns), of one
  of :data:`SPACE_TIME_KINDS`: log10 twin gap, twin growth rate, block sharpness ÷ critical
  sharpness, or the LR controller's multipliers; with a color bar and the LR-schedule changes marked.

matplotlib is an optional dependency (the ``dev`` extra): it is imported inside the functions, so
``import lightning_eos`` never needs it.
"""

from __future__ import annotations

import dataclasses
import io
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:  # pragma: no cover - typing only
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "SPACE_TIME_KINDS",
    "SpaceTimeKind",
    "common_layer_prefix",
    "figure_to_png",
    "lr_changes",
    "require_matplotlib",
    "shorten_labels",
    "sharpness_figure",
    "space_time_figure",
    "space_time_grid",
    "space_time_title",
    "stability_ratio_figure",
    "twin_gap_figure",
]

SpaceTimeKind = Literal["twin_gap", "growth_rate", "sharpness_ratio", "lr_multiplier"]

#: The quantities a space-time map can show.
SPACE_TIME_KINDS: tuple[SpaceTimeKind, ...] = ("twin_gap", "growth_rate", "sharpness_ratio", "lr_multiplier")

_WIDTH = 10.0  # inches; at the default 110 dpi a figure is 1100 px wide
_LR_MARK = "#00b4d8"
_EDGE = "#e76f51"


@dataclasses.dataclass(frozen=True)
class _Kind:
    title: str
    label: str
    cmap: str
    transform: str  # "log10", "log2" or "identity"
    center: float | None  # diverging maps: the value drawn in the middle color


_KINDS: dict[str, _Kind] = {
    "twin_gap": _Kind("Space-time map · log10 twin gap", "log10 twin gap", "magma", "log10", None),
    "growth_rate": _Kind(
        "Space-time map · twin growth rate", "growth rate of ln gap (1/step)", "RdBu_r", "identity", 0.0
    ),
    "sharpness_ratio": _Kind(
        "Space-time map · block sharpness ÷ critical sharpness",
        "sharpness ÷ critical (1 = edge)",
        "RdYlBu_r",
        "identity",
        1.0,
    ),
    "lr_multiplier": _Kind(
        "Space-time map · local LR multiplier", "log2 LR multiplier (0 = unchanged)", "PuOr_r", "log2", 0.0
    ),
}


def space_time_title(kind: SpaceTimeKind) -> str:
    """The default title of a space-time map of ``kind``."""
    return _KINDS[kind].title


def require_matplotlib(owner: str = "lightning-eos plots") -> None:
    """Raise a clear ``ImportError`` when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"{owner} needs matplotlib: pip install matplotlib (or pip install 'lightning-eos[dev]')."
        ) from err


def _new_figure(height: float, width: float = _WIDTH) -> Figure:
    """A figure on its own Agg canvas (never registered with pyplot)."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_to_png(fig: Figure, dpi: int = 110) -> bytes:
    """The figure as PNG bytes (Agg)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _xy(series: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` float arrays of a series-like object, sorted by step."""
    if series is None:
        return np.zeros(0), np.zeros(0)
    if hasattr(series, "steps") and hasattr(series, "values"):
        steps, values = series.steps, series.values
    else:
        steps, values = series
    x = np.asarray(steps, dtype=np.float64).reshape(-1)
    y = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"a series needs as many steps as values; got {x.shape} and {y.shape}.")
    order = np.argsort(x, kind="stable")
    return x[order], y[order]


def lr_changes(series: Iterable[Any], rtol: float = 1e-6) -> list[int]:
    """Steps where a learning-rate schedule changes regime, over all groups' LR series.

    Marked: a jump (StepLR, MultiStepLR: at the first step with the new value), the end of a ramp
    (a warm-up reaching its peak) and a ramp that turns around (warm-up into decay: at the peak).
    Not marked: every step of a smooth schedule (a cosine decay gets no marks) or the start of a ramp.
    Changes below ``rtol`` (relative) count as no change.

    Args:
        series: one LR series per param group (series-like, see the module docstring).
        rtol: relative change below which two consecutive LRs are equal.
    """
    marks: set[int] = set()
    for lr in series:
        steps, values = _xy(lr)
        keep = np.isfinite(values)
        steps, values = steps[keep], values[keep]
        if steps.size < 2:
            continue
        rel = np.diff(values) / np.maximum(np.abs(values[:-1]), 1e-300)
        sign = np.where(np.abs(rel) > rtol, np.sign(rel), 0.0)  # sign[j]: point j -> point j + 1
        runs: list[tuple[float, int, int]] = []  # (sign, first j, length)
        for j, v in enumerate(sign.tolist()):
            if runs and runs[-1][0] == v:
                runs[-1] = (v, runs[-1][1], runs[-1][2] + 1)
            else:
                runs.append((v, j, 1))
        for k in range(1, len(runs)):
            (a, _, a_len), (b, b_start, b_len) = runs[k - 1], runs[k]
            after = runs[k + 1][0] if k + 1 < len(runs) else 0.0
            if a == 0 and b_len == 1 and after == 0:
                marks.add(int(steps[b_start + 1]))  # a jump: the first point at the new value
            elif a != 0 and b == 0 and a_len > 1:
                marks.add(int(steps[b_start]))  # a ramp ended here
            elif a != 0 and b != 0:
                marks.add(int(steps[b_start]))  # a ramp turned around here
    return sorted(marks)


def _mark_lr_changes(ax: Axes, lr_changes: Iterable[int], *, on_image: bool = False) -> bool:
    """Vertical marks where the LR schedule changed (at most 50); True if any was drawn."""
    from matplotlib import patheffects

    marks = sorted(set(int(s) for s in lr_changes))
    if not marks or len(marks) > 50:
        return False
    effects = [patheffects.withStroke(linewidth=2.6, foreground="black")] if on_image else None
    color = "white" if on_image else _LR_MARK
    for i, step in enumerate(marks):
        ax.axvline(
            step, color=color, ls="--", lw=1.2, path_effects=effects, label="LR change" if i == 0 else None
        )
    return True


def _no_data(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} logged", ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _finish(ax: Axes, title: str, xlabel: str = "step") -> None:
    ax.set_title(title, loc="left", fontsize=12, fontweight="bold")
    ax.set_xlabel(xlabel)
    ax.grid(True, alpha=0.25)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def sharpness_figure(
    sharpness: Any,
    critical: Any,
    *,
    batch_sharpness: Any = None,
    onset_step: int | None = None,
    lr_changes: Iterable[int] = (),
    title: str = "Sharpness vs critical sharpness",
) -> Figure:
    """Sharpness λ_max against the critical sharpness, the region above the bound shaded.

    Args:
        sharpness: ``eos/sharpness``.
        critical: ``eos/critical_sharpness`` (e.g. 2/lr for SGD).
        batch_sharpness: ``eos/batch_sharpness`` (optional, a thin line).
        onset_step: first step at the edge (a dotted mark).
        lr_changes: steps where the LR schedule changed.
        title: figure title.
    """
    fig = _new_figure(4.2)
    ax = fig.add_subplot()
    xs, ys = _xy(sharpness)
    xc, yc = _xy(critical)
    if xs.size == 0 and xc.size == 0:
        _no_data(ax, "sharpness")
        _finish(ax, title)
        return fig
    finite = np.concatenate([ys[np.isfinite(ys)], yc[np.isfinite(yc)]])
    top = float(finite.max()) * 1.15 if finite.size else 1.0
    bottom = min(0.0, float(finite.min()) * 1.1) if finite.size else 0.0
    if xc.size:
        ax.plot(xc, yc, color="black", ls="--", lw=1.6, label="critical sharpness (bound)")
        ax.fill_between(
            xc,
            yc,
            top,
            where=np.isfinite(yc),
            color=_EDGE,
            alpha=0.10,
            lw=0,
            label="above the bound (unstable)",
        )
    if xs.size:
        ax.plot(xs, ys, color="#1d3557", lw=2.0, label="sharpness λ_max")
        if xc.size:
            crit_at = np.interp(xs, xc, yc, left=np.nan, right=np.nan)
            over = np.isfinite(crit_at) & np.isfinite(ys) & (ys > crit_at)
            if over.any():
                ax.fill_between(
                    xs,
                    crit_at,
                    ys,
                    where=over,
                    color=_EDGE,
                    alpha=0.45,
                    lw=0,
                    label="sharpness above the bound",
                )
    xb, yb = _xy(batch_sharpness)
    if xb.size:
        ax.plot(xb, yb, color="#2a9d8f", lw=1.0, alpha=0.8, label="batch sharpness")
    if onset_step is not None:
        ax.axvline(onset_step, color="0.3", ls=":", lw=1.4, label=f"edge onset (step {onset_step})")
    _mark_lr_changes(ax, lr_changes)
    ax.set_ylim(bottom, top)
    ax.set_ylabel("curvature (1/lr units)")
    ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
    _finish(ax, title)
    return fig


def stability_ratio_figure(
    ratio: Any,
    *,
    batch_ratio: Any = None,
    edge_ratio: float = 0.9,
    onset_step: int | None = None,
    lr_changes: Iterable[int] = (),
    title: str = "Stability ratio: sharpness ÷ critical sharpness",
) -> Figure:
    """The stability ratio with the edge band [``edge_ratio``, 1] and the unstable region above 1.

    Args:
        ratio: ``eos/stability_ratio``.
        batch_ratio: ``eos/batch_stability_ratio`` (optional).
        edge_ratio: lower end of the "at the edge" band.
        onset_step: first step at the edge (a dotted mark).
        lr_changes: steps where the LR schedule changed.
        title: figure title.
    """
    fig = _new_figure(3.6)
    ax = fig.add_subplot()
    x, y = _xy(ratio)
    if x.size == 0:
        _no_data(ax, "stability ratio")
        _finish(ax, title)
        return fig
    finite = y[np.isfinite(y)]
    top = max(1.25, float(finite.max()) * 1.1) if finite.size else 1.25
    ax.axhspan(1.0, top, color=_EDGE, alpha=0.10, lw=0, label="unstable (> 1)")
    ax.axhspan(edge_ratio, 1.0, color="#f4a261", alpha=0.25, lw=0, label=f"at the edge (≥ {edge_ratio:g})")
    ax.axhline(1.0, color="black", ls="--", lw=1.2)
    ax.plot(x, y, color="#1d3557", lw=2.0, label="stability ratio")
    xb, yb = _xy(batch_ratio)
    if xb.size:
        ax.plot(xb, yb, color="#2a9d8f", lw=1.0, alpha=0.8, label="batch stability ratio")
    if onset_step is not None:
        ax.axvline(onset_step, color="0.3", ls=":", lw=1.4, label=f"edge onset (step {onset_step})")
    _mark_lr_changes(ax, lr_changes)
    ax.set_ylim(0.0, top)
    ax.set_ylabel("ratio (1 = edge of stability)")
    ax.legend(loc="lower right", fontsize=8, framealpha=0.9)
    _finish(ax, title)
    return fig


def twin_gap_figure(
    layers: Mapping[str, Any],
    *,
    total: Any = None,
    events: Iterable[Any] = (),
    lr_changes: Iterable[int] = (),
    title: str = "Twin gap per layer (relative L1, log scale)",
) -> Figure:
    """The twin gap of every layer on a log scale, the whole-model gap in black.

    Args:
        layers: ``{layer: twin/divergence/<layer>}`` in depth order.
        total: ``twin/divergence``.
        events: restrained-instability episodes (objects or dicts with ``start_step``/``end_step``),
            shaded.
        lr_changes: steps where the LR schedule changed.
        title: figure title.
    """
    from matplotlib import colormaps

    fig = _new_figure(4.4)
    ax = fig.add_subplot()
    names = list(layers)
    if not names and total is None:
        _no_data(ax, "twin gap")
        _finish(ax, title)
        return fig
    many = len(names) > 12
    cmap = colormaps["viridis"] if many else colormaps["tab10"]
    drawn = False
    for i, name in enumerate(names):
        x, y = _xy(layers[name])
        keep = np.isfinite(y) & (y > 0)
        if not keep.any():
            continue
        color = cmap(i / max(len(names) - 1, 1)) if many else cmap(i % 10)
        ax.plot(x[keep], y[keep], color=color, lw=1.3, label=None if many else name)
        drawn = True
    xt, yt = _xy(total)
    keep = np.isfinite(yt) & (yt > 0)
    if keep.any():
        ax.plot(xt[keep], yt[keep], color="black", lw=2.2, label="whole model")
        drawn = True
    if not drawn:
        _no_data(ax, "positive twin gap")
        _finish(ax, title)
        return fig
    ax.set_yscale("log")
    spans: set[tuple[int, int]] = set()
    for e in events:
        start = e["start_step"] if isinstance(e, Mapping) else e.start_step
        end = e["end_step"] if isinstance(e, Mapping) else e.end_step
        spans.add((int(start), int(end)))
    merged: list[list[int]] = []
    for start, end in sorted(spans):  # overlapping episodes of several layers: one shaded span
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    for j, (start, end) in enumerate(merged):
        ax.axvspan(
            start, end, color=_EDGE, alpha=0.12, lw=0, label="restrained instability" if j == 0 else None
        )
    _mark_lr_changes(ax, lr_changes)
    if many:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        sm = ScalarMappable(norm=Normalize(0, len(names) - 1), cmap=cmap)
        fig.colorbar(sm, ax=ax, label="layer index (input → output)", pad=0.01)
    if ax.get_legend_handles_labels()[1]:
        ax.legend(loc="lower right", fontsize=8, ncol=2 if len(names) > 5 else 1, framealpha=0.9)
    ax.set_ylabel("gap Σ|w − w'| / Σ|w|")
    _finish(ax, title)
    return fig


def common_layer_prefix(names: Sequence[str]) -> str:
    """The longest module path (ending in ``.``) every name starts with, ``""`` if none."""
    if len(names) < 2:
        return ""
    parts = [n.split(".") for n in names]
    common: list[str] = []
    for pieces in zip(*parts):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    # Keep at least one component of every name.
    common = common[: min(len(p) for p in parts) - 1]
    return ".".join(common) + "." if common else ""


def shorten_labels(names: Sequence[str], max_chars: int = 30) -> tuple[list[str], str]:
    """Layer names short enough for an axis, and the prefix that was dropped.

    When some name is longer than ``max_chars``, the module path all names share
    (``model.transformer.``) is dropped; names still too long keep their start and end around an
    ellipsis (``h.0.attn…c_attn``). Distinct names stay distinct.

    Returns:
        ``(labels, dropped_prefix)``.
    """
    prefix = common_layer_prefix(names) if any(len(n) > max_chars for n in names) else ""
    out: list[str] = []
    seen: set[str] = set()
    for name in names:
        label = name[len(prefix) :]
        if len(label) > max_chars:
            tail = max_chars * 3 // 5
            head = max_chars - tail - 1
            label = f"{label[:head]}…{label[-tail:]}"
        if label in seen:  # two long names that shorten alike: keep the full one
            label = name[len(prefix) :]
        seen.add(label)
        out.append(label)
    return out, prefix


def space_time_grid(
    layers: Mapping[str, Any], max_columns: int = 600
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """A layers × steps matrix from per-layer series.

    Args:
        layers: ``{layer: series}``; the union of their steps gives the columns.
        max_columns: above this many steps, consecutive columns are averaged (NaN-aware) into
            ``max_columns`` bins.

    Returns:
        ``(edges, names, values)``: column edges (``columns + 1`` steps; column ``j`` holds the value
        from ``edges[j]`` until the next measurement at ``edges[j + 1]``), the layer names, and the
        ``(layers, columns)`` matrix with NaN where a layer has no value.
    """
    names = list(layers)
    data = [_xy(layers[n]) for n in names]
    steps = np.unique(np.concatenate([x for x, _ in data])) if data else np.zeros(0)
    matrix = np.full((len(names), steps.size), np.nan)
    for i, (x, y) in enumerate(data):
        if x.size:
            matrix[i, np.searchsorted(steps, x)] = y
    if steps.size == 0:
        return np.zeros(0), names, matrix
    spacing = float(np.median(np.diff(steps))) if steps.size > 1 else 1.0
    if steps.size > max_columns:
        chunks = np.array_split(np.arange(steps.size), max_columns)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN bins stay NaN
            matrix = np.stack([np.nanmean(matrix[:, c], axis=1) for c in chunks], axis=1)
        starts = np.array([steps[c[0]] for c in chunks], dtype=np.float64)
    else:
        starts = steps.astype(np.float64)
    edges = np.append(starts, float(steps[-1]) + spacing)
    return edges, names, matrix


def _transform(values: np.ndarray, how: str) -> np.ndarray:
    out = np.full(values.shape, np.nan)
    if how == "identity":
        keep = np.isfinite(values)
        out[keep] = values[keep]
        return out
    keep = np.isfinite(values) & (values > 0)
    out[keep] = np.log10(values[keep]) if how == "log10" else np.log2(values[keep])
    return out


def _norm(values: np.ndarray, kind: _Kind) -> Any:
    from matplotlib.colors import Normalize, TwoSlopeNorm

    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if kind.center is None:
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
        return Normalize(lo, hi)
    c = kind.center
    if kind.transform == "identity" and c == 1.0:  # a ratio: 0 .. at least 2, the edge in the middle
        return TwoSlopeNorm(vcenter=1.0, vmin=min(lo, 0.0), vmax=max(hi, 2.0 - min(lo, 0.0)))
    span = max(abs(lo - c), abs(hi - c))
    if finite.size:
        span = max(span, float(np.percentile(np.abs(finite - c), 99)))
    span = span if span > 0 else 1.0
    return TwoSlopeNorm(vcenter=c, vmin=c - span, vmax=c + span)


def space_time_figure(
    layers: Mapping[str, Any],
    kind: SpaceTimeKind,
    *,
    lr_changes: Iterable[int] = (),
    max_columns: int = 600,
    title: str | None = None,
) -> Figure:
    """A space-time heat map: layers (rows, in the given order, first at the top) × steps.

    Args:
        layers: ``{layer: series}`` of the quantity, in depth order.
        kind: what the series are (:data:`SPACE_TIME_KINDS`): ``"twin_gap"`` (``twin/divergence/<layer>``,
            colored by log10), ``"growth_rate"`` (``twin/growth_rate/<layer>``, diverging around 0),
            ``"sharpness_ratio"`` (block sharpness ÷ critical sharpness, diverging around 1),
            ``"lr_multiplier"`` (``local_lr/multiplier/<layer>``, colored by log2, around 1×).
        lr_changes: steps where the LR schedule changed (vertical marks).
        max_columns: steps beyond this are averaged into bins (:func:`space_time_grid`).
        title: figure title; default one per kind.
    """
    if kind not in _KINDS:
        raise ValueError(f"kind={kind!r} is not supported; accepted values: {list(SPACE_TIME_KINDS)}.")
    spec = _KINDS[kind]
    title = title or spec.title
    edges, names, matrix = space_time_grid(layers, max_columns)
    n = len(names)
    height = min(16.0, max(2.8, 0.3 * n + 1.6))
    fig = _new_figure(height)
    ax = fig.add_subplot()
    values = _transform(matrix, spec.transform)
    if n == 0 or edges.size == 0 or not np.isfinite(values).any():
        _no_data(ax, spec.label)
        _finish(ax, title)
        return fig
    from matplotlib import colormaps

    cmap = colormaps[spec.cmap].with_extremes(bad="#d9d9d9")  # grey: not measured
    mesh = ax.pcolormesh(
        edges,
        np.arange(n + 1),
        np.ma.masked_invalid(values),
        cmap=cmap,
        norm=_norm(values, spec),
        rasterized=True,
    )
    fig.colorbar(mesh, ax=ax, label=spec.label, pad=0.01, fraction=0.04)
    ax.set_ylim(n, 0)  # first layer (the input side) at the top
    labels, dropped = shorten_labels(names)
    fontsize = 9.0 if n <= 20 else 7.5
    row_points = (height - 1.6) * 72.0 / n  # the vertical space of one row
    stride = max(1, math.ceil(fontsize * 1.15 / row_points))
    ticks = list(range(0, n, stride))
    ax.set_yticks([t + 0.5 for t in ticks])
    ax.set_yticklabels([labels[t] for t in ticks], fontsize=fontsize, family="monospace")
    ax.tick_params(axis="y", length=0)
    ax.set_ylabel(f"layer ({dropped}…)" if dropped else "layer")
    if _mark_lr_changes(ax, lr_changes, on_image=True):
        ax.legend(loc="upper right", fontsize=8, framealpha=0.8)
    ax.set_xlim(edges[0], edges[-1])
    ax.set_title(title, loc="left", fontsize=12, fontweight="bold")
    ax.set_xlabel("step")
    return fig
