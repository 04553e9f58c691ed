"""SharpnessMonitor: arguments, edge-of-stability behaviour, per-layer values, applied LR, resume,
NaN probes, the TensorBoard layout and DDP equality."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from lightning_eos import curvature
from lightning_eos.callbacks import SharpnessMonitor, StabilityMonitor
from lightning_eos.demos.digits import DigitsDataModule, DigitsMLP, load_digits_tensors
from lightning_eos.records import SharpnessRecord
from tests.callbacks._helpers import MemoryLogger, fit_ddp_spawn, free_port, make_trainer, quiet_fit

# --------------------------------------------------------------------------------------- helpers


def digits_loss(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    return model.loss(batch)  # type: ignore[operator]


# --------------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"every_n_steps": 2.0}, "every_n_steps"),
        ({"probe": "random"}, "probe"),
        ({"probe_size": 0}, "probe_size"),
        ({"probe_batch_size": -3}, "probe_batch_size"),
        ({"k": 0}, "k"),
        ({"which": "smallest"}, "which"),
        ({"per_layer": 1}, "per_layer"),
        ({"preconditioned": "yes"}, "preconditioned"),
        ({"preconditioned": 1}, "preconditioned"),
        ({"tol": 0.0}, "tol"),
        ({"tol": float("nan")}, "tol"),
        ({"max_iter": 0}, "max_iter"),
        ({"k": 3, "max_iter": 2}, "max_iter"),
        ({"mode": "test"}, "mode"),
        ({"optimizer_idx": -1}, "optimizer_idx"),
        ({"log_prefix": ""}, "log_prefix"),
        ({"log_prefix": "eos/"}, "log_prefix"),
        ({"batch_sharpness": "no"}, "batch_sharpness"),
        ({"batch_sharpness_window": 0}, "batch_sharpness_window"),
        ({"warn_ratio": -1.0}, "warn_ratio"),
        ({"loss_fn": 3}, "loss_fn"),
        ({"loss_fn": "no_such_module.loss"}, "loss_fn"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_every_bad_argument_raises(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=rf"{name}.*accepted values|{name}.*cannot import"):
        SharpnessMonitor(**kwargs)


def test_sharded_strategies_are_refused_at_setup() -> None:
    class FSDPStrategy:  # matched by class name, like Lightning's and any subclass of it
        pass

    class FakeTrainer:
        strategy = FSDPStrategy()

    for callback in (SharpnessMonitor(), StabilityMonitor()):
        with pytest.raises(RuntimeError, match=type(callback).__name__):
            callback.setup(FakeTrainer(), None, "fit")  # type: ignore[arg-type]


def test_loss_fn_accepts_an_import_path() -> None:
    monitor = SharpnessMonitor(loss_fn="tests.callbacks.test_sharpness.digits_loss")
    assert monitor.loss_fn is digits_loss


def test_lightning_cli_parser_accepts_the_signature() -> None:
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_class_arguments(SharpnessMonitor, "m")
    cfg = parser.parse_args(["--m.probe=current", "--m.which=both", "--m.preconditioned=false", "--m.k=2"])
    monitor = SharpnessMonitor(**cfg.m)
    assert (monitor.probe, monitor.which, monitor.preconditioned, monitor.k) == ("current", "both", False, 2)
    with pytest.raises(SystemExit):
        parser.parse_args(["--m.probe=sometimes"])


def test_setup_time_errors() -> None:
    with pytest.raises(ValueError, match="optimizer_idx=1"):
        quiet_fit(
            make_trainer(max_steps=1, callbacks=[SharpnessMonitor(optimizer_idx=1)]),
            DigitsMLP(),
            DigitsDataModule(),
        )
    with pytest.raises(ValueError, match="preconditioned=True"):
        quiet_fit(
            make_trainer(max_steps=1, callbacks=[SharpnessMonitor(preconditioned=True)]),
            DigitsMLP(),
            DigitsDataModule(),
        )

    class Stream(IterableDataset):
        def __iter__(self) -> Any:
            x, y = load_digits_tensors(64)
            yield from zip(x, y)

    class StreamModel(DigitsMLP):
        def train_dataloader(self) -> DataLoader:
            return DataLoader(Stream(), batch_size=32)

    with pytest.raises(ValueError, match="probe='current'"):
        quiet_fit(make_trainer(max_steps=1, callbacks=[SharpnessMonitor()]), StreamModel())
    monitor = SharpnessMonitor(probe="current", every_n_steps=1)
    quiet_fit(make_trainer(max_steps=2, callbacks=[monitor]), StreamModel())
    assert len(monitor.history) == 2 and all(r.finite for r in monitor.history)


# --------------------------------------------------------------------------------------- behaviour


def test_edge_of_stability_on_digits() -> None:
    """lr = 0.3 full-batch GD: the sharpness rises to 2/lr, overshoots once and hovers there."""
    monitor = SharpnessMonitor(every_n_steps=10, probe_size=None, batch_sharpness=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(max_steps=420, callbacks=[monitor]).fit(DigitsMLP(lr=0.3), DigitsDataModule())
    edge_warnings = [w for w in caught if "reached the edge of stability" in str(w.message)]
    assert len(edge_warnings) == 1  # once, although the ratio stays above warn_ratio=1.0
    steps = [r.step for r in monitor.history]
    ratios = [r.ratio for r in monitor.history]
    assert all(r.critical == pytest.approx(2 / 0.3) for r in monitor.history)
    assert 0.3 <= ratios[0] <= 0.55  # starts well below the edge
    first = next(i for i, q in enumerate(ratios) if q >= 0.9)
    assert 140 <= steps[first] <= 230
    assert max(ratios) <= 1.35
    assert min(ratios[first:]) >= 0.85  # once at the edge it stays there
    peak = max(range(len(ratios)), key=ratios.__getitem__)
    settled = [q for s, q in zip(steps, ratios) if s >= steps[peak] + 30]
    assert len(settled) >= 5 and all(0.85 <= q <= 1.25 for q in settled)
    assert 1.0 <= sum(settled) / len(settled) <= 1.15
    summary = monitor.summary()
    assert summary["first_edge_step"] == steps[first] and summary["max_ratio"] == max(ratios)
    assert summary["measurements"] == 42


def test_per_layer_values_equal_block_eigenvalues() -> None:
    monitor = SharpnessMonitor(every_n_steps=1, probe_size=200, per_layer=True, tol=1e-7, max_iter=300)
    model = DigitsMLP(lr=0.3)
    quiet_fit(make_trainer(max_steps=2, callbacks=[monitor]), model, DigitsDataModule())
    last = monitor.last
    assert last is not None and last.step == 2  # measured on the final weights
    x, y = load_digits_tensors(1000)
    idx = monitor.probe_indices
    assert idx is not None and len(idx) == 200 and len(set(idx.tolist())) == 200
    probe = (x[idx], y[idx])
    assert set(last.layers) == {"net.0", "net.2", "net.4"}
    for layer, value in last.layers.items():
        ref = curvature.block_eigenvalues(model, digits_loss, probe, layer, tol=1e-9, max_iter=400)
        assert value == pytest.approx(float(ref.eigenvalues[0]), rel=1e-5)
    full = curvature.hessian_eigenvalues(model, digits_loss, probe, tol=1e-9, max_iter=400)
    assert last.sharpness == pytest.approx(float(full.eigenvalues[0]), rel=1e-5)


class StepScheduledMLP(DigitsMLP):
    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.2)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_applied_lr_under_a_step_scheduler_with_accumulation() -> None:
    monitor = SharpnessMonitor(every_n_steps=1, probe="current")
    logger = MemoryLogger()
    data = DigitsDataModule(n_samples=200, batch_size=50)
    quiet_fit(
        make_trainer(max_steps=4, accumulate_grad_batches=2, callbacks=[monitor], logger=logger),
        StepScheduledMLP(),
        data,
    )
    assert [r.step for r in monitor.history] == [1, 2, 3, 4]  # real optimizer steps only
    lrs = [r.lr for r in monitor.history]
    assert lrs == pytest.approx([0.2 * 0.5**s for s in range(4)])  # applied, not the next step's
    assert [r.critical for r in monitor.history] == pytest.approx([2 / lr for lr in lrs])
    assert [s for s, _ in logger.series("eos/sharpness")] == [0, 1, 2, 3]  # the Trainer's own x-axis
    for r in monitor.history:
        assert r.ratio == pytest.approx(r.sharpness / r.critical)
        assert r.max_stable_lr == pytest.approx(2 / r.sharpness)
        assert math.isfinite(r.batch_sharpness) and r.batch_ratio == pytest.approx(
            r.batch_sharpness_avg / r.critical
        )


def test_fixed_probe_is_converted_like_the_training_batches_under_64_true() -> None:
    # precision="64-true" runs a float64 model on batches Lightning converts to float64: the fixed
    # probe, collated from the same dataset, must be converted the same way.
    monitor = SharpnessMonitor(every_n_steps=1, probe_size=100, tol=1e-9, max_iter=400)
    model, data = DigitsMLP(lr=0.1), DigitsDataModule(200)
    quiet_fit(make_trainer(max_steps=1, precision="64-true", callbacks=[monitor]), model, data)
    last = monitor.last
    assert last is not None and last.finite
    x, y = load_digits_tensors(200)
    idx = monitor.probe_indices
    assert idx is not None
    probe = (x[idx].double(), y[idx])
    ref = curvature.hessian_eigenvalues(model, digits_loss, probe, tol=1e-9, max_iter=400)
    assert last.sharpness == pytest.approx(float(ref.eigenvalues[0]), rel=1e-6)


class FrozenGroupMLP(DigitsMLP):
    """The first layer is frozen but still in the optimizer, in a group with a larger LR."""

    def configure_optimizers(self) -> Any:
        self.net[0].requires_grad_(False)
        rest = [p for n, p in self.named_parameters() if not n.startswith("net.0.")]
        return torch.optim.SGD([{"params": self.net[0].parameters(), "lr": 1.0}, {"params": rest, "lr": 0.1}])


def test_a_frozen_param_group_is_not_the_binding_group() -> None:
    # Nothing in the frozen group moves, so its LR bounds nothing: the threshold is the trained group's.
    monitor = SharpnessMonitor(every_n_steps=1, probe_size=100)
    quiet_fit(make_trainer(max_steps=2, callbacks=[monitor]), FrozenGroupMLP(), DigitsDataModule(200))
    last = monitor.last
    assert last is not None and last.binding_group == 1
    assert last.lr == 0.1 and last.critical == pytest.approx(2 / 0.1)


def test_batch_sharpness_window_average() -> None:
    monitor = SharpnessMonitor(every_n_steps=1, probe="current", batch_sharpness_window=2)
    quiet_fit(
        make_trainer(max_steps=3, callbacks=[monitor]),
        DigitsMLP(),
        DigitsDataModule(n_samples=300, batch_size=100),
    )
    raw = [r.batch_sharpness for r in monitor.history]
    avg = [r.batch_sharpness_avg for r in monitor.history]
    assert avg == pytest.approx([raw[0], (raw[0] + raw[1]) / 2, (raw[1] + raw[2]) / 2])
    assert all(0 < b <= r.sharpness * (1 + 1e-4) for b, r in zip(raw, monitor.history))  # gᵀHg/‖g‖² ≤ λ_max


def test_checkpoint_resume_restores_probe_and_history(tmp_path: Path) -> None:
    def run(max_steps: int, seed: int, ckpt: str | None = None) -> tuple[SharpnessMonitor, pl.Trainer]:
        monitor = SharpnessMonitor(every_n_steps=2, probe_size=64, seed=seed)
        trainer = make_trainer(max_steps=max_steps, callbacks=[monitor])
        quiet_fit(trainer, DigitsMLP(lr=0.3), DigitsDataModule(n_samples=300), ckpt_path=ckpt)
        return monitor, trainer

    first, trainer = run(4, seed=1)
    path = tmp_path / "half.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["callbacks"][first.state_key]
    assert torch.equal(state["probe_indices"], first.probe_indices)
    assert [SharpnessRecord.from_dict(r) for r in state["history"]] == first.history

    resumed, _ = run(8, seed=2, ckpt=str(path))  # a different seed: the indices must come from the ckpt
    assert resumed.probe_indices is not None and torch.equal(resumed.probe_indices, first.probe_indices)
    assert resumed.history[:2] == first.history
    assert [r.step for r in resumed.history] == [1, 3, 5, 7]
    straight, _ = run(8, seed=1)
    for a, b in zip(resumed.history, straight.history):
        assert a.step == b.step and a.sharpness == pytest.approx(b.sharpness, rel=1e-5)


def nan_at_step_one(model: torch.nn.Module, batch: Any) -> torch.Tensor:
    loss = model.loss(batch)  # type: ignore[operator]
    return loss * float("nan") if model.trainer.global_step == 1 else loss  # type: ignore[attr-defined]


def test_nan_probe_loss_is_logged_as_nan_and_training_continues() -> None:
    monitor = SharpnessMonitor(every_n_steps=1, probe_size=100, loss_fn=nan_at_step_one)
    logger = MemoryLogger()
    model = DigitsMLP()
    with pytest.warns(RuntimeWarning, match="not finite"):
        make_trainer(max_steps=3, callbacks=[monitor], logger=logger).fit(
            model, DigitsDataModule(n_samples=300)
        )
    assert [r.step for r in monitor.history] == [1, 2, 3]
    assert not monitor.history[0].finite and math.isnan(monitor.history[0].ratio)
    assert all(r.finite for r in monitor.history[1:])
    logged = [v for _, v in logger.series("eos/sharpness")]
    assert math.isnan(logged[0]) and all(math.isfinite(v) for v in logged[1:])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_tensorboard_layout_and_scalars_in_event_files(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    callbacks = [SharpnessMonitor(every_n_steps=1, probe_size=50, which="both"), StabilityMonitor()]
    quiet_fit(
        make_trainer(max_steps=2, callbacks=callbacks, logger=logger),
        DigitsMLP(),
        DigitsDataModule(n_samples=100),
    )
    acc = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    assert "custom_scalars__config__" in acc.Tags()["tensors"]
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0])
    titles = {c.title for c in layout.category}
    assert titles == {"eos: edge of stability", "eos: stability"}  # both monitors' charts survive
    charts = {chart.title: list(chart.multiline.tag) for c in layout.category for chart in c.chart}
    assert charts["sharpness vs critical sharpness"] == [r"^eos/sharpness$", r"^eos/critical_sharpness$"]
    scalars = set(acc.Tags()["scalars"])
    for key in (
        "sharpness",
        "critical_sharpness",
        "stability_ratio",
        "max_stable_lr",
        "lambda_min",
        "hvps",
        "converged",
        "weight_decay_window_low",
        "weight_decay_window_high",
        "batch_sharpness",
        "batch_stability_ratio",
        "lr/pg0",
        "critical_sharpness/pg0",
        "lr_margin/pg0",
    ):
        assert f"eos/{key}" in scalars, key
    assert [e.step for e in acc.Scalars("eos/sharpness")] == [0, 1]


# --------------------------------------------------------------------------------------- DDP


class DumpHistory(pl.Callback):
    """Writes every rank's SharpnessMonitor history to ``<dir>/rank<r>.json`` (spawned processes do
    not send callback attributes back to the parent)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        monitors = [cb for cb in trainer.callbacks if isinstance(cb, SharpnessMonitor)]  # type: ignore[attr-defined]
        out = {
            "indices": monitors[0].probe_indices.tolist(),
            "history": [r.to_dict() for r in monitors[0].history],
            "budget_steps": [r.step for m in monitors[1:] for r in m.history],
            "world": trainer.world_size,
        }
        Path(self.directory, f"rank{trainer.global_rank}.json").write_text(json.dumps(out))


def _fixed_monitor() -> SharpnessMonitor:
    return SharpnessMonitor(every_n_steps=4, probe_size=96, probe_batch_size=32, tol=1e-7, max_iter=200)


def _ddp_run(tmp: Path, **trainer_kw: Any) -> None:
    # A second monitor on the budget: the ranks' own timings differ, the measured steps must not.
    budgeted = SharpnessMonitor(budget=0.9, probe_size=32, log_prefix="budget", batch_sharpness=False)
    callbacks = [_fixed_monitor(), budgeted, DumpHistory(str(tmp))]
    trainer = make_trainer(max_steps=8, callbacks=callbacks, **trainer_kw)
    quiet_fit(trainer, DigitsMLP(lr=0.3), DigitsDataModule(n_samples=200))


@pytest.mark.ddp
def test_ddp_two_processes_equal_single_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    (tmp_path / "ddp").mkdir()
    (tmp_path / "one").mkdir()
    fit_ddp_spawn(
        lambda: _ddp_run(tmp_path / "ddp", strategy="ddp_spawn", devices=2),
        *(tmp_path / "ddp" / f"rank{r}.json" for r in (0, 1)),
    )
    monitor = _fixed_monitor()
    quiet_fit(
        make_trainer(max_steps=8, callbacks=[monitor]), DigitsMLP(lr=0.3), DigitsDataModule(n_samples=200)
    )
    ranks = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == 2
    assert ranks[0]["indices"] == ranks[1]["indices"] == monitor.probe_indices.tolist()
    for rank in ranks:
        assert len(rank["history"]) == len(monitor.history) == 2
        for got, want in zip(rank["history"], monitor.history):
            assert got["sharpness"] == pytest.approx(want.sharpness, rel=1e-5)
            assert got["batch_sharpness"] == pytest.approx(want.batch_sharpness, rel=1e-4)
    assert ranks[0]["history"] == ranks[1]["history"]  # every rank has the same numbers
    assert ranks[0]["budget_steps"] and ranks[0]["budget_steps"] == ranks[1]["budget_steps"]


# ------------------------------------------------------------------------------ warm starts


def test_warm_starts_give_the_cold_eigenvalue_in_fewer_products_and_resume(tmp_path: Path) -> None:
    def run(warm: bool) -> SharpnessMonitor:
        monitor = SharpnessMonitor(
            every_n_steps=5, probe_size=256, warm_start=warm, batch_sharpness=False, eig_tol=1e-6
        )
        quiet_fit(make_trainer(max_steps=40, callbacks=[monitor]), DigitsMLP(lr=0.05), DigitsDataModule(256))
        return monitor

    warm, cold = run(True), run(False)
    assert [r.step for r in warm.history] == [r.step for r in cold.history] and len(warm.history) == 8
    for w, c in zip(warm.history, cold.history):
        assert w.converged and c.converged
        assert w.sharpness == pytest.approx(c.sharpness, rel=1e-5)
    assert warm.history[0].hvps == cold.history[0].hvps  # nothing to start from on the first one
    warm_mean = sum(r.hvps for r in warm.history[1:]) / 7
    cold_mean = sum(r.hvps for r in cold.history[1:]) / 7
    assert warm_mean < cold_mean
    # The vectors are part of the checkpoint (weights_only) and come back unchanged.
    path = tmp_path / "state.pt"
    torch.save(warm.state_dict(), path)
    again = SharpnessMonitor(every_n_steps=5, probe_size=256, batch_sharpness=False)
    again.load_state_dict(torch.load(path, weights_only=True))
    assert set(again._warm) == {"top"} and torch.equal(again._warm["top"], warm._warm["top"].cpu())
    assert again._refresh.state_dict() == warm._refresh.state_dict()  # light/full sequence resumes
