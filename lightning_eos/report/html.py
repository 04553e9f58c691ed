"""The report's figures (PNG files) and one self-contained HTML page.

:func:`report_figures` draws every figure the run has data for (:mod:`lightning_eos.plots`);
:func:`render_html` lays out the summary tables and the figures, inlined as base64 PNG, in one file
with its own CSS: no script, no external resource, readable offline and attachable to an issue.
:func:`write_report` writes both.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as _dt
import html
from collections.abc import Sequence
from pathlib import Path

from lightning_eos import plots
from lightning_eos.report.reader import Prefixes, RunData
from lightning_eos.report.summary import (
    EVENT_COLUMNS,
    LAYER_COLUMNS,
    TOTAL,
    RunSummary,
    layer_ratios,
)

__all__ = ["ReportFigure", "render_html", "report_figures", "write_report"]


@dataclasses.dataclass(frozen=True)
class ReportFigure:
    """One figure of the report: ``name`` (the PNG's file stem), a title, a caption, the PNG bytes."""

    name: str
    title: str
    caption: str
    png: bytes


def report_figures(run: RunData, summary: RunSummary, prefixes: Prefixes | None = None) -> list[ReportFigure]:
    """Every figure the run has data for, in reading order."""
    plots.require_matplotlib("lightning-eos report")
    p = prefixes or Prefixes()
    marks = summary.lr_changes
    out: list[ReportFigure] = []

    def add(name: str, title: str, caption: str, fig: object) -> None:
        out.append(ReportFigure(name, title, caption, plots.figure_to_png(fig)))  # type: ignore[arg-type]

    sharp, critical = run.get(f"{p.eos}/sharpness"), run.get(f"{p.eos}/critical_sharpness")
    if sharp is not None or critical is not None:
        add(
            "sharpness",
            "Sharpness vs critical sharpness",
            "The top Hessian eigenvalue of the training loss (blue) against the largest curvature the "
            "optimizer's hyper-parameters keep stable (dashed; 2/lr for SGD). Above the dashed line "
            "(shaded) the update overshoots along the top eigenvector; training at the edge of "
            "stability keeps the sharpness hovering at the line.",
            plots.sharpness_figure(
                sharp,
                critical,
                batch_sharpness=run.get(f"{p.eos}/batch_sharpness"),
                onset_step=summary.onset_step,
                lr_changes=marks,
            ),
        )
    ratio = run.get(f"{p.eos}/stability_ratio")
    if ratio is not None:
        add(
            "stability_ratio",
            "Stability ratio",
            f"Sharpness ÷ critical sharpness: 1 is the edge of stability. The orange band "
            f"[{summary.edge_ratio:g}, 1] counts as at the edge; above 1 the sharpness exceeds what "
            "the learning rate tolerates.",
            plots.stability_ratio_figure(
                ratio,
                batch_ratio=run.get(f"{p.eos}/batch_stability_ratio"),
                edge_ratio=summary.edge_ratio,
                onset_step=summary.onset_step,
                lr_changes=marks,
            ),
        )
    gaps = run.family(f"{p.twin}/divergence")
    total = run.get(f"{p.twin}/divergence")
    if gaps or total is not None:
        add(
            "twin_gap",
            "Twin gap per layer",
            "Relative L1 distance between the real weights and those of a twin started one ulp away. "
            "Flat near 1e-7: round-off stays round-off. Growing by decades: the dynamics amplify it. "
            "Shaded: restrained-instability episodes (growth by ≥ 3 decades, then saturation).",
            plots.twin_gap_figure(gaps, total=total, events=summary.events, lr_changes=marks),
        )
    maps = (
        (
            "map_twin_gap",
            "twin_gap",
            gaps,
            "Space-time map of log10 twin gap: one row per layer (input at the top), one column per "
            "logged step. Bright rows are the layers where round-off grows first and most.",
        ),
        (
            "map_growth_rate",
            "growth_rate",
            run.family(f"{p.twin}/growth_rate"),
            "Twin growth rate (slope of ln gap per step over the callback's window): red = amplifying, "
            "white = flat, blue = decaying.",
        ),
        (
            "map_sharpness_ratio",
            "sharpness_ratio",
            layer_ratios(run, p),
            "Each layer's block sharpness ÷ the critical sharpness: yellow at the edge (1), red beyond, "
            "blue well inside the stable region. Grey: not measured at that step.",
        ),
        (
            "map_lr_multiplier",
            "lr_multiplier",
            run.family(f"{p.local_lr}/multiplier"),
            "The local-LR controller's per-layer multiplier (log2: 0 = unchanged, −1 = halved).",
        ),
    )
    for name, kind, data, caption in maps:
        if data:
            fig = plots.space_time_figure(data, kind, lr_changes=marks)  # type: ignore[arg-type]
            add(name, plots.space_time_title(kind), caption, fig)  # type: ignore[arg-type]
    return out


_CSS = """
:root { --ink: #1f2933; --muted: #616e7c; --line: #e4e7eb; --bg: #f7f8fa; --card: #ffffff;
  --stable: #2a9d8f; --edge: #e9a23b; --amp: #d1495b; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
  font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1140px; margin: 0 auto; padding: 28px 24px 48px; }
header h1 { margin: 0 0 4px; font-size: 26px; letter-spacing: -0.01em; }
header p { margin: 0; color: var(--muted); }
code { font-family: "SFMono-Regular", Menlo, Consolas, monospace; font-size: 0.92em;
  background: #eef1f4; padding: 1px 5px; border-radius: 4px; }
.verdict { margin: 20px 0 8px; padding: 14px 18px; border-radius: 10px; color: white;
  font-size: 18px; font-weight: 600; }
.verdict small { display: block; font-weight: 400; font-size: 14px; opacity: 0.95; }
.v-stable { background: var(--stable); } .v-at-the-edge { background: var(--edge); }
.v-amplifying { background: var(--amp); }
.cards { display: grid; grid-template-columns: repeat(4, 1fr); gap: 12px; margin: 16px 0 8px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: 12px 14px; }
.card .k { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: 0.04em; }
.card .v { font-size: 22px; font-weight: 650; margin-top: 2px; }
section { background: var(--card); border: 1px solid var(--line); border-radius: 12px;
  padding: 18px 20px; margin: 18px 0; }
h2 { margin: 0 0 10px; font-size: 19px; }
table { border-collapse: collapse; width: 100%; font-size: 14px; }
th, td { text-align: left; padding: 7px 10px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { color: var(--muted); font-weight: 600; font-size: 12.5px; text-transform: uppercase;
  letter-spacing: 0.03em; background: #fbfcfd; }
td.num { font-variant-numeric: tabular-nums; }
tr:last-child td { border-bottom: none; }
.badge { display: inline-block; padding: 1px 9px; border-radius: 999px; color: white;
  font-size: 12.5px; font-weight: 600; white-space: nowrap; }
.b-stable { background: var(--stable); } .b-at-the-edge { background: var(--edge); }
.b-amplifying { background: var(--amp); }
figure { margin: 0 0 26px; }
figure img { display: block; width: 100%; height: auto; border: 1px solid var(--line); border-radius: 8px; }
figcaption { color: var(--muted); font-size: 13.5px; margin-top: 6px; }
figcaption b { color: var(--ink); }
.note { color: var(--muted); font-size: 13px; margin: 8px 0 0; }
footer { color: var(--muted); font-size: 12.5px; text-align: center; margin-top: 26px; }
"""

_VERDICT_TEXT = {
    "stable": "The sharpness stayed below the bound and the twin gap stayed at round-off.",
    "at the edge": "Training reached the edge of stability; round-off has not (yet) been amplified.",
    "amplifying": "Floating-point noise is amplified: the twin gap grew by orders of magnitude.",
}


def _slug(verdict: str) -> str:
    return verdict.replace(" ", "-")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], *, badge_col: int | None = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for j, cell in enumerate(row):
            text = html.escape(cell)
            if j == badge_col:
                cells.append(f'<td><span class="badge b-{_slug(cell)}">{text}</span></td>')
            elif j == 0:
                cells.append(f"<td><code>{text}</code></td>" if badge_col is not None else f"<td>{text}</td>")
            else:
                cells.append(f'<td class="num">{text}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render_html(
    summary: RunSummary, figures: Sequence[ReportFigure], *, title: str = "lightning-eos report"
) -> str:
    """The self-contained HTML page: verdict, key numbers, tables, figures as inline base64 PNG."""
    esc = html.escape
    rows = dict(summary.rows())
    measured = summary.measurements > 0
    onset = "—" if not measured else ("never" if summary.onset_step is None else str(summary.onset_step))
    amplification = rows["twin amplification, whole model (decades)"]
    cards = [
        ("edge onset step", onset),
        ("max stability ratio", f"{summary.max_ratio:.2f}" if measured else "—"),
        ("twin amplification", amplification + " dec" if amplification != "—" else "—"),
        ("instability events", str(len(summary.events))),
    ]
    cards_html = "".join(
        f'<div class="card"><div class="k">{esc(k)}</div><div class="v">{esc(v)}</div></div>'
        for k, v in cards
    )
    run_table = _table(("quantity", "value"), [list(r) for r in summary.rows()[1:]])
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body><main>",
        f"<header><h1>{esc(title)}</h1><p>Run <code>{esc(summary.logdir)}</code> · "
        f"{summary.files} event file(s) · {esc(rows['steps logged'])} steps logged</p></header>",
        f'<div class="verdict v-{_slug(summary.verdict)}">Verdict: {esc(summary.verdict)}'
        f"<small>{esc(_VERDICT_TEXT[summary.verdict])}</small></div>",
        f'<div class="cards">{cards_html}</div>',
        f'<section id="summary"><h2>Summary</h2>{run_table}<p class="note">Steps are TensorBoard\'s '
        "x-axis (the step <code>self.log</code> uses). Edge: stability ratio ≥ "
        f"{summary.edge_ratio:g}.</p></section>",
    ]
    if summary.layers:
        parts.append(
            '<section id="layers"><h2>Layers</h2>'
            + _table(LAYER_COLUMNS, summary.layer_rows(), badge_col=len(LAYER_COLUMNS) - 1)
            + '<p class="note">amplifying: twin gap grew ≥ 1 decade or went through a restrained '
            "instability · at the edge: block sharpness ≥ "
            f"{summary.edge_ratio:g} × critical (the whole model's, when the layer's was not measured) · "
            "stable: neither.</p></section>"
        )
    if summary.events:
        event_rows = summary.event_rows()
        for row in event_rows:
            if row[0] == TOTAL:
                row[0] = "(total) whole model"
        events_html = _table(EVENT_COLUMNS, event_rows)
    else:
        events_html = '<p class="note">None: no twin gap grew by the event threshold and then saturated.</p>'
    parts.append(f'<section id="events"><h2>Restrained-instability events</h2>{events_html}</section>')
    if figures:
        figs = []
        for f in figures:
            data = base64.b64encode(f.png).decode("ascii")
            figs.append(
                f'<figure id="fig-{esc(f.name)}">'
                f'<img alt="{esc(f.title)}" src="data:image/png;base64,{data}">'
                f"<figcaption><b>{esc(f.title)}.</b> {esc(f.caption)}</figcaption></figure>"
            )
        parts.append('<section id="figures"><h2>Figures</h2>' + "".join(figs) + "</section>")
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    parts.append(f"<footer>Generated by lightning-eos on {esc(stamp)}.</footer></main></body></html>")
    return "\n".join(parts) + "\n"


def write_report(
    run: RunData,
    summary: RunSummary,
    out_dir: str | Path,
    *,
    html_page: bool = True,
    prefixes: Prefixes | None = None,
) -> list[Path]:
    """Write the PNGs (and, with ``html_page``, ``report.html``) into ``out_dir``; the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = report_figures(run, summary, prefixes)
    written = []
    for f in figures:
        path = out / f"{f.name}.png"
        path.write_bytes(f.png)
        written.append(path)
    if html_page:
        page = out / "report.html"
        page.write_text(render_html(summary, figures), encoding="utf-8")
        written.append(page)
    return written
