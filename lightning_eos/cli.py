"""The ``lightning-eos`` command line (also ``python -m lightning_eos``).

``lightning-eos report LOGDIR [--out DIR] [--format html|png|md]`` reads the TensorBoard event files
under ``LOGDIR`` and writes the figures as PNGs plus one self-contained ``report.html`` (``html``,
the default), only the PNGs (``png``), or prints the summary as Markdown tables on stdout (``md``).

Exit codes: 0 on success, 2 for a missing folder, a folder without event files, event files without
any of the library's keys, or a bad argument (the message says which).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["build_parser", "main"]

EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``lightning-eos`` command."""
    parser = argparse.ArgumentParser(
        prog="lightning-eos",
        description="Edge-of-stability and floating-point sensitivity reports from lightning-eos runs.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    report = commands.add_parser(
        "report",
        help="summarize a run's TensorBoard logs (tables, figures, one HTML file)",
        description="Read every TensorBoard event file under LOGDIR (recursively) and report on the "
        "lightning-eos keys: edge-of-stability onset, twin amplification per layer, "
        "restrained-instability events and a verdict per layer.",
    )
    report.add_argument("logdir", metavar="LOGDIR", type=Path, help="folder a TensorBoardLogger wrote to")
    report.add_argument(
        "--out",
        metavar="DIR",
        type=Path,
        default=None,
        help="where the PNGs and report.html go (default: LOGDIR/eos_report)",
    )
    report.add_argument(
        "--format",
        choices=("html", "png", "md"),
        default="html",
        help="html: PNGs + self-contained report.html (default); png: PNGs only; "
        "md: the summary as Markdown on stdout, nothing written",
    )
    rule = report.add_argument_group("summary rules (use the values the run's callbacks were given)")
    rule.add_argument("--edge-ratio", type=float, default=0.9, help="stability ratio counted as at the edge")
    rule.add_argument("--window", type=int, default=50, help="TwinDivergence window (steps)")
    rule.add_argument("--event-decades", type=float, default=3.0, help="TwinDivergence event_decades")
    rule.add_argument(
        "--saturation-decades", type=float, default=0.1, help="TwinDivergence saturation_decades"
    )
    rule.add_argument(
        "--amplifying-decades", type=float, default=1.0, help="twin growth from which a layer is amplifying"
    )
    keys = report.add_argument_group("key prefixes (the callbacks' log_prefix)")
    keys.add_argument("--eos-prefix", default="eos", help="SharpnessMonitor / StabilityMonitor prefix")
    keys.add_argument("--twin-prefix", default="twin", help="TwinDivergence prefix")
    keys.add_argument("--local-lr-prefix", default="local_lr", help="AdaptiveLocalLR prefix")
    bar = report.add_mutually_exclusive_group()
    bar.add_argument(
        "--progress", dest="progress", action="store_true", default=None, help="always show progress"
    )
    bar.add_argument("--no-progress", dest="progress", action="store_false", help="never show progress")
    return parser


def _report(args: argparse.Namespace) -> int:
    from lightning_eos.report.reader import Prefixes, ReportError, read_run
    from lightning_eos.report.summary import markdown, summarize

    prefixes = Prefixes(args.eos_prefix, args.twin_prefix, args.local_lr_prefix)
    try:
        run = read_run(args.logdir, progress=args.progress, prefixes=prefixes)
        summary = summarize(
            run,
            edge_ratio=args.edge_ratio,
            window=args.window,
            event_decades=args.event_decades,
            saturation_decades=args.saturation_decades,
            amplifying_decades=args.amplifying_decades,
            prefixes=prefixes,
        )
    except (ReportError, ValueError) as err:
        print(f"lightning-eos report: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    if len(run.folders) > 1:
        names = ", ".join(str(f.relative_to(run.logdir)) or "." for f in run.folders[:4])
        more = f" and {len(run.folders) - 4} more" if len(run.folders) > 4 else ""
        print(
            f"lightning-eos report: note: event files in {len(run.folders)} folders ({names}{more}) are "
            "merged by step, as for a resumed run; pass one run's folder to report on it alone.",
            file=sys.stderr,
        )
    if args.format == "md":
        sys.stdout.write(markdown(summary))
        return 0
    try:
        from lightning_eos.report.html import write_report

        out = args.out if args.out is not None else args.logdir / "eos_report"
        written = write_report(run, summary, out, html_page=args.format == "html", prefixes=prefixes)
    except ImportError as err:
        print(f"lightning-eos report: error: {err} (or use --format md)", file=sys.stderr)
        return EXIT_USAGE
    for path in written:
        print(path)
    print(
        f"verdict: {summary.verdict}; edge onset step: {summary.onset_step}; events: {len(summary.events)}",
        file=sys.stderr,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (``lightning-eos`` exits with it)."""
    args = build_parser().parse_args(argv)
    if args.command == "report":
        return _report(args)
    return EXIT_USAGE  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
