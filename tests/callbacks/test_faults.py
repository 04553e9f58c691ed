"""Faults inside a callback never stop training: reported once, the callback steps aside, the run is
bitwise the run without it; ``strict=True`` re-raises. Under DDP a fault only one rank sees (a NaN in
its probe shard, a validation batch the default ``predict_fn`` cannot read) leads every rank to the
same decision, with an uneven last batch, and the weights are those of the run without callbacks; an
exception raised on every rank at the same point makes the callback step aside on every rank, one
raised on one rank only stops every rank with an error that says so (no hang)."""

from __future__ import annotations

import json
import math
import os
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_eos.callbacks import (
    AdaptiveLocalLR,
    SharpnessMonitor,
    StabilityMonitor,
    TwinDivergence,
    _lightning,
)
from lightning_eos.demos.digits import DigitsDataModule, DigitsMLP
from tests.callbacks._helpers import MemoryLogger, fit_ddp_spawn, free_port, make_trainer, quiet_fit


def _plain_weights() -> list[torch.Tensor]:
    model = DigitsMLP(lr=0.1, hidden=16)
    quiet_fit(make_trainer(max_steps=6, deterministic=True), model, DigitsDataModule(128, batch_size=32))
    return [p.detach().clone() for p in model.parameters()]


def _broken_sharpness(strict: bool) -> SharpnessMonitor:
    def loss_fn(model: torch.nn.Module, batch: Any) -> torch.Tensor:
        raise RuntimeError("a bug inside the probe")

    return SharpnessMonitor(every_n_steps=2, loss_fn=loss_fn, strict=strict)


def _broken_stability(strict: bool) -> StabilityMonitor:
    monitor = StabilityMonitor(every_n_steps=1, strict=strict)

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug inside the metrics")

    monitor._metrics = boom  # type: ignore[method-assign]
    return monitor


def _broken_twin(strict: bool) -> TwinDivergence:
    twin = TwinDivergence(every_n_steps=1, validation=False, strict=strict)
    real_fit_start = twin.on_fit_start

    def fit_start(trainer: Any, pl_module: Any) -> None:
        real_fit_start(trainer, pl_module)
        assert twin.engine is not None

        def boom(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("a bug inside the twin step")

        twin.engine.step = boom  # type: ignore[method-assign]

    twin.on_fit_start = fit_start  # type: ignore[method-assign]
    return twin


BROKEN = {"sharpness": _broken_sharpness, "stability": _broken_stability, "twin": _broken_twin}


@pytest.mark.parametrize("name", list(BROKEN))
def test_an_error_inside_a_callback_is_reported_once_and_training_goes_on(name: str) -> None:
    plain = _plain_weights()
    callback = BROKEN[name](strict=False)
    model = DigitsMLP(lr=0.1, hidden=16)
    trainer = make_trainer(max_steps=6, callbacks=[callback], deterministic=True)
    with pytest.warns(RuntimeWarning, match="disables itself") as record:
        trainer.fit(model, DigitsDataModule(128, batch_size=32))
    assert trainer.global_step == 6
    assert callback.failure is not None and "a bug inside" in callback.failure
    reports = [w for w in record if "disables itself" in str(w.message)]
    assert len(reports) == 1 and "Traceback" in str(reports[0].message)
    for a, b in zip(plain, model.parameters()):
        assert torch.equal(a, b)
    assert _lightning._fault_groups is None  # one process: no fault group, no handshake


@pytest.mark.parametrize("name", list(BROKEN))
def test_strict_re_raises(name: str) -> None:
    callback = BROKEN[name](strict=True)
    trainer = make_trainer(max_steps=6, callbacks=[callback])
    with pytest.raises(RuntimeError, match="a bug inside"):
        quiet_fit(trainer, DigitsMLP(lr=0.1, hidden=16), DigitsDataModule(128, batch_size=32))


# --------------------------------------------------------------------------------------- DDP faults


class ShardedNet(pl.LightningModule):
    """Linear-BN-ReLU-Dropout-Linear on 40 samples; each of 2 ranks trains on its 18 of the first 36
    (batches of 4: an uneven last batch of 2). Sample 39 holds a NaN: never trained on, but in rank 1's
    shard of a whole-dataset probe, so only rank 1's probe loss is NaN. Rank 1's validation batches
    are dicts, which the twin's default ``predict_fn`` cannot read: a failure on that rank only."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.net = nn.Sequential(
            nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 3)
        )
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.4)
        self.x = torch.randn(40, 8, generator=gen)
        self.x[39, 0] = float("nan")
        self.y = torch.randint(0, 3, (40,), generator=gen)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        trained = list(range(36))[self.trainer.global_rank :: self.trainer.world_size]
        return DataLoader(TensorDataset(self.x, self.y), batch_size=4, sampler=trained)

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = (batch["x"], batch["y"]) if isinstance(batch, dict) else batch
        return nn.functional.cross_entropy(self.net(x), y)

    def val_dataloader(self) -> DataLoader:
        data = TensorDataset(self.x[:16], self.y[:16])
        collate = _as_dict if self.trainer.global_rank == 1 else None
        return DataLoader(data, batch_size=8, collate_fn=collate)


def _as_dict(items: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    x, y = torch.utils.data.default_collate(items)
    return {"x": x, "y": y}


class DumpRank(pl.Callback):
    """Writes what each rank ended with to ``<dir>/<tag>-rank<r>.pt`` (spawned workers send nothing
    back): weights, the callbacks' records and notes, and rank zero's logged values."""

    def __init__(self, directory: Path, tag: str) -> None:
        self.directory, self.tag = directory, tag

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        ours: dict[str, Any] = {}
        for cb in trainer.callbacks:  # type: ignore[attr-defined]
            if isinstance(cb, (SharpnessMonitor, StabilityMonitor, TwinDivergence, AdaptiveLocalLR)):
                key = f"{type(cb).__name__}/{cb.log_prefix}"
                history = getattr(cb, "history", [])
                ours[key] = {
                    "history": [r.to_dict() for r in history],
                    "notes": sorted(getattr(cb, "_notes", ())),
                    "failure": getattr(cb, "failure", None),
                    "validation": list(getattr(cb, "validation_history", [])),
                }
        logger = trainer.logger
        out = {
            "weights": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
            "callbacks": ours,
            "logged": logger.logged if isinstance(logger, MemoryLogger) else [],
            "step": trainer.global_step,
            "world": trainer.world_size,
        }
        torch.save(out, self.directory / f"{self.tag}-rank{trainer.global_rank}.pt")


def _ddp_fit(directory: Path, tag: str, with_callbacks: bool) -> None:
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy

    callbacks: list[pl.Callback] = []
    if with_callbacks:
        callbacks = [
            SharpnessMonitor(every_n_steps=2, probe_size=None, probe_batch_size=8, strict=True),
            SharpnessMonitor(every_n_steps=3, probe="current", log_prefix="current", strict=True),
            StabilityMonitor(every_n_steps=1, strict=True),
            TwinDivergence(every_n_steps=2, strict=True),
            # twin=False: the twin's growth rates would lower LRs by design, a change of the run.
            AdaptiveLocalLR(every_n_steps=2, probe="fixed", probe_size=None, max_iter=20, twin=False),
        ]
    # A collective that some rank never reaches fails after the timeout instead of hanging the suite.
    trainer = make_trainer(
        validation=True,
        num_sanity_val_steps=0,
        max_epochs=2,
        devices=2,
        strategy=DDPStrategy(timeout=timedelta(seconds=60)),
        use_distributed_sampler=False,
        deterministic=True,
        logger=MemoryLogger(),
        callbacks=[*callbacks, DumpRank(directory, tag)],
    )
    pl.seed_everything(5, verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(ShardedNet())
    ours = [str(w.message) for w in caught if "not finite" in str(w.message)]
    (directory / f"{tag}-rank{trainer.global_rank}-warnings.json").write_text(json.dumps(ours))


FAULT_TIMEOUT_S = 3.0  # the fault handshake's wait (lightning_eos.callbacks._lightning), lowered


def _ddp_worker(rank: int, directory: str, port: int) -> None:
    """One rank of an externally launched 2-process group: every DDP fit of this module in one
    process start (Lightning keeps the process group between them); the one that fails on rank 1
    only comes last, since it ends the process group."""
    _lightning.FAULT_TIMEOUT_S = FAULT_TIMEOUT_S  # before the first setup creates the fault group
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank)
    )
    os.environ["NODE_RANK"] = "0"
    torch.set_num_threads(1)
    for tag, with_callbacks in (("plain", False), ("watched", True)):
        _ddp_fit(Path(directory), tag, with_callbacks)
    for tag, ranks in (("fault-plain", None), ("everywhere", (0, 1)), ("rank1", (1,))):
        _fault_fit(Path(directory), tag, ranks)


_DDP_TAGS = ("plain", "watched", "fault-plain", "everywhere", "rank1")


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory of every rank's results of :func:`_ddp_worker` (one 2-process start)."""
    directory = tmp_path_factory.mktemp("ddp")
    fit_ddp_spawn(
        lambda: torch.multiprocessing.spawn(_ddp_worker, args=(str(directory), free_port()), nprocs=2),
        *[directory / f"{tag}-rank{r}.pt" for tag in _DDP_TAGS for r in (0, 1)],
    )
    return directory


@pytest.mark.ddp
def test_ddp_nan_on_one_rank_and_an_uneven_last_batch(ddp_runs: Path) -> None:
    """Every rank takes the same decision on a NaN only one rank sees; weights are the plain run's."""
    plain, watched = (
        [torch.load(ddp_runs / f"{tag}-rank{r}.pt", weights_only=True) for r in (0, 1)]
        for tag in ("plain", "watched")
    )
    assert [r["world"] for r in watched] == [2, 2] and [r["step"] for r in watched] == [10, 10]
    for a, b in zip(plain, watched):  # 2 epochs of 5 batches, the last of 2 samples
        assert a["weights"].keys() == b["weights"].keys()
        for key in a["weights"]:
            assert torch.equal(a["weights"][key], b["weights"][key]), key
    rank0, rank1 = watched
    assert rank0["callbacks"].keys() == rank1["callbacks"].keys()
    for key, mine in rank0["callbacks"].items():
        theirs = rank1["callbacks"][key]
        assert mine["failure"] is None and theirs["failure"] is None, key
        assert repr(mine["history"]) == repr(theirs["history"]), key  # same decisions, NaN included
    whole = rank0["callbacks"]["SharpnessMonitor/eos"]
    assert [r["step"] for r in whole["history"]] == [1, 3, 5, 7, 9]
    assert all(math.isnan(r["sharpness"]) for r in whole["history"]) and "nan" in whole["notes"]
    current = rank0["callbacks"]["SharpnessMonitor/current"]["history"]
    assert len(current) == 4 and all(math.isfinite(r["sharpness"]) for r in current)
    local = rank0["callbacks"]["AdaptiveLocalLR/local_lr"]
    assert local["history"] == [] and "nan" in local["notes"]  # never applied a NaN-derived multiplier
    logged = [v for _, m in rank0["logged"] for k, v in m.items() if k == "eos/sharpness"]
    assert len(logged) == 5 and all(math.isnan(v) for v in logged)
    assert rank1["logged"] == []  # only rank zero logs
    warned = [json.loads((ddp_runs / f"watched-rank{r}-warnings.json").read_text()) for r in (0, 1)]
    assert sorted(w.split(":")[0] for w in warned[0]) == ["AdaptiveLocalLR", "SharpnessMonitor"]  # once each
    assert warned[1] == []  # rank zero warns
    # The default predict_fn failed on rank 1 only: every rank skips the disagreement (whose sync
    # rank 1 alone would have missed) and measures the loss gap, after each of the 2 epochs.
    validation = rank0["callbacks"]["TwinDivergence/twin"]["validation"]
    assert validation == rank1["callbacks"]["TwinDivergence/twin"]["validation"]
    assert [sorted(v) for v in validation] == [["global_step", "twin/val_loss_gap"]] * 2


# ------------------------------------------------------------------- DDP: an exception in a callback


def _raising_after(calls: int, ranks: tuple[int, ...], real: Any, what: str) -> Any:
    """``real`` for its first ``calls`` calls, then a RuntimeError on ``ranks`` (others go on)."""
    count = [0]
    rank = int(os.environ["RANK"])

    def call(*args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        if count[0] > calls and rank in ranks:
            raise RuntimeError(f"a bug inside {what}")
        return real(*args, **kwargs)

    return call


def _probe_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _failing_callbacks(ranks: tuple[int, ...]) -> list[pl.Callback]:
    """On ``ranks``: a SharpnessMonitor whose ``loss_fn`` raises at its 4th call (the measurement at
    step 2), a StabilityMonitor whose metrics raise at their 2nd (step 2), a twin whose update raises
    at its 3rd (step 3). ``ranks=(1,)``: the SharpnessMonitor alone."""
    sharpness = SharpnessMonitor(
        every_n_steps=1, probe="current", loss_fn=_raising_after(3, ranks, _probe_loss, "the probe")
    )
    stability = StabilityMonitor(every_n_steps=1)
    stability._metrics = _raising_after(1, ranks, stability._metrics, "the metrics")  # type: ignore[method-assign]
    twin = TwinDivergence(every_n_steps=1, validation=False)
    real_fit_start = twin.on_fit_start

    def fit_start(trainer: Any, pl_module: Any) -> None:
        real_fit_start(trainer, pl_module)
        assert twin.engine is not None
        twin.engine.step = _raising_after(2, ranks, twin.engine.step, "the twin step")  # type: ignore[method-assign]

    twin.on_fit_start = fit_start  # type: ignore[method-assign]
    return [sharpness, stability, twin] if ranks != (1,) else [sharpness]


def _fault_fit(directory: Path, tag: str, ranks: tuple[int, ...] | None) -> None:
    """One 4-step fit of ShardedNet: no lightning-eos callback (``ranks=None``) or the callbacks of
    :func:`_failing_callbacks`; writes ``<tag>-rank<r>.pt``: weights (or the error and when it came),
    each callback's ``failure``, this rank's "disables itself" warnings."""
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy

    callbacks = [] if ranks is None else _failing_callbacks(ranks)
    trainer = make_trainer(
        max_steps=4,
        devices=2,
        strategy=DDPStrategy(timeout=timedelta(seconds=60)),
        use_distributed_sampler=False,
        deterministic=True,
        callbacks=callbacks,
    )
    pl.seed_everything(5, verbose=False)
    model = ShardedNet()
    out: dict[str, Any] = {}
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            trainer.fit(model)
        except Exception as err:  # the fault on one rank only: an error on every rank, not a hang
            out["error"] = "".join(traceback.format_exception(err))
            out["error_after_s"] = time.perf_counter() - start
    out["fit_s"] = time.perf_counter() - start
    out["weights"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out["step"] = trainer.global_step
    out["failures"] = [getattr(cb, "failure", None) for cb in callbacks]
    out["warnings"] = [str(w.message) for w in caught if "disables itself" in str(w.message)]
    torch.save(out, directory / f"{tag}-rank{trainer.global_rank}.pt")


@pytest.mark.ddp
def test_ddp_an_exception_on_every_rank_disables_the_callback_on_every_rank(ddp_runs: Path) -> None:
    """Raised on both ranks at the same point, each callback steps aside on both and the weights are
    the plain run's; raised on rank 1 only, every rank stops with an error that says so, no hang."""
    tags = ("fault-plain", "everywhere", "rank1")
    plain, everywhere, rank1 = (
        [torch.load(ddp_runs / f"{tag}-rank{r}.pt", weights_only=True) for r in (0, 1)] for tag in tags
    )
    for a, b in zip(plain, everywhere):
        assert "error" not in a and "error" not in b and a["step"] == b["step"] == 4
        for key in a["weights"]:
            assert torch.equal(a["weights"][key], b["weights"][key]), key
    for record in everywhere:
        expected = ["the probe", "the metrics", "the twin step"]
        assert [f"RuntimeError: a bug inside {what}" for what in expected] == record["failures"]
    warned = everywhere[0]["warnings"]
    assert [w.split(":")[0] for w in warned] == ["SharpnessMonitor", "StabilityMonitor", "TwinDivergence"]
    assert [int(w.split(" at step ")[1].split(";")[0]) for w in warned] == [2, 2, 3]  # then step 4 ran
    assert all("on all 2 ranks" in w and "Traceback" in w for w in warned)
    assert everywhere[1]["warnings"] == []  # rank zero warns
    # Rank 1 waits FAULT_TIMEOUT_S for a handshake rank 0 never joins (rank 0 waits in the monitor's
    # next all-reduce), then raises; rank 0's all-reduce fails when rank 1's process exits.
    for record in rank1:
        assert "SharpnessMonitor" in record["error"] and "on some ranks only" in record["error"]
    assert "a bug inside the probe" in rank1[1]["error"] and "a bug" not in rank1[0]["error"]
    assert FAULT_TIMEOUT_S <= rank1[1]["error_after_s"] < FAULT_TIMEOUT_S + 10.0
    assert rank1[0]["error_after_s"] < 30.0  # not the default group's 60 s timeout: rank 1's exit
