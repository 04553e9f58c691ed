"""Restrained instability on digits: a one-ulp twin's gap below and at the edge of stability.

Full-batch gradient descent on the first 1000 scikit-learn digits (standardized), MLP 64-100-100-10
with tanh, loss ½·mean_n ‖f(x_n) − onehot(y_n)‖², float32, one Lightning ``Trainer`` per learning
rate with :class:`~lightning_eos.callbacks.TwinDivergence` (perturbation ``"ulp"``) and — the
curvature side of the same story — ``SharpnessMonitor`` + ``StabilityMonitor``.

Expected: for lr 0.05 and 0.1 (sharpness stays below 2/lr) the relative L1 gap stays at round-off
(~1e-7); for lr 0.2, 0.3, 0.4 (edge of stability) it grows by 4–5 decades to 1e-3…1e-2 and then
saturates. ``--dtype float64`` starts the gap at ~1e-16 and reaches the same level.

    python examples/twin_divergence.py --out runs/twin            # 600 steps, ~35 s on 2 cores
    python examples/twin_divergence.py --out runs/twin --steps 1000 --no-monitors

Prints a table (lr, 2/lr, last sharpness, gap start → end, decades, first step with gap > 1e-4,
restrained-instability events) and writes ``twin_divergence.png`` and ``twin_divergence.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_eos.callbacks import SharpnessMonitor, StabilityMonitor, TwinDivergence
from lightning_eos.demos import DigitsDataModule, DigitsMLP, quiet_trainer


def run(lr: float, steps: int, dtype: torch.dtype, monitors: bool) -> dict[str, Any]:
    """One Trainer at learning rate ``lr``; returns the twin history and summary (plain data)."""
    model = DigitsMLP(lr=lr)
    if dtype == torch.float64:
        model = model.double()
    twin = TwinDivergence(perturbation="ulp", every_n_steps=10, validation=False)
    callbacks: list[pl.Callback] = [twin]
    sharp = None
    if monitors:
        sharp = SharpnessMonitor(
            every_n_steps=100, probe_size=1000, max_iter=40, tol=1e-3, batch_sharpness=False
        )
        callbacks += [sharp, StabilityMonitor(every_n_steps=10)]
    trainer = quiet_trainer(steps, callbacks)
    trainer.fit(model, DigitsDataModule(n_samples=1000, dtype=dtype))
    sharpness = [(r.step, r.sharpness) for r in sharp.history] if sharp is not None else []
    return {
        "lr": lr,
        "steps": [r.step for r in twin.history],
        "gap": [r.divergence for r in twin.history],
        "summary": twin.summary(),
        "sharpness": sharpness,
    }


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_sharpness = any(r["sharpness"] for r in results)
    fig, axes = plt.subplots(1, 2 if with_sharpness else 1, figsize=(11 if with_sharpness else 6, 4))
    axes = list(axes) if with_sharpness else [axes]
    for r in results:
        axes[0].semilogy(r["steps"], r["gap"], label=f"lr={r['lr']}")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("relative L1 gap Σ|w−w'|/Σ|w|")
    axes[0].set_title("one-ulp twin")
    axes[0].legend()
    if with_sharpness:
        for r in results:
            s = [(step, value * r["lr"] / 2) for step, value in r["sharpness"] if math.isfinite(value)]
            if s:
                axes[1].plot(*zip(*s), marker="o", label=f"lr={r['lr']}")
        axes[1].axhline(1.0, color="k", lw=0.8, ls="--")
        axes[1].set_xlabel("step")
        axes[1].set_ylabel("sharpness / (2/lr)")
        axes[1].set_title("sharpness ratio")
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per lr (default 600)")
    parser.add_argument("--lrs", type=str, default="0.05,0.1,0.2,0.3,0.4")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--no-monitors", action="store_true", help="twin only (faster)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (small matmuls: 1 is fastest)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*log_every_n_steps.*")
    torch.set_num_threads(args.threads)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    start = time.perf_counter()
    results = [run(float(lr), args.steps, dtype, not args.no_monitors) for lr in args.lrs.split(",")]
    elapsed = time.perf_counter() - start

    print(f"\ndigits, full-batch GD, {args.steps} steps, {args.dtype}, ulp twin ({elapsed:.1f} s)")
    print(
        f"{'lr':>5} {'2/lr':>6} {'sharp':>7} {'gap start':>10} {'gap end':>10} {'decades':>8} "
        f"{'>1e-4 at':>9} {'events':>6}"
    )
    for r in results:
        s = r["summary"]
        sharp = r["sharpness"][-1][1] if r["sharpness"] else math.nan
        first = s["first_step_above_threshold"]
        print(
            f"{r['lr']:>5} {2 / r['lr']:>6.1f} {sharp:>7.2f} {s['start_divergence']:>10.2e} "
            f"{s['divergence']:>10.2e} {s['amplification_decades']:>8.2f} "
            f"{first if first >= 0 else '—':>9} {s['restrained_instability_events']:>6}"
        )
    plot(results, args.out / "twin_divergence.png")
    (args.out / "twin_divergence.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {args.out / 'twin_divergence.png'}")


if __name__ == "__main__":
    main()
