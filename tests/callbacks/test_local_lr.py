"""AdaptiveLocalLR on real Trainers: applied LRs measured from the parameter updates against dense
float64 Hessians, bitwise non-interference, schedulers and resume, the divergent-LR rescue, DDP."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_eos import bounds
from lightning_eos.callbacks.local_lr import AdaptiveLocalLR
from lightning_eos.callbacks.twin import TwinDivergence
from lightning_eos.demos.digits import DigitsDataModule, DigitsMLP
from lightning_eos.local_lr import COUPLED_DEADBAND, GLOBAL_LAYER
from lightning_eos.records import TwinRecord
from tests.callbacks._helpers import MemoryLogger, fit_ddp_spawn, free_port, make_trainer, quiet_fit

DT = torch.float64

# --------------------------------------------------------------------------------------- models


def tiny_data(n: int = 32, batch_size: int | None = None, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=gen, dtype=DT)
    y = torch.randn(n, 3, generator=gen, dtype=DT)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size or n, shuffle=False)


class Tiny(pl.LightningModule):
    """4-6-3 tanh MLP in float64, squared error; optional dropout and LR schedule."""

    def __init__(
        self,
        lr: float = 1.0,
        momentum: float = 0.0,
        optimizer: str = "sgd",
        schedule: str | None = None,
        dropout: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(dropout), nn.Linear(6, 3)).double()
        self.lr, self.momentum, self.optimizer, self.schedule = lr, momentum, optimizer, schedule

    def loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return 0.5 * (self.net(x) - y).pow(2).sum(dim=1).mean()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.log("const", 1.0)  # a weight-independent metric for ReduceLROnPlateau
        return self.loss(batch)

    def configure_optimizers(self) -> Any:
        if self.optimizer == "lbfgs":
            return torch.optim.LBFGS(self.parameters(), lr=self.lr)
        if self.optimizer == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        else:
            opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)
        sched: Any
        if self.schedule is None:
            return opt
        if self.schedule == "lambda":
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.3 * s))
        elif self.schedule == "step":
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        elif self.schedule == "onecycle":
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr, total_steps=20)
        elif self.schedule == "plateau":
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)
            return {
                "optimizer": opt,
                "lr_scheduler": {"scheduler": sched, "interval": "step", "monitor": "const"},
            }
        else:  # pragma: no cover
            raise ValueError(self.schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


class LRRecorder(pl.Callback):
    """The group LRs each step applied (read where LearningRateMonitor reads them)."""

    def __init__(self) -> None:
        self.lrs: list[list[float]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.lrs.append([float(g["lr"]) for g in trainer.optimizers[0].param_groups])


# --------------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"every_n_steps": 2.0}, "every_n_steps"),
        ({"budget": 0.1}, "every_n_steps"),  # two schedules at once
        ({"every_n_steps": None}, "every_n_steps"),  # no schedule
        ({"every_n_steps": None, "budget": 1.5}, "budget"),
        ({"mode": "greedy"}, "mode"),
        ({"safety": 0.0}, "safety"),
        ({"safety": 1.2}, "safety"),
        ({"max_multiplier": 0.5}, "max_multiplier"),
        ({"max_change": 1.0}, "max_change"),
        ({"smoothing": 1.0}, "smoothing"),
        ({"layers": "blocks"}, "layers"),
        ({"layers": {"net.0": ""}}, "layers"),
        ({"coupled": 1}, "coupled"),
        ({"probe": "random"}, "probe"),
        ({"probe_size": 0}, "probe_size"),
        ({"probe_batch_size": -1}, "probe_batch_size"),
        ({"probe_mode": "test"}, "probe_mode"),
        ({"tol": -1.0}, "tol"),
        ({"max_iter": 1}, "max_iter"),
        ({"warm_start": "yes"}, "warm_start"),
        ({"twin": "always"}, "twin"),
        ({"twin_threshold": 0.0}, "twin_threshold"),
        ({"twin_cut": 1.0}, "twin_cut"),
        ({"freeze_after": 0}, "freeze_after"),
        ({"freeze_after": 1.5}, "freeze_after"),
        ({"check_weight_decay": 1}, "check_weight_decay"),
        ({"optimizer_idx": -1}, "optimizer_idx"),
        ({"log_prefix": "local_lr/"}, "log_prefix"),
        ({"loss_fn": 3}, "loss_fn"),
        ({"seed": 0.5}, "seed"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=rf"AdaptiveLocalLR: {name}=.*accepted values"):
        AdaptiveLocalLR(**kwargs)


def test_unsupported_setups_fail_at_fit_start_with_the_reason() -> None:
    with pytest.raises(bounds.UnsupportedOptimizerError, match="LBFGS: it runs a line search"):
        quiet_fit(
            make_trainer(max_steps=1, callbacks=[AdaptiveLocalLR()]), Tiny(optimizer="lbfgs"), tiny_data()
        )
    with pytest.raises(ValueError, match=r"optimizer_idx=1 is not supported.*accepted values: 0\.\.0"):
        quiet_fit(
            make_trainer(max_steps=1, callbacks=[AdaptiveLocalLR(optimizer_idx=1)]), Tiny(), tiny_data()
        )
    with pytest.raises(ValueError, match="twin=True needs a TwinDivergence"):
        quiet_fit(make_trainer(max_steps=1, callbacks=[AdaptiveLocalLR(twin=True)]), Tiny(), tiny_data())


# --------------------------------------------------------------------------------------- the bound


def _dense_hessian(module: Tiny, batch: Any) -> torch.Tensor:
    """The exact float64 Hessian of ``module.loss(batch)`` over all parameters, in parameter order."""
    names = [n for n, _ in module.named_parameters()]
    shapes = [p.shape for p in module.parameters()]
    sizes = [p.numel() for p in module.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in module.parameters()])

    return torch.autograd.functional.hessian(
        lambda f: _call_loss(module, names, shapes, sizes, f, batch), flat0
    )


def _call_loss(
    module: Tiny, names: list[str], shapes: list[torch.Size], sizes: list[int], flat: torch.Tensor, batch: Any
) -> torch.Tensor:
    x, y = batch
    tensors = {n[len("net.") :]: c.view(s) for n, c, s in zip(names, flat.split(sizes), shapes)}
    out = torch.func.functional_call(module.net, tensors, (x,))
    return 0.5 * (out - y).pow(2).sum(dim=1).mean()


class AppliedLRChecker(pl.Callback):
    """Dense float64 Hessian blocks at every step start; the LR each layer really applied from the
    parameter update after the step (plain SGD: Δp = −η_l·g exactly)."""

    def __init__(self, controller_cb: AdaptiveLocalLR, safety: float) -> None:
        self.cb = controller_cb
        self.safety = safety
        self.rows: list[dict[str, Any]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._before = _params(pl_module)
        self._H = _dense_hessian(pl_module, batch)
        self._refreshed = self.cb._refreshed_this_step is not None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        lr = float(trainer.optimizers[0].param_groups[0]["lr"])
        start, row = 0, {"refresh": self._refreshed, "layers": {}}
        d_parts = []
        for name, module in (("net.0", pl_module.net[0]), ("net.3", pl_module.net[3])):
            ps = list(module.parameters())
            n = sum(p.numel() for p in ps)
            idx = [i for i, q in enumerate(pl_module.parameters()) if any(q is p for p in ps)]
            delta = torch.cat(
                [(list(pl_module.parameters())[i].detach() - self._before[i]).reshape(-1) for i in idx]
            )
            grad = torch.cat([p.grad.reshape(-1) for p in ps])
            eta = float(delta.norm() / grad.norm())
            torch.testing.assert_close(delta, -eta * grad, rtol=1e-10, atol=1e-14)  # a true per-layer LR
            block = self._H[start : start + n, start : start + n]
            lam = float(torch.linalg.eigvalsh(block)[-1])
            row["layers"][name] = {"eta": eta, "eta_star": 2.0 / lam, "multiplier": eta / lr}
            d_parts.append(torch.full((n,), eta / 2.0, dtype=DT))
            start += n
        d = torch.cat(d_parts).sqrt()
        row["coupled"] = float(torch.linalg.eigvalsh(d[:, None] * self._H * d[None, :])[-1])
        self.rows.append(row)


@pytest.mark.parametrize("tol", [1e-2, 1e-6])  # the default and a tight solve
def test_applied_lr_stays_below_safety_times_the_dense_bound(tol: float) -> None:
    safety = 0.8
    cb = AdaptiveLocalLR(every_n_steps=2, safety=safety, tol=tol)
    checker = AppliedLRChecker(cb, safety)
    quiet_fit(make_trainer(max_steps=8, callbacks=[cb, checker]), Tiny(lr=3.0), tiny_data())
    refreshes = [r for r in checker.rows if r["refresh"]]
    assert len(refreshes) == len(cb.history) >= 4
    capped = 0
    for row in refreshes:
        for name, v in row["layers"].items():
            assert v["eta"] <= safety * v["eta_star"] * (1 + 1e-5), (name, v)
            capped += v["multiplier"] < 0.99
        assert row["coupled"] <= safety * (1 + COUPLED_DEADBAND) + 1e-6  # the coupled system too
    assert capped >= 4  # the caps were active: the test is not vacuous
    # the recorded multiplier is the one measured from the update; the recorded bound is the dense
    # one at the first refresh and never above it later (smoothing only delays a rising bound)
    for i, (rec, row) in enumerate(zip(cb.history, refreshes)):
        for name, v in row["layers"].items():
            assert rec.multiplier[name] == pytest.approx(v["multiplier"], rel=1e-8)
            assert rec.bound[name] <= v["eta_star"] * (1 + 1e-6)
            if i == 0:
                assert rec.bound[name] == pytest.approx(v["eta_star"], rel=2 * tol)


# --------------------------------------------------------------------------------------- non-interference


def test_multipliers_of_one_give_a_bitwise_identical_run() -> None:
    def run(with_cb: bool) -> tuple[Tiny, AdaptiveLocalLR | None]:
        cb = AdaptiveLocalLR(every_n_steps=2, adaptive_interval=False) if with_cb else None
        model = Tiny(lr=0.01, momentum=0.9, dropout=0.3, seed=1)
        quiet_fit(make_trainer(max_steps=6, callbacks=[cb] if cb else []), model, tiny_data(batch_size=16))
        return model, cb

    base, _ = run(False)
    model, cb = run(True)
    assert cb is not None and len(cb.history) == 3
    assert all(v == 1.0 for rec in cb.history for v in rec.multiplier.values())
    assert cb.controller is not None and cb.controller.scaler.steps == 6
    for a, b in zip(base.parameters(), model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("schedule", ["lambda", "step", "onecycle", "plateau"])
def test_schedulers_and_lr_monitor_see_the_users_lrs(schedule: str) -> None:
    def run(with_cb: bool) -> tuple[LRRecorder, MemoryLogger, AdaptiveLocalLR | None]:
        rec, logger = LRRecorder(), MemoryLogger()
        cb = AdaptiveLocalLR(every_n_steps=3) if with_cb else None
        callbacks: list[pl.Callback] = [rec, LearningRateMonitor()] + ([cb] if cb else [])
        quiet_fit(
            make_trainer(max_steps=8, callbacks=callbacks, logger=logger, log_every_n_steps=1),
            Tiny(lr=3.0, schedule=schedule),
            tiny_data(batch_size=16),
        )
        return rec, logger, cb

    base, base_log, _ = run(False)
    rec, log, cb = run(True)
    assert cb is not None and min(r.min_multiplier for r in cb.history) < 0.9  # the controller acted
    assert rec.lrs == base.lrs and len(rec.lrs) == 8
    key = "lr-SGD"
    assert [v for _, v in log.series(key)] == [v for _, v in base_log.series(key)] and log.series(key)
    # and the effective LR logged is multiplier x the user's LR
    effective = dict(log.series("local_lr/effective_lr/net.0"))
    multiplier = dict(log.series("local_lr/multiplier/net.0"))
    for step, lr in base_log.series(key):
        if step in effective:
            assert effective[step] == pytest.approx(multiplier[step] * lr, rel=1e-12)


def _resume_setup(
    tmp_path: Path, with_cb: bool, max_steps: int, ckpt: str | None = None, adaptive: bool = False
) -> tuple[Tiny, LRRecorder, AdaptiveLocalLR | None]:
    cb = AdaptiveLocalLR(every_n_steps=2, adaptive_interval=adaptive) if with_cb else None
    rec = LRRecorder()
    save = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1, filename="{step}")
    model = Tiny(lr=3.0, momentum=0.5, schedule="step")
    callbacks: list[pl.Callback] = [rec, save] + ([cb] if cb else [])
    trainer = make_trainer(max_steps=max_steps, callbacks=callbacks, enable_checkpointing=True)
    # full batch: one batch per epoch, so a resumed epoch starts at the same batch (Lightning restarts
    # a plain DataLoader's epoch on resume)
    quiet_fit(trainer, model, tiny_data(), ckpt_path=ckpt)
    return model, rec, cb


def test_exact_resume_with_the_callback(tmp_path: Path) -> None:
    full, full_lrs, full_cb = _resume_setup(tmp_path / "a", True, 7, adaptive=True)
    ckpt = str(tmp_path / "a" / "step=3.ckpt")
    state = torch.load(ckpt, weights_only=True)  # plain tensors and primitives only
    assert any(k.startswith("AdaptiveLocalLR") for k in state["callbacks"])
    resumed, lrs, cb = _resume_setup(tmp_path / "b", True, 7, ckpt=ckpt, adaptive=True)
    assert cb is not None and full_cb is not None
    assert cb.history == full_cb.history and min(r.min_multiplier for r in cb.history) < 1.0
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert lrs.lrs == full_lrs.lrs[3:]


def test_checkpoint_with_the_callback_resumes_without_it_and_vice_versa(tmp_path: Path) -> None:
    _, base_lrs, _ = _resume_setup(tmp_path / "base", False, 7)
    _resume_setup(tmp_path / "a", True, 4)
    ckpt = torch.load(tmp_path / "a" / "step=3.ckpt", weights_only=True)
    plain = torch.load(tmp_path / "base" / "step=3.ckpt", weights_only=True)
    # the optimizer's param groups in the checkpoint are the user's (same LRs, same keys)
    strip = [
        {k: v for k, v in g.items() if k != "params"} for g in ckpt["optimizer_states"][0]["param_groups"]
    ]
    assert strip == [
        {k: v for k, v in g.items() if k != "params"} for g in plain["optimizer_states"][0]["param_groups"]
    ]
    assert ckpt["lr_schedulers"] == plain["lr_schedulers"]
    _, lrs, _ = _resume_setup(tmp_path / "b", False, 7, ckpt=str(tmp_path / "a" / "step=3.ckpt"))
    assert lrs.lrs == base_lrs.lrs[3:]  # the user's schedule continues
    _, lrs, cb = _resume_setup(tmp_path / "c", True, 7, ckpt=str(tmp_path / "base" / "step=3.ckpt"))
    assert cb is not None and [r.step for r in cb.history] == [3, 5]  # a fresh controller
    assert lrs.lrs == base_lrs.lrs[3:]


# --------------------------------------------------------------------------------------- behaviour


class Losses(pl.Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.values.append(float(outputs["loss"]))


def test_a_divergent_base_lr_trains_to_a_low_loss_with_the_controller() -> None:
    lr, steps = 4.0, 40  # constant GD at lr 4 diverges to NaN on digits (theory.md: already at lr 2)
    plain, rescued = Losses(), Losses()
    quiet_fit(
        make_trainer(max_steps=steps, callbacks=[plain]), DigitsMLP(lr=lr), DigitsDataModule(n_samples=200)
    )
    cb = AdaptiveLocalLR(every_n_steps=5)
    quiet_fit(
        make_trainer(max_steps=steps, callbacks=[cb, rescued]),
        DigitsMLP(lr=lr),
        DigitsDataModule(n_samples=200),
    )
    assert not math.isfinite(plain.values[-1]) or plain.values[-1] > plain.values[0]
    assert rescued.values[-1] < 0.15 < rescued.values[0]  # from 0.62
    assert all(r.coupled_ratio <= 0.8 * (1 + COUPLED_DEADBAND) for r in cb.history)


class TwoHeads(pl.LightningModule):
    """Two independent linear regressions (block-diagonal Hessian); head ``a`` sees inputs x10, so
    its curvature is 100x head ``b``'s: one layer unstable at an LR the other tolerates."""

    def __init__(self, lr: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(3, 1).double()
        self.b = nn.Linear(3, 1).double()
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return (
            0.5 * ((self.a(10.0 * x[:, :3]) - y[:, :1]) ** 2).mean()
            + 0.5 * ((self.b(x[:, 3:6]) - y[:, 1:2]) ** 2).mean()
        )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def test_one_unstable_layer_only_its_multiplier_drops() -> None:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 6, generator=gen, dtype=DT), torch.randn(64, 2, generator=gen, dtype=DT)
    data = DataLoader(TensorDataset(x, y), batch_size=64)
    plain, controlled = Losses(), Losses()
    quiet_fit(make_trainer(max_steps=30, callbacks=[plain]), TwoHeads(lr=0.1), data)
    cb = AdaptiveLocalLR(every_n_steps=5)
    quiet_fit(make_trainer(max_steps=30, callbacks=[cb, controlled]), TwoHeads(lr=0.1), data)
    assert plain.values[-1] > 10 * plain.values[0]  # head a diverges at lr 0.1
    for rec in cb.history:
        assert rec.multiplier["b"] == 1.0 and rec.scale == 1.0
        assert (
            rec.multiplier["a"] == pytest.approx(0.8 * rec.bound["a"] / 0.1, rel=1e-9)
            and rec.multiplier["a"] < 0.2
        )
    assert controlled.values[-1] < controlled.values[0]


def test_adam_is_controlled_through_its_preconditioned_blocks() -> None:
    cb = AdaptiveLocalLR(every_n_steps=2)
    quiet_fit(make_trainer(max_steps=5, callbacks=[cb]), Tiny(lr=0.5, optimizer="adam"), tiny_data())
    # no optimizer state before the first step: the first refresh is at step 1
    assert [r.step for r in cb.history][:2] == [1, 2] and all(r.preconditioned for r in cb.history)
    assert all(0 < v <= 1 for r in cb.history for v in r.multiplier.values())


def test_global_ablation_and_parameter_layers() -> None:
    for layers, names in (
        ("global", [GLOBAL_LAYER]),
        ("parameter", ["net.0.weight", "net.0.bias", "net.3.weight", "net.3.bias"]),
    ):
        cb = AdaptiveLocalLR(every_n_steps=2, layers=layers)  # type: ignore[arg-type]
        quiet_fit(make_trainer(max_steps=3, callbacks=[cb]), Tiny(lr=3.0), tiny_data())
        assert list(cb.history[0].multiplier) == names


def test_fixed_and_adaptive_refresh_intervals() -> None:
    fixed = AdaptiveLocalLR(every_n_steps=3, adaptive_interval=False)
    quiet_fit(make_trainer(max_steps=8, callbacks=[fixed]), Tiny(lr=3.0), tiny_data())
    assert [r.step for r in fixed.history] == [0, 3, 6]
    adaptive = AdaptiveLocalLR(every_n_steps=4)
    quiet_fit(make_trainer(max_steps=12, callbacks=[adaptive]), Tiny(lr=3.0), tiny_data())
    steps = [r.step for r in adaptive.history]
    gaps = [b - a for a, b in itertools.pairwise(steps)]
    assert steps[:2] == [0, 1] and max(gaps) <= 4  # starts at 1 step, never beyond every_n_steps
    assert adaptive.state_dict()["schedule"]["next_step"] > steps[-1]


def test_freeze_after_stops_refreshing_and_keeps_the_multipliers() -> None:
    """The static ablation: two refreshes (steps 0 and 1), then the same multipliers every step."""
    cb = AdaptiveLocalLR(every_n_steps=1, freeze_after=2)
    seen: list[dict[str, float]] = []

    class Watch(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            assert cb.controller is not None
            seen.append(dict(cb.controller.scaler.last))

    quiet_fit(make_trainer(max_steps=8, callbacks=[cb, Watch()]), Tiny(lr=3.0), tiny_data())
    assert [r.step for r in cb.history] == [0, 1]
    assert cb.controller is not None and cb.controller.frozen
    assert min(seen[1].values()) < 1.0  # lr 3 is capped ...
    assert all(s == seen[1] for s in seen[1:])  # ... by the same multipliers from step 1 on


def test_gradient_accumulation_refreshes_and_scales_once_per_optimizer_step() -> None:
    cb = AdaptiveLocalLR(every_n_steps=1)
    quiet_fit(
        make_trainer(max_steps=3, accumulate_grad_batches=2, callbacks=[cb]),
        Tiny(lr=3.0),
        tiny_data(batch_size=8),
    )
    assert [r.step for r in cb.history] == [0, 1, 2]
    assert cb.controller is not None and cb.controller.scaler.steps == 3


def test_budget_schedule_and_fixed_probe() -> None:
    cb = AdaptiveLocalLR(every_n_steps=None, budget=0.5, probe="fixed", probe_size=20)
    quiet_fit(make_trainer(max_steps=12, callbacks=[cb]), Tiny(lr=3.0), tiny_data())
    assert cb.history[0].step == 0 and len(cb.history) >= 2
    state = cb.state_dict()
    assert state["budget"]["measurements"] == len(cb.history) and state["probe_indices"].numel() == 20


def test_logged_keys_and_custom_scalars() -> None:
    logger = MemoryLogger()
    cb = AdaptiveLocalLR(every_n_steps=2, adaptive_interval=False)
    trainer = make_trainer(max_steps=3, callbacks=[cb], logger=logger, log_every_n_steps=1)
    quiet_fit(trainer, Tiny(lr=3.0), tiny_data())
    keys = logger.keys()
    for layer in ("net.0", "net.3"):
        for kind in ("multiplier", "effective_lr", "bound", "curvature"):
            assert f"local_lr/{kind}/{layer}" in keys
    for key in (
        "local_lr/coupled_ratio",
        "local_lr/coupled_ratio_raw",
        "local_lr/min_multiplier",
        "local_lr/hvps",
    ):
        assert key in keys
    assert [s for s, _ in logger.series("local_lr/bound/net.0")] == [0, 2]
    assert [s for s, _ in logger.series("local_lr/multiplier/net.0")] == [0, 1, 2]
    layout = trainer._lightning_eos_custom_scalars  # type: ignore[attr-defined]
    assert "local_lr: local learning rates" in layout
    assert layout["local_lr: local learning rates"]["effective lr vs bound"][1] == [
        r"^local_lr/effective_lr/.*",
        r"^local_lr/bound/.*",
    ]


class StubTwin(TwinDivergence):
    """A TwinDivergence whose latest record says: layer ``net.0`` amplifies, ``net.3`` is flat."""

    @property
    def history(self) -> list[TwinRecord]:  # type: ignore[override]
        return [TwinRecord(step=0, global_step=0, layer_growth_rate={"net.0": 0.2, "net.3": 0.0})]

    def on_fit_start(self, *args: Any, **kwargs: Any) -> None:
        return None

    def on_train_start(self, *args: Any, **kwargs: Any) -> None:
        return None

    def on_train_batch_start(self, *args: Any, **kwargs: Any) -> None:
        return None

    def on_before_optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        return None

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}


def test_twin_signal_cuts_the_amplifying_layer_once_per_record() -> None:
    cb = AdaptiveLocalLR(every_n_steps=2, twin=True, twin_cut=0.5)
    quiet_fit(make_trainer(max_steps=5, callbacks=[StubTwin(), cb]), Tiny(lr=0.01), tiny_data())
    assert [r.twin for r in cb.history] == [{"net.0": 0.5, "net.3": 1.0}] * 3  # same record: cut once
    assert all(r.multiplier == {"net.0": 0.5, "net.3": 1.0} for r in cb.history)
    with pytest.raises(ValueError, match="same layer naming"):
        quiet_fit(
            make_trainer(max_steps=1, callbacks=[StubTwin(), AdaptiveLocalLR(twin=True, layers="global")]),
            Tiny(),
            tiny_data(),
        )


# --------------------------------------------------------------------------------------- DDP


class DumpMultipliers(pl.Callback):
    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        (cb,) = [c for c in trainer.callbacks if isinstance(c, AdaptiveLocalLR)]  # type: ignore[attr-defined]
        out = {
            "world": trainer.world_size,
            "history": [r.to_dict() for r in cb.history],
            "applied": cb.controller.last_plan.multiplier,
        }  # type: ignore[union-attr]
        Path(self.directory, f"rank{trainer.global_rank}.json").write_text(json.dumps(out))


def _ddp_fit(directory: str, batch_size: int, **trainer_kw: Any) -> None:
    cb = AdaptiveLocalLR(every_n_steps=2)
    trainer = make_trainer(max_steps=4, callbacks=[cb, DumpMultipliers(directory)], **trainer_kw)
    quiet_fit(trainer, Tiny(lr=3.0), tiny_data(n=32, batch_size=batch_size))


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_every_rank_applies_the_same_multipliers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    (tmp_path / "ddp").mkdir()
    (tmp_path / "one").mkdir()
    fit_ddp_spawn(
        lambda: _ddp_fit(str(tmp_path / "ddp"), 16, strategy="ddp_spawn", devices=2),
        *(tmp_path / "ddp" / f"rank{r}.json" for r in (0, 1)),
    )
    ranks = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == 2
    assert ranks[0]["history"] == ranks[1]["history"] and len(ranks[0]["history"]) >= 2
    assert ranks[0]["applied"] == ranks[1]["applied"]
    assert min(ranks[0]["history"][0]["multiplier"].values()) < 1.0
    # the all-reduced Hessian is that of the global batch: the first refresh (same initial weights,
    # two rank batches of 16 = one batch of all 32 samples in one process) matches a single process
    _ddp_fit(str(tmp_path / "one"), 32)
    one = json.loads((tmp_path / "one" / "rank0.json").read_text())
    for name, value in one["history"][0]["multiplier"].items():
        assert ranks[0]["history"][0]["multiplier"][name] == pytest.approx(value, rel=1e-6)


# --------------------------------------------------------------------------------------- other setups


class Maximizing(Tiny):
    """Returns −loss and asks SGD(maximize=True): the same descent as Tiny, from the other side."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return -self.loss(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, maximize=True)


class Manual(Tiny):
    """Manual optimization doing what automatic optimization does."""

    def __init__(self, lr: float) -> None:
        super().__init__(lr=lr)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        opt.zero_grad()  # type: ignore[union-attr]
        self.manual_backward(self.loss(batch))
        opt.step()  # type: ignore[union-attr]


@pytest.mark.parametrize("variant", [Maximizing, Manual])
def test_maximize_and_manual_optimization_control_the_same_descent(variant: type) -> None:
    runs = []
    for cls in (Tiny, variant):
        cb = AdaptiveLocalLR(every_n_steps=2)
        model = cls(lr=3.0)
        quiet_fit(make_trainer(max_steps=4, callbacks=[cb]), model, tiny_data())
        runs.append((model, cb))
    (base, base_cb), (other, other_cb) = runs
    assert min(r.min_multiplier for r in base_cb.history) < 0.9
    assert [r.multiplier for r in other_cb.history] == [r.multiplier for r in base_cb.history]
    for a, b in zip(base.parameters(), other.parameters()):
        assert torch.equal(a, b)


def test_weight_decay_window_warning_through_the_callback() -> None:
    alpha = 1e-3

    class Decayed(Tiny):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=self.lr, weight_decay=alpha)

    cb = AdaptiveLocalLR(every_n_steps=1, check_weight_decay=True, tol=1e-6)
    with pytest.warns(RuntimeWarning, match="outside its stable window") as caught:
        make_trainer(max_steps=3, callbacks=[cb]).fit(Decayed(lr=0.1), tiny_data())
    warned = [
        name
        for w in caught
        if "outside its stable window" in str(w.message)
        for name in ("net.0", "net.3")
        if f"'{name}'" in str(w.message)
    ]
    # too little decay for the negative curvature of a block (λ_min < −α): warned once per such layer
    below = {name for r in cb.history for name, lo in r.lambda_min.items() if lo < -alpha}
    assert below and sorted(warned) == sorted(below)
    with pytest.raises(ValueError, match="check_weight_decay=True is not supported for Adam"):
        quiet_fit(
            make_trainer(max_steps=1, callbacks=[AdaptiveLocalLR(check_weight_decay=True)]),
            Tiny(optimizer="adam"),
            tiny_data(),
        )


@pytest.mark.parametrize("order", ["controller_first", "twin_first"])
def test_an_unperturbed_twin_follows_the_controlled_steps_exactly(order: str) -> None:
    # The twin's optimizer is its own copy: it must apply the multipliers the real step applied.
    cb = AdaptiveLocalLR(every_n_steps=5, twin=False)
    twin = TwinDivergence(perturbation="none", every_n_steps=1, validation=False)
    callbacks = [cb, twin] if order == "controller_first" else [twin, cb]
    quiet_fit(
        make_trainer(max_steps=12, callbacks=callbacks), DigitsMLP(lr=4.0), DigitsDataModule(n_samples=200)
    )
    assert cb.controller is not None and cb.controller.history
    assert min(cb.controller.scaler.last.values()) < 1.0  # the controller really scaled the steps
    assert len(twin.history) == 13 and all(r.divergence == 0.0 for r in twin.history)
