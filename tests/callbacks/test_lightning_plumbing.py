"""Shared Lightning plumbing: replica training steps, applied hyper-parameters, strategy checks."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.demos.boring_classes import BoringModel

from lightning_eos.callbacks._lightning import (
    OptimizerStepTracker,
    StepReplica,
    check_supported_strategy,
    extract_loss,
    group_hparams,
)
from tests.callbacks._helpers import MemoryLogger, make_trainer


class CountingModel(BoringModel):
    """Logs and carries a counter in training_step: the replica must do neither to the real one."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        self.calls += 1
        out = super().training_step(batch, batch_idx)
        self.log("loss_seen", out["loss"])
        return out


def test_replica_loss_equals_real_loss_and_leaves_module_alone() -> None:
    model = CountingModel()
    trainer = make_trainer(max_steps=1)
    replica = StepReplica(model, trainer, share_parameters=True)
    batch = torch.randn(4, 32)
    loss = replica.training_loss(batch)
    assert torch.equal(loss, model.loss(model(batch)))
    assert model.calls == 0 and replica.module.calls == 1
    (grad,) = torch.autograd.grad(loss, [model.layer.weight])  # derivative w.r.t. the real weights
    assert grad.shape == model.layer.weight.shape


class ManualModel(BoringModel):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        opt = self.optimizers()
        # As Lightning's ManualOptimBoringModel does: user code that type-checks what it is given.
        assert isinstance(opt, (torch.optim.Optimizer, LightningOptimizer))
        assert isinstance(self.optimizers(use_pl_optimizer=False), torch.optim.Optimizer)
        loss = self.loss(self(batch))
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return loss


def test_manual_optimization_replica_captures_loss_without_stepping() -> None:
    model = ManualModel()
    trainer = make_trainer(max_steps=1)
    trainer.fit(model)
    weights = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    replica = StepReplica(model, trainer, share_parameters=True)
    batch = torch.randn(4, 32)
    loss = replica.training_loss(batch)
    assert torch.allclose(loss, model.loss(model(batch)))
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    # The stand-in's zero_grad and step reached neither the real gradients nor the real weights.
    assert all(p.grad is not None and bool((p.grad == 1).all()) for p in model.parameters())
    with pytest.raises(ValueError, match="optimizer_idx=1"):
        StepReplica(model, trainer, share_parameters=True, optimizer_idx=1).training_loss(batch)


def test_extract_loss_rejects_outputs_without_a_loss() -> None:
    t = torch.tensor(1.0)
    assert extract_loss({"loss": t}) is t
    with pytest.raises(ValueError, match="loss_fn"):
        extract_loss(None)


class Tracker(pl.Callback):
    def __init__(self) -> None:
        self.tracker = OptimizerStepTracker()
        self.applied_lrs: list[float] = []
        self.live_lrs: list[float] = []
        self.stepped: list[bool] = []

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        self.tracker.on_train_batch_start(trainer)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        self.tracker.on_before_optimizer_step(trainer, optimizer)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.stepped.append(self.tracker.stepped(trainer))
        if self.stepped[-1]:
            self.applied_lrs.append(self.tracker.applied[0][0]["lr"])
            self.live_lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


class StepScheduled(BoringModel):
    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_tracker_reads_applied_lr_and_real_steps_under_accumulation() -> None:
    cb = Tracker()
    make_trainer(max_steps=3, accumulate_grad_batches=2, callbacks=[cb]).fit(StepScheduled())
    assert cb.stepped[:6] == [False, True] * 3
    assert cb.applied_lrs == pytest.approx([0.1, 0.05, 0.025])
    assert cb.live_lrs == pytest.approx([0.05, 0.025, 0.0125])  # already the next step's


def test_group_hparams_is_plain() -> None:
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=torch.tensor(0.01))
    (snap,) = group_hparams(opt)
    assert "params" not in snap and isinstance(snap["lr"], float)


def test_sharded_strategies_are_refused() -> None:
    class FSDPStrategy:  # stands in for Lightning's by name, like any subclass of it would
        pass

    class Fake:
        strategy = FSDPStrategy()

    with pytest.raises(RuntimeError, match="FSDPStrategy"):
        check_supported_strategy(Fake(), "SharpnessMonitor")  # type: ignore[arg-type]
    check_supported_strategy(make_trainer(max_steps=1), "SharpnessMonitor")


class ExperimentWriter(BoringModel):
    """Writes to the logger's experiment and to the trainer from training_step."""

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        self.logger.experiment.add_scalar("written_by_step", 1.0, batch_idx)
        self.logger.log_metrics({"direct": 1.0}, step=batch_idx)
        self.trainer.should_stop = True
        return super().training_step(batch, batch_idx)


def test_replica_cannot_reach_the_real_logger_or_change_the_trainer() -> None:
    logger = MemoryLogger()
    trainer = make_trainer(max_steps=1, logger=logger)
    model = ExperimentWriter()
    replica = StepReplica(model, trainer, share_parameters=True)
    replica.training_loss(torch.randn(4, 32))
    assert logger.logged == [] and trainer.should_stop is False
    assert replica.module.trainer.global_step == trainer.global_step  # reads still reach the trainer
