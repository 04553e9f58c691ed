"""Benchmark of the local-LR controller on digits: robustness over a learning-rate grid and efficiency.

The MLP of ``lightning_eos/demos/digits.py`` (64-100-100-10 tanh, half squared error, 1000 samples),
trained with a constant base LR, with the per-layer controller (``mode="cap"`` and ``"fill"``), and
with one global multiplier (the ablation: ``layers="global"``), over a log2 grid of base LRs from far
below to far above the largest stable constant LR, for several seeds (model init and batch order).

The controller runs exactly as :class:`lightning_eos.callbacks.AdaptiveLocalLR` drives it -- a
refresh before every ``every``-th step on the batch that step trains on (a Hessian of that batch's
loss, one graph shared by the block solves and the coupled solve), multipliers applied by update
scaling inside ``optimizer.step`` -- but in a plain torch loop, so that the ~500 runs fit in minutes.

Reported (same run, printed as markdown):

* **robustness**: fraction of (LR, seed) pairs whose full-data training loss reaches ``target``
  within the step budget (a run stops when it reaches it, or when the loss is non-finite or 100x its
  start);
* **efficiency**: for each arm the best grid LR by median steps to target (over seeds that reach it),
  against the best constant LR; with the controller's cost as *work* = steps + refresh CPU time /
  mean training-step CPU time (measured in this run; the products per refresh are printed too).

Usage::

    .venv/bin/python benchmarks/local_lr.py [--seeds 3] [--configs gd gd_mom sgd sgd_mom adam] [--out FILE]

Times are CPU seconds of this process (``time.process_time``), one torch thread.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_eos.curvature import HessianOperator
from lightning_eos.demos.digits import DigitsMLP, load_digits_tensors
from lightning_eos.local_lr import LocalLRController, RefreshSchedule, controlled_layers


@dataclass(frozen=True)
class Config:
    """One training setup: optimizer, batch size (None = full batch), budget and target loss."""

    name: str
    momentum: float
    batch_size: int | None
    steps: int
    target: float
    lrs: tuple[float, ...]
    optimizer: str = "sgd"


_SGD_GRID = tuple(2.0**e for e in range(-4, 4))  # 1/16 ... 8: the largest stable constant LR is ~1
_MOM_GRID = tuple(2.0**e for e in range(-6, 2))  # 1/64 ... 2: with momentum 0.9 it is ~0.25-0.5
CONFIGS = {
    "gd": Config("GD, full batch", 0.0, None, 300, 0.06, _SGD_GRID),
    "gd_mom": Config("GD + momentum 0.9, full batch", 0.9, None, 300, 0.02, _MOM_GRID),
    "sgd": Config("SGD, batch 100", 0.0, 100, 600, 0.06, _SGD_GRID),
    "sgd_mom": Config("SGD + momentum 0.9, batch 100", 0.9, 100, 600, 0.02, _MOM_GRID),
    "adam": Config("Adam, batch 100", 0.0, 100, 600, 0.02, tuple(2.0**e for e in range(-10, -2)), "adam"),
}
ARMS = {
    "constant": None,
    "per-layer cap": {"layers": "module", "mode": "cap"},
    "global cap": {"layers": "global", "mode": "cap"},
    "per-layer fill": {"layers": "module", "mode": "fill"},
}


@dataclass
class Run:
    """One training run: steps to target (None: not reached), diverged, work, controller costs."""

    reached: int | None
    diverged: bool
    final: float
    train_cpu: float = 0.0
    refresh_cpu: float = 0.0
    refreshes: int = 0
    hvps: int = 0
    min_multiplier: float = 1.0
    steps_run: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def step_cpu(self) -> float:
        return self.train_cpu / max(self.steps_run, 1)

    def work(self) -> float | None:
        """Steps to target plus the refreshes up to then, in training-step units (CPU time)."""
        if self.reached is None:
            return None
        return self.reached + (self.refresh_cpu / self.step_cpu if self.step_cpu > 0 else 0.0)


def run_one(
    cfg: Config,
    lr: float,
    seed: int,
    arm: dict | None,
    x: torch.Tensor,
    y: torch.Tensor,
    every: int,
    adaptive: bool = True,
) -> Run:
    model = DigitsMLP(seed=seed)
    if cfg.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum)
    ctl = None
    schedule = RefreshSchedule(every, adaptive=adaptive)
    if arm is not None:
        ctl = LocalLRController(opt, controlled_layers(model, opt, arm["layers"]), mode=arm["mode"])
        ctl.attach()
    n = x.shape[0]
    gen = torch.Generator().manual_seed(1000 + seed)
    perm, pos = torch.randperm(n, generator=gen), 0
    eval_every = 1 if cfg.batch_size is None else 10
    with torch.no_grad():
        start = float(model.loss((x, y)))
    out = Run(reached=None, diverged=False, final=start)
    for step in range(cfg.steps):
        if cfg.batch_size is None:
            batch = (x, y)
        else:
            if pos + cfg.batch_size > n:
                perm, pos = torch.randperm(n, generator=gen), 0
            idx = perm[pos : pos + cfg.batch_size]
            pos += cfg.batch_size
            batch = (x[idx], y[idx])
        if ctl is not None and schedule.due(step):
            t0 = time.process_time()
            op = HessianOperator(model, lambda m, b: m.loss(b), batch)
            rec = ctl.refresh(op, step=step)
            op.release()
            out.refresh_cpu += time.process_time() - t0
            if rec is not None:
                schedule.refreshed(step, rec.curvature_rise)
                out.refreshes += 1
                out.hvps += rec.hvps
                out.min_multiplier = min(out.min_multiplier, rec.min_multiplier)
        t0 = time.process_time()
        loss = model.loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        out.train_cpu += time.process_time() - t0
        out.steps_run = step + 1
        value = float(loss.detach())
        if cfg.batch_size is not None and (step + 1) % eval_every == 0:
            with torch.no_grad():
                value = float(model.loss((x, y)))
        elif cfg.batch_size is not None:
            continue
        # full batch: `value` is the loss at the weights before this step (step + 0 steps taken)
        reached_at = step if cfg.batch_size is None else step + 1
        out.final = value
        if not math.isfinite(value) or value > 100 * start:
            out.diverged = True
            break
        if value <= cfg.target:
            out.reached = reached_at
            break
    if ctl is not None:
        ctl.detach()
    return out


def median_of_reached(values: list[int | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


def cell(runs: list[Run], controlled: bool) -> str:
    """``k/n`` reaching the target · median steps of those · median final loss · divergences ·
    smallest multiplier seen."""
    ok = sum(r.reached is not None for r in runs)
    med = median_of_reached([r.reached for r in runs])
    finals = [r.final for r in runs]
    final = statistics.median(finals) if all(math.isfinite(f) for f in finals) else math.nan
    out = f"{ok}/{len(runs)}"
    if med is not None:
        out += f" · {med:.0f} st"
    div = sum(r.diverged for r in runs)
    out += f" · {div} div" if div else f" · L {final:.3f}"
    if controlled:
        out += f" · s≥{min(r.min_multiplier for r in runs):.2g}"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--configs", nargs="+", default=["gd", "gd_mom", "sgd", "sgd_mom"])
    parser.add_argument("--arms", nargs="+", default=list(ARMS))
    parser.add_argument("--every", type=int, default=25, help="longest refresh interval (steps)")
    parser.add_argument("--fixed-interval", action="store_true", help="refresh exactly every --every steps")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    parser.add_argument("--quick", action="store_true", help="1 seed, GD and SGD+momentum only (~2 min)")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.configs = 1, ["gd", "sgd_mom"]
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    x, y = load_digits_tensors(1000)
    lines: list[str] = []

    def emit(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    t_all = time.process_time()
    emit(
        f"torch {torch.__version__}, 1 thread; seeds {args.seeds}; refresh interval "
        + (f"fixed {args.every}" if args.fixed_interval else f"adaptive 1..{args.every}")
        + " steps; controller defaults (safety 0.8, smoothing 0.5, max_change 2, tol 1e-2, warm starts)"
    )
    for key in args.configs:
        cfg = CONFIGS[key]
        results: dict[str, dict[float, list[Run]]] = {a: {} for a in args.arms}
        for arm_name in args.arms:
            for lr in cfg.lrs:
                results[arm_name][lr] = [
                    run_one(cfg, lr, seed, ARMS[arm_name], x, y, args.every, not args.fixed_interval)
                    for seed in range(args.seeds)
                ]
        emit()
        emit(f"### {cfg.name}: target loss {cfg.target} within {cfg.steps} steps")
        emit()
        header = "| base lr | " + " | ".join(args.arms) + " |"
        emit(header)
        emit("|" + "---|" * (len(args.arms) + 1))
        for lr in cfg.lrs:
            cells = [cell(results[a][lr], a != "constant") for a in args.arms]
            emit(f"| {lr:g} | " + " | ".join(cells) + " |")
        emit()
        emit(
            "| arm | robustness (LR×seed reaching target) | best LR | seeds reaching there | median steps "
            "| median work (step units) | products / refresh | refresh / step CPU |"
        )
        emit("|---|---|---|---|---|---|---|---|")
        for arm_name in args.arms:
            runs_by_lr = results[arm_name]
            total = sum(len(v) for v in runs_by_lr.values())
            ok = sum(r.reached is not None for v in runs_by_lr.values() for r in v)
            # best LR: most seeds reaching the target, then fewest median steps among those
            best = None
            for lr, runs in runs_by_lr.items():
                k = sum(r.reached is not None for r in runs)
                med = median_of_reached([r.reached for r in runs])
                if med is not None and (best is None or (k, -med) > (best[1], -best[2])):
                    works = [w for w in (r.work() for r in runs) if w is not None]
                    best = (lr, k, med, statistics.median(works), len(runs))
            refreshing = [r for v in runs_by_lr.values() for r in v if r.refreshes]
            per_refresh = (
                f"{sum(r.hvps for r in refreshing) / sum(r.refreshes for r in refreshing):.1f}"
                if refreshing
                else "–"
            )
            ratio = (
                f"{statistics.median(r.refresh_cpu / r.refreshes / r.step_cpu for r in refreshing):.1f}"
                if refreshing
                else "–"
            )
            head = f"| {arm_name} | {ok}/{total} = {ok / total:.2f} |"
            if best is None:
                emit(f"{head} – | – | – | – | {per_refresh} | {ratio} |")
            else:
                lr, k, med, work, n = best
                emit(f"{head} {lr:g} | {k}/{n} | {med:.0f} | {work:.0f} | {per_refresh} | {ratio} |")
    emit()
    emit(f"total CPU time {time.process_time() - t_all:.0f} s")
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
