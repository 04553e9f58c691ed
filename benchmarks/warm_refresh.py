"""Warm refreshes of the top Hessian eigenvalue along the demo's edge-of-stability run.

The run: full-batch gradient descent (``DigitsMLP``: 64-100-100-10 tanh, squared error, SGD lr 0.3)
on the first 1000 standardized digits, ``--steps`` steps, through a Lightning ``Trainer`` with
``SharpnessMonitor(every_n_steps=--every, probe_size=None)`` (the whole set is the probe), once
with ``warm_start=False`` (every solve cold) and once with the monitor's warm refreshes (light,
with a full one as :class:`lightning_eos.curvature.ExplorationSchedule` decides). A snapshot callback
keeps the weights at every measured step (training is bitwise the same with or without the
monitor, so both runs see the same weights); on each snapshot a cold solve at ``eig_tol=1e-6``
(``k=2``) is the reference.

Printed per measurement: the reference λ1 and λ2/λ1, products cold / warm, the warm refresh's
exploration, its relative error against the reference, its error bound and ``converged`` flag;
then the means over the measurements after the first, the largest error, and whether every flag
was True. Engine-only sequences on the same snapshots (``--engine``): every warm refresh full,
every one light, and (``--floor``) the fewest products a single-vector warm refresh could stop at
if the exact gap λ1 − λ2 were known and nothing else were checked (smallest ``m`` with
``r_m²/(λ1 − λ2) ≤ eig_tol·θ_m`` along the light sequence's Krylov runs).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/warm_refresh.py [--eig-tol 1e-4] [--tol T]
        [--steps 400] [--every 10] [--engine] [--floor]

Product counts do not depend on the machine's load; nothing here is timed.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import warnings
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_eos.callbacks import SharpnessMonitor
from lightning_eos.curvature import ExplorationSchedule, hessian_eigenvalues
from lightning_eos.demos import DigitsDataModule, DigitsMLP


class Snapshots(pl.Callback):
    """Copies of the weights at the steps the monitor measures (the same schedule rule)."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.steps = 0
        self.weights: list[tuple[int, dict[str, torch.Tensor]]] = []

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, i: int
    ) -> None:
        self.steps += 1
        if (self.steps - 1) % self.every == 0:
            state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            self.weights.append((int(trainer.global_step), state))


def fit(args: argparse.Namespace, warm: bool) -> tuple[SharpnessMonitor, Snapshots]:
    """One training run with the monitor (``warm_start=warm``) and the snapshot callback."""
    monitor = SharpnessMonitor(
        every_n_steps=args.every, probe_size=None, eig_tol=args.eig_tol, tol=args.tol, warm_start=warm
    )
    snaps = Snapshots(args.every)
    trainer = pl.Trainer(
        max_steps=args.steps,
        logger=False,
        callbacks=[monitor, snaps],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(DigitsMLP(lr=0.3, seed=0), DigitsDataModule(n_samples=1000))
    return monitor, snaps


def loss_fn(model: DigitsMLP, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return model.loss(batch)


def engine_sequence(
    snaps: Snapshots,
    data: tuple[torch.Tensor, torch.Tensor],
    args: argparse.Namespace,
    schedule: ExplorationSchedule,
) -> list[tuple[int, str, float]]:
    """Warm refreshes by the engine alone along the snapshots: (products, exploration, value)."""
    model = DigitsMLP(lr=0.3, seed=0)
    prev = None
    out = []
    for _, state in snaps.weights:
        model.load_state_dict(state)
        explore = "cold" if prev is None else schedule.next("top")
        res = hessian_eigenvalues(
            model,
            loss_fn,
            data,
            eig_tol=args.eig_tol,
            tol=args.tol,
            start_vectors=prev,
            exploration="light" if explore == "light" else "full",
            return_eigenvectors=True,
        )
        schedule.observe("top", explore, res.max)
        prev = res.eigenvectors
        out.append((res.num_hvps, explore, res.max))
    return out


def floor_sequence(
    snaps: Snapshots,
    data: tuple[torch.Tensor, torch.Tensor],
    args: argparse.Namespace,
    refs: list[torch.Tensor],
) -> list[int]:
    """Fewest products of an exact-gap, no-exploration stop along the light sequence (see above)."""
    model = DigitsMLP(lr=0.3, seed=0)
    prev = None
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the truncated runs are unconverged on purpose
        for (_, state), ref in zip(snaps.weights, refs, strict=True):
            model.load_state_dict(state)
            gap = float(ref[0] - ref[1])
            kw: dict[str, Any] = dict(eig_tol=args.eig_tol, tol=args.tol, exploration="light")
            res = hessian_eigenvalues(
                model, loss_fn, data, start_vectors=prev, return_eigenvectors=True, **kw
            )
            if prev is not None:
                # The Krylov run is the same whatever its stop: truncating it at m products gives
                # the Ritz pair it had after m products.
                m = 1
                while m < res.num_hvps:
                    short = hessian_eigenvalues(model, loss_fn, data, start_vectors=prev, max_iter=m, **kw)
                    if float(short.residuals[0]) ** 2 / gap <= args.eig_tol * short.max:
                        break
                    m += 1
                out.append(m)
            prev = res.eigenvectors
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--eig-tol", type=float, default=1e-4, help="the monitor's eig_tol (its default)")
    parser.add_argument("--tol", type=float, default=None, help="residual cap (None: sqrt(eig_tol))")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--engine", action="store_true", help="also all-full and all-light engine sequences")
    parser.add_argument(
        "--floor", action="store_true", help="also the exact-gap floor (slow: O(m²) products)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|log_every_n).*")
    warnings.filterwarnings("ignore", message=".*sharpness.*critical sharpness.*")  # the edge warning

    cold, snaps = fit(args, warm=False)
    warm, snaps_warm = fit(args, warm=True)
    same = all(
        all(torch.equal(a[k], b[k]) for k in a)
        for (_, a), (_, b) in zip(snaps.weights, snaps_warm.weights, strict=True)
    )
    tol = math.sqrt(args.eig_tol) if args.tol is None else args.tol
    args.tol = tol
    data = DigitsDataModule(n_samples=1000)
    data.setup("fit")
    assert data.dataset is not None
    xy = (data.dataset.tensors[0], data.dataset.tensors[1])
    model = DigitsMLP(lr=0.3, seed=0)
    refs = []
    for _, state in snaps.weights:
        model.load_state_dict(state)
        refs.append(hessian_eigenvalues(model, loss_fn, xy, k=2, eig_tol=1e-6, tol=1e-3).eigenvalues)

    # The monitor's own exploration choices, replayed by the same schedule on its recorded values.
    replay = ExplorationSchedule()
    kinds = []
    for i, r in enumerate(warm.history):
        kind = "cold" if i == 0 else replay.next("top")
        replay.observe("top", kind, r.sharpness)
        kinds.append(kind)

    print(f"eig_tol {args.eig_tol:g}, tol {tol:g}; weights identical with and without warm starts: {same}")
    # The monitor's products include its batch sharpness (1 per measurement): report the solver's.
    extra = 1 if warm.batch_sharpness else 0
    head = f"{'step':>5} {'λ1 (ref)':>10} {'λ2/λ1':>6} {'cold':>5} {'warm':>5} {'kind':>6}"
    print(f"{head} {'rel. err':>9} {'conv':>5}")
    errs, errs_cold = [], []
    for i, (c, w, ref) in enumerate(zip(cold.history, warm.history, refs, strict=True)):
        lam = float(ref[0])
        err, err_c = abs(w.sharpness - lam) / lam, abs(c.sharpness - lam) / lam
        errs.append(err)
        errs_cold.append(err_c)
        print(
            f"{w.step:>5} {lam:>10.6f} {float(ref[1]) / lam:>6.3f} {c.hvps - extra:>5} {w.hvps - extra:>5}"
            f" {kinds[i]:>6} {err:>9.1e} {w.converged!s:>5}"
        )
    cold_hv = [r.hvps - extra for r in cold.history[1:]]
    warm_hv = [r.hvps - extra for r in warm.history[1:]]
    print(
        f"\nmonitor, {len(warm.history)} measurements: products per solve after the first, mean: cold"
        f" {statistics.mean(cold_hv):.2f}, warm {statistics.mean(warm_hv):.2f}"
        f" (batch sharpness, {extra} more per measurement, not included)"
    )
    print(
        f"max rel. error vs cold 1e-6: warm {max(errs):.1e}, cold {max(errs_cold):.1e};"
        f" all converged: warm {all(r.converged for r in warm.history)},"
        f" cold {all(r.converged for r in cold.history)}; full warm refreshes:"
        f" {sum(k == 'full' for k in kinds)} of {len(kinds) - 1}"
    )
    if args.engine:
        for name, schedule in (
            ("all full", ExplorationSchedule(full_every=1)),
            ("all light", ExplorationSchedule(full_every=10**9, max_jump=1e9)),
        ):
            seq = engine_sequence(snaps, xy, args, schedule)
            e = max(
                abs(v - float(r[0])) / float(r[0]) for (_, _, v), r in zip(seq[1:], refs[1:], strict=True)
            )
            mean = statistics.mean(h for h, _, _ in seq[1:])
            print(f"engine, {name}: mean {mean:.2f} products, max rel. error {e:.1e}")
    if args.floor:
        fl = floor_sequence(snaps, xy, args, refs)
        print(f"exact-gap floor (no exploration): mean {statistics.mean(fl):.2f} products")


if __name__ == "__main__":
    main()
