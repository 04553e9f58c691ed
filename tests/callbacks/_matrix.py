"""The support matrix's cells, its model and its runs, single process and in a 2-process gloo group.

A cell is one combination of framework (``lightning`` / ``pytorch_lightning``), precision
(``32-true`` / ``bf16-mixed``; ``16-mixed``, fp16 with a GradScaler, in :data:`FP16_CELLS` only),
gradient accumulation (1 / 2), gradient clipping (off / on) and optimization (automatic with one
optimizer, manual with one, manual with two). Under manual optimization Lightning rejects
``accumulate_grad_batches`` and ``gradient_clip_val``, so there the module accumulates and clips
itself (``self.clip_gradients``), as users do.

Every cell runs three fits on the same global data and the same initial weights:

* ``baseline``: no lightning-eos callback;
* ``monitored``: SharpnessMonitor (one per optimizer), StabilityMonitor and, where supported
  (automatic optimization), a one-ulp TwinDivergence: the trained weights must equal the baseline's
  bit for bit;
* ``controlled``: AdaptiveLocalLR (and, where supported, an unperturbed TwinDivergence, which must
  stay exactly on the controlled model: gap 0).

:func:`run_cell` returns what the test compares as plain JSON (weights as float lists: a float32
value round-trips exactly through a Python float). :func:`ddp_worker` runs many cells in one
externally launched 2-process group (``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` set before the Trainer
is built, so ``Trainer(strategy="ddp", devices=2)`` starts no process of its own), which costs one
process start for all DDP cells instead of one per fit.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import socket
import sys
import warnings
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import lightning.pytorch as lpt
import pytorch_lightning as ptl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_eos.callbacks import AdaptiveLocalLR, SharpnessMonitor, StabilityMonitor, TwinDivergence

Framework = Literal["lightning", "pytorch_lightning"]
Optimization = Literal["automatic", "manual", "manual-2opt"]

FRAMEWORKS: dict[str, ModuleType] = {"lightning": lpt, "pytorch_lightning": ptl}
N_SAMPLES = 64  # 4 global batches of 16: one epoch
GLOBAL_BATCH = 16  # one process: batches of 16; DDP: 8 per rank, the same 16 samples per step
CLIP = 0.05  # below this model's gradient norms, so clipping acts (the test checks it changes the run)
LR = 0.6  # SGD momentum 0.9: critical sharpness 3.8 / 0.6 ≈ 6.3; the model's is 4-6, near the edge ...
LR_HEAD = 0.3  # ... and the head's own optimizer in the two-optimizer cells
SAFETY = 0.05  # AdaptiveLocalLR aims far below the edge, so its multipliers are < 1 and act


@dataclasses.dataclass(frozen=True)
class Cell:
    """One combination of the matrix's dimensions (see the module docstring)."""

    framework: Framework = "lightning"
    precision: Literal["32-true", "bf16-mixed", "16-mixed"] = "32-true"
    accumulate: int = 1
    clip: bool = False
    optimization: Optimization = "automatic"

    @property
    def name(self) -> str:
        return (
            f"{self.framework}-{self.precision}-acc{self.accumulate}-"
            f"{'clip' if self.clip else 'noclip'}-{self.optimization}"
        )

    @property
    def automatic(self) -> bool:
        return self.optimization == "automatic"

    @property
    def optimizers(self) -> int:
        return 2 if self.optimization == "manual-2opt" else 1

    @property
    def twin_supported(self) -> bool:
        """TwinDivergence replays automatic optimization only (refused at setup otherwise)."""
        return self.automatic


def all_cells() -> list[Cell]:
    """The full product of the dimensions (48 cells)."""
    return [
        Cell(fw, prec, acc, clip, opt)  # type: ignore[arg-type]
        for fw, prec, acc, clip, opt in itertools.product(
            ("lightning", "pytorch_lightning"),
            ("32-true", "bf16-mixed"),
            (1, 2),
            (False, True),
            ("automatic", "manual", "manual-2opt"),
        )
    ]


# fp16 with a GradScaler, single process: every callback under automatic and manual optimization,
# accumulation 1 and 2, under both packages (8 cells; the full product stays 32-true / bf16-mixed).
FP16_CELLS: tuple[Cell, ...] = tuple(
    Cell(fw, "16-mixed", acc, False, opt)  # type: ignore[arg-type]
    for fw, acc, opt in itertools.product(("lightning", "pytorch_lightning"), (1, 2), ("automatic", "manual"))
)
FP16_INIT_SCALE = 2.0**8  # no overflow on this model: every step is taken, none skipped


# All-pairs (pairwise) cover of the 5 dimensions for DDP: every pair of values of any two
# dimensions appears in at least one row (checked by the test), 6 rows instead of 48.
DDP_CELLS: tuple[Cell, ...] = (
    Cell("lightning", "32-true", 1, False, "automatic"),
    Cell("pytorch_lightning", "bf16-mixed", 2, True, "automatic"),
    Cell("lightning", "bf16-mixed", 2, False, "manual"),
    Cell("pytorch_lightning", "32-true", 1, True, "manual"),
    Cell("pytorch_lightning", "bf16-mixed", 1, False, "manual-2opt"),
    Cell("lightning", "32-true", 2, True, "manual-2opt"),
)


# ----------------------------------------------------------------------------------- the model


def dataset() -> TensorDataset:
    """64 samples of a smooth 8 → 2 regression (fixed seed, private generator)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(N_SAMPLES, 8, generator=g)
    y = torch.tanh(x @ torch.randn(8, 2, generator=g)) + 0.1 * torch.randn(N_SAMPLES, 2, generator=g)
    return TensorDataset(x, y)


def matrix_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """The module's mean squared error on ``batch`` (the ``loss_fn`` the manual cells pass)."""
    return model.loss(batch)  # type: ignore[operator]


class _MatrixBody:
    """The LightningModule body, mixed into either framework's LightningModule by :func:`make_module`."""

    def __init__(self, cell: Cell) -> None:
        super().__init__()
        self.cell = cell
        g = torch.Generator().manual_seed(0)
        self.body = nn.Linear(8, 16)
        self.head = nn.Linear(16, 2)
        with torch.no_grad():
            for p in self.parameters():  # type: ignore[attr-defined]
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.automatic_optimization = cell.automatic

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))

    def loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return (self(x).float() - y).square().mean()  # type: ignore[operator]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        if self.cell.automatic:
            return self.loss(batch)
        # Manual optimization: the user's own accumulation and clipping, as Lightning's automatic
        # loop does them (loss / N per micro-batch, clip then step on the last one).
        opts = self.optimizers()  # type: ignore[attr-defined]
        opts = opts if isinstance(opts, list) else [opts]
        # User code that type-checks its optimizers against its own framework's wrapper (as
        # Lightning's ManualOptimBoringModel does): a probe's stand-in must pass it under both.
        wrapper = FRAMEWORKS[self.cell.framework].core.optimizer.LightningOptimizer
        if not all(isinstance(opt, wrapper) for opt in opts):
            raise TypeError(
                f"expected {wrapper.__module__}.LightningOptimizer, got {[type(o) for o in opts]}"
            )
        acc = self.cell.accumulate
        self.manual_backward(self.loss(batch) / acc)  # type: ignore[attr-defined]
        if (batch_idx + 1) % acc == 0:
            for opt in opts:
                if self.cell.clip:
                    self.clip_gradients(opt, gradient_clip_val=CLIP, gradient_clip_algorithm="norm")  # type: ignore[attr-defined]
                opt.step()
                opt.zero_grad()
        return None

    def configure_optimizers(self) -> Any:
        if self.cell.optimizers == 2:
            return [
                torch.optim.SGD(self.body.parameters(), lr=LR, momentum=0.9),
                torch.optim.SGD(self.head.parameters(), lr=LR_HEAD),
            ]
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9)  # type: ignore[attr-defined]


_CLASSES: dict[str, type] = {}


def make_module(cell: Cell) -> Any:
    """The cell's LightningModule, a subclass of its framework's ``LightningModule``."""
    if cell.framework not in _CLASSES:
        base = FRAMEWORKS[cell.framework].LightningModule
        _CLASSES[cell.framework] = type("MatrixNet", (_MatrixBody, base), {"__module__": __name__})
    return _CLASSES[cell.framework](cell)


class _RankLoggerBody:
    """Keeps every ``log_metrics`` call on *every* rank (no rank-zero filter of its own): what a
    rank other than zero receives, the callbacks sent it."""

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[dict[str, float]] = []

    @property
    def name(self) -> str:
        return "rank"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        return None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.logged.append(dict(metrics))


_LOGGERS: dict[str, type] = {}


def make_logger(framework: str) -> Any:
    if framework not in _LOGGERS:
        base = FRAMEWORKS[framework].loggers.Logger
        _LOGGERS[framework] = type("RankLogger", (_RankLoggerBody, base), {"__module__": __name__})
    return _LOGGERS[framework]()


class _RecorderBody:
    """Copies the StabilityMonitor's values at every optimizer step (listed after it)."""

    def __init__(self) -> None:
        super().__init__()
        self.stability: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        for cb in trainer.callbacks:
            fresh = isinstance(cb, StabilityMonitor) and cb.last_metrics not in self.stability[-1:]
            if fresh and cb.last_metrics:
                self.stability.append(dict(cb.last_metrics))


def _recorder(framework: str) -> Any:
    base = FRAMEWORKS[framework].Callback
    return type("Recorder", (_RecorderBody, base), {"__module__": __name__})()


# ----------------------------------------------------------------------------------- the runs


def _trainer(cell: Cell, world: int, callbacks: list[Any], logger: Any) -> Any:
    fw = FRAMEWORKS[cell.framework]
    kw: dict[str, Any] = dict(
        accelerator="cpu",
        devices=world,
        max_epochs=1,
        logger=logger,
        callbacks=callbacks,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        deterministic=False,
    )
    if cell.precision == "16-mixed":
        # On CPU precision="16-mixed" silently runs bf16: the plugin given explicitly keeps fp16 and
        # its GradScaler, of the cell's own package.
        scaler = torch.amp.GradScaler("cpu", init_scale=FP16_INIT_SCALE)
        kw["plugins"] = [fw.plugins.precision.MixedPrecision("16-mixed", "cpu", scaler)]
    else:
        kw["precision"] = cell.precision
    if world > 1:
        # The loader brings its own unshuffled sampler (see _fit): Lightning's would shuffle.
        kw.update(strategy="ddp", use_distributed_sampler=False)
    if cell.automatic:
        kw["accumulate_grad_batches"] = cell.accumulate
        if cell.clip:
            kw["gradient_clip_val"] = CLIP
    return fw.Trainer(**kw)


def _weights(module: nn.Module) -> dict[str, list[float]]:
    return {n: p.detach().reshape(-1).tolist() for n, p in module.named_parameters()}


def _scalers(trainer: Any, twin: TwinDivergence | None) -> dict[str, Any] | None:
    """Under 16-mixed: the autocast dtype, the real GradScaler's scale and its twin's clone (None
    without a twin): a distinct object, at the same scale."""
    real = getattr(trainer.precision_plugin, "scaler", None)
    if real is None:
        return None
    clone = twin.engine.scaler if twin is not None and twin.engine is not None else None
    return {
        "dtype": str(trainer.precision_plugin.autocast_context_manager().fast_dtype),
        "scale": float(real.get_scale()),
        "twin_scale": None if clone is None else float(clone.get_scale()),
        "twin_own": None if clone is None else clone is not real,
    }


def _fit(cell: Cell, world: int, callbacks: list[Any]) -> tuple[Any, Any, Any]:
    """One fit of the cell's module; returns (module, trainer, logger)."""
    logger = make_logger(cell.framework)
    recorder = _recorder(cell.framework)
    trainer = _trainer(cell, world, [*callbacks, recorder], logger)
    module = make_module(cell)
    data = dataset()
    # Under DDP rank r's k-th batch holds samples 16k + r + 2j (j < 8): the two ranks' batches
    # together are exactly the single process's k-th batch of 16, the "same global data".
    sampler = (
        DistributedSampler(data, num_replicas=world, rank=dist.get_rank(), shuffle=False)
        if world > 1
        else None
    )
    loader = DataLoader(data, batch_size=GLOBAL_BATCH // world, sampler=sampler)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader)
    trainer.recorder = recorder
    return module, trainer, logger


def _sharpness_monitors(cell: Cell) -> list[SharpnessMonitor]:
    # A tight solve: DDP and one process must agree to round-off, not to the solver's tolerance.
    kw: dict[str, Any] = dict(every_n_steps=1, eig_tol=1e-8, max_iter=200, strict=True)
    # Under the module's own accumulation manual_backward sees loss / N: the monitors are given the
    # loss itself (the objective the optimizer descends), as docs/support.md tells users to do.
    manual_acc = not cell.automatic and cell.accumulate > 1
    out = [SharpnessMonitor(loss_fn=matrix_loss if manual_acc else None, **kw)]
    if cell.optimizers == 2:
        # One manual_backward drives both optimizers: the second one's loss is named explicitly.
        out.append(SharpnessMonitor(optimizer_idx=1, log_prefix="eos1", loss_fn=matrix_loss, **kw))
    return out


def _controller(cell: Cell) -> AdaptiveLocalLR:
    manual_acc = not cell.automatic and cell.accumulate > 1
    two = cell.optimizers == 2
    return AdaptiveLocalLR(
        every_n_steps=1,
        adaptive_interval=False,
        safety=SAFETY,
        tol=1e-4,
        max_iter=100,
        optimizer_idx=1 if two else 0,
        loss_fn=matrix_loss if (manual_acc or two) else None,
    )


def run_cell(cell: Cell, world: int = 1) -> dict[str, Any]:
    """The cell's three fits (see the module docstring) as plain JSON-able values."""
    rank = dist.get_rank() if world > 1 else 0
    out: dict[str, Any] = {"cell": cell.name, "rank": rank, "world": world}

    module, trainer, _ = _fit(cell, world, [])
    out["baseline"] = {
        "weights": _weights(module),
        "global_step": int(trainer.global_step),
        "scaler": _scalers(trainer, None),
    }

    monitors: list[Any] = [*_sharpness_monitors(cell), StabilityMonitor(every_n_steps=1, strict=True)]
    if cell.twin_supported:
        monitors.append(TwinDivergence(every_n_steps=1, strict=True, validation=False))
    module, trainer, logger = _fit(cell, world, monitors)
    sharp = [m for m in monitors if isinstance(m, SharpnessMonitor)]
    twins = [m for m in monitors if isinstance(m, TwinDivergence)]
    out["monitored"] = {
        "weights": _weights(module),
        "world_size": int(trainer.world_size),
        "failures": {type(m).__name__: m.failure for m in monitors if m.failure is not None},
        "sharpness": [[r.to_dict() for r in m.history] for m in sharp],
        "stability": trainer.recorder.stability,
        "twin": [r.to_dict() for r in twins[0].history] if twins else None,
        "scaler": _scalers(trainer, twins[0] if twins else None),
        "logged_keys": sorted({k for m in logger.logged for k in m}),
        "log_calls": len(logger.logged),
    }

    controller = _controller(cell)
    callbacks: list[Any] = [controller]
    if cell.twin_supported:
        callbacks.append(TwinDivergence(perturbation="none", every_n_steps=1, strict=True, validation=False))
    module, trainer, logger = _fit(cell, world, callbacks)
    twin = callbacks[1] if len(callbacks) > 1 else None
    out["controlled"] = {
        "weights": _weights(module),
        "history": [r.to_dict() for r in controller.history],
        "twin_gaps": [r.divergence for r in twin.history] if twin is not None else None,
        "scaler": _scalers(trainer, twin),
        "logged_keys": sorted({k for m in logger.logged for k in m}),
        "log_calls": len(logger.logged),
    }
    return out


# ----------------------------------------------------------------------------------- DDP worker


def ddp_worker(rank: int, world: int, port: int, cells: list[Cell], out_dir: str) -> None:
    """One rank of an externally launched gloo group: every cell's fits, then ``rank<r>.json``."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
        WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    # Initialized here once, with a short timeout: Lightning reuses an initialized group, and a rank
    # that fails makes the other one fail within a minute instead of Lightning's default 30.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    results = []
    for cell in cells:
        try:
            results.append(run_cell(cell, world))
        except Exception as err:
            what = f"{type(err).__name__}: {err}"
            raise RuntimeError(f"DDP cell {cell.name} failed on rank {rank}: {what}") from err
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def launch(out_dir: str, world: int = 2) -> None:
    """Run :data:`DDP_CELLS` in one ``world``-process gloo group forked from this process.

    Meant for a fresh interpreter (``python -m tests.callbacks._matrix OUT_DIR``): a fork copies the
    imported modules (spawn re-imports Lightning in every rank: measured 15 s to start and 4 s to exit
    for one cell, against 11 s for all six cells forked), and a fresh single-threaded parent has no
    other thread whose locks a fork could copy held.
    """
    mp.start_processes(
        ddp_worker, args=(world, _free_port(), list(DDP_CELLS), out_dir), nprocs=world, start_method="fork"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pairs(cells: tuple[Cell, ...] | list[Cell]) -> Iterator[tuple[tuple[str, Any], tuple[str, Any]]]:
    """Every (dimension, value) pair the cells cover."""
    fields = [f.name for f in dataclasses.fields(Cell)]
    for cell in cells:
        for a, b in itertools.combinations(fields, 2):
            yield (a, getattr(cell, a)), (b, getattr(cell, b))


if __name__ == "__main__":
    torch.set_num_threads(1)
    launch(sys.argv[1])
