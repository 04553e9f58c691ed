"""Overhead of TwinDivergence: wall time and parameter+optimizer memory, with / without the callback.

Two workloads, each trained by a Lightning ``Trainer`` on CPU (no logger, no checkpointing):

* ``digits-mlp``: 64-100-100-10 tanh MLP, full-batch GD on 1000 digits (SGD, momentum 0.9);
* ``small-cnn``: conv(1→16, 3×3)–ReLU–pool–conv(16→32, 3×3)–ReLU–pool–linear(→10), BatchNorm,
  Dropout, Adam, batches of 64 random 28×28 images.

Time: the fit's wall time (``min`` over ``--repeats`` alternating runs, to damp noise from other
processes). Memory: bytes of all distinct tensors in the model's parameters and buffers and the
optimizer state, plus — with the callback — the twin's parameters, buffers, optimizer state and the
engine's measurement buffers. Targets (issue 5): time ≤ 2.1×, memory ≤ 2.05×.

    python benchmarks/bench_twin.py [--steps 200] [--repeats 3] [--threads 1]

The CPU-time ratio (``time.process_time``) is reported next to the wall-time ratio because it is
far less sensitive to other processes on a shared machine.
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_eos.callbacks.twin import TwinDivergence
from lightning_eos.demos import DigitsDataModule, DigitsMLP, quiet_trainer


class SmallCNN(pl.LightningModule):
    """A small conv net with BatchNorm and Dropout on random images (the data do not matter)."""

    def __init__(self, n: int = 1024) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Dropout(0.1),
            nn.Linear(32 * 7 * 7, 10),
        )
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, 1, 28, 28, generator=g)
        self.data = TensorDataset(x, torch.randint(0, 10, (n,), generator=g))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=64, shuffle=True)


def _tensor_bytes(tensors: Iterable[Any]) -> int:
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


def _module_and_optimizer(module: nn.Module, opt: torch.optim.Optimizer) -> list[Any]:
    state = [v for s in opt.state.values() for v in s.values()]
    return [*module.parameters(), *module.buffers(), *state]


def fit(
    make: Callable[[], tuple[pl.LightningModule, Any]], steps: int, twin: bool
) -> tuple[float, float, int]:
    """One fit; returns (wall seconds, process CPU seconds, parameter+optimizer bytes)."""
    model, data = make()
    cb = TwinDivergence(every_n_steps=10, validation=False) if twin else None
    trainer = quiet_trainer(steps, [cb] if cb is not None else [])
    start, cpu = time.perf_counter(), time.process_time()
    trainer.fit(model, data) if data is not None else trainer.fit(model)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    tensors = _module_and_optimizer(model, trainer.optimizers[0])
    if cb is not None and cb.engine is not None and cb.engine.optimizer is not None:
        engine = cb.engine
        tensors += _module_and_optimizer(engine.twin, engine.optimizer)
        tensors += engine.measurement_buffers()
    return seconds, cpu, _tensor_bytes(tensors)


WORKLOADS: dict[str, Callable[[], tuple[pl.LightningModule, Any]]] = {
    "digits-mlp": lambda: (DigitsMLP(lr=0.1, momentum=0.9), DigitsDataModule(n_samples=1000)),
    "small-cnn": lambda: (SmallCNN(), None),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: least noisy)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    print(
        "| workload | steps | wall without (s) | wall with (s) | wall ratio | CPU ratio | "
        "memory without (KiB) | memory with (KiB) | memory ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, make in WORKLOADS.items():
        fit(make, 5, False)  # warm-up: imports, allocator, data set-up
        wall0, wall1, cpu0, cpu1, mem = [], [], [], [], (0, 0)
        for _ in range(args.repeats):  # alternate so that background load hits both alike
            t0, c0, m0 = fit(make, args.steps, False)
            t1, c1, m1 = fit(make, args.steps, True)
            wall0.append(t0)
            wall1.append(t1)
            cpu0.append(c0)
            cpu1.append(c1)
            mem = (m0, m1)
        b, w = min(wall0), min(wall1)
        print(
            f"| {name} | {args.steps} | {b:.2f} | {w:.2f} | {w / b:.2f}× | {min(cpu1) / min(cpu0):.2f}× | "
            f"{mem[0] / 1024:.0f} | {mem[1] / 1024:.0f} | {mem[1] / mem[0]:.3f}× |"
        )


if __name__ == "__main__":
    main()
