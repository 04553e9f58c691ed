"""The report: event files -> series -> summary -> Markdown / PNGs / one self-contained HTML page.

Most tests read the logs of one short real run (full-batch gradient descent on digits at an LR that
reaches the edge of stability, with SharpnessMonitor, StabilityMonitor and TwinDivergence attached
to a TensorBoardLogger) and compare what the report says with what the callbacks themselves kept.
"""

from __future__ import annotations

import base64
import io
import math
import os
import re
import runpy
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomllib

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.tensorboard import SummaryWriter

from lightning_eos import cli
from lightning_eos.callbacks import SharpnessMonitor, StabilityMonitor, TwinDivergence
from lightning_eos.demos.digits import DigitsDataModule, DigitsMLP
from lightning_eos.report import (
    ReportError,
    markdown,
    read_run,
    restrained_instability_events,
    summarize,
)

ROOT = Path(__file__).resolve().parents[1]
STEPS = 40


def _rec(record: Any) -> dict[str, Any]:
    """A history record as a dict (records have ``to_dict``; older histories are dicts)."""
    return record.to_dict() if hasattr(record, "to_dict") else dict(record)


def _fit(logdir: Path, steps: int, callbacks: list[pl.Callback], *, lr: float, n: int, hidden: int) -> None:
    trainer = pl.Trainer(
        max_steps=steps,
        logger=TensorBoardLogger(str(logdir), name="run"),
        callbacks=callbacks,
        accelerator="cpu",
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=10,  # one full batch = one epoch: validation every 10 steps
        log_every_n_steps=1,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(DigitsMLP(lr=lr, hidden=hidden), DigitsDataModule(n_samples=n))


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """40 steps of full-batch GD at lr 0.5 (sharpness reaches 0.9 × 2/lr around step 10)."""
    logdir = tmp_path_factory.mktemp("logs")
    sharp = SharpnessMonitor(every_n_steps=2, probe_size=64, per_layer=True)
    twin = TwinDivergence(every_n_steps=1)
    _fit(logdir, STEPS, [sharp, StabilityMonitor(), twin], lr=0.5, n=256, hidden=100)
    return {"logdir": logdir, "sharp": sharp, "twin": twin}


@pytest.fixture(scope="module")
def html_report(real_run: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report")
    assert cli.main(["report", str(real_run["logdir"]), "--out", str(out)]) == 0
    return out


def _expected_onset_and_fraction(sharp: SharpnessMonitor) -> tuple[int, float]:
    # TensorBoard stores float32: compare the logged ratio as it was stored.
    ratios = [(r.log_step, float(np.float32(r.ratio))) for r in sharp.history if math.isfinite(r.ratio)]
    at_edge = [step for step, ratio in ratios if ratio >= 0.9]
    return at_edge[0], len(at_edge) / len(ratios)


# --------------------------------------------------------------------------- summary vs callbacks
def test_summary_matches_what_the_callbacks_measured(real_run: dict[str, Any]) -> None:
    sharp, twin = real_run["sharp"], real_run["twin"]
    summary = summarize(read_run(real_run["logdir"]))
    onset, fraction = _expected_onset_and_fraction(sharp)
    assert 0 < onset < STEPS - 1, "the run must reach the edge mid-way for this test to mean something"
    assert summary.onset_step == onset
    assert summary.edge_fraction == pytest.approx(fraction)
    assert summary.measurements == len(sharp.history)
    assert summary.max_ratio == pytest.approx(max(r.ratio for r in sharp.history), rel=1e-6)
    assert summary.final_ratio == pytest.approx(sharp.history[-1].ratio, rel=1e-6)
    assert summary.last_step == STEPS - 1

    history = [_rec(r) for r in twin.history]
    layers = list(history[-1]["layers"])
    assert [row.layer for row in summary.layers] == layers == ["net.0", "net.2", "net.4"]
    for row in summary.layers:
        final = history[-1]["layers"][row.layer]
        assert row.final_gap == pytest.approx(final, rel=1e-6)
        # First logged gap: the first real twin step (or the step-0 reading, if that is logged too).
        candidates = [math.log10(final / h["layers"][row.layer]) for h in history[:2]]
        assert min(abs(row.amplification - c) for c in candidates) < 1e-5, (row.amplification, candidates)
        ratios = [r.layers[row.layer] / r.critical for r in sharp.history]
        assert row.max_ratio == pytest.approx(max(ratios), rel=1e-5)
        # The verdict rule, from the callbacks' own numbers.
        amplified = math.log10(final / history[0]["layers"][row.layer]) >= 1.0
        expected = "amplifying" if amplified else ("at the edge" if max(ratios) >= 0.9 else "stable")
        assert row.verdict == expected
    validation = twin.validation_history[-1]["twin/val_disagreement"]
    assert summary.final_disagreement == pytest.approx(validation, abs=1e-7)
    # No twin gap grew by 3 decades in 40 steps: no event, and the twin agrees.
    assert summary.events == ()
    assert summary.logged_events == 0.0
    layer_verdicts = {row.verdict for row in summary.layers}
    # The ratio reached 0.9: at least at the edge, amplifying if some layer's gap grew a decade.
    assert summary.verdict == ("amplifying" if "amplifying" in layer_verdicts else "at the edge")


# ------------------------------------------------------------------------------------- HTML
def test_html_report_is_self_contained_with_images_and_tables(
    real_run: dict[str, Any], html_report: Path
) -> None:
    import matplotlib.image as mpimg

    page = (html_report / "report.html").read_text(encoding="utf-8")
    pngs = sorted(p.name for p in html_report.glob("*.png"))
    assert pngs == sorted(
        [
            "sharpness.png",
            "stability_ratio.png",
            "twin_gap.png",
            "map_twin_gap.png",
            "map_growth_rate.png",
            "map_sharpness_ratio.png",
        ]
    )
    images = re.findall(r'<img [^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == len(pngs)
    inline = {base64.b64decode(data) for data in images}
    assert inline == {(html_report / name).read_bytes() for name in pngs}  # the same bytes, inlined
    for data in inline:
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        pixels = mpimg.imread(io.BytesIO(data), format="png")
        assert pixels.shape[1] >= 900 and pixels[..., :3].std() > 0.05  # wide and not blank
    # Self-contained: nothing fetched from anywhere.
    assert not re.search(r'(src|href)="(?!data:|#)', page)
    assert "<script" not in page and "<link" not in page and "@import" not in page

    onset, fraction = _expected_onset_and_fraction(real_run["sharp"])
    assert f'<td>edge-of-stability onset step (first ratio ≥ 0.9)</td><td class="num">{onset}</td>' in page
    assert f"{fraction:.0%} (" in page
    for layer in ("net.0", "net.2", "net.4"):
        assert f"<td><code>{layer}</code></td>" in page
    assert page.count('class="badge b-') == 3
    assert "Restrained-instability events" in page


def test_png_format_writes_only_the_figures(real_run: dict[str, Any], tmp_path: Path) -> None:
    assert cli.main(["report", str(real_run["logdir"]), "--out", str(tmp_path), "--format", "png"]) == 0
    assert not (tmp_path / "report.html").exists()
    assert len(list(tmp_path.glob("*.png"))) == 6


def test_markdown_summary_on_stdout(
    real_run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "not_written"
    assert cli.main(["report", str(real_run["logdir"]), "--format", "md", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert not out.exists()
    onset, _ = _expected_onset_and_fraction(real_run["sharp"])
    lines = text.splitlines()
    assert lines[0].startswith("## lightning-eos report")
    assert "| quantity | value |" in lines
    assert f"| edge-of-stability onset step (first ratio ≥ 0.9) | {onset} |" in lines
    header = next(line for line in lines if line.startswith("| layer | max sharpness"))
    rows = [line for line in lines if line.startswith("| net.")]
    assert [r.split(" | ")[0] for r in rows] == ["| net.0", "| net.2", "| net.4"]
    assert all(r.count("|") == header.count("|") for r in rows)  # well-formed table rows
    assert text == markdown(summarize(read_run(real_run["logdir"])))


@pytest.mark.parametrize("kind", ["twin only", "sharpness only"])
def test_report_of_a_run_with_only_some_callbacks(kind: str, tmp_path: Path) -> None:
    writer = SummaryWriter(str(tmp_path / "logs"))
    for step in range(30):
        if kind == "twin only":
            writer.add_scalar("twin/divergence", 1e-7 * 1.1**step, step)
            writer.add_scalar("twin/divergence/fc", 1e-7 * 1.2**step, step)
        else:
            writer.add_scalar("eos/stability_ratio", 0.5 + 0.021 * step, step)
            writer.add_scalar("eos/sharpness", 2.0 + 0.08 * step, step)
            writer.add_scalar("eos/critical_sharpness", 4.0, step)
            writer.add_scalar("eos/lr/pg0", 0.5 if step < 15 else 0.25, step)  # a StepLR drop at 15
            writer.add_scalar("eos/lr_margin/pg0", 1.0, step)  # not an LR: must not add marks
    writer.close()
    out = tmp_path / "out"
    assert cli.main(["report", str(tmp_path / "logs"), "--out", str(out)]) == 0
    figures = sorted(p.stem for p in out.glob("*.png"))
    page = (out / "report.html").read_text(encoding="utf-8")
    if kind == "twin only":
        assert figures == ["map_twin_gap", "twin_gap"]
        assert "— (no eos/stability_ratio)" in page
        assert '<span class="badge b-amplifying">amplifying</span>' in page  # 30 × log10(1.2) ≈ 2.4 decades
    else:
        assert figures == ["sharpness", "stability_ratio"]
        assert '<td>learning-rate changes at steps</td><td class="num">15</td>' in page
        assert "Verdict: at the edge" in page  # the ratio reaches 0.9 at step 20 (0.92; 0.899 at 19)
        assert '<td>edge-of-stability onset step (first ratio ≥ 0.9)</td><td class="num">20</td>' in page


# ------------------------------------------------------------------------------- exit codes
def test_exit_code_2_for_a_missing_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "nope" in err


def test_exit_code_2_for_a_folder_without_event_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "notes.txt").write_text("no logs here")
    assert cli.main(["report", str(tmp_path), "--format", "md"]) == 2
    err = capsys.readouterr().err
    assert "no TensorBoard event files" in err and str(tmp_path) in err


def test_exit_code_2_for_event_files_without_the_library_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    writer = SummaryWriter(str(tmp_path / "version_0"))
    for step in range(3):
        writer.add_scalar("train_loss", 1.0 / (step + 1), step)
    writer.close()
    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    for key in ("eos/stability_ratio", "eos/sharpness/<layer>", "twin/divergence/<layer>", "local_lr/"):
        assert key in err
    assert "train_loss" in err  # what was found instead


def test_python_dash_m_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["lightning_eos", "report", str(tmp_path / "missing")])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("lightning_eos", run_name="__main__")
    assert exit_info.value.code == 2


def test_console_script_points_at_the_cli() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attr = scripts["lightning-eos"].partition(":")
    assert (module, attr) == ("lightning_eos.cli", "main")
    assert getattr(__import__(module, fromlist=[attr]), attr) is cli.main


# ------------------------------------------------------------------------------------ reader
def test_reader_merges_files_and_keeps_every_point(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = SummaryWriter(str(tmp_path / "version_0"))
    for step in range(12000):  # more than the EventAccumulator's default reservoir of 10 000
        first.add_scalar("eos/stability_ratio", 0.5, step)
    first.add_scalar("twin/divergence/net.0", 1e-7, 0)
    first.close()
    second = SummaryWriter(str(tmp_path / "version_1"))  # a resumed run: written later
    second.add_scalar("eos/stability_ratio", 0.95, 11999)
    second.add_scalar("eos/stability_ratio", 0.97, 12000)
    second.close()
    run = read_run(tmp_path)
    ratio = run.scalars["eos/stability_ratio"]
    assert len(ratio) == 12001 and ratio.steps[0] == 0 and ratio.steps[-1] == 12000
    assert np.all(np.diff(ratio.steps) == 1)
    assert ratio.values[-2] == pytest.approx(0.95) and ratio.values[-1] == pytest.approx(0.97)
    assert list(run.family("twin/divergence")) == ["net.0"]
    assert len(run.files) == 2 and run.folders == [tmp_path / "version_0", tmp_path / "version_1"]
    assert cli.main(["report", str(tmp_path), "--format", "md"]) == 0
    assert "event files in 2 folders (version_0, version_1) are merged by step" in capsys.readouterr().err


def test_progress_bar_tqdm_and_plain_counter(
    real_run: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("tqdm")
    read_run(real_run["logdir"], progress=True)
    assert "reading event files" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "tqdm", None)  # as if tqdm were not installed
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    read_run(real_run["logdir"], progress=True)
    assert "reading event files: 1/1" in capsys.readouterr().err
    read_run(real_run["logdir"])  # a small read: no progress by default
    assert capsys.readouterr().err == ""


def test_read_run_errors_name_what_was_looked_for(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="does not exist"):
        read_run(tmp_path / "missing")
    (tmp_path / "file").write_text("")
    with pytest.raises(ReportError, match="is not a folder"):
        read_run(tmp_path / "file")


# ----------------------------------------------------------------- restrained-instability rule
def _episode(
    steps: np.ndarray, start: int, growth_steps: int, decades: float, base: float = 1e-7
) -> np.ndarray:
    """A gap flat at ``base``, then growing ``decades`` linearly in log over ``growth_steps``, then flat."""
    t = np.clip((steps - start) / growth_steps, 0.0, 1.0)
    return base * 10.0 ** (decades * t)


def test_event_rule_growth_then_saturation() -> None:
    steps = np.arange(300)
    gaps = _episode(steps, start=50, growth_steps=50, decades=4.5)  # 0.09 decade per step
    events = restrained_instability_events(steps, gaps, layer="fc", window=20)
    assert len(events) == 1
    e = events[0]
    assert e.layer == "fc"
    assert e.start_step == 62  # first point >= 1 decade above the reference (61: 0.99 decade)
    # Saturated once the 20-step line rises < 0.1 decade: the window must lie (almost) past step 100;
    # at step 119 it holds only flat points.
    assert 100 < e.end_step <= 119
    assert e.decades == pytest.approx(4.5)
    assert e.level == pytest.approx(10**-2.5)


def test_event_rule_needs_both_growth_and_saturation() -> None:
    steps = np.arange(300)
    flat = np.full(300, 1e-7) * (1 + 0.01 * np.sin(steps))
    assert restrained_instability_events(steps, flat) == []
    small = _episode(steps, 50, 50, decades=2.5)  # saturates, but only 2.5 decades
    assert restrained_instability_events(steps, small, window=20) == []
    growing = _episode(steps, 0, 400, decades=6.0)  # 4.5 decades by the end, still growing
    assert restrained_instability_events(steps, growing, window=20) == []
    assert len(restrained_instability_events(steps, small, window=20, event_decades=2.0)) == 1


def test_event_rule_reference_moves_after_an_event() -> None:
    steps = np.arange(600)
    gaps = _episode(steps, 50, 50, 4.0) * _episode(steps, 300, 50, 3.5, base=1.0)
    events = restrained_instability_events(steps, gaps, window=20)
    assert [(e.start_step > 300) for e in events] == [False, True]
    assert events[1].decades == pytest.approx(3.5)
    # The second growth alone from the first reference would be 7.5 decades: the reference moved.


def test_event_rule_skips_zeros_and_handles_sparse_logging() -> None:
    steps = np.arange(0, 300, 5)  # logged every 5 steps
    gaps = _episode(steps, 50, 50, 4.5)
    gaps[:3] = 0.0  # a twin with no gap yet
    gaps[10] = math.nan
    events = restrained_instability_events(steps, gaps, window=20)
    assert len(events) == 1 and events[0].start_step == 65 and events[0].decades == pytest.approx(4.5)


def test_event_rule_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="same length"):
        restrained_instability_events([0, 1], [1.0])
    with pytest.raises(ValueError, match="window"):
        restrained_instability_events([0, 1], [1.0, 2.0], window=1)
    with pytest.raises(ValueError, match="increasing"):
        restrained_instability_events([1, 0], [1.0, 2.0])


@pytest.mark.slow
def test_events_from_the_logs_match_the_twin(tmp_path: Path) -> None:
    """On a run long enough for a restrained instability, the report finds the twin's own events."""
    twin = TwinDivergence(every_n_steps=1, window=20, validation=False)
    _fit(tmp_path, 110, [twin], lr=0.6, n=1000, hidden=100)
    expected = twin.summary()["events"]
    assert len(expected) >= 2, "the run must go through a restrained instability"
    summary = summarize(read_run(tmp_path), window=20)
    # The twin counts its own steps; the logs use TensorBoard's x-axis (log_step).
    history = [_rec(r) for r in twin.history]
    to_log = {h["step"]: h.get("log_step", h["global_step"] - 1) for h in history}
    got = {e.layer: e for e in summary.events}
    assert set(got) == {e["layer"] for e in expected}
    for e in expected:
        mine = got[e["layer"]]
        assert mine.end_step == to_log[e["end_step"]]
        assert mine.start_step == to_log[e["start_step"]]
        assert mine.decades == pytest.approx(e["decades"], abs=0.05)  # reference: step 0 vs step 1
        assert mine.level == pytest.approx(e["level"], rel=1e-5)
    assert all(row.verdict == "amplifying" for row in summary.layers)
    assert summary.logged_events == len(expected)


# ------------------------------------------------------------------------ headless Chromium
def _chromium() -> str | None:
    for name in ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def test_report_renders_in_headless_chromium(html_report: Path, tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium not found (apt-get install chromium); the HTML rendering is not checked")
    import matplotlib.image as mpimg

    shot = tmp_path / "shot.png"
    cmd = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
        f"--screenshot={shot}",
        "--window-size=1200,2000",
        (html_report / "report.html").resolve().as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if "Uncaught" in line or "ERROR:CONSOLE" in line]
    assert console == []
    pixels = mpimg.imread(str(shot))[..., :3]
    assert pixels.shape[:2] == (2000, 1200)
    gray = pixels.mean(axis=2)
    assert gray.std() > 0.05  # not a blank page
    background = np.median(gray)
    assert (np.abs(gray - background) > 0.1).mean() > 0.05  # text, tables and figures drawn
    # Both halves hold content: the page is laid out down the viewport, not collapsed at the top.
    assert gray[1000:].std() > 0.05


# ------------------------------------------------------------------------------------- docs
def test_docs_build_strict(tmp_path: Path) -> None:
    """``mkdocs build --strict`` (offline): every page, nav entry and docstring reference resolves."""
    missing = [m for m in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python") if _no(m)]
    if missing:
        pytest.skip(
            f"mkdocs is not installed (missing: {', '.join(missing)}); "
            "pip install -e '.[docs]' to check the documentation build"
        )
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "site" / "report" / "index.html").is_file()
    reference = (tmp_path / "site" / "reference" / "space_time_maps" / "index.html").read_text()
    assert "every_n_steps" in reference  # generated from the docstring


def _no(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is None
    except ModuleNotFoundError:
        return True
