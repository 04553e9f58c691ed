"""With SharpnessMonitor and StabilityMonitor attached, the run is bitwise the run without them.

Compared: weights, optimizer state, BatchNorm statistics, the dropout RNG stream (the global generator
state after training) and the training metrics the module logs. Deterministic CPU runs, several
epochs, dropout + BatchNorm, gradient accumulation, momentum and a step scheduler; then Lightning's
own demo module, bf16-mixed, fp16-mixed with a GradScaler and manual optimization.
"""

from __future__ import annotations

import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.demos.transformer import LightningTransformer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_eos.callbacks import SharpnessMonitor, StabilityMonitor, TwinDivergence
from lightning_eos.demos.digits import load_digits_tensors
from tests.callbacks._helpers import MemoryLogger, fp16_mixed, make_trainer, quiet_fit


class DropoutBatchNormNet(pl.LightningModule):
    """Linear-BN-ReLU-Dropout-Linear on digits; carries a step counter it uses in its loss."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 10)
        )
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        self.calls = 0  # carried state: a replica must not advance it

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.calls += 1
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        self.log("calls", float(self.calls), on_step=True)
        return loss

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.7)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self) -> DataLoader:
        x, y = load_digits_tensors(256)
        # shuffle draws from the global generator too: part of the stream that must not move
        return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)


def _run(
    model: pl.LightningModule | type[pl.LightningModule], callbacks: list[pl.Callback], **kw: Any
) -> dict[str, Any]:
    """Train (a class is instantiated after seeding: its initialization draws from the stream)."""
    pl.seed_everything(123, verbose=False)
    if isinstance(model, type):
        model = model()
    logger = MemoryLogger()
    trainer = make_trainer(callbacks=callbacks, logger=logger, log_every_n_steps=1, deterministic=True, **kw)
    quiet_fit(trainer, model)
    opt = trainer.optimizers[0]
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},  # weights + BN buffers
        "optimizer": opt.state_dict(),
        "rng": torch.get_rng_state(),
        "next_random": torch.rand(4),  # the stream continues identically
        "metrics": [(s, m) for s, m in (_without_ours(s, m) for s, m in logger.logged) if m],
        "global_step": trainer.global_step,
        "scaler": scaler.state_dict()
        if (scaler := getattr(trainer.precision_plugin, "scaler", None))
        else None,
    }


def _without_ours(step: int | None, metrics: dict[str, float]) -> tuple[int | None, dict[str, float]]:
    return step, {k: v for k, v in metrics.items() if not k.startswith(("eos/", "twin/"))}


def _assert_identical(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["global_step"] == b["global_step"]
    assert a["state"].keys() == b["state"].keys()
    for key in a["state"]:
        assert torch.equal(a["state"][key], b["state"][key]), key
    sa, sb = a["optimizer"], b["optimizer"]
    assert sa["param_groups"] == sb["param_groups"]
    for idx in sa["state"]:
        for name, value in sa["state"][idx].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(sb["state"][idx][name])), (idx, name)
    assert torch.equal(a["rng"], b["rng"]) and torch.equal(a["next_random"], b["next_random"])
    assert a["metrics"] == b["metrics"]
    assert a["scaler"] == b["scaler"]  # fp16-mixed: the real GradScaler took the same decisions


def _monitors(**kw: Any) -> list[pl.Callback]:
    return [
        SharpnessMonitor(
            every_n_steps=1, probe_size=64, probe_batch_size=32, which="both", per_layer=True, **kw
        ),
        StabilityMonitor(every_n_steps=1, per_layer=True),
    ]


def test_bitwise_identical_with_dropout_batchnorm_accumulation() -> None:
    kw = {"max_epochs": 3, "accumulate_grad_batches": 2}
    plain_model, watched_model = DropoutBatchNormNet(), DropoutBatchNormNet()
    plain = _run(plain_model, [], **kw)
    monitors = _monitors()
    watched = _run(watched_model, monitors, **kw)
    _assert_identical(plain, watched)
    assert len(plain["metrics"]) == 15  # every optimizer step (12) and every epoch end (3)
    assert plain_model.calls == watched_model.calls == 24  # replicas never advanced the real counter
    assert len(monitors[0].history) == 12 and all(r.finite for r in monitors[0].history)
    assert monitors[0].history[0].layers.keys() == {"net.0", "net.1", "net.4"}  # BN has a block too


class NumpyAugmented(torch.utils.data.Dataset):
    """Digits with noise drawn from numpy's and Python's global generators (no worker processes)."""

    def __init__(self) -> None:
        self.x, self.y = load_digits_tensors(128)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        noise = np.random.normal(scale=0.1, size=self.x.shape[1]) * random.random()  # noqa: NPY002
        return self.x[i] + torch.as_tensor(noise, dtype=self.x.dtype), self.y[i]


class NumpyAugmentedNet(DropoutBatchNormNet):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(NumpyAugmented(), batch_size=32, shuffle=True)


def test_fixed_probe_does_not_consume_numpy_or_python_random_draws() -> None:
    # Reading the fixed probe runs the dataset's __getitem__ in the main process: augmentations
    # drawing from numpy / random must see the same stream as in a run without the monitor.
    kw = {"max_epochs": 2}
    plain = _run(NumpyAugmentedNet(), [], **kw)
    plain_np = np.random.random()  # noqa: NPY002
    watched = _run(NumpyAugmentedNet(), [SharpnessMonitor(every_n_steps=4, probe_size=32)], **kw)
    assert np.random.random() == plain_np  # noqa: NPY002
    _assert_identical(plain, watched)


def test_bitwise_identical_with_current_probe_and_eval_mode() -> None:
    kw = {"max_epochs": 2, "accumulate_grad_batches": 2}
    plain = _run(DropoutBatchNormNet(), [], **kw)
    watched = _run(
        DropoutBatchNormNet(), [SharpnessMonitor(every_n_steps=2, probe="current", mode="eval")], **kw
    )
    _assert_identical(plain, watched)


def test_bitwise_identical_on_lightnings_boring_model() -> None:
    kw = {"max_steps": 6, "limit_train_batches": 3}
    plain = _run(BoringModel, [], **kw)
    monitors = [SharpnessMonitor(every_n_steps=1, probe_size=16, k=2), StabilityMonitor(every_n_steps=1)]
    watched = _run(BoringModel, monitors, **kw)
    _assert_identical(plain, watched)
    assert len(monitors[0].history) == 6 and len(monitors[0].history[0].eigenvalues) == 2


class AutocastProbe(DropoutBatchNormNet):
    """Records whether autocast is on and the activation dtype whenever its loss is evaluated."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bool, torch.dtype]] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, _ = batch
        self.seen.append((torch.is_autocast_enabled("cpu"), self.net[0](x).dtype))
        return super().training_step(batch, batch_idx)


def _mixed(precision: str) -> dict[str, Any]:
    """Trainer arguments for bf16-mixed, or for fp16-mixed with a (fresh) dynamic GradScaler on CPU."""
    if precision == "bf16-mixed":
        return {"precision": "bf16-mixed"}
    # init_scale 2^22 overflows the fp16 backward at first: skipped steps and back-off are included.
    return {"plugins": [fp16_mixed(init_scale=2.0**22, growth_interval=3)]}


@pytest.mark.parametrize(
    ("precision", "dtype"), [("bf16-mixed", torch.bfloat16), ("16-mixed", torch.float16)]
)
def test_mixed_precision_probe_runs_in_float32_and_does_not_interfere(
    precision: str, dtype: torch.dtype
) -> None:
    kw = {"max_steps": 4}
    plain_model = AutocastProbe()
    plain = _run(plain_model, [], **kw, **_mixed(precision))
    monitor = SharpnessMonitor(every_n_steps=1, probe="current")
    watched_model = AutocastProbe()
    watched = _run(watched_model, [monitor, StabilityMonitor(every_n_steps=1)], **kw, **_mixed(precision))
    _assert_identical(plain, watched)
    assert all(seen == (True, dtype) for seen in plain_model.seen)  # the real steps: autocast
    assert len(monitor.history) == 4 and all(r.finite for r in monitor.history)
    # The replicas' seen-lists are private copies; check the probe context directly instead.
    probe_seen: list[tuple[bool, torch.dtype]] = []

    def recording_loss(model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        out = model.net(x)  # type: ignore[operator]
        probe_seen.append((torch.is_autocast_enabled("cpu"), out.dtype))
        return nn.functional.cross_entropy(out, y)

    check = SharpnessMonitor(every_n_steps=1, probe="current", loss_fn=recording_loss)
    _run(AutocastProbe(), [check], max_steps=1, **_mixed(precision))
    assert probe_seen and all(seen == (False, torch.float32) for seen in probe_seen)


def test_fp16_mixed_with_accumulation_and_fixed_probe_does_not_interfere() -> None:
    kw = {"max_epochs": 2, "accumulate_grad_batches": 2}
    plain = _run(DropoutBatchNormNet(), [], **kw, **_mixed("16-mixed"))
    monitors = _monitors()
    watched = _run(DropoutBatchNormNet(), monitors, **kw, **_mixed("16-mixed"))
    _assert_identical(plain, watched)
    assert plain["scaler"]["scale"] < 2.0**22  # steps were skipped and the scale backed off
    assert len(monitors[0].history) == 8 and all(r.finite for r in monitors[0].history)


class ManualBoring(BoringModel):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        opt = self.optimizers()
        loss = self.loss(self(batch))
        self.log("train_loss", loss)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return loss


@pytest.mark.parametrize("probe", ["fixed", "current"])
def test_bitwise_identical_under_manual_optimization(probe: str) -> None:
    kw = {"max_steps": 4, "limit_train_batches": 4}
    plain = _run(ManualBoring, [], **kw)
    monitors = [
        SharpnessMonitor(every_n_steps=1, probe=probe, probe_size=16),
        StabilityMonitor(every_n_steps=1),
    ]
    watched = _run(ManualBoring, monitors, **kw)
    _assert_identical(plain, watched)
    assert len(monitors[0].history) == 4 and all(r.finite for r in monitors[0].history)


class TinyTextTransformer(LightningTransformer):
    """Lightning's demo transformer (dropout 0.2) on random tokens instead of WikiText2 (no download)."""

    def __init__(self) -> None:
        super().__init__(vocab_size=33)

    def prepare_data(self) -> None:
        return None

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, 33, (8, 17), generator=gen)
        return DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=4)


def test_bitwise_identical_on_lightnings_demo_transformer() -> None:
    kw = {"max_steps": 4, "accumulate_grad_batches": 2}
    plain = _run(TinyTextTransformer, [], **kw)
    monitors = [
        SharpnessMonitor(every_n_steps=1, probe_size=4, max_iter=20, tol=1e-2),
        StabilityMonitor(every_n_steps=1),
    ]
    watched = _run(TinyTextTransformer, monitors, **kw)
    _assert_identical(plain, watched)
    assert len(monitors[0].history) == 4 and all(r.finite for r in monitors[0].history)


def test_all_callbacks_on_lightnings_demo_transformer_with_a_lockstep_twin() -> None:
    """The three callbacks together on a module we did not write: the run is bitwise unchanged and a
    ``perturbation="none"`` twin follows it exactly (dropout masks replayed, gradient accumulation)."""
    kw = {"max_steps": 4, "accumulate_grad_batches": 2}
    plain = _run(TinyTextTransformer, [], **kw)
    twin = TwinDivergence(perturbation="none", every_n_steps=1, validation=False)
    callbacks = [
        SharpnessMonitor(every_n_steps=2, probe_size=4, max_iter=20, tol=1e-2),
        StabilityMonitor(every_n_steps=1),
        twin,
    ]
    watched = _run(TinyTextTransformer, callbacks, **kw)
    _assert_identical(plain, watched)
    assert len(twin.history) == 5 and all(r.divergence == 0.0 for r in twin.history)
