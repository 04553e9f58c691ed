"""The tested support matrix of docs/support.md: every callback under every combination of framework,
precision, accumulation, clipping and optimization style, in one process and under 2-process DDP.

Single process: the full product (48 cells, :func:`tests.callbacks._matrix.all_cells`) and 8 fp16
cells with a GradScaler (:data:`tests.callbacks._matrix.FP16_CELLS`), each with
exact answers (critical sharpness 3.8/lr, ratio = sharpness/critical, the StabilityMonitor's margin
equal to the same step's ratio, the controller's multipliers from its bounds) and the monitored run's
weights bitwise equal to the unmonitored run's. DDP: an all-pairs cover (6 cells) run in ONE
externally launched 2-process gloo group, compared with the single-process run of the same global
data. Cells that are refused (by a callback, or by Lightning itself) are tested to raise at setup.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as ptl
import torch
from torch.utils.data import DataLoader

from lightning_eos.callbacks import (
    AdaptiveLocalLR,
    SharpnessMonitor,
    SpaceTimeMaps,
    StabilityMonitor,
    TwinDivergence,
)
from lightning_eos.callbacks._lightning import StepReplica, inert_optimizer
from tests.callbacks import _matrix as mx

ROOT = Path(__file__).resolve().parents[2]
CALLBACKS = (SharpnessMonitor, StabilityMonitor, TwinDivergence, AdaptiveLocalLR)
MOMENTUM_C = 2 + 2 * 0.9  # SGD heavy ball: critical sharpness (2 + 2μ)/lr
PLAIN_C = 2.0  # plain SGD: 2/lr


@functools.cache
def single(cell: mx.Cell) -> dict[str, Any]:
    """The cell's single-process result (computed once per test session, reused by the DDP test)."""
    return mx.run_cell(cell)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def _critical(idx: int) -> float:
    """The exact critical sharpness of optimizer ``idx`` (opt1 only in the two-optimizer cells)."""
    return PLAIN_C / mx.LR_HEAD if idx == 1 else MOMENTUM_C / mx.LR


def _steps(cell: mx.Cell) -> int:
    """Real optimizer steps per optimizer: one epoch of 4 batches, one step per accumulation."""
    return (mx.N_SAMPLES // mx.GLOBAL_BATCH) // cell.accumulate


def _initial_ulp_gap(cell: mx.Cell) -> float:
    """The twin's step-0 gap, exactly: Σ|nextafter(w, +inf) − w| / Σ|w| over the initial weights."""
    weights = torch.cat([p.detach().reshape(-1) for p in mx.make_module(cell).parameters()])
    up = torch.nextafter(weights, torch.full_like(weights, math.inf))
    return float((up.double() - weights.double()).abs().sum() / weights.double().abs().sum())


# ------------------------------------------------------------------------------ single process


@pytest.mark.parametrize("cell", [*mx.all_cells(), *mx.FP16_CELLS], ids=lambda c: c.name)
def test_single_process_cell(cell: mx.Cell) -> None:
    out = single(cell)
    steps = _steps(cell)
    assert out["baseline"]["global_step"] == steps * cell.optimizers
    if cell.precision == "16-mixed":
        # fp16 autocast with a GradScaler that never overflowed (every step taken); the twin steps
        # through its own clone of the real scaler, at the same scale.
        real = {"dtype": "torch.float16", "scale": mx.FP16_INIT_SCALE}
        twin = {"twin_scale": mx.FP16_INIT_SCALE, "twin_own": True} if cell.twin_supported else {}
        blank = {"twin_scale": None, "twin_own": None}
        assert out["baseline"]["scaler"] == {**real, **blank}
        for fit in ("monitored", "controlled"):
            assert out[fit]["scaler"] == {**real, **blank, **twin}, f"{cell.name}: {fit} scaler"
    else:
        assert out["baseline"]["scaler"] is None

    mon = out["monitored"]
    assert mon["failures"] == {}, f"{cell.name}: a callback stepped aside: {mon['failures']}"
    assert mon["weights"] == out["baseline"]["weights"], (
        f"{cell.name}: SharpnessMonitor/StabilityMonitor/TwinDivergence changed the trained weights"
    )
    # SharpnessMonitor: one tight, converged measurement per real step, against the exact threshold.
    assert len(mon["sharpness"]) == cell.optimizers
    for idx, history in enumerate(mon["sharpness"]):
        # global_step after each real step (both optimizers step in the same batch)
        expected_steps = [(k + 1) * cell.optimizers for k in range(steps)]
        assert [r["step"] for r in history] == expected_steps, f"{cell.name}: SharpnessMonitor({idx}) steps"
        for r in history:
            assert r["converged"] and 0 < r["sharpness"] < 100, f"{cell.name}: SharpnessMonitor {r}"
            assert r["critical"] == pytest.approx(_critical(idx), rel=1e-12)
            assert r["ratio"] == pytest.approx(r["sharpness"] / _critical(idx), rel=1e-12)
            assert math.isfinite(r["batch_sharpness"]) and r["batch_sharpness"] > 0
    # StabilityMonitor: the applied LR, its threshold and the margin of the same step's measurement.
    stab = mon["stability"]
    assert len(stab) == steps, f"{cell.name}: StabilityMonitor logged {len(stab)} of {steps} steps"
    for k, metrics in enumerate(stab):
        for idx in range(cell.optimizers):
            tag = f"opt{idx}/pg0" if cell.optimizers == 2 else "pg0"
            assert metrics[f"eos/lr/{tag}"] == (mx.LR_HEAD if idx == 1 else mx.LR)
            assert metrics[f"eos/critical_sharpness/{tag}"] == pytest.approx(_critical(idx), rel=1e-12)
        ratio = mon["sharpness"][0][k]["ratio"]
        tag0 = "opt0/pg0" if cell.optimizers == 2 else "pg0"
        assert metrics[f"eos/lr_margin/{tag0}"] == pytest.approx(ratio, rel=1e-12), f"{cell.name}: margin"
    # TwinDivergence: the exact one-ulp start, then one record per step.
    if cell.twin_supported:
        twin = mon["twin"]
        assert len(twin) == steps + 1
        assert twin[0]["divergence"] == pytest.approx(_initial_ulp_gap(cell), rel=1e-5)
        assert all(0 < r["divergence"] < 1e-4 for r in twin), f"{cell.name}: TwinDivergence {twin}"
    else:
        assert mon["twin"] is None
    keys = set(mon["logged_keys"])
    expected = {"eos/sharpness", "eos/stability_ratio", "eos/batch_sharpness"}
    expected |= {"eos1/sharpness"} if cell.optimizers == 2 else set()
    expected |= {"twin/divergence"} if cell.twin_supported else set()
    assert expected <= keys, f"{cell.name}: missing logged keys {expected - keys}"

    # AdaptiveLocalLR: a refresh per step; bounds c/λ, multipliers min(1, safety·bound/lr), acting.
    ctl = out["controlled"]
    assert len(ctl["history"]) == steps, f"{cell.name}: AdaptiveLocalLR refreshes"
    lr, c = (mx.LR_HEAD, PLAIN_C) if cell.optimizers == 2 else (mx.LR, MOMENTUM_C)
    for r in ctl["history"]:
        assert r["converged"], f"{cell.name}: AdaptiveLocalLR {r}"
        for layer, curvature in r["curvature"].items():
            assert r["bound"][layer] == pytest.approx(c / curvature, rel=1e-12)
            assert r["target"][layer] == pytest.approx(
                min(1.0, mx.SAFETY * r["bound"][layer] / lr), rel=1e-12
            )
            assert r["multiplier"][layer] == pytest.approx(r["target"][layer] * r["scale"], rel=1e-12)
            assert 0 < r["multiplier"][layer] < 1
    assert ctl["weights"] != out["baseline"]["weights"], f"{cell.name}: AdaptiveLocalLR did not act"
    if cell.twin_supported:  # an unperturbed twin follows the controlled model exactly
        assert ctl["twin_gaps"] == [0.0] * (steps + 1), f"{cell.name}: TwinDivergence('none') left lockstep"
    assert "local_lr/min_multiplier" in ctl["logged_keys"]


def test_the_dimensions_take_effect() -> None:
    """Each dimension changes the run (clipping clips, bf16 rounds), and the module's own
    accumulation and clipping under manual optimization give the automatic loop's numbers."""
    base = mx.Cell()
    for changed in (
        mx.Cell(clip=True),
        mx.Cell(precision="bf16-mixed"),
        mx.Cell(precision="16-mixed"),
        mx.Cell(accumulate=2),
    ):
        assert single(changed)["baseline"]["weights"] != single(base)["baseline"]["weights"], changed.name
    fp16 = single(mx.Cell(precision="16-mixed"))["baseline"]["weights"]
    assert fp16 != single(mx.Cell(precision="bf16-mixed"))["baseline"]["weights"]  # fp16, not bf16
    # The probes run in float32 on the unscaled loss (a scaled one would read 256 times larger): the
    # first refresh, on the initial weights, is the 32-true run's exactly; the sharpness follows the
    # 32-true run's up to fp16's rounding of the updates (measured at most 3.0e-4).
    for cell in mx.FP16_CELLS:
        fp16_out, f32_out = single(cell), single(dataclasses.replace(cell, precision="32-true"))
        assert (
            fp16_out["controlled"]["history"][0]["curvature"]
            == f32_out["controlled"]["history"][0]["curvature"]
        )
        for a, b in zip(
            fp16_out["monitored"]["sharpness"][0], f32_out["monitored"]["sharpness"][0], strict=True
        ):
            assert a["sharpness"] == pytest.approx(b["sharpness"], rel=1e-3), cell.name
    grid = itertools.product(
        ("lightning", "pytorch_lightning"), ("32-true", "bf16-mixed"), (1, 2), (False, True)
    )
    fp16_grid = {(c.framework, c.precision, c.accumulate, c.clip) for c in mx.FP16_CELLS}
    for fw, prec, acc, clip in [*grid, *sorted(fp16_grid)]:
        auto = single(mx.Cell(fw, prec, acc, clip, "automatic"))  # type: ignore[arg-type]
        manual = single(mx.Cell(fw, prec, acc, clip, "manual"))  # type: ignore[arg-type]
        assert manual["baseline"]["weights"] == auto["baseline"]["weights"]
        for a, m in zip(auto["monitored"]["sharpness"][0], manual["monitored"]["sharpness"][0]):
            assert m["sharpness"] == pytest.approx(a["sharpness"], rel=1e-6)
    # The framework changes nothing: the same cell under either package gives the same numbers.
    for cell in [*mx.all_cells(), *mx.FP16_CELLS]:
        if cell.framework == "lightning":
            other = single(dataclasses.replace(cell, framework="pytorch_lightning"))
            for fit in ("baseline", "monitored", "controlled"):  # JSON: NaN ("not measured") equals NaN
                same = json.dumps(other[fit], sort_keys=True) == json.dumps(single(cell)[fit], sort_keys=True)
                assert same, f"{cell.name}: pytorch_lightning gives other {fit} values"


# ----------------------------------------------------------------------------------------- DDP


def test_ddp_cells_cover_every_pair() -> None:
    every = set(mx.pairs(mx.all_cells()))
    covered = set(mx.pairs(mx.DDP_CELLS))
    assert every - covered == set()


# float32: DDP equals one process to round-off (measured at most 1.7e-7 over every value below).
# bf16-mixed rounds the per-rank batches of 8 and the single process's batch of 16 differently (8
# mantissa bits), so from the first update on the two trajectories differ: measured up to 4.2e-4
# (sharpness, ratios, margins), 1.2e-4 (multipliers) and 2.0e-2 (batch sharpness, the most sensitive:
# gᵀHg/‖g‖² of one batch's gradient). Values taken on the initial weights agree to 1e-5 in both.
TOLERANCE = {"32-true": 1e-5, "bf16-mixed": 2e-3}
BATCH_SHARPNESS_TOLERANCE = {"32-true": 1e-5, "bf16-mixed": 5e-2}


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_matches_single_process(tmp_path: Path) -> None:
    cells = list(mx.DDP_CELLS)
    # One fresh interpreter forks both ranks once for all cells (see _matrix.launch).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "tests.callbacks._matrix", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"DDP group failed:\n{done.stderr[-6000:]}"
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for cell, r0, r1 in zip(cells, *ranks):
        one = single(cell)
        tol, batch_tol = TOLERANCE[cell.precision], BATCH_SHARPNESS_TOLERANCE[cell.precision]
        assert r0["cell"] == r1["cell"] == cell.name and r0["monitored"]["world_size"] == 2
        for fit in ("baseline", "monitored", "controlled"):
            assert r0[fit]["weights"] == r1[fit]["weights"], f"{cell.name}: ranks' {fit} weights differ"
        assert r0["monitored"]["weights"] == r0["baseline"]["weights"], (
            f"{cell.name}: monitors changed DDP weights"
        )
        # Every rank holds the same values; only rank zero logs, the same keys as one process.
        for fit, skip in (
            ("monitored", {"logged_keys", "log_calls"}),
            ("controlled", {"logged_keys", "log_calls"}),
        ):
            same = {k: v for k, v in r0[fit].items() if k not in skip}
            assert same == {k: v for k, v in r1[fit].items() if k not in skip}, (
                f"{cell.name}: ranks' {fit} values"
            )
            assert r1[fit]["log_calls"] == 0, f"{cell.name}: rank 1 logged"
            assert r0[fit]["log_calls"] == one[fit]["log_calls"] > 0
            assert r0[fit]["logged_keys"] == one[fit]["logged_keys"]
        assert r0["monitored"]["failures"] == {}
        # SharpnessMonitor and StabilityMonitor against one process on the same global data.
        for got_h, want_h in zip(r0["monitored"]["sharpness"], one["monitored"]["sharpness"], strict=True):
            assert len(got_h) == len(want_h)
            for got, want in zip(got_h, want_h):
                for key, rel in (("sharpness", tol), ("ratio", tol), ("batch_sharpness", batch_tol)):
                    assert got[key] == pytest.approx(want[key], rel=rel), (
                        f"{cell.name}: SharpnessMonitor {key}"
                    )
        for got, want in zip(r0["monitored"]["stability"], one["monitored"]["stability"], strict=True):
            assert got.keys() == want.keys()
            for key in want:
                assert got[key] == pytest.approx(want[key], rel=tol), f"{cell.name}: StabilityMonitor {key}"
        # AdaptiveLocalLR: the first refresh is at the initial weights, identical in both runs.
        got_c, want_c = r0["controlled"]["history"], one["controlled"]["history"]
        assert len(got_c) == len(want_c)
        for k, (got, want) in enumerate(zip(got_c, want_c)):
            for key in ("multiplier", "bound", "curvature"):
                for layer, value in want[key].items():
                    assert got[key][layer] == pytest.approx(value, rel=1e-5 if k == 0 else tol), (
                        f"{cell.name}: AdaptiveLocalLR {key}[{layer}] at refresh {k}"
                    )
        if cell.twin_supported:
            # The unperturbed twin stays exactly on the DDP model (its gradient all-reduce is DDP's).
            assert r0["controlled"]["twin_gaps"] == [0.0] * len(one["controlled"]["twin_gaps"])
            # A one-ulp gap is round-off itself, and so is the difference of the two runs: the same
            # exact start, then the same size (measured within 5 %; asserted within 0.1 decade).
            got_t, want_t = r0["monitored"]["twin"], one["monitored"]["twin"]
            assert got_t[0]["divergence"] == want_t[0]["divergence"]
            for got, want in zip(got_t, want_t, strict=True):
                assert abs(math.log10(got["divergence"] / want["divergence"])) < 0.1, f"{cell.name}: twin gap"


# ----------------------------------------------------------------------------------------- refusals


def _tiny_fit(framework: str, module: Any, callbacks: list[Any], **kw: Any) -> None:
    fw = mx.FRAMEWORKS[framework]
    for key, value in dict(accelerator="cpu", devices=1, max_steps=1, logger=False).items():
        kw.setdefault(key, value)
    trainer = fw.Trainer(
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **kw,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, DataLoader(mx.dataset(), batch_size=mx.GLOBAL_BATCH))


@pytest.mark.parametrize("framework", ["lightning", "pytorch_lightning"])
def test_twin_refuses_manual_optimization_at_setup(framework: str) -> None:
    for optimization in ("manual", "manual-2opt"):
        module = mx.make_module(mx.Cell(framework=framework, optimization=optimization))  # type: ignore[arg-type]
        with pytest.raises(RuntimeError, match="TwinDivergence supports automatic optimization only"):
            _tiny_fit(framework, module, [TwinDivergence()])
        assert module.global_step == 0  # refused before the first step


@pytest.mark.parametrize("framework", ["lightning", "pytorch_lightning"])
def test_not_applicable_cells_are_rejected_by_lightning_itself(framework: str) -> None:
    """Two optimizers under automatic optimization, ``gradient_clip_val`` or ``accumulate_grad_batches``
    under manual optimization: Lightning raises before any callback could run."""

    class TwoAutomatic(mx.make_module(mx.Cell(framework)).__class__):  # type: ignore[misc]
        def configure_optimizers(self) -> Any:
            return [
                torch.optim.SGD(self.body.parameters(), lr=0.1),
                torch.optim.SGD(self.head.parameters(), lr=0.1),
            ]

    with pytest.raises(RuntimeError, match="manual optimization"):
        _tiny_fit(framework, TwoAutomatic(mx.Cell(framework)), [SharpnessMonitor()])
    manual = mx.Cell(framework=framework, optimization="manual")  # type: ignore[arg-type]
    for kw in ({"gradient_clip_val": 0.1}, {"accumulate_grad_batches": 2}):
        with pytest.raises(Exception, match=r"manual optimization|automatic_optimization") as err:
            _tiny_fit(framework, mx.make_module(manual), [SharpnessMonitor()], **kw)
        assert type(err.value).__module__.split(".")[0] in (
            "lightning",
            "lightning_fabric",
            "pytorch_lightning",
        )


def test_mixing_the_two_packages_is_rejected_by_lightning_itself() -> None:
    """A ``pytorch_lightning`` module under a ``lightning.pytorch`` Trainer (or the reverse) is Lightning's
    own TypeError; the callbacks run under either package's Trainer."""
    with pytest.raises(TypeError, match="LightningModule"):
        _tiny_fit("lightning", mx.make_module(mx.Cell("pytorch_lightning")), [])
    with pytest.raises(TypeError, match="LightningModule"):
        _tiny_fit("pytorch_lightning", mx.make_module(mx.Cell("lightning")), [])


@pytest.mark.parametrize("framework", ["lightning", "pytorch_lightning"])
def test_sharded_strategies_are_refused_at_setup(framework: str) -> None:
    fw = mx.FRAMEWORKS[framework]
    # ModelParallelStrategy runs on CPU: a real fit, refused by each callback's setup hook.
    for callback in CALLBACKS:
        with pytest.raises(
            RuntimeError, match=rf"{callback.__name__} does not support the ModelParallelStrategy"
        ):
            _tiny_fit(
                framework,
                mx.make_module(mx.Cell(framework)),
                [callback()],
                strategy=fw.strategies.ModelParallelStrategy(),
            )  # type: ignore[arg-type]

    # Lightning refuses FSDP on CPU itself and DeepSpeed needs its package: the callbacks' setup
    # is given a trainer holding the real FSDPStrategy and a subclass named like DeepSpeed's.
    class DeepSpeedStrategy(fw.strategies.DDPStrategy):  # type: ignore[name-defined,misc]
        pass

    for strategy in (fw.strategies.FSDPStrategy(), DeepSpeedStrategy()):

        class Holder:
            pass

        holder = Holder()
        holder.strategy = strategy  # type: ignore[attr-defined]
        for callback in CALLBACKS:
            with pytest.raises(
                RuntimeError, match=rf"{callback.__name__} does not support the {type(strategy).__name__}"
            ):
                callback().setup(holder, None, "fit")  # type: ignore[arg-type]


# ------------------------------------------------------------------- the standalone package's own classes


def test_replica_stand_ins_are_of_the_modules_own_framework() -> None:
    """Under ``pytorch_lightning`` the stand-in optimizer is that package's ``LightningOptimizer`` and a
    hook the module does not override is recognised as Lightning's do-nothing default."""

    class WithHook(mx.make_module(mx.Cell("pytorch_lightning")).__class__):  # type: ignore[misc]
        def on_train_epoch_end(self) -> None:
            return None

    for framework, module in (
        ("lightning", mx.make_module(mx.Cell())),
        ("pytorch_lightning", WithHook(mx.Cell())),
    ):
        fw = mx.FRAMEWORKS[framework]
        trainer = fw.Trainer(
            accelerator="cpu", devices=1, logger=False, max_steps=1, enable_progress_bar=False
        )
        opt = torch.optim.SGD(module.parameters(), lr=0.1)
        assert isinstance(inert_optimizer(opt, trainer), fw.core.optimizer.LightningOptimizer)
        replica = StepReplica(module, trainer, share_parameters=True)
        assert replica.overrides("on_train_epoch_end") is (framework == "pytorch_lightning")
        assert not replica.overrides("on_train_batch_start") and not replica.overrides("on_fit_start")


def test_custom_scalars_reach_the_standalone_tensorboard_logger(tmp_path: Path) -> None:
    """The TensorBoard layout (and SpaceTimeMaps' figures) go to ``pytorch_lightning``'s logger too."""
    layouts: list[Any] = []
    logger = ptl.loggers.TensorBoardLogger(str(tmp_path))
    logger.experiment.add_custom_scalars = layouts.append  # type: ignore[method-assign]
    _tiny_fit(
        "pytorch_lightning", mx.make_module(mx.Cell("pytorch_lightning")), [StabilityMonitor()], logger=logger
    )
    assert layouts and "eos: stability" in layouts[-1]
    trainer = ptl.Trainer(logger=[logger, mx.make_logger("pytorch_lightning")], enable_progress_bar=False)
    assert SpaceTimeMaps._tensorboards(trainer) == [logger]


def test_twin_clones_the_standalone_fp16_scaler() -> None:
    """Under ``pytorch_lightning``'s 16-mixed the twin steps through its own clone of the real run's
    GradScaler: an unperturbed twin then stays exactly on the model through overflow-skipped steps."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24, growth_interval=2)
    plugin = ptl.plugins.precision.MixedPrecision("16-mixed", "cpu", scaler)
    twin = TwinDivergence(perturbation="none", every_n_steps=1, strict=True, validation=False)
    module = mx.make_module(mx.Cell("pytorch_lightning"))
    _tiny_fit("pytorch_lightning", module, [twin], plugins=[plugin], max_steps=4)
    assert twin.engine is not None and twin.engine.scaler is not None
    assert [r.divergence for r in twin.history] == [0.0] * 5
