"""Edge of stability, live: full-batch gradient descent on digits through a Lightning Trainer.

An MLP 64-100-100-10 (tanh) is trained with plain SGD on the first 1000 standardized samples of
scikit-learn's ``load_digits`` (one batch = the whole set, so every step is a gradient-descent step)
with the squared-error loss ½‖f(x) − onehot(y)‖² averaged over samples. ``SharpnessMonitor``
measures the top Hessian eigenvalue every few steps and compares it with the critical sharpness
2/lr; ``StabilityMonitor`` logs the applied LR and its margin every step.

What to expect at lr = 0.3: the sharpness starts near 0.4·2/lr, rises ("progressive sharpening"),
crosses 0.9·2/lr around step 150–220, overshoots once and then hovers just above 2/lr while the loss
keeps falling, non-monotonically. Run::

    python examples/edge_of_stability.py --out runs/demo          # ~20 s on 2 CPU cores
    tensorboard --logdir runs/demo                                  # "Custom Scalars" tab

Writes TensorBoard logs and ``sharpness_vs_2_over_lr.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_eos.callbacks import SharpnessMonitor, StabilityMonitor
from lightning_eos.demos.digits import DigitsDataModule, DigitsMLP


class LossRecorder(pl.Callback):
    """Keeps the training loss of every step (for the table and the plot)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, i: int
    ) -> None:
        self.losses.append(float(outputs["loss"]))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory")
    parser.add_argument("--lr", type=float, default=0.3, help="SGD learning rate (2/lr is the edge)")
    parser.add_argument("--steps", type=int, default=600, help="gradient-descent steps")
    parser.add_argument("--every", type=int, default=5, help="measure the sharpness every N steps")
    parser.add_argument("--seed", type=int, default=0, help="initialization seed")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest here)")
    return parser.parse_args()


def plot(path: Path, monitor: SharpnessMonitor, losses: list[float], lr: float) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    steps = [r.step for r in monitor.history]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.plot(steps, [r.sharpness for r in monitor.history], label="sharpness λ_max(H)")
    top.plot(steps, [r.critical for r in monitor.history], "k--", label=f"2/lr = {2 / lr:.3g}")
    top.set_ylabel("curvature")
    top.set_title(f"Full-batch GD on digits, lr = {lr}")
    top.legend()
    bottom.semilogy(range(1, len(losses) + 1), losses)
    bottom.set_xlabel("step")
    bottom.set_ylabel("training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    # The matrices are tiny: extra intra-op threads only add synchronisation (and, on a loaded
    # machine, oversubscription that was measured to slow this script down more than 10x).
    torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed, verbose=False)
    start = time.perf_counter()

    sharpness = SharpnessMonitor(every_n_steps=args.every, probe_size=None)  # the whole set: full batch
    stability = StabilityMonitor()
    recorder = LossRecorder()
    trainer = pl.Trainer(
        max_steps=args.steps,
        logger=TensorBoardLogger(args.out, name="edge_of_stability"),
        callbacks=[sharpness, stability, recorder],
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    with warnings.catch_warnings():
        # Lightning's advice for tiny CPU data sets is noise here; the monitor's edge warning stays.
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|log_every_n).*")
        trainer.fit(DigitsMLP(lr=args.lr, seed=args.seed), DigitsDataModule(n_samples=1000))
    elapsed = time.perf_counter() - start

    losses = recorder.losses
    print(f"\n{'step':>6} {'loss':>10} {'sharpness':>10} {'2/lr':>8} {'ratio':>7}")
    rows = max(1, len(sharpness.history) // 15)
    for record in sharpness.history[::rows]:
        loss = losses[record.step - 1] if record.step - 1 < len(losses) else math.nan
        row = f"{record.step:>6} {loss:>10.5f} {record.sharpness:>10.4f} {record.critical:>8.4f}"
        print(f"{row} {record.ratio:>7.3f}")

    summary = sharpness.summary()
    late = [r.ratio for r in sharpness.history if r.step > 0.75 * args.steps]
    rises = sum(b > a for a, b in itertools.pairwise(losses)) / max(1, len(losses) - 1)
    print(
        f"\nfirst step at ≥0.9·2/lr: {summary['first_edge_step']}   max ratio: {summary['max_ratio']:.3f}   "
        f"late ratio (last quarter): {sum(late) / max(1, len(late)):.3f}\n"
        f"loss rose on {100 * rises:.0f}% of steps, final loss {losses[-1]:.5f}   "
        f"HVPs: {summary['hvps']}   time: {elapsed:.1f} s"
    )
    png = args.out / "sharpness_vs_2_over_lr.png"
    plot(png, sharpness, losses, args.lr)
    print(f"TensorBoard logs: {trainer.logger.log_dir}\nplot: {png}")


if __name__ == "__main__":
    main()
