"""The flagship demo (``--quick``) and the LightningCLI example, run in-process with a tmp output."""

from __future__ import annotations

import importlib.util
import io
import sys
import warnings
from contextlib import redirect_stdout
from pathlib import Path
from types import ModuleType

import pytest
import yaml

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CONFIG = EXAMPLES / "configs" / "eos.yaml"

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


def _load(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` (``cli.py`` imports ``demo`` from its own folder)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _quiet() -> None:
    warnings.filterwarnings("ignore", message=".*(does not have many workers|log_every_n_steps|LeafSpec).*")


def test_demo_quick_writes_logs_report_and_prints_summary(tmp_path: Path) -> None:
    demo = _load("demo")
    out = tmp_path / "demo"
    figures = tmp_path / "figures"
    buf = io.StringIO()
    with redirect_stdout(buf):
        result = demo.main(["--out", str(out), "--quick", "--figures", str(figures)])
    printed = buf.getvalue()

    events = list(out.rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file under --out"
    report = out / "eos_report" / "report.html"
    assert report.is_file() and report.stat().st_size > 10_000
    assert "<html" in report.read_text(encoding="utf-8").lower()
    # --figures copies the report's PNGs (the docs' screenshots are made this way).
    assert (figures / "demo_sharpness.png").is_file()
    assert (figures / "demo_twin_gap.png").is_file()

    # The summary table: every row the demo promises, then the two commands to look.
    for row in demo.SUMMARY_ROWS:
        assert row in printed, f"summary row {row!r} missing from:\n{printed}"
    assert f"tensorboard --logdir {out}" in printed
    assert str(report.resolve()) in printed

    # Every callback did its job within the few steps of --quick.
    summary = result["summary"]
    assert summary.measurements >= 2  # SharpnessMonitor at steps 1 and 5
    assert summary.final_divergence > 0  # the twin started one ulp away
    assert summary.last_step == 7  # 8 steps, logged at 0..7
    assert any(layer.layer == "net.0" for layer in summary.layers)
    tags = set(result["tags"])
    assert {"eos/sharpness", "eos/lr/pg0", "twin/divergence", "eos/cfl/net.0"} <= tags


def test_demo_builds_every_callback_and_the_local_lr_one_on_request() -> None:
    demo = _load("demo")
    from lightning_eos.callbacks import SharpnessMonitor, SpaceTimeMaps, StabilityMonitor, TwinDivergence

    callbacks = demo.build_callbacks(demo.parse_args(["--quick"]))
    assert [type(c) for c in callbacks] == [SharpnessMonitor, StabilityMonitor, TwinDivergence, SpaceTimeMaps]
    assert callbacks[0].every_n_steps == 4 and callbacks[0].per_layer
    from lightning_eos.callbacks import AdaptiveLocalLR

    with_local = demo.build_callbacks(demo.parse_args(["--quick", "--local-lr"]))
    assert isinstance(with_local[-1], AdaptiveLocalLR)
    assert any(isinstance(c, TwinDivergence) for c in with_local)  # the twin follows the controller


def _expected_callbacks() -> list[dict]:
    return yaml.safe_load(CONFIG.read_text())["trainer"]["callbacks"]


def _class(path: str) -> type:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def test_cli_print_config_round_trips_the_callbacks() -> None:
    cli = _load("cli")
    buf = io.StringIO()
    with redirect_stdout(buf), pytest.raises(SystemExit) as exit_info:
        cli.cli_main(["fit", "-c", str(CONFIG), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(buf.getvalue())
    got = printed["trainer"]["callbacks"]
    expected = _expected_callbacks()
    assert [c["class_path"] for c in got] == [c["class_path"] for c in expected]
    for want, have in zip(expected, got):
        for key, value in (want.get("init_args") or {}).items():
            assert have["init_args"][key] == value, (want["class_path"], key)


def test_cli_fit_builds_the_yaml_callbacks_and_trains(tmp_path: Path) -> None:
    cli = _load("cli")
    result = cli.cli_main(
        [
            "fit",
            "-c",
            str(CONFIG),
            "--trainer.max_steps=2",
            "--data.n_train=48",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ]
    )
    trainer = result.trainer
    assert trainer.global_step == 2
    expected = _expected_callbacks()
    for entry in expected:
        cls = _class(entry["class_path"])
        found = [c for c in trainer.callbacks if type(c) is cls]
        assert len(found) == 1, entry["class_path"]
        for key, value in (entry.get("init_args") or {}).items():
            assert getattr(found[0], key) == value, (entry["class_path"], key)
    assert list(tmp_path.rglob("events.out.tfevents.*"))
    assert (tmp_path / "digits_cnn" / "version_0" / "config.yaml").is_file()
    sharp = next(c for c in trainer.callbacks if type(c).__name__ == "SharpnessMonitor")
    assert len(sharp.history) == 1  # measured on the first real step
    assert result.model.hparams.weight_decay == 0.01


def test_local_lr_benchmark_quick_runs_every_arm(tmp_path: Path) -> None:
    """``benchmarks/local_lr.py --quick``: every arm runs, the tables, JSON and figures are written,
    and each run's record is consistent with its stopping rule."""
    import json

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "local_lr.py"
    spec = importlib.util.spec_from_file_location("bench_local_lr", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_local_lr"] = bench  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(bench)
    out, raw = tmp_path / "local_lr.md", tmp_path / "local_lr.json"
    with redirect_stdout(io.StringIO()):
        bench.main(["--quick", "--out", str(out), "--json", str(raw), "--figures", str(tmp_path)])
    text = out.read_text(encoding="utf-8")
    for arm in (*bench.GRID_ARMS, *bench.FREE_ARMS):
        assert f"| {arm} |" in text, f"no summary row for {arm}"
    assert "twin gap at the end" in text
    assert (tmp_path / "local_lr_robustness.png").stat().st_size > 5_000
    assert (tmp_path / "local_lr_steps.png").stat().st_size > 5_000
    res = json.loads(raw.read_text(encoding="utf-8"))["mlp-sgd-full"]
    assert set(res["runs"]) == {*bench.GRID_ARMS, *bench.FREE_ARMS}
    assert len(res["grid"]) == 3 and res["grid"][1] == res["eta_s"]
    for arm, by_lr in res["runs"].items():
        for runs in by_lr.values():
            for r in runs:
                if r["reached"] is not None:  # stopped at the target: the loss there is at most the target
                    assert not r["diverged"] and r["final"] <= res["target"] and r["reached"] <= 40
                if arm in bench.CONTROLLER_ARMS:
                    first = bench.CONTROLLER_ARMS[arm].get("first_refresh", 0)
                    if r["steps_run"] > first:
                        assert r["refreshes"] >= 1 and r["hvps"] >= r["refreshes"]
                    else:  # stopped before its first refresh was due
                        assert r["refreshes"] == 0
                if arm == "static":
                    assert r["refreshes"] <= bench.STATIC_REFRESHES
    for arm in ("constant", "cap"):
        (calm,) = res["calm"][arm]
        assert 0 < calm["twin_gap"] < 1 and 0 < calm["test_acc"] <= 1
    # the merge of saved runs (how the docs' tables are made) gives the same per-setup tables
    merged = tmp_path / "merged.md"
    with redirect_stdout(io.StringIO()):
        bench.main(["--from-json", str(raw), "--out", str(merged)])
    again = merged.read_text(encoding="utf-8")
    assert "Robustness: median over seeds" in again and "| mlp-sgd-full |" in again
    per_setup = text[text.index("#### ") : text.index("(mlp-sgd-full:")].strip()
    assert per_setup in again
    # one setup's arms saved in two files (a later run adding arms) merge into the same tables
    whole = json.loads(raw.read_text(encoding="utf-8"))
    first, second = tmp_path / "first.json", tmp_path / "second.json"
    for path, keep in ((first, {"constant", "cap"}), (second, set(res["runs"]) - {"cap"})):
        part = {k: {**v, "runs": {a: r for a, r in v["runs"].items() if a in keep}} for k, v in whole.items()}
        path.write_text(json.dumps(part), encoding="utf-8")
    split = tmp_path / "split.md"
    with redirect_stdout(io.StringIO()):
        bench.main(["--from-json", str(first), str(second), "--out", str(split)])
    assert per_setup in split.read_text(encoding="utf-8")
