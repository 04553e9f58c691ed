"""Whole-run overhead of every lightning-eos callback at its defaults, against the same run without it.

Two workloads on scikit-learn's digits (1797 samples, standardized; batches of 64, shuffled with a
seeded generator), each trained by a Lightning ``Trainer`` on CPU with a TensorBoard logger (what a
user has), no checkpointing, no progress bar:

* ``mlp``: 64-100-100-10 tanh MLP, squared error, SGD lr 0.1;
* ``cnn-bn``: conv(1→16, 3×3, pad 1)–BN–ReLU–conv(16→32, 3×3, pad 1)–BN–ReLU–avgpool 2–linear on
  the 8×8 images, cross-entropy, SGD lr 0.05 momentum 0.9.

For each callback (``SharpnessMonitor()``, ``StabilityMonitor()``, ``TwinDivergence()``, all at their
defaults) the fit's wall time is compared with the baseline fit *in the same run*: runs alternate
baseline / callback, and the ratio of the best of ``--repeats`` is reported. For TwinDivergence also
parameter + optimizer-state memory (bytes of distinct tensors) with over without. The CPU-time
ratio (``time.process_time``) is reported next to the wall-time ratio: on a shared machine it is far
less sensitive to other processes. For
SharpnessMonitor also what it says of itself: the measured share ``eos/overhead``, the number of
measurements and the Hessian-vector products per measurement (the first, cold, and the mean of the
warm-started rest).

    .venv/bin/python benchmarks/overhead.py [--steps 1500] [--repeats 3] [--threads 1] [--models mlp cnn-bn]

Prints a markdown table. Targets (cost issue): SharpnessMonitor ≤ 1.10× (aim 1.05×), StabilityMonitor
≤ 1.05×, TwinDivergence ≤ 2.1× time and ≤ 2.05× memory.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_eos.callbacks import SharpnessMonitor, StabilityMonitor, TwinDivergence
from lightning_eos.demos import DigitsMLP, load_digits_tensors


class DigitsCNN(pl.LightningModule):
    """A small conv net with BatchNorm on the 8×8 digit images (SGD + momentum)."""

    def __init__(self, lr: float = 0.05, momentum: float = 0.9, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.net = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1),
                nn.BatchNorm2d(16),
                nn.ReLU(),
                nn.Conv2d(16, 32, 3, padding=1),
                nn.BatchNorm2d(32),
                nn.ReLU(),
                nn.AvgPool2d(2),
                nn.Flatten(),
                nn.Linear(32 * 4 * 4, 10),
            )
        self.lr, self.momentum = lr, momentum

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x.view(-1, 1, 8, 8)), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


def _data() -> DataLoader:
    x, y = load_digits_tensors(1797)
    return DataLoader(
        TensorDataset(x, y), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0)
    )


MODELS: dict[str, Callable[[], pl.LightningModule]] = {
    "mlp": lambda: DigitsMLP(lr=0.1),
    "cnn-bn": DigitsCNN,
}
CALLBACKS: dict[str, Callable[[], pl.Callback]] = {
    "SharpnessMonitor()": SharpnessMonitor,
    "StabilityMonitor()": StabilityMonitor,
    "TwinDivergence()": TwinDivergence,
}


def _tensor_bytes(tensors: list[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _state_tensors(module: nn.Module, optimizer: torch.optim.Optimizer | None) -> list[torch.Tensor]:
    out = [*module.parameters(), *module.buffers()]
    if optimizer is not None:
        out += [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return out


def _fit(model_name: str, callback: pl.Callback | None, steps: int) -> tuple[float, float, pl.Trainer, Any]:
    model = MODELS[model_name]()
    with tempfile.TemporaryDirectory() as logdir:
        trainer = pl.Trainer(
            max_steps=steps,
            accelerator="cpu",
            devices=1,
            logger=TensorBoardLogger(logdir, name="bench"),
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            callbacks=[callback] if callback is not None else [],
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start, cpu = time.perf_counter(), time.process_time()
            trainer.fit(model, _data())
            elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    return elapsed, cpu, trainer, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--callbacks", nargs="+", default=list(CALLBACKS), choices=list(CALLBACKS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.steps} steps, best of {args.repeats}")
    print()
    print("| run | callback | wall-time ratio | CPU-time ratio | baseline s | with s | notes |")
    print("|---|---|---|---|---|---|---|")
    for model_name in args.models:
        _fit(model_name, None, 20)  # warm-up: imports, allocator, first-call overheads
        for cb_name in args.callbacks:
            base, with_cb, base_cpu, with_cpu = [], [], [], []
            notes = ""
            for _ in range(args.repeats):
                elapsed, cpu, _, _ = _fit(model_name, None, args.steps)
                base.append(elapsed)
                base_cpu.append(cpu)
                callback = CALLBACKS[cb_name]()
                elapsed, cpu, trainer, model = _fit(model_name, callback, args.steps)
                with_cb.append(elapsed)
                with_cpu.append(cpu)
            if isinstance(callback, SharpnessMonitor):
                hvps = [r.hvps for r in callback.history]
                warm = statistics.mean(hvps[1:]) if len(hvps) > 1 else float("nan")
                share = callback.overhead
                notes = (
                    f"{len(hvps)} measurements, products cold {hvps[0] if hvps else 'n/a'} / warm mean "
                    f"{warm:.1f}, eos/overhead {share:.3f}"
                )
            if isinstance(callback, TwinDivergence) and callback.engine is not None:
                opt = trainer.optimizers[0]
                real = _tensor_bytes(_state_tensors(model, opt))
                engine = callback.engine
                twin = _tensor_bytes(
                    _state_tensors(engine.twin, engine.optimizer) + engine.measurement_buffers()
                )
                notes = f"memory {(real + twin) / real:.3f}×"
            print(
                f"| {model_name} | {cb_name} | {min(with_cb) / min(base):.3f}× | "
                f"{min(with_cpu) / min(base_cpu):.3f}× | {min(base):.2f} | "
                f"{min(with_cb):.2f} | {notes} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
