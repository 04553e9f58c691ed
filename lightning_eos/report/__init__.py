"""Reports from a run's TensorBoard event files: series, summary table, figures, one HTML page.

``lightning-eos report LOGDIR`` (:mod:`lightning_eos.cli`) is the command line; the pieces are
:func:`read_run` (event files -> :class:`RunData`), :func:`summarize` (-> :class:`RunSummary`),
:func:`markdown` and :func:`write_report` (PNGs and the self-contained HTML file).
"""

from lightning_eos.report.html import render_html, report_figures, write_report
from lightning_eos.report.reader import LIBRARY_KEYS, Prefixes, ReportError, RunData, Series, read_run
from lightning_eos.report.summary import (
    InstabilityEvent,
    LayerSummary,
    RunSummary,
    markdown,
    restrained_instability_events,
    summarize,
)

__all__ = [
    "LIBRARY_KEYS",
    "InstabilityEvent",
    "LayerSummary",
    "Prefixes",
    "ReportError",
    "RunData",
    "RunSummary",
    "Series",
    "markdown",
    "read_run",
    "render_html",
    "report_figures",
    "restrained_instability_events",
    "summarize",
    "write_report",
]
