"""The three callbacks on models we did not write, through a real Trainer.

Lightning's demo modules (the nn.Transformer LM, the LSTM LM that carries its hidden state between
steps and resets it in its own ``on_train_epoch_end``, ``BoringModel``, ``ManualOptimBoringModel``)
and tiny ``transformers`` models built from configs (GPT-2 with tied embeddings, BERT with a padding
mask, ViT, ResNet with BatchNorm; SDPA attention). Every run: deterministic CPU, 2 epochs of 3 steps.

1. non-interference: with SharpnessMonitor (train mode on a fixed probe, eval mode on the current
   batch), StabilityMonitor and a ``perturbation="none"`` TwinDivergence attached, weights, buffers,
   optimizer state, the global RNG stream and the module's own logged metrics are bitwise those of
   a run without them;
2. a ``perturbation="none"`` twin stays exactly on the real model at every step, across the epoch
   boundary;
3. the sharpness the monitor records is the one a direct ``hessian_eigenvalues`` call gives on the
   same weights, carried state and batch;
4. manual optimization: the monitors work, TwinDivergence refuses with a clear error;
5. per-layer keys of the monitor and the twin name the same layers on GPT-2 (tied lm_head included
   once, under the embedding that owns the weight).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import pytest

from lightning_eos import curvature
from lightning_eos.callbacks import SharpnessMonitor, StabilityMonitor, TwinDivergence
from tests.callbacks._real_models import CASES, STEPS, Case, SnapshotAt, assert_identical, fit

AUTOMATIC = [
    "demo_transformer",
    "demo_lstm",
    "boring",
    "gpt2",
    "gpt2_checkpointing",
    "bert",
    "vit",
    "resnet",
    "compiled",
]
SLOW = {"gpt2", "gpt2_checkpointing", "bert", "vit"}  # the transformers models: the heaviest cases


def _cases(names: list[str]) -> list[Any]:
    return [pytest.param(CASES[n], id=n, marks=[pytest.mark.slow] if n in SLOW else []) for n in names]


@functools.cache
def _plain(name: str) -> dict[str, Any]:
    """The run without callbacks (shared by the tests that compare against it)."""
    return fit(CASES[name], []).result


def _monitor(mode: str, every_n_steps: int = 3, **kw: Any) -> SharpnessMonitor:
    # mode="train" measures a fixed probe, mode="eval" the current batch: both probes on every model.
    probe = (
        {"probe": "fixed", "probe_size": 8, "probe_batch_size": 4}
        if mode == "train"
        else {"probe": "current"}
    )
    return SharpnessMonitor(every_n_steps=every_n_steps, mode=mode, max_iter=20, tol=1e-2, **probe, **kw)


# ----------------------------------------------------------------------------- 1. non-interference
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("case", _cases(AUTOMATIC))
def test_all_callbacks_leave_the_run_bitwise_unchanged(case: Case, mode: str) -> None:
    monitor = _monitor(mode)
    twin = TwinDivergence(perturbation="none", every_n_steps=1, validation=False)
    watched = fit(case, [monitor, StabilityMonitor(every_n_steps=1), twin])
    assert_identical(_plain(case.name), watched.result)
    assert [r.step for r in monitor.history] == [1, 4]  # steps 1 and 4: both epochs measured
    assert all(math.isfinite(r.sharpness) for r in monitor.history), [r.sharpness for r in monitor.history]
    assert len(twin.history) == STEPS + 1


# --------------------------------------------------------------------------- 2. twin determinism
@pytest.mark.parametrize("case", _cases(AUTOMATIC))
def test_unperturbed_twin_gap_is_exactly_zero_across_epochs(case: Case) -> None:
    twin = TwinDivergence(perturbation="none", every_n_steps=1, validation=False)
    run = fit(case, [twin])
    assert run.trainer.current_epoch == 2 and run.trainer.global_step == STEPS
    assert [r.step for r in twin.history] == list(range(STEPS + 1))  # step 0, then every step
    gaps = [(r.step, r.divergence, r.layers) for r in twin.history]
    bad = [(s, d, {k: v for k, v in layers.items() if v != 0.0}) for s, d, layers in gaps if d != 0.0]
    assert not bad, f"the unperturbed twin left the real model at (step, gap, layers): {bad}"
    logged = run.logger.series("twin/divergence")
    assert len(logged) == STEPS and all(v == 0.0 for _, v in logged), logged


# ------------------------------------------------------------------------ 3. sharpness correctness
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("case", _cases(["manual_boring", *AUTOMATIC]))
def test_recorded_sharpness_equals_a_direct_core_call(case: Case, mode: str) -> None:
    every = 3
    tol, max_iter = 1e-4, 100
    snap = SnapshotAt(case, every)
    # preconditioned=False: the monitor measures λ_max(H) for Adam too, what hessian_eigenvalues gives.
    monitor = SharpnessMonitor(
        every_n_steps=every, probe="current", mode=mode, preconditioned=False, tol=tol, max_iter=max_iter
    )
    fit(case, [snap, monitor])  # the snapshot first: it copies the state the monitor is handed
    assert [r.step for r in monitor.history] == [1, 4] == [s.step for s in snap.snapshots]
    for record, s in zip(monitor.history, snap.snapshots):
        params = [p for p in s.module.parameters() if p.requires_grad]
        direct = curvature.hessian_eigenvalues(
            s.module,
            case.loss,
            curvature.Batches([s.batch]),
            k=1,
            params=params,
            mode=mode,
            seed=monitor.seed,
            tol=tol,
            max_iter=max_iter,
        )
        expected = float(direct.eigenvalues[0])
        assert math.isfinite(expected) and math.isfinite(record.sharpness), (record.sharpness, expected)
        assert record.sharpness == pytest.approx(expected, rel=1e-4), f"step {record.step}"


# --------------------------------------------------------------------------- 4. manual optimization
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_monitors_under_manual_optimization_leave_the_run_unchanged(mode: str) -> None:
    case = CASES["manual_boring"]
    monitor = _monitor(mode)
    watched = fit(case, [monitor, StabilityMonitor(every_n_steps=1)])
    assert_identical(_plain(case.name), watched.result)
    assert [r.step for r in monitor.history] == [1, 4]
    assert all(math.isfinite(r.sharpness) for r in monitor.history)
    assert any(k.startswith("eos/lr/") for k in watched.logger.keys())  # StabilityMonitor logged


def test_twin_refuses_manual_optimization_with_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="manual optimization"):
        fit(CASES["manual_boring"], [TwinDivergence(perturbation="none", every_n_steps=1, validation=False)])


# ------------------------------------------------------------------------------- 5. per-layer keys
@pytest.mark.slow
def test_gpt2_per_layer_sharpness_and_twin_name_the_same_layers() -> None:
    case = CASES["gpt2"]
    monitor = SharpnessMonitor(
        every_n_steps=STEPS, probe="current", per_layer=True, max_iter=10, tol=1e-2, batch_sharpness=False
    )
    twin = TwinDivergence(layers="module", every_n_steps=1, validation=False)
    run = fit(case, [monitor, twin])
    keys = run.logger.keys()
    sharp = {k.removeprefix("eos/sharpness/") for k in keys if k.startswith("eos/sharpness/")}
    gaps = {k.removeprefix("twin/divergence/") for k in keys if k.startswith("twin/divergence/")}
    # A layer is the module owning a parameter; the tied lm_head.weight is the embedding's parameter.
    owners = {name.rsplit(".", 1)[0] for name, _ in run.model.named_parameters()}
    assert "model.transformer.wte" in owners and "model.lm_head" not in owners
    assert gaps == owners
    assert sharp == owners, f"only in the monitor: {sharp - owners}; missing: {owners - sharp}"
    assert all(math.isfinite(v) for _, v in run.logger.series("eos/sharpness/model.transformer.wte"))
