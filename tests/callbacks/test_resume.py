"""Resume anywhere: a run stopped at a checkpoint and resumed with ``ckpt_path=`` continues bitwise as
the run that was never stopped -- weights, BatchNorm statistics, optimizer state and every callback's
own records and logged values.

Checkpoints at an epoch boundary and mid-epoch with a loader Lightning restores exactly (a shuffled
``torchdata`` ``StatefulDataLoader``); mid-epoch with a plain shuffled ``DataLoader`` (which Lightning
does not resume exactly) the callbacks must change nothing relative to the same resume without them.
A checkpoint written without the callbacks resumes with them (they start fresh) and one written with
them resumes without them. Every checkpoint loads with ``torch.load(weights_only=True)``. The
mid-epoch resume with all four callbacks runs under the standalone ``pytorch_lightning`` package's
``Trainer`` too (its module, callbacks and ``ModelCheckpoint`` of that package).

The model draws dropout masks from the global generator and carries BatchNorm statistics. Lightning
does not checkpoint the global generator, so :class:`GlobalRngResume` (test scaffolding, listed
first) does: it restores the state at the point the uninterrupted run continued from.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning.pytorch as pl
import pytest
import pytorch_lightning as ptl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from lightning_eos.callbacks import AdaptiveLocalLR, SharpnessMonitor, StabilityMonitor, TwinDivergence
from tests.callbacks._helpers import MemoryLogger, make_trainer, quiet_fit

PACKAGES: dict[str, ModuleType] = {"lightning": pl, "pytorch_lightning": ptl}

STEPS = 12  # two epochs of 6 batches
BIG_LR = 3.0  # past the edge at first: AdaptiveLocalLR caps layers, its state matters for the weights
SMALL_LR = 0.05  # far below every bound: AdaptiveLocalLR leaves every multiplier at exactly 1


class _NetBody:
    """Linear-BN-ReLU-Dropout-Linear on 48 samples of 8 features, 3 classes, batches of 8 (mixed into
    either package's ``LightningModule``)."""

    def __init__(self, loader: str = "stateful", lr: float = BIG_LR) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.net = nn.Sequential(
            nn.Linear(8, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Dropout(0.25), nn.Linear(12, 3)
        )
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        self.x = torch.randn(48, 8, generator=gen)
        self.y = torch.randint(0, 3, (48,), generator=gen)
        self.loader = loader
        self.lr = lr

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)  # type: ignore[attr-defined]
        return loss

    def configure_optimizers(self) -> Any:
        params = self.parameters()  # type: ignore[attr-defined]
        opt = torch.optim.SGD(params, lr=self.lr, momentum=0.9, weight_decay=1e-3)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.8)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self) -> DataLoader:
        data = TensorDataset(self.x, self.y)
        if self.loader == "stateful":
            return StatefulDataLoader(data, batch_size=8, shuffle=True)
        return DataLoader(data, batch_size=8, shuffle=True)


class Net(_NetBody, pl.LightningModule):
    """The model, a ``lightning.pytorch`` module."""


class _GlobalRngResumeBody:
    """Checkpoints the global CPU generator and restores it where the uninterrupted run went on.

    Saved at a batch end mid-epoch, the next draw of the uninterrupted run is the next batch's:
    restored at that batch's start (after the resumed run rebuilt its loader iterator, which draws).
    Saved at the end of an epoch's last batch, the next draws are the next epoch's loader iterator's
    (its seeds): restored on load, before the resumed run builds that iterator.
    """

    def __init__(self) -> None:
        super().__init__()
        self._epoch_end = False
        self._pending: dict[str, Any] | None = None

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        self._epoch_end = idx == trainer.num_training_batches - 1

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int
    ) -> None:
        if self._pending is not None:
            torch.set_rng_state(self._pending["rng"])
            self._pending = None

    def state_dict(self) -> dict[str, Any]:
        return {"rng": torch.get_rng_state(), "epoch_end": self._epoch_end}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["epoch_end"]:
            torch.set_rng_state(state_dict["rng"])
        else:
            self._pending = dict(state_dict)


class GlobalRngResume(_GlobalRngResumeBody, pl.Callback):
    """The generator's checkpointing, a ``lightning.pytorch`` callback."""


# The same model and scaffolding under the standalone package. The lightning-eos callbacks are
# lightning.pytorch callbacks and MemoryLogger a lightning.pytorch logger: a pytorch_lightning
# Trainer runs both as they are (it type-checks neither).
_OWN = {
    "lightning": (Net, GlobalRngResume, ModelCheckpoint),
    "pytorch_lightning": (
        type("Net", (_NetBody, ptl.LightningModule), {"__module__": __name__}),
        type("GlobalRngResume", (_GlobalRngResumeBody, ptl.Callback), {"__module__": __name__}),
        ptl.callbacks.ModelCheckpoint,
    ),
}


ALL = ("sharpness", "stability", "twin", "local_lr")


def _callbacks(names: tuple[str, ...], twin_signal: bool = True) -> list[pl.Callback]:
    """The callbacks named; ``twin_signal=False``: AdaptiveLocalLR ignores the twin's growth rates
    (with them it lowers the LR of layers whose twin gap grows, by design a change of the run)."""
    made: list[pl.Callback] = []
    if "sharpness" in names:
        made.append(
            SharpnessMonitor(
                every_n_steps=3, probe_size=16, max_iter=30, which="both", per_layer=True, strict=True
            )
        )
    if "stability" in names:
        made.append(StabilityMonitor(every_n_steps=1, strict=True))
    if "twin" in names:
        made.append(TwinDivergence(every_n_steps=2, validation=False, window=3, strict=True))
    if "local_lr" in names:
        made.append(
            AdaptiveLocalLR(
                every_n_steps=4,
                probe="fixed",
                probe_size=16,
                max_iter=20,
                twin="auto" if twin_signal else False,
            )
        )
    return made


def _records(callback: pl.Callback) -> Any:
    """What a callback keeps of the run: its records as plain numbers."""
    if isinstance(callback, StabilityMonitor):
        return dict(callback.last_metrics)
    return [r.to_dict() for r in callback.history]  # type: ignore[attr-defined]


def _fit(
    names: tuple[str, ...],
    loader: str,
    lr: float = BIG_LR,
    *,
    save: ModelCheckpoint | None = None,
    resume: Path | None = None,
    twin_signal: bool = True,
    package: str = "lightning",
) -> dict[str, Any]:
    fw = PACKAGES[package]
    net, rng_resume, _ = _OWN[package]
    fw.seed_everything(7, verbose=False)
    model = net(loader, lr)
    ours = _callbacks(names, twin_signal)
    logger = MemoryLogger()
    callbacks: list[Any] = [rng_resume(), *ours, *([save] if save is not None else [])]
    trainer = make_trainer(
        package=fw,
        max_steps=STEPS,
        callbacks=callbacks,
        logger=logger,
        log_every_n_steps=1,
        deterministic=True,
        enable_checkpointing=save is not None,
    )
    quiet_fit(trainer, model, ckpt_path=resume)
    assert isinstance(model, fw.LightningModule) and isinstance(trainer, fw.Trainer)
    assert trainer.global_step == STEPS
    for cb in ours:
        assert getattr(cb, "failure", None) is None
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "optimizer": trainer.optimizers[0].state_dict(),
        "records": {type(cb).__name__: _records(cb) for cb in ours},
        "logged": [
            (
                step,
                {
                    k: v
                    for k, v in m.items()
                    if k.startswith(("eos/", "twin/", "local_lr/")) and k != "eos/overhead"
                },
            )
            for step, m in logger.logged
        ],
        "callbacks": ours,
    }


def _same(a: Any, b: Any) -> bool:
    """Exact equality of nested records, NaN equal to NaN, tensors bitwise."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return bool(a == b)


def _assert_weights_equal(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["state"].keys() == b["state"].keys()
    for key in a["state"]:
        assert torch.equal(a["state"][key], b["state"][key]), key
    assert _same(a["optimizer"], b["optimizer"])


def _assert_continues(full: dict[str, Any], resumed: dict[str, Any]) -> None:
    """The resumed run ends where the uninterrupted one does, with the same records and logs."""
    _assert_weights_equal(full, resumed)
    assert full["records"].keys() == resumed["records"].keys()
    for name in full["records"]:
        assert _same(full["records"][name], resumed["records"][name]), name
    after = [entry for entry in resumed["logged"] if entry[1]]
    assert after, "nothing logged after the resume point"
    assert _same([e for e in full["logged"] if e[1]][-len(after) :], after)


def _multipliers(run: dict[str, Any]) -> list[float]:
    """Every multiplier AdaptiveLocalLR applied in ``run`` (empty without it)."""
    return [m for r in run["records"].get("AdaptiveLocalLR", []) for m in r["multiplier"].values()]


_CLASSES = {"sharpness": "SharpnessMonitor", "twin": "TwinDivergence", "local_lr": "AdaptiveLocalLR"}


def _checkpoint(directory: Path, pattern: str, names: tuple[str, ...] = ()) -> Path:
    """The one checkpoint file matching ``pattern``, checked to load with ``weights_only=True`` and
    to hold the state of each stateful callback of ``names``."""
    (path,) = directory.glob(pattern)
    saved = torch.load(path, weights_only=True)["callbacks"]  # only tensors and primitives
    for name in names:
        if name in _CLASSES:
            assert any(key.startswith(_CLASSES[name]) and state for key, state in saved.items()), name
    return path


CONFIGS = [(n,) for n in ALL] + [ALL]
IDS = [*ALL, "all"]


@pytest.mark.parametrize("names", CONFIGS, ids=IDS)
def test_resume_at_an_epoch_boundary(names: tuple[str, ...], tmp_path: Path) -> None:
    save = ModelCheckpoint(tmp_path, every_n_train_steps=6, save_top_k=-1)
    full = _fit(names, "plain", save=save)
    resumed = _fit(names, "plain", resume=_checkpoint(tmp_path, "epoch=0-step=6.ckpt", names))
    _assert_continues(full, resumed)
    if "local_lr" in names:  # the controller really changed the update: its state matters
        assert min(_multipliers(full)) < 1.0


@pytest.mark.parametrize(
    ("names", "package"),
    [*((names, "lightning") for names in CONFIGS), (ALL, "pytorch_lightning")],
    ids=[*IDS, "all-pytorch_lightning"],
)
def test_resume_mid_epoch_with_a_stateful_loader(
    names: tuple[str, ...], package: str, tmp_path: Path
) -> None:
    checkpoint = _OWN[package][2]
    save = checkpoint(tmp_path, every_n_train_steps=8, save_top_k=-1)
    full = _fit(names, "stateful", save=save, package=package)
    path = _checkpoint(tmp_path, "epoch=1-step=8.ckpt", names)
    resumed = _fit(names, "stateful", resume=path, package=package)
    _assert_continues(full, resumed)
    if "local_lr" in names:  # the controller really changed the update: its state matters
        assert min(_multipliers(full)) < 1.0


@pytest.fixture(scope="module")
def plain_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A mid-epoch checkpoint written without any lightning-eos callback, and its resume."""
    directory = tmp_path_factory.mktemp("plain")
    _fit((), "plain", SMALL_LR, save=ModelCheckpoint(directory, every_n_train_steps=8, save_top_k=-1))
    path = _checkpoint(directory, "epoch=1-step=8.ckpt")
    return path, _fit((), "plain", SMALL_LR, resume=path)


@pytest.mark.parametrize("names", CONFIGS, ids=IDS)
def test_resume_mid_epoch_with_a_plain_loader_changes_nothing(
    names: tuple[str, ...], tmp_path: Path, plain_checkpoint: tuple[Path, dict[str, Any]]
) -> None:
    """Lightning restarts a plain loader's epoch from a new iterator (and warns): not the
    uninterrupted run, but the callbacks must not change it. At SMALL_LR, and without the twin's
    signal, AdaptiveLocalLR keeps every multiplier at exactly 1: its runs too are bitwise the runs
    without it."""
    save = ModelCheckpoint(tmp_path, every_n_train_steps=8, save_top_k=-1)
    _fit(names, "plain", SMALL_LR, save=save, twin_signal=False)
    with_them = _checkpoint(tmp_path, "epoch=1-step=8.ckpt", names)
    resumed = _fit(names, "plain", SMALL_LR, resume=with_them, twin_signal=False)
    # Written with the callbacks, resumed without them (Lightning warns about their unused state).
    _assert_weights_equal(resumed, _fit((), "plain", SMALL_LR, resume=with_them))
    # Written without them, resumed with them: they start fresh at the resume point (step 8).
    path, plain = plain_checkpoint
    fresh = _fit(names, "plain", SMALL_LR, resume=path, twin_signal=False)
    _assert_weights_equal(fresh, plain)
    _assert_weights_equal(resumed, plain)  # the checkpointed weights did not depend on the callbacks
    first = {
        name: min(r.get("global_step", r["step"]) for r in records)
        for name, records in fresh["records"].items()
        if name != "StabilityMonitor"
    }
    # The twin is made and the controller refreshes before the first resumed step; the monitor
    # measures right after it, on the weights that step made.
    want = {"SharpnessMonitor": 9, "TwinDivergence": 8, "AdaptiveLocalLR": 8}
    assert first == {name: want[name] for name in first}
    if "stability" in names:
        assert fresh["records"]["StabilityMonitor"]
    assert all(m == 1.0 for m in _multipliers(resumed) + _multipliers(fresh))


def _budget_fit(
    callback: pl.Callback, *, save: ModelCheckpoint | None = None, resume: Path | None = None
) -> dict[str, torch.Tensor]:
    pl.seed_everything(7, verbose=False)
    model = Net("stateful", BIG_LR)
    callbacks = [GlobalRngResume(), callback, *([save] if save else [])]
    trainer = make_trainer(
        max_steps=STEPS, callbacks=callbacks, deterministic=True, enable_checkpointing=bool(save)
    )
    quiet_fit(trainer, model, ckpt_path=resume)
    assert trainer.global_step == STEPS
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", ["sharpness", "local_lr"])
def test_resume_with_the_wall_time_budget(kind: str, tmp_path: Path) -> None:
    """The budget schedule is wall time, so the steps it measures at are not reproducible. Resumed,
    a callback keeps its records and goes on with the restored schedule (its step count continues);
    the monitor leaves the weights bitwise those of the uninterrupted run."""

    def make() -> SharpnessMonitor | AdaptiveLocalLR:
        if kind == "sharpness":
            return SharpnessMonitor(budget=0.9, probe_size=16, strict=True)
        return AdaptiveLocalLR(None, budget=0.9, probe="fixed", probe_size=16, max_iter=20)

    full_cb = make()
    full = _budget_fit(full_cb, save=ModelCheckpoint(tmp_path, every_n_train_steps=8, save_top_k=-1))
    path = _checkpoint(tmp_path, "epoch=1-step=8.ckpt")
    prefix = "SharpnessMonitor" if kind == "sharpness" else "AdaptiveLocalLR"
    (state,) = [
        v for k, v in torch.load(path, weights_only=True)["callbacks"].items() if k.startswith(prefix)
    ]
    resumed_cb = make()
    resumed = _budget_fit(resumed_cb, resume=path)
    records = [r.to_dict() for r in resumed_cb.history]
    if isinstance(resumed_cb, SharpnessMonitor):
        assert state["schedule"]["steps"] == 8 and resumed_cb._schedule.steps == STEPS
        assert state["history"] and _same(records[: len(state["history"])], state["history"])
        assert 0.0 < resumed_cb.overhead < 1.0
        assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
    else:
        # Steps are timed from one batch start to the next: the one before the checkpoint is counted
        # on resume (at the mean step time), so the count is the uninterrupted run's.
        assert full_cb._budget is not None and resumed_cb._budget is not None
        assert (
            state["budget"]["steps"] == 7 and resumed_cb._budget.steps == full_cb._budget.steps == STEPS - 1
        )
        assert len(records) >= len(state["controller"]["history"]) > 0
        assert all(torch.isfinite(v).all() for v in resumed.values())
