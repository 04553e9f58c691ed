"""TwinDivergence through a real Trainer: lockstep exactness, non-interference, resume, NaN, DDP."""

from __future__ import annotations

import json
import math
import os
import random
import traceback
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import BaseFinetuning
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.demos.lstm import LightningLSTM, SequenceSampler, SimpleLSTM
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_eos
from lightning_eos.callbacks.twin import TwinDivergence
from lightning_eos.demos import DigitsDataModule, DigitsMLP
from lightning_eos.records import TwinRecord
from tests.callbacks._helpers import MemoryLogger, fit_ddp_spawn, fp16_mixed, free_port, make_trainer


class Net(pl.LightningModule):
    """Linear–BatchNorm–tanh–Dropout–Linear, cross-entropy, Adam + a step-interval StepLR."""

    def __init__(self, dropout: float = 0.3, shuffle: bool = False, lr: float = 0.05) -> None:
        super().__init__()
        state = torch.get_rng_state()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 3)
        )
        g = torch.Generator().manual_seed(1)
        self.data = TensorDataset(torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g))
        torch.set_rng_state(state)
        self.shuffle, self.lr = shuffle, lr
        self.poison_at: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        if getattr(self, "poison", False):  # set on the twin only, by a test callback
            self.poison = False
            loss = loss * math.nan
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("val_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=4, shuffle=self.shuffle)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=16)


def test_none_perturbation_is_exactly_zero_every_step() -> None:
    model = Net(dropout=0.3)
    twin = TwinDivergence(perturbation="none", every_n_steps=1, layers="parameter")
    trainer = make_trainer(
        validation=True, max_epochs=2, accumulate_grad_batches=2, gradient_clip_val=0.5, callbacks=[twin]
    )
    trainer.fit(model)
    assert twin.engine is not None and twin.engine.steps == 8
    assert len(twin.history) == 9  # step 0 + every step
    for rec in twin.history:
        assert rec.divergence == 0.0 and all(v == 0.0 for v in rec.layers.values())
    for (n, a), b in zip(model.state_dict().items(), twin.engine.twin.state_dict().values()):
        assert torch.equal(a, b), n  # weights and BatchNorm statistics
    real_state = trainer.optimizers[0].state_dict()["state"]
    twin_state = twin.engine.optimizer.state_dict()["state"]
    for i in real_state:
        for key in real_state[i]:
            assert torch.equal(real_state[i][key], twin_state[i][key])
    s = twin.summary()
    assert s["deterministic"] is True
    assert s["validation"]["twin/val_disagreement"] == 0.0 and s["validation"]["twin/val_loss_gap"] == 0.0


@pytest.mark.parametrize("k", [1.0, 3.0])
def test_rescale_through_trainer(k: float) -> None:
    twin = TwinDivergence(perturbation="rescale", rescale_k=k, every_n_steps=1, validation=False)
    make_trainer(max_epochs=1, accumulate_grad_batches=2, callbacks=[twin]).fit(Net(dropout=0.3))
    gaps = [r.divergence for r in twin.history]
    assert gaps[0] == 0.0  # identical start
    if k == 1.0:
        assert all(g == 0.0 for g in gaps)  # k = 1 is the plain step, bit for bit
    else:
        # One step from identical weights and gradients: only the roundings of (k·lr)·(u/k) differ.
        # (Later steps may amplify them a lot: Adam turns the round-off-level gradient of the
        # bias in front of BatchNorm into ±lr steps.)
        assert 0.0 < gaps[1] < 1e-7


def _fit_state(
    callbacks: list[pl.Callback], **kw: Any
) -> tuple[dict[str, torch.Tensor], dict[str, Any], torch.Tensor]:
    pl.seed_everything(0, verbose=False)
    model = Net(dropout=0.3, shuffle=True)
    trainer = make_trainer(
        validation=True,
        max_epochs=2,
        accumulate_grad_batches=2,
        gradient_clip_val=0.5,
        callbacks=callbacks,
        **kw,
    )
    trainer.fit(model)
    return model.state_dict(), trainer.optimizers[0].state_dict(), torch.get_rng_state()


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "fp16-mixed"])
def test_real_run_is_bitwise_unaffected(amp: bool) -> None:
    kw: dict[str, Any] = {"plugins": [fp16_mixed(init_scale=2.0**22, growth_interval=3)]} if amp else {}
    weights_a, opt_a, rng_a = _fit_state([], **kw)
    twin = TwinDivergence(every_n_steps=2)
    if amp:
        kw = {"plugins": [fp16_mixed(init_scale=2.0**22, growth_interval=3)]}  # a fresh scaler
    weights_b, opt_b, rng_b = _fit_state([twin], **kw)
    for k in weights_a:
        assert torch.equal(weights_a[k], weights_b[k]), k
    for i, st in opt_a["state"].items():
        for key, value in st.items():
            assert torch.equal(value, opt_b["state"][i][key])
    assert opt_a["param_groups"] == opt_b["param_groups"]
    assert torch.equal(rng_a, rng_b)
    assert twin.history[-1].divergence > 0  # the twin did run, perturbed


def test_resume_continues_the_twin_trajectory_bitwise(tmp_path: Path) -> None:
    full = TwinDivergence(every_n_steps=2, layers="parameter")
    model = Net(dropout=0.0)
    make_trainer(validation=True, max_epochs=2, callbacks=[full]).fit(model)

    first = TwinDivergence(every_n_steps=2, layers="parameter")
    trainer = make_trainer(validation=True, max_epochs=1, callbacks=[first])
    trainer.fit(Net(dropout=0.0))
    ckpt = tmp_path / "half.ckpt"
    trainer.save_checkpoint(ckpt)
    torch.load(ckpt, weights_only=True)  # plain tensors and primitives only

    resumed = TwinDivergence(every_n_steps=2, layers="parameter")
    make_trainer(validation=True, max_epochs=2, callbacks=[resumed]).fit(Net(dropout=0.0), ckpt_path=ckpt)
    assert full.engine is not None and resumed.engine is not None
    assert resumed.engine.steps == full.engine.steps == 16
    for a, b in zip(full.engine.twin.state_dict().values(), resumed.engine.twin.state_dict().values()):
        assert torch.equal(a, b)
    assert resumed.history == full.history  # every field of every record (NaN equals NaN)


class ScaleSpy(pl.Callback):
    """Records the real GradScaler's scale after every batch."""

    def __init__(self) -> None:
        self.scales: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.scales.append(trainer.precision_plugin.scaler.get_scale())  # type: ignore[attr-defined]


def test_fp16_mixed_none_is_exactly_zero_with_the_twins_own_scaler() -> None:
    # init_scale 2^22 overflows the fp16 backward at first: the real scaler skips steps and backs
    # off, growth_interval=3 makes it grow again. The twin's own scaler must take the same decisions.
    plugin = fp16_mixed(init_scale=2.0**22, growth_interval=3)
    model, spy = Net(dropout=0.3), ScaleSpy()
    twin = TwinDivergence(perturbation="none", every_n_steps=1, layers="parameter")
    trainer = make_trainer(
        validation=True,
        max_epochs=2,
        accumulate_grad_batches=2,
        gradient_clip_val=0.5,
        plugins=[plugin],
        callbacks=[twin, spy],
    )
    trainer.fit(model)
    assert plugin.scaler is not None and twin.engine is not None
    scaler = twin.engine.scaler
    assert scaler is not None and scaler is not plugin.scaler
    assert min(spy.scales) < 2.0**22 and spy.scales[-1] > min(spy.scales)  # backed off, grew again
    assert scaler.state_dict() == plugin.scaler.state_dict()
    assert len(twin.history) == 9
    assert all(r.divergence == 0.0 and all(v == 0.0 for v in r.layers.values()) for r in twin.history)
    for (n, a), b in zip(model.state_dict().items(), twin.engine.twin.state_dict().values()):
        assert torch.equal(a, b), n
    real_state = trainer.optimizers[0].state_dict()["state"]
    twin_state = twin.engine.optimizer.state_dict()["state"]  # type: ignore[union-attr]
    for i in real_state:
        for key in real_state[i]:
            assert torch.equal(real_state[i][key], twin_state[i][key])
    assert twin.summary()["deterministic"] is True


class SkippingNet(Net):
    """Returns None from training_step on every third batch (Lightning then makes no update)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        loss = super().training_step(batch, batch_idx)
        return None if batch_idx % 3 == 2 else loss


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "fp16-mixed"])
def test_none_stays_zero_when_training_step_returns_none(amp: bool) -> None:
    model = SkippingNet(dropout=0.3)
    twin = TwinDivergence(perturbation="none", every_n_steps=1, validation=False)
    kw: dict[str, Any] = {"plugins": [fp16_mixed(init_scale=2.0**22, growth_interval=3)]} if amp else {}
    make_trainer(max_epochs=1, gradient_clip_val=0.5, callbacks=[twin], **kw).fit(model)
    assert twin.engine is not None and twin.engine.steps == 8
    assert all(r.divergence == 0.0 for r in twin.history)
    for a, b in zip(model.state_dict().values(), twin.engine.twin.state_dict().values()):
        assert torch.equal(a, b)


class TensorLrNet(Net):
    """Adam with ``lr`` given as a tensor (the step scheduler then fills it in place)."""

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=torch.tensor(self.lr))
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_none_stays_zero_with_a_tensor_learning_rate() -> None:
    # Tensor lr arithmetic in Adam rounds differently from a Python float: the twin must keep the
    # tensor (filled with the applied value), not be handed a float, or "none" reports a false
    # non-determinism as soon as the scheduler moves the LR.
    model = TensorLrNet(dropout=0.3)
    twin = TwinDivergence(perturbation="none", every_n_steps=1, validation=False)
    make_trainer(max_epochs=1, callbacks=[twin]).fit(model)
    assert twin.engine is not None and twin.engine.steps == 8
    assert all(r.divergence == 0.0 for r in twin.history)
    assert twin.summary()["deterministic"] is True
    assert isinstance(twin.engine.optimizer.param_groups[0]["lr"], torch.Tensor)


class DictBatchNet(Net):
    """Batches are dicts (``{"x": ..., "y": ...}``): the default predict_fn's ``module(batch[0])`` fails."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return super().training_step((batch["x"], batch["y"]), batch_idx)

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return super().validation_step((batch["x"], batch["y"]), batch_idx)

    def train_dataloader(self) -> DataLoader:
        x, y = self.data.tensors
        return DataLoader([{"x": a, "y": b} for a, b in zip(x, y)], batch_size=4)

    def val_dataloader(self) -> DataLoader:
        x, y = self.data.tensors
        return DataLoader([{"x": a, "y": b} for a, b in zip(x, y)], batch_size=16)


def test_default_predict_fn_that_does_not_fit_the_batch_warns_and_training_continues() -> None:
    model = DictBatchNet(dropout=0.3)
    twin = TwinDivergence(every_n_steps=2)
    trainer = make_trainer(validation=True, max_epochs=2, callbacks=[twin])
    with pytest.warns(UserWarning, match="predict_fn"):
        trainer.fit(model)
    assert trainer.global_step == 16 and twin.engine is not None and twin.engine.steps == 16
    assert len(twin.validation_history) == 2
    for rec in twin.validation_history:
        assert "twin/val_disagreement" not in rec and rec["twin/val_loss_gap"] >= 0.0


def test_callback_reused_for_a_second_fit_measures_the_new_model() -> None:
    twin = TwinDivergence(perturbation="none", every_n_steps=4)
    make_trainer(validation=True, max_epochs=1, callbacks=[twin]).fit(Net(dropout=0.0, lr=0.05))
    make_trainer(validation=True, max_epochs=1, callbacks=[twin]).fit(Net(dropout=0.0, lr=0.2))
    # An unperturbed twin of the *second* model: its validation loss equals the real one exactly.
    assert len(twin.validation_history) == 1  # the second twin's validations only, like its history
    assert twin.validation_history[-1]["twin/val_loss_gap"] == 0.0


def test_two_twins_in_one_run_keep_separate_checkpoint_state(tmp_path: Path) -> None:
    ulp = TwinDivergence(every_n_steps=2)
    none = TwinDivergence(perturbation="none", every_n_steps=2, log_prefix="determinism")
    logger = MemoryLogger()
    trainer = make_trainer(max_epochs=1, callbacks=[ulp, none], logger=logger)
    trainer.fit(Net(dropout=0.3))
    assert ulp.history[-1].divergence > 0 and none.history[-1].divergence == 0.0
    # Each twin logs under its own prefix: neither overwrites the other's curve.
    assert all(v > 0 for _, v in logger.series("twin/divergence"))
    assert [v for _, v in logger.series("determinism/divergence")] == [0.0] * 4
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    saved = torch.load(tmp_path / "two.ckpt", weights_only=True)["callbacks"]
    assert {k: v["engine"]["steps"] for k, v in saved.items()} == {ulp.state_key: 8, none.state_key: 8}


class UnfreezeFirstLayer(BaseFinetuning):
    """Lightning's fine-tuning pattern: frozen at the start, unfrozen (a new param group) at epoch 1."""

    def freeze_before_training(self, pl_module: pl.LightningModule) -> None:
        self.freeze(pl_module.net[0])

    def finetune_function(self, pl_module: pl.LightningModule, epoch: int, optimizer: Any) -> None:
        if epoch == 1:
            self.unfreeze_and_add_param_group(pl_module.net[0], optimizer, lr=0.01)


class FrozenStartNet(Net):
    def configure_optimizers(self) -> Any:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.05, momentum=0.9)


def test_none_stays_zero_when_a_finetuning_callback_unfreezes_a_layer() -> None:
    model = FrozenStartNet(dropout=0.3)
    twin = TwinDivergence(perturbation="none", every_n_steps=1, validation=False)
    make_trainer(max_epochs=2, callbacks=[UnfreezeFirstLayer(), twin]).fit(model)
    assert twin.engine is not None and len(twin.engine.optimizer.param_groups) == 2
    assert all(r.divergence == 0.0 for r in twin.history)
    for a, b in zip(model.state_dict().values(), twin.engine.twin.state_dict().values()):
        assert torch.equal(a, b)


def test_fp16_mixed_ulp_runs_and_logs() -> None:
    logger = MemoryLogger()
    twin = TwinDivergence(every_n_steps=2, validation=False)
    make_trainer(max_epochs=2, plugins=[fp16_mixed()], logger=logger, callbacks=[twin]).fit(Net(dropout=0.3))
    gaps = [v for _, v in logger.series("twin/divergence")]
    assert len(gaps) == 8 and all(0.0 < g < 1.0 for g in gaps)  # perturbed, finite (Adam amplifies)
    assert twin.engine is not None and twin.engine.scaler is not None and not twin.engine.frozen


def test_fp16_mixed_resume_continues_bitwise(tmp_path: Path) -> None:
    def amp() -> list[Any]:
        return [fp16_mixed(init_scale=2.0**22, growth_interval=3)]

    full, full_model = TwinDivergence(every_n_steps=2, validation=False), Net(dropout=0.0)
    make_trainer(max_epochs=2, plugins=amp(), callbacks=[full]).fit(full_model)
    first = TwinDivergence(every_n_steps=2, validation=False)
    trainer = make_trainer(max_epochs=1, plugins=amp(), callbacks=[first])
    trainer.fit(Net(dropout=0.0))
    ckpt = tmp_path / "half.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)["callbacks"]
    (state,) = [v for k, v in saved.items() if "TwinDivergence" in k]
    assert state["engine"]["scaler"]["scale"] < 2.0**22  # the twin scaler's own, backed-off state
    resumed, resumed_model = TwinDivergence(every_n_steps=2, validation=False), Net(dropout=0.0)
    make_trainer(max_epochs=2, plugins=amp(), callbacks=[resumed]).fit(resumed_model, ckpt_path=ckpt)
    for a, b in zip(full_model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)  # the real run resumes bitwise (its scaler is in the checkpoint)
    assert full.engine is not None and resumed.engine is not None
    assert full.engine.scaler is not None and resumed.engine.scaler is not None
    assert resumed.engine.scaler.state_dict() == full.engine.scaler.state_dict()
    for a, b in zip(full.engine.twin.state_dict().values(), resumed.engine.twin.state_dict().values()):
        assert torch.equal(a, b)
    assert [r.divergence for r in full.history] == [r.divergence for r in resumed.history]


class HostReadCounter(TwinDivergence):
    """Counts tensor-to-host reads (``item``, ``bool``, ``float``, ``tolist``...) made while the
    callback handles a training batch, by the file that issued them (on CUDA each is a sync)."""

    READS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist")

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.reads: list[tuple[bool, list[str]]] = []  # (logged at this batch, callers)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        callers: list[str] = []
        originals = {name: getattr(torch.Tensor, name) for name in self.READS}

        def counting(name: str) -> Any:
            def read(tensor: torch.Tensor, *a: Any, **k: Any) -> Any:
                callers.append(traceback.extract_stack(limit=2)[0].filename)
                return originals[name](tensor, *a, **k)

            return read

        steps = self.engine.steps if self.engine is not None else 0
        try:
            for name in self.READS:
                setattr(torch.Tensor, name, counting(name))
            super().on_train_batch_end(trainer, *args)
        finally:
            for name, fn in originals.items():
                setattr(torch.Tensor, name, fn)
        assert self.engine is not None
        logged = self.engine.steps != steps and self.engine.steps % self.every_n_steps == 0
        self.reads.append((logged, callers))


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "fp16-mixed"])
def test_no_host_reads_on_steps_that_do_not_log(amp: bool) -> None:
    counter = HostReadCounter(every_n_steps=4, d_metric=True, validation=False)
    kw: dict[str, Any] = {"plugins": [fp16_mixed()]} if amp else {}
    make_trainer(
        max_epochs=1, accumulate_grad_batches=2, gradient_clip_val=0.5, callbacks=[counter], **kw
    ).fit(Net(dropout=0.3))
    quiet = [callers for logged, callers in counter.reads if not logged]
    assert len(quiet) == 7 and len(counter.reads) == 8
    package = os.path.dirname(lightning_eos.__file__)
    for callers in quiet:
        assert not [c for c in callers if package in c]  # nothing from lightning_eos itself
        # What remains is torch's own: Adam's CPU step counters (never a device sync) and, under
        # fp16-mixed, the twin GradScaler's found-inf check (one per step, as the real scaler's).
        scaler_reads = [c for c in callers if c.endswith("grad_scaler.py")]
        assert all(c.endswith(("optim/optimizer.py", "grad_scaler.py")) for c in callers)
        assert len(scaler_reads) <= (1 if amp else 0)
    assert any(package in c for _, callers in counter.reads if _ for c in callers)  # logging reads


class Poisoner(pl.Callback):
    """Makes the twin's loss NaN once, at a chosen global step."""

    def __init__(self, twin: TwinDivergence, at: int) -> None:
        self.twin, self.at = twin, at

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.at:
            assert self.twin.engine is not None
            self.twin.engine.twin.poison = True


@pytest.mark.parametrize("resync", [False, True])
def test_nonfinite_twin_is_reported_once_and_real_run_untouched(resync: bool) -> None:
    twin = TwinDivergence(every_n_steps=2, resync_on_nonfinite=resync, validation=False)
    logger = MemoryLogger()
    pl.seed_everything(0, verbose=False)
    model = Net(dropout=0.3)
    with pytest.warns(UserWarning, match="non-finite"):
        make_trainer(
            validation=True, max_epochs=2, callbacks=[Poisoner(twin, at=3), twin], logger=logger
        ).fit(model)
    pl.seed_everything(0, verbose=False)
    reference = Net(dropout=0.3)
    make_trainer(validation=True, max_epochs=2).fit(reference)
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)
    flagged = [step for step, m in logger.logged if "twin/nonfinite" in m]
    assert len(flagged) == 1
    assert twin.engine is not None and twin.engine.nonfinite_step == (None if resync else 4)
    assert twin.engine.frozen is (not resync)
    if resync:
        assert twin.engine.resyncs == 1 and math.isfinite(twin.history[-1].divergence)
        assert twin.engine.steps == 16
    else:
        assert twin.engine.steps == 4  # frozen: no more twin steps


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"perturbation": "bits"}, "perturbation"),
        ({"fraction": 0.0}, "fraction"),
        ({"fraction": 1.5}, "fraction"),
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"window": 1}, "window"),
        ({"layers": "block"}, "layers"),
        ({"threshold": 0.0}, "threshold"),
        ({"params": []}, "params"),
        ({"rescale_k": 0.0}, "rescale_k"),
        ({"event_decades": -1.0}, "event_decades"),
        ({"predict_fn": 3}, "predict_fn"),
        ({"params": "layer"}, "params"),
        ({"threshold": math.inf}, "threshold"),
        ({"single_weight": 1}, "single_weight"),
        ({"validation": "no"}, "validation"),
        ({"seed": 1.5}, "seed"),
        ({"log_prefix": "twin/"}, "log_prefix"),
    ],
)
def test_bad_arguments_are_rejected(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=f"{name}=.*accepted"):
        TwinDivergence(**kwargs)


def test_argument_errors_name_the_callback_the_argument_and_the_accepted_values() -> None:
    with pytest.raises(
        ValueError, match=r"^TwinDivergence: window=1 is not supported; accepted values: an int >= 2\.$"
    ):
        TwinDivergence(window=1)
    with pytest.raises(
        ValueError, match=r"^TwinDivergence: layers='block' .* 'module', 'parameter', 'none'\.$"
    ):
        TwinDivergence(layers="block")


class RpropModel(BoringModel):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Rprop(self.parameters())


class ManualModel(BoringModel):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        opt = self.optimizers()
        loss = self.step(batch)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return loss


def test_unsupported_setups_fail_at_setup() -> None:
    with pytest.raises(ValueError, match=r"rescale.*Rprop"):
        make_trainer(max_steps=1, callbacks=[TwinDivergence(perturbation="rescale")]).fit(RpropModel())
    with pytest.raises(RuntimeError, match="automatic optimization"):
        make_trainer(max_steps=1, callbacks=[TwinDivergence()]).fit(ManualModel())


def test_boring_model_logs_documented_keys() -> None:
    logger = MemoryLogger()
    twin = TwinDivergence(every_n_steps=2, layers="parameter", d_metric=True)
    trainer = make_trainer(
        validation=True,
        max_epochs=1,
        limit_train_batches=6,
        limit_val_batches=3,
        logger=logger,
        callbacks=[twin],
    )
    trainer.fit(BoringModel())
    keys = logger.keys()
    for key in (
        "twin/divergence",
        "twin/divergence/layer.weight",
        "twin/divergence/layer.bias",
        "twin/d_metric",
        "twin/growth_rate",
        "twin/amplification",
        "twin/restrained_instability",
        "twin/val_disagreement",
    ):
        assert key in keys, key
    assert "twin/val_loss_gap" not in keys  # BoringModel's validation_step returns no loss
    assert "twin/divergence" in trainer.callback_metrics
    assert len(twin.history) == 4
    # What was logged is each record's scalars, at its log step (the step-0 record, made in
    # on_fit_start, is kept but not logged); the checkpoint holds the same records.
    logged = [(step, m) for step, m in logger.logged if "twin/divergence" in m]
    assert logged == [(r.log_step, r.scalars()) for r in twin.history[1:]]
    assert [r.log_step for r in twin.history] == [0, 1, 3, 5]
    saved = twin.state_dict()["engine"]["history"]
    assert [TwinRecord.from_dict(d) for d in saved] == twin.history


@pytest.mark.slow
def test_digits_below_vs_at_edge_of_stability() -> None:
    result = {}
    for lr in (0.05, 0.4):
        twin = TwinDivergence(every_n_steps=25, validation=False)
        make_trainer(validation=True, max_steps=250, limit_val_batches=0, callbacks=[twin]).fit(
            DigitsMLP(lr=lr), DigitsDataModule()
        )
        result[lr] = twin.summary()
    below, at = result[0.05], result[0.4]
    assert below["amplification_decades"] < 0.4 and below["first_step_above_threshold"] == -1
    assert at["amplification_decades"] > 3.0 and 100 <= at["first_step_above_threshold"] <= 250
    assert at["divergence"] > 1e-4


class Regression(pl.LightningModule):
    """L = ½·mean_i (x_iᵀ(w − w*))², started at w = w*: the real model stays put, the twin's gap
    follows e ← (I − ηH)e with H = mean x xᵀ over the *global* batch, so it grows like ρ^t with
    ρ = max|1 − ηλ(H)| = 1.5. Full batch of 64; under DDP rank r gets samples 32r..32r+31, and the
    halves are scaled differently so that the rank-local ρ are 0.89 and 3.6: a twin stepping on
    rank-local (or summed) gradients would grow at a visibly different rate."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        x = torch.randn(64, 8, generator=g)
        x[:32] *= 0.5
        x[32:] *= 1.2
        self.x = x
        self.register_buffer("w_star", 1.0 + torch.rand(8, generator=g))
        self.w = nn.Parameter(self.w_star.clone())

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x,) = batch
        return 0.5 * (x @ (self.w - self.w_star)).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=2.5 / 1.7043583)

    def train_dataloader(self) -> DataLoader:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        n = len(self.x) // world
        return DataLoader(TensorDataset(self.x[rank * n : (rank + 1) * n]), batch_size=n)


class DumpingTwin(TwinDivergence):
    """Writes its history from rank 0 (ddp_spawn does not bring callback state back)."""

    def __init__(self, out: str, **kw: Any) -> None:
        super().__init__(**kw)
        self.out = out

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            Path(self.out).write_text(json.dumps([[r.divergence, r.growth_rate] for r in self.history]))


@pytest.mark.ddp
def test_ddp_gap_equals_single_process_gap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    single = DumpingTwin(str(tmp_path / "single.json"), every_n_steps=5)
    make_trainer(max_steps=30, callbacks=[single]).fit(Regression())
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    out = tmp_path / "ddp.json"
    ddp = DumpingTwin(str(out), every_n_steps=5)
    trainer = make_trainer(
        max_steps=30, devices=2, strategy="ddp_spawn", use_distributed_sampler=False, callbacks=[ddp]
    )
    fit_ddp_spawn(lambda: trainer.fit(Regression()), out)
    single_rec = json.loads((tmp_path / "single.json").read_text())
    ddp_rec = json.loads(out.read_text())
    assert len(ddp_rec) == len(single_rec) == 7
    # Same global batches and all-reduced (mean) twin gradients: the same linear gap dynamics. A twin
    # stepping on rank-local gradients would follow a rank-local H (another ρ), a summed gradient 2H.
    (gap_s, rate_s), (gap_d, rate_d) = single_rec[-1], ddp_rec[-1]
    assert gap_s > 1e-4 and gap_d > 1e-4  # it did grow from round-off (~6e-8)
    assert abs(math.log10(gap_s / gap_d)) < 0.05
    assert rate_d == pytest.approx(rate_s, rel=0.02)
    assert rate_s == pytest.approx(math.log(1.5), rel=0.1)  # still converging to log ρ at step 30
    assert os.environ["MASTER_PORT"]


def test_lightning_cli_configures_the_callback() -> None:
    pytest.importorskip("jsonargparse")
    from lightning.pytorch.cli import LightningCLI

    args = [
        "--trainer.callbacks+=lightning_eos.callbacks.TwinDivergence",
        "--trainer.callbacks.every_n_steps=5",
        "--trainer.callbacks.perturbation=rescale",
        "--trainer.callbacks.params=[layer]",
        "--trainer.logger=false",
    ]
    cli = LightningCLI(BoringModel, run=False, args=args)
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, TwinDivergence)]
    assert (cb.every_n_steps, cb.perturbation, cb.params) == (5, "rescale", ["layer"])


class RankBranches(pl.LightningModule):
    """Rank 0 trains only ``a``, rank 1 only ``b``; ``unused`` is never used on any rank. Under DDP
    with ``find_unused_parameters=True`` every parameter lacks a gradient on some rank."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(2)
        self.a = nn.Linear(4, 1)
        self.b = nn.Linear(4, 1)
        self.unused = nn.Linear(4, 1)
        self.x = torch.randn(16, 4, generator=g)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (x,) = batch
        branch = self.a if self.trainer.global_rank == 0 else self.b
        return branch(x).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x), batch_size=8)


@pytest.mark.ddp
def test_ddp_lockstep_with_unused_parameters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ "none" stays exactly 0 when ranks use different parameters: the twin's all-reduce mirrors
    DDP's (zeros for a rank's missing gradients; no gradient where no rank produced one)."""
    from lightning.pytorch.strategies import DDPStrategy

    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    out = tmp_path / "ddp.json"
    twin = DumpingTwin(str(out), perturbation="none", every_n_steps=1, validation=False)
    strategy = DDPStrategy(start_method="spawn", find_unused_parameters=True)
    trainer = make_trainer(max_steps=6, devices=2, strategy=strategy, callbacks=[twin])
    fit_ddp_spawn(lambda: trainer.fit(RankBranches()), out)
    gaps = [gap for gap, _ in json.loads(out.read_text())]
    assert len(gaps) == 7 and all(gap == 0.0 for gap in gaps)


class HostNoise(Net):
    """Input noise drawn from numpy's and Python's global generators inside ``training_step``."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        noise = np.random.standard_normal(x.shape).astype("float32") * random.random()  # noqa: NPY002
        return nn.functional.cross_entropy(self(x + torch.from_numpy(noise)), y)


def test_none_stays_zero_with_numpy_and_python_random_in_training_step() -> None:
    twin = TwinDivergence(perturbation="none", every_n_steps=1, validation=False)
    np.random.seed(0)  # noqa: NPY002
    random.seed(0)
    make_trainer(max_epochs=2, callbacks=[twin]).fit(HostNoise(dropout=0.3))
    assert len(twin.history) == 17 and all(r.divergence == 0.0 for r in twin.history)


# ----------------------------------------------------------------- the module's own hooks, on the twin
TRAIN_HOOKS = (
    "on_fit_start",
    "on_train_start",
    "on_train_epoch_start",
    "on_train_batch_start",
    "on_before_zero_grad",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_train_batch_end",
    "on_train_epoch_end",
    "on_train_end",
)
VAL_HOOKS = (
    "on_validation_start",
    "on_validation_epoch_start",
    "on_validation_batch_start",
    "on_validation_batch_end",
    "on_validation_epoch_end",
    "on_validation_end",
)
# A distinct affine update per hook: a missed, extra or reordered hook call changes ``carry``.
_HOOK_BUMP = {name: float(i + 1) for i, name in enumerate((*TRAIN_HOOKS, *VAL_HOOKS))}


class HookCarrier(pl.LightningModule):
    """Carries a number that every hook advances and the training loss depends on, and logs each
    hook call (with what it was given) in ``calls``.

    A hook the twin's replica does not receive (or receives out of order) changes its ``carry``: the
    unperturbed twin's loss, and so its weights, then leave the real ones; after the last step it
    shows as another final ``carry``.
    """

    def __init__(self) -> None:
        super().__init__()
        state = torch.get_rng_state()
        torch.manual_seed(0)
        self.layer = nn.Linear(4, 1)
        g = torch.Generator().manual_seed(1)
        self.data = TensorDataset(torch.randn(16, 4, generator=g), torch.randn(16, 1, generator=g))
        torch.set_rng_state(state)
        self.carry = 0.0
        self.calls: list[tuple[Any, ...]] = []

    def _hook(self, name: str, *detail: Any) -> None:
        # global_step: the replica's hooks run when the real run has stepped; they must see the step
        # the real module's hook saw.
        self.calls.append((name, self.global_step, *detail))
        self.carry = 0.5 * self.carry + _HOOK_BUMP[name] + 1e-3 * self.global_step

    def _owns(self, optimizer: torch.optim.Optimizer) -> bool:
        return optimizer.param_groups[0]["params"][0] is self.layer.weight  # its own optimizer

    def _grad(self) -> float:
        grad = self.layer.weight.grad
        return math.nan if grad is None else float(grad.norm())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        self.calls.append(("training_step", self.global_step, batch_idx))
        x, y = batch
        loss = nn.functional.mse_loss(self.layer(x), y) * (1.0 + 0.01 * self.carry)
        return {"loss": loss, "carry": self.carry}

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.calls.append(("validation_step", batch_idx))
        x, y = batch
        return nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=4)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=8)

    # the hooks
    def on_fit_start(self) -> None:
        self._hook("on_fit_start")

    def on_train_start(self) -> None:
        self._hook("on_train_start")

    def on_train_epoch_start(self) -> None:
        self._hook("on_train_epoch_start")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._hook("on_train_batch_start", batch_idx)

    def on_before_zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        self._hook("on_before_zero_grad", self._owns(optimizer))

    def on_before_backward(self, loss: torch.Tensor) -> None:
        self._hook("on_before_backward", float(loss.detach()))

    def on_after_backward(self) -> None:
        self._hook("on_after_backward", self._grad())

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self._hook("on_before_optimizer_step", self._owns(optimizer), self._grad())  # unclipped

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._hook("on_train_batch_end", batch_idx, sorted(outputs), float(outputs["loss"]), outputs["carry"])

    def on_train_epoch_end(self) -> None:
        self._hook("on_train_epoch_end")

    def on_train_end(self) -> None:
        self._hook("on_train_end")

    def on_validation_start(self) -> None:
        self._hook("on_validation_start")

    def on_validation_epoch_start(self) -> None:
        self._hook("on_validation_epoch_start")

    def on_validation_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._hook("on_validation_batch_start", batch_idx)

    def on_validation_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._hook("on_validation_batch_end", batch_idx, float(outputs))

    def on_validation_epoch_end(self) -> None:
        self._hook("on_validation_epoch_end")

    def on_validation_end(self) -> None:
        self._hook("on_validation_end")


def _fit_hook_carrier() -> tuple[HookCarrier, TwinDivergence]:
    model = HookCarrier()
    twin = TwinDivergence(perturbation="none", every_n_steps=1, layers="none")
    make_trainer(
        validation=True,
        num_sanity_val_steps=0,  # the twin runs no validation in the sanity check
        limit_val_batches=1,
        max_epochs=2,
        accumulate_grad_batches=2,
        gradient_clip_val=0.01,
        callbacks=[twin],
    ).fit(model)
    return model, twin


def test_replica_receives_the_modules_training_hooks_so_carried_state_stays_in_lockstep() -> None:
    model, twin = _fit_hook_carrier()
    assert twin.engine is not None and twin.engine.steps == 4
    replica = twin.engine.twin
    assert isinstance(replica, HookCarrier) and replica is not model
    assert [r.divergence for r in twin.history] == [0.0] * 5  # step 0, then every step
    assert replica.carry == model.carry  # bitwise: every hook, in the same order, also after the last step
    received = {call[0] for call in replica.calls}
    assert received >= {*TRAIN_HOOKS, *VAL_HOOKS}  # each hook reached the replica ...
    for name in (*TRAIN_HOOKS, *VAL_HOOKS):  # ... as often as the real module
        assert [c for c in replica.calls if c[0] == name] == [c for c in model.calls if c[0] == name], name


def test_replica_receives_the_hooks_in_the_real_modules_order_with_its_own_optimizer_and_outputs() -> None:
    model, twin = _fit_hook_carrier()
    assert twin.engine is not None
    replica = twin.engine.twin
    assert replica.calls == model.calls
    steps = [c for c in replica.calls if c[0] == "on_before_optimizer_step"]
    # stepping batches only, with the twin's optimizer, before clipping (gradient_clip_val=0.01)
    assert [(step, owns) for _, step, owns, _ in steps] == [(0, True), (1, True), (2, True), (3, True)]
    assert all(norm > 0.01 for _, _, _, norm in steps)
    zero_grads = [c for c in replica.calls if c[0] == "on_before_zero_grad"]
    assert len(zero_grads) == 4 and all(owns for _, _, owns in zero_grads)  # first micro-batch of a step
    ends = [c for c in replica.calls if c[0] == "on_train_batch_end"]
    assert [step for _, step, *_ in ends] == [0, 1, 1, 2, 2, 3, 3, 4]  # after the step, as Lightning's
    assert all(keys == ["carry", "loss"] for _, _, _, keys, _, _ in ends)
    # The order of one accumulated step, as Lightning calls the real module's hooks:
    first = [c[0] for c in replica.calls[3:13]]
    assert first == [
        "on_train_batch_start",
        "training_step",
        "on_before_zero_grad",
        "on_before_backward",
        "on_after_backward",
        "on_train_batch_end",
        "on_train_batch_start",
        "training_step",
        "on_before_backward",
        "on_after_backward",
    ]
    assert replica.calls[13][0] == "on_before_optimizer_step"


@pytest.mark.parametrize("missed", (*TRAIN_HOOKS, *VAL_HOOKS))
def test_a_hook_the_replica_misses_shows_as_a_lost_lockstep(
    missed: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check above can fail: without any one of the hooks the twin leaves the real module."""
    from lightning_eos.callbacks._lightning import StepReplica

    call_hook = StepReplica.call_hook

    def skipping(self: StepReplica, name: str, *args: Any, **kwargs: Any) -> Any:
        return None if name == missed else call_hook(self, name, *args, **kwargs)

    monkeypatch.setattr(StepReplica, "call_hook", skipping)
    model, twin = _fit_hook_carrier()
    assert twin.engine is not None
    lost = twin.engine.twin.carry != model.carry or any(r.divergence != 0.0 for r in twin.history)
    assert lost


class SelfSchedulingNet(HookCarrier):
    """Its hooks edit and step its own optimizer and scheduler through ``self.optimizers()`` and
    ``self.lr_schedulers()`` (both not idempotent): done by the replica on the real ones, the real
    run would change."""

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        # Lightning would step it only every 100 epochs: the module steps it itself at epoch end.
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch", "frequency": 100}}

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        for group in self.optimizers().param_groups:
            group["momentum"] *= 0.9

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        self.lr_schedulers().step()


def test_replica_hooks_edit_and_step_the_twins_optimizer_never_the_real_one() -> None:
    def run(callbacks: list[pl.Callback]) -> tuple[SelfSchedulingNet, pl.Trainer]:
        model = SelfSchedulingNet()
        trainer = make_trainer(max_epochs=2, callbacks=callbacks)
        trainer.fit(model)
        return model, trainer

    plain, plain_trainer = run([])
    twin = TwinDivergence(perturbation="none", every_n_steps=1, validation=False)
    watched, trainer = run([twin])
    for a, b in zip(plain.parameters(), watched.parameters()):
        assert torch.equal(a, b)
    (group,) = trainer.optimizers[0].param_groups
    assert group == plain_trainer.optimizers[0].param_groups[0] | {"params": group["params"]}
    assert group["lr"] == 0.05 * 0.5**2 and group["momentum"] == pytest.approx(0.9 * 0.9**8)
    assert twin.engine is not None and all(r.divergence == 0.0 for r in twin.history)
    assert twin.engine.twin.carry == watched.carry


class TinyLSTM(LightningLSTM):
    """Lightning's demo LSTM language model (it carries ``self.hidden`` from step to step and resets
    it in its own ``on_train_epoch_end``), small, on random tokens through its ``SequenceSampler``."""

    def __init__(self) -> None:
        super().__init__(vocab_size=50)
        state = torch.get_rng_state()
        torch.manual_seed(0)
        self.model = SimpleLSTM(vocab_size=50, ninp=16, nhid=16, nlayers=2)
        tokens = torch.randint(0, 50, (16, 9), generator=torch.Generator().manual_seed(1))
        torch.set_rng_state(state)
        self.tokens = TensorDataset(tokens[:, :-1], tokens[:, 1:])

    def prepare_data(self) -> None:  # the demo downloads WikiText-2 here
        return None

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.tokens, batch_sampler=SequenceSampler(self.tokens, batch_size=4))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1.0)


def test_demo_lstm_unperturbed_twin_stays_exact_across_the_epoch_boundary() -> None:
    pl.seed_everything(0, verbose=False)
    model = TinyLSTM()
    twin = TwinDivergence(perturbation="none", every_n_steps=1, validation=False)
    trainer = make_trainer(max_epochs=2, callbacks=[twin])
    trainer.fit(model)
    assert trainer.global_step == 8 and trainer.current_epoch == 2
    assert [r.step for r in twin.history] == list(range(9))
    assert [(r.step, r.divergence) for r in twin.history if r.divergence != 0.0] == []
    assert all(v == 0.0 for r in twin.history for v in r.layers.values())
    assert model.hidden is None and twin.engine is not None and twin.engine.twin.hidden is None
    for a, b in zip(model.parameters(), twin.engine.twin.parameters()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------- one layer definition
class TiedRootLM(pl.LightningModule):
    """An embedding tied to the output head (``head.weight is emb.weight``) and a logit offset owned by
    the root module (12 entries: the monitor skips blocks of dimension <= k)."""

    def __init__(self) -> None:
        super().__init__()
        state = torch.get_rng_state()
        torch.manual_seed(0)
        self.emb = nn.Embedding(12, 8)
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 12, bias=False)
        self.head.weight = self.emb.weight
        self.offset = nn.Parameter(torch.zeros(12))
        tokens = torch.randint(0, 12, (32, 2), generator=torch.Generator().manual_seed(1))
        torch.set_rng_state(state)
        self.tokens = TensorDataset(tokens[:, 0], tokens[:, 1])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.head(torch.tanh(self.body(self.emb(x)))) + self.offset, y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.tokens, batch_size=8)


def test_twin_and_sharpness_monitor_name_the_same_layers_tied_once_root_as_root() -> None:
    from lightning_eos.callbacks import SharpnessMonitor
    from lightning_eos.layers import ROOT_LAYER, layer_of_parameters

    logger = MemoryLogger()
    monitor = SharpnessMonitor(
        every_n_steps=4, probe="current", per_layer=True, max_iter=10, tol=1e-2, batch_sharpness=False
    )
    twin = TwinDivergence(every_n_steps=2, validation=False)
    model = TiedRootLM()
    make_trainer(max_epochs=1, callbacks=[monitor, twin], logger=logger).fit(model)
    keys = logger.keys()
    sharpness = {k.removeprefix("eos/sharpness/") for k in keys if k.startswith("eos/sharpness/")}
    divergence = {k.removeprefix("twin/divergence/") for k in keys if k.startswith("twin/divergence/")}
    assert divergence == sharpness == {ROOT_LAYER, "emb", "body"}  # no "head": its weight is emb's
    assert list(twin.history[-1].layers) == list(dict.fromkeys(layer_of_parameters(model).values()))
