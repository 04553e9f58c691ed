"""Evidence for the local-LR controller on digits: robustness, efficiency against baselines, calm.

Two models on scikit-learn's digits (1000 training images, the other 797 held out): the MLP of
``lightning_eos/demos/digits.py`` (64-100-100-10 tanh) and the CNN with BatchNorm of
``examples/demo.py`` (two stride-2 convolutions, width 8), both with half squared error. Three
optimizers (SGD, SGD + heavy-ball momentum 0.9, Adam), full batch and batch 100, paired seeds (model
init and batch order shared by every arm of a seed).

**Grid.** For each setup the largest stable constant LR ``η_s`` is found first (seed 0, scanning
down a log2 ladder until a run neither diverges nor stalls above 90 % of its initial loss); the grid is
``η_s · 2^e`` for ``e = -4 … 3``: from 16x below to 8x above it.

**Target.** The constant-LR arm runs the whole budget on the grid; the target training loss is the
median over seeds of the loss the best constant LR (lowest median final loss) reached at *half* the
budget. Every other run stops when its full-data training loss reaches the target (checked every
step for full batch, every 10 steps for minibatches: all arms stop at the same loss), or diverges
(non-finite or 100x the initial loss).

**Arms.** ``constant``; ``warm-up+cosine`` (linear warm-up over 10 % of the budget to the base LR,
then cosine to 0 at the budget's end: the base LR is its tuned peak); ``LARS``
(``pytorch_optimizer.LARS``, momentum of the setup, trust 1e-3, LR tuned on the grid; SGD setups);
``Prodigy`` and ``D-Adapt Adam`` (their default lr 1: no grid); the controller
(:class:`lightning_eos.local_lr.LocalLRController`, driven as ``AdaptiveLocalLR`` drives it, in a
plain torch loop, on the batch the step trains on) as ``cap`` (the default: only lowers LRs),
``fill`` (also raises layers, up to 10x), and the two ablations ``global`` (one multiplier,
``layers="global"``, cap) and ``static`` (cap, ``freeze_after=5`` refreshes: bounds measured in the
first steps, never updated).

Reported (markdown on stdout, ``--out``; raw numbers ``--json``; figures ``--figures``):

* **robustness**: per seed, the fraction of the grid's base LRs reaching the target; median and
  range over seeds;
* **efficiency**: per arm its best grid LR (most seeds reaching the target, then fewest median
  steps): steps to target (median and range), *gradient-equivalents* = steps + 2 x the controller's
  Hessian-vector products (one product by double back-propagation costs about two gradients), and
  *work* = steps + refresh CPU time / mean training-step CPU time (both measured in this run);
* **calm**: at the edge-of-stability LR ``η_s``, constant vs controller (cap), the whole budget,
  with a one-ulp twin (:class:`lightning_eos.twin.TwinEngine`, ``perturbation="ulp"``, the
  controller's multipliers mirrored onto the twin's steps as ``AdaptiveLocalLR`` does): the twin gap
  at the end and the held-out accuracy (mean, std across seeds).

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/local_lr.py [--models mlp cnn] [--seeds 5]
        [--out FILE.md] [--json FILE.json] [--figures DIR] [--quick] [--from-json FILE.json ...]

``--quick`` (the smoke test): one seed, the MLP with SGD on full batch only, a 3-value grid, 40
steps, every arm (also the diagnostics ``cap from step 10`` and ``cap, fixed probe``, which ``--arms``
adds to other runs).
``--from-json`` rebuilds the tables and figures from saved ``--json`` files (arms of one setup
saved in several files merge).
Costs are CPU seconds of this process (``time.process_time``), one torch thread.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from demo import DigitsCNN  # noqa: E402  (examples/demo.py: the project's CNN with BatchNorm)

from lightning_eos.curvature import HessianOperator  # noqa: E402
from lightning_eos.demos.digits import DigitsMLP, load_digits_tensors  # noqa: E402
from lightning_eos.local_lr import (  # noqa: E402
    LayerUpdateScaler,
    LocalLRController,
    RefreshSchedule,
    controlled_layers,
)
from lightning_eos.twin import TwinEngine  # noqa: E402

N_TRAIN = 1000
#: Exponents of the grid around the largest stable constant LR η_s.
GRID_EXPONENTS = tuple(range(-4, 4))
#: Refreshes after which the "static" ablation freezes its bounds.
STATIC_REFRESHES = 5
#: Longest refresh interval of the controller arms (the callback's default).
EVERY = 25

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Setup:
    """One training setup: model, optimizer, batch size (None = full batch), step budget."""

    model: str  # "mlp" | "cnn"
    optimizer: str  # "sgd" | "mom" | "adam"
    batch_size: int | None
    steps: int

    @property
    def key(self) -> str:
        return f"{self.model}-{self.optimizer}-{'full' if self.batch_size is None else self.batch_size}"

    @property
    def title(self) -> str:
        opt = {"sgd": "SGD", "mom": "SGD + momentum 0.9", "adam": "Adam"}[self.optimizer]
        batch = "full batch" if self.batch_size is None else f"batch {self.batch_size}"
        return f"{self.model.upper()}, {opt}, {batch}"


#: Step budgets. Minibatch runs read the full-data loss every 10 steps, so they get more steps (MLP)
#: or the same (the CNN, whose steps cost 2.5-3x the MLP's and whose refreshes more: five blocks,
#: double back-propagation through BatchNorm).
STEPS = {("mlp", None): 150, ("mlp", 100): 300, ("cnn", None): 150, ("cnn", 100): 150}

#: Step before which the diagnostic arm "cap from step 10" makes no refresh (so no cut).
LATE_START = 10

CONTROLLER_ARMS: dict[str, dict[str, Any]] = {
    "cap": {"layers": "module", "mode": "cap"},
    "fill": {"layers": "module", "mode": "fill"},
    "global": {"layers": "global", "mode": "cap"},
    "static": {"layers": "module", "mode": "cap", "freeze_after": STATIC_REFRESHES},
    # diagnostics, not run by default: is the controller's effect all in its first refreshes? Does
    # the whole training set's curvature (AdaptiveLocalLR's probe="fixed" with its default 1024
    # samples: all 1000 here) do better on minibatches than the batch the step trains on?
    f"cap from step {LATE_START}": {"layers": "module", "mode": "cap", "first_refresh": LATE_START},
    "cap, fixed probe": {"layers": "module", "mode": "cap", "probe": "fixed"},
}
GRID_ARMS = ("constant", "warm-up+cosine", "LARS", *CONTROLLER_ARMS)
FREE_ARMS = ("Prodigy", "D-Adapt Adam")  # no learning rate to tune
#: The arms a run has unless ``--arms`` says otherwise (``constant`` always runs: it sets the target).
DEFAULT_ARMS = ("warm-up+cosine", "LARS", "cap", "fill", "global", "static", *FREE_ARMS)


# ---------------------------------------------------------------------------------------------------
# Data, models, optimizers
# ---------------------------------------------------------------------------------------------------


@dataclass
class Data:
    """Training and held-out tensors of one model (images ``(n, 1, 8, 8)`` for the CNN)."""

    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_data(model: str) -> Data:
    x, y = load_digits_tensors(1797)
    if model == "cnn":
        x = x.view(-1, 1, 8, 8)
    return Data(x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:])


def build_model(model: str, seed: int) -> nn.Module:
    if model == "mlp":
        return DigitsMLP(seed=seed)
    return DigitsCNN(width=8, seed=seed)


def loss_of(m: nn.Module, batch: Batch) -> torch.Tensor:
    """Half squared error on one-hot targets, summed over the 10 outputs, mean over samples."""
    out = m(batch[0])
    target = nn.functional.one_hot(batch[1], 10).to(out.dtype)
    return 0.5 * (out - target).pow(2).sum(dim=1).mean()


def build_optimizer(
    setup: Setup, arm: str, params: Sequence[nn.Parameter], lr: float
) -> torch.optim.Optimizer:
    momentum = 0.9 if setup.optimizer == "mom" else 0.0
    if arm == "Prodigy":
        from prodigyopt import Prodigy

        return Prodigy(params, lr=1.0)
    if arm == "D-Adapt Adam":
        from dadaptation import DAdaptAdam

        return DAdaptAdam(params, lr=1.0)
    if arm == "LARS":
        from pytorch_optimizer import LARS

        return LARS(params, lr=lr, momentum=momentum)
    if setup.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr, momentum=momentum)


def cosine_factor(step: int, total: int) -> float:
    """Warm-up (linear over 10 % of ``total``) then cosine to 0 at ``total``: the LR multiplier."""
    warm = max(1, total // 10)
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))


# ---------------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One training run. ``curve``: full-data training loss at the checked steps ``(step, loss)``."""

    reached: int | None = None
    diverged: bool = False
    final: float = math.nan
    train_cpu: float = 0.0
    refresh_cpu: float = 0.0
    refreshes: int = 0
    hvps: int = 0
    min_multiplier: float = 1.0
    steps_run: int = 0
    curve: list[tuple[int, float]] = field(default_factory=list)
    twin_gap: float = math.nan
    test_acc: float = math.nan

    @property
    def step_cpu(self) -> float:
        return self.train_cpu / max(self.steps_run, 1)

    def work(self) -> float | None:
        """Steps to target plus the refreshes up to then, in training-step units of CPU time."""
        if self.reached is None:
            return None
        return self.reached + (self.refresh_cpu / self.step_cpu if self.step_cpu > 0 else 0.0)

    def grad_eq(self) -> float | None:
        """Steps to target plus two gradient-equivalents per Hessian-vector product."""
        return None if self.reached is None else self.reached + 2.0 * self.hvps


def run_one(
    setup: Setup,
    arm: str,
    lr: float,
    seed: int,
    data: Data,
    target: float | None,
    *,
    twin: bool = False,
) -> Run:
    """Train ``setup`` with ``arm`` at base LR ``lr``; stop at ``target`` (None: run the budget)."""
    model = build_model(setup.model, seed)
    model.train()
    params = list(model.parameters())
    opt = build_optimizer(setup, arm, params, lr)
    sched = (
        torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_factor(s, setup.steps))
        if arm == "warm-up+cosine"
        else None
    )
    ctl: LocalLRController | None = None
    schedule = RefreshSchedule(EVERY)
    if arm in CONTROLLER_ARMS:
        spec = CONTROLLER_ARMS[arm]
        schedule.next_step = spec.get("first_refresh", 0)
        ctl = LocalLRController(
            opt,
            controlled_layers(model, opt, spec["layers"]),
            mode=spec["mode"],
            freeze_after=spec.get("freeze_after"),
        )
        ctl.attach()
    engine: TwinEngine | None = None
    if twin:
        engine = TwinEngine(model, perturbation="ulp")
        twin_opt = engine.attach_optimizer(opt)
        if ctl is not None:
            # the twin takes the real step's multipliers (what AdaptiveLocalLR wires for a twin)
            mirror_layers = {n: [engine.pairing.twin_of(p) for p in ps] for n, ps in ctl.layers.items()}
            LayerUpdateScaler(twin_opt, mirror_layers, lambda: ctl.scaler.last).attach()
        engine.start()
    n = data.x.shape[0]
    gen = torch.Generator().manual_seed(1000 + seed)
    perm, pos = torch.randperm(n, generator=gen), 0
    full = (data.x, data.y)
    fixed_probe = arm in CONTROLLER_ARMS and CONTROLLER_ARMS[arm].get("probe") == "fixed"
    with torch.no_grad():
        start = float(loss_of(model, full))
    out = Run(final=start)
    for step in range(setup.steps):
        if setup.batch_size is None:
            batch = full
        else:
            if pos + setup.batch_size > n:
                perm, pos = torch.randperm(n, generator=gen), 0
            idx = perm[pos : pos + setup.batch_size]
            pos += setup.batch_size
            batch = (data.x[idx], data.y[idx])
        if ctl is not None and not ctl.frozen and schedule.due(step):
            t0 = time.process_time()
            try:
                op = HessianOperator(model, loss_of, full if fixed_probe else batch)
            except ValueError:  # a non-finite loss on this batch (what AdaptiveLocalLR skips): diverged
                out.diverged, out.final = True, math.nan
                break
            rec = ctl.refresh(op, step=step)
            op.release()
            out.refresh_cpu += time.process_time() - t0
            if rec is not None:
                schedule.refreshed(step, rec.curvature_rise)
                out.refreshes += 1
                out.hvps += rec.hvps
                out.min_multiplier = min(out.min_multiplier, rec.min_multiplier)
        t0 = time.process_time()
        loss = loss_of(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        out.train_cpu += time.process_time() - t0
        if engine is not None:
            engine.backward(lambda m, b=batch: loss_of(m, b))
            engine.step()
        out.steps_run = step + 1
        if setup.batch_size is None:
            value, at = float(loss.detach()), step  # the loss at the weights before this step
        elif (step + 1) % 10 == 0 or step + 1 == setup.steps:
            with torch.no_grad():
                value, at = float(loss_of(model, full)), step + 1
        else:
            continue
        out.final = value
        out.curve.append((at, value))
        if not math.isfinite(value) or value > 100 * start:
            out.diverged = True
            break
        if target is not None and value <= target:
            out.reached = at
            break
    if setup.batch_size is None and not out.diverged and out.reached is None:
        with torch.no_grad():  # the loss after the last step
            value = float(loss_of(model, full))
        out.final = value
        out.curve.append((setup.steps, value))
        if not math.isfinite(value) or value > 100 * start:
            out.diverged = True
    if engine is not None:
        out.twin_gap = float(engine.read().divergence)
    with torch.no_grad():
        model.eval()
        out.test_acc = float((model(data.x_test).argmax(-1) == data.y_test).float().mean())
    if ctl is not None:
        ctl.detach()
    return out


def first_below(curve: Sequence[tuple[int, float]], target: float) -> int | None:
    """First checked step whose loss is at or below ``target``."""
    return next((s for s, v in curve if math.isfinite(v) and v <= target), None)


def loss_at(curve: Sequence[tuple[int, float]], step: int) -> float:
    """The loss at the last checked step ``<= step`` (inf after a divergence)."""
    value = math.inf
    for s, v in curve:
        if s > step:
            break
        value = v if math.isfinite(v) else math.inf
    return value


def stable_lr(setup: Setup, data: Data, top: float, arm: str = "constant") -> float:
    """The largest LR of the ladder ``top, top/2, …`` at which seed 0 with a constant LR (of
    ``arm``'s optimizer) neither diverges nor stays above 90 % of its initial loss within the budget."""
    lr = top
    for _ in range(40):
        r = run_one(setup, arm, lr, 0, data, None)
        if not r.diverged and r.curve and r.final < 0.9 * r.curve[0][1]:
            return lr
        lr /= 2
    raise RuntimeError(f"{setup.key}: no stable constant LR down to {lr}")


# ---------------------------------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------------------------------


def med_range(values: Sequence[float], fmt: str = "{:.0f}") -> str:
    if not values:
        return "–"
    med = fmt.format(statistics.median(values))
    lo, hi = fmt.format(min(values)), fmt.format(max(values))
    return med if lo == hi else f"{med} [{lo}–{hi}]"


def best_lr(runs_by_lr: dict[float, list[Run]]) -> float | None:
    """Most seeds reaching the target, then the fewest median steps."""
    best, key = None, None
    for lr, runs in runs_by_lr.items():
        got = [r.reached for r in runs if r.reached is not None]
        if not got:
            continue
        k = (len(got), -statistics.median(got))
        if key is None or k > key:
            best, key = lr, k
    return best


def summarize(setup: Setup, res: dict[str, Any], emit: Callable[[str], None]) -> None:
    eta_s, target, grid = res["eta_s"], res["target"], res["grid"]
    runs: dict[str, dict[float, list[Run]]] = res["runs"]
    seeds = res["seeds"]
    emit("")
    emit(
        f"#### {setup.title}: {setup.steps} steps, largest stable constant LR η_s = {eta_s:g}, "
        f"target loss {target:.4g}"
        + (f" (LARS: its own η_s = {res['eta_lars']:g})" if "eta_lars" in res else "")
    )
    emit("")
    arms = [a for a in GRID_ARMS if a in runs]
    emit("| base LR / η_s | " + " | ".join(arms) + " |")
    emit("|" + "---|" * (len(arms) + 1))
    for i, lr in enumerate(grid):
        cells = []
        for a in arms:
            rs = list(runs[a].values())[i]  # LARS: the same position on its own grid
            ok = [r.reached for r in rs if r.reached is not None]
            div = sum(r.diverged for r in rs)
            c = f"{len(ok)}/{len(rs)}"
            if ok:
                c += f" · {statistics.median(ok):.0f} st"
            if div:
                c += f" · {div} div"
            cells.append(c)
        emit(f"| {lr / eta_s:g} | " + " | ".join(cells) + " |")
    emit("")
    emit(
        "| arm | robustness: fraction of grid LRs reaching the target, per seed | largest base LR "
        "reaching it (all seeds) / η_s | best LR / η_s | seeds there | steps | grad-equiv. | work | "
        "products / refresh |"
    )
    emit("|---|---|---|---|---|---|---|---|---|")
    for a in [*arms, *[f for f in FREE_ARMS if f in runs]]:
        by_lr = runs[a]
        free = a in FREE_ARMS
        fractions = [sum(by_lr[lr][s].reached is not None for lr in by_lr) / len(by_lr) for s in range(seeds)]
        all_ok = [lr for lr in by_lr if all(r.reached is not None for r in by_lr[lr])]
        scale = res.get("eta_lars", eta_s) if a == "LARS" else eta_s
        largest = "–" if free or not all_ok else f"{max(all_ok) / scale:g}"
        b = best_lr(by_lr)
        refreshing = [r for rs in by_lr.values() for r in rs if r.refreshes]
        per_refresh = (
            f"{sum(r.hvps for r in refreshing) / sum(r.refreshes for r in refreshing):.1f}"
            if refreshing
            else "–"
        )
        rob = "–" if free else med_range(fractions, "{:.2f}")
        if b is None:
            emit(f"| {a} | {rob} | {largest} | – | 0/{seeds} | – | – | – | {per_refresh} |")
            continue
        rs = by_lr[b]
        ok = [r for r in rs if r.reached is not None]
        steps = [float(r.reached) for r in ok]  # type: ignore[arg-type]
        geq = [r.grad_eq() for r in ok]
        work = [r.work() for r in ok]
        emit(
            f"| {a} | {rob} | {largest} | {'(lr 1)' if free else f'{b / scale:g}'} | {len(ok)}/{len(rs)} | "
            f"{med_range(steps)} | {med_range([g for g in geq if g is not None])} | "
            f"{med_range([w for w in work if w is not None])} | {per_refresh} |"
        )
    calm = res.get("calm")
    if calm:
        emit("")
        emit(
            f"Calm at η_s = {eta_s:g}, {setup.steps} steps, {seeds} seeds (twin: one ulp on every "
            "weight at step 0):"
        )
        emit("")
        emit("| arm | final train loss | twin gap at the end | held-out accuracy, mean ± std | diverged |")
        emit("|---|---|---|---|---|")
        for a, rs in calm.items():
            fin = [r.final for r in rs if math.isfinite(r.final) and not r.diverged]
            gaps = [r.twin_gap for r in rs if math.isfinite(r.twin_gap)]
            accs = [r.test_acc for r in rs]
            sd = statistics.pstdev(accs) if len(accs) > 1 else 0.0
            emit(
                f"| {a} | {med_range(fin, '{:.4f}')} | {med_range(gaps, '{:.1e}')} | "
                f"{100 * statistics.fmean(accs):.1f} % ± {100 * sd:.2f} | "
                f"{sum(r.diverged for r in rs)}/{len(rs)} |"
            )


def _present(arms: Sequence[str], results: dict[str, dict[str, Any]]) -> list[str]:
    """The arms, in order, that at least one setup of ``results`` ran."""
    return [a for a in arms if any(a in res["runs"] for res in results.values())]


def _best_steps(by_lr: dict[float, list[Run]]) -> tuple[float | None, list[Run]]:
    b = best_lr(by_lr)
    return b, ([] if b is None else [r for r in by_lr[b] if r.reached is not None])


def overview(
    results: dict[str, dict[str, Any]], setups: dict[str, Setup], emit: Callable[[str], None]
) -> None:
    """Three cross-setup tables: robustness, efficiency, calm (medians over seeds)."""
    arms = _present(GRID_ARMS, results)
    emit("")
    emit("Robustness: median over seeds of the fraction of the 8 grid LRs reaching the target (largest")
    emit("base LR / η_s reaching it with every seed in brackets):")
    emit("")
    emit("| setup | η_s | target | " + " | ".join(arms) + " |")
    emit("|" + "---|" * (len(arms) + 3))
    for key, res in results.items():
        cells = []
        for a in arms:
            by = res["runs"].get(a)
            if by is None:
                cells.append("n/r")
                continue
            n = res["seeds"]
            frac = statistics.median(
                sum(by[lr][s].reached is not None for lr in by) / len(by) for s in range(n)
            )
            scale = res.get("eta_lars", res["eta_s"]) if a == "LARS" else res["eta_s"]
            ok = [lr for lr in by if all(r.reached is not None for r in by[lr])]
            cells.append(f"{frac:.2f}" + (f" ({max(ok) / scale:g})" if ok else " (–)"))
        emit(f"| {setups[key].key} | {res['eta_s']:g} | {res['target']:.3g} | " + " | ".join(cells) + " |")
    emit("")
    emit("Efficiency: median steps to the target at each arm's best LR (best LR / η_s, seeds reaching it);")
    emit("controller arms also median work (steps + refresh CPU in training steps):")
    emit("")
    all_arms = [*arms, *_present(FREE_ARMS, results)]
    emit("| setup | " + " | ".join(all_arms) + " |")
    emit("|" + "---|" * (len(all_arms) + 1))
    for key, res in results.items():
        cells = []
        for a in all_arms:
            by = res["runs"].get(a)
            if by is None:
                cells.append("n/r")
                continue
            b, ok = _best_steps(by)
            if b is None:
                cells.append("never")
                continue
            scale = res.get("eta_lars", res["eta_s"]) if a == "LARS" else res["eta_s"]
            at = "" if a in FREE_ARMS else f" @{b / scale:g}"
            c = f"{statistics.median(float(r.reached) for r in ok):.0f}{at} ({len(ok)}/{len(by[b])})"  # type: ignore[arg-type]
            if a in CONTROLLER_ARMS:
                c += f", work {statistics.median(w for w in (r.work() for r in ok) if w is not None):.0f}"
            cells.append(c)
        emit(f"| {setups[key].key} | " + " | ".join(cells) + " |")
    emit("")
    emit("Calm at η_s over the whole budget: twin gap at the end (median) and held-out accuracy (mean ± std")
    emit("over seeds), constant vs cap:")
    emit("")
    emit("| setup | constant: final loss | gap | accuracy | cap: final loss | gap | accuracy |")
    emit("|---|---|---|---|---|---|---|")
    for key, res in results.items():
        calm = res.get("calm") or {}
        if not calm:
            continue
        cells = []
        for a in ("constant", "cap"):
            rs = calm[a]
            fin = [r.final for r in rs if math.isfinite(r.final) and not r.diverged]
            gaps = [r.twin_gap for r in rs if math.isfinite(r.twin_gap)]
            accs = [r.test_acc for r in rs]
            sd = statistics.pstdev(accs) if len(accs) > 1 else 0.0
            div = sum(r.diverged for r in rs)
            cells += [
                (f"{statistics.median(fin):.4f}" if fin else "–") + (f" ({div} div)" if div else ""),
                f"{statistics.median(gaps):.1e}" if gaps else "nan",
                f"{100 * statistics.fmean(accs):.1f} % ± {100 * sd:.1f}",
            ]
        emit(f"| {setups[key].key} | " + " | ".join(cells) + " |")


def plot(results: dict[str, dict[str, Any]], setups: dict[str, Setup], path: Path) -> None:
    """Robustness vs base LR: fraction of seeds reaching the target, one panel per setup."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(results)
    cols = min(4, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False, sharey=True)
    styles = {
        "constant": ("k", "o-"),
        "warm-up+cosine": ("tab:gray", "s--"),
        "LARS": ("tab:brown", "^--"),
        "cap": ("tab:blue", "o-"),
        "fill": ("tab:green", "o-"),
        "global": ("tab:orange", "v:"),
        "static": ("tab:purple", "d:"),
    }
    for ax, key in zip(axes.flat, keys):
        res = results[key]
        for arm, by_lr in res["runs"].items():
            if arm not in styles:
                continue
            xs = [lr / res["eta_s"] for lr in res["grid"]]  # LARS: the same positions on its own grid
            ys = [sum(r.reached is not None for r in rs) / len(rs) for rs in by_lr.values()]
            color, fmt = styles[arm]
            ax.plot(xs, ys, fmt, color=color, label=arm, ms=3, lw=1)
        ax.set_xscale("log", base=2)
        ax.axvline(1.0, color="0.8", lw=0.8)
        ax.set_title(setups[key].title, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(keys) :]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("base LR / η_s", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("seeds reaching target", fontsize=8)
    axes.flat[0].legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_steps(results: dict[str, dict[str, Any]], setups: dict[str, Setup], path: Path) -> None:
    """Steps (left) and work (right) to the target at each arm's best LR, over the constant LR's
    steps at its best LR (medians over the seeds reaching the target)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = _present((*GRID_ARMS, *FREE_ARMS), results)
    keys = list(results)
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 1.6 * len(keys) + 3), 3.4))
    width = 0.8 / len(arms)
    for ax, measure in zip(axes, ("steps", "work")):
        for i, arm in enumerate(arms):
            vals = []
            for key in keys:
                runs = results[key]["runs"]
                _, ref_runs = _best_steps(runs["constant"])
                b, ok = _best_steps(runs[arm]) if arm in runs else (None, [])
                if b is None or not ref_runs:
                    vals.append(math.nan)
                    continue
                ref = statistics.median(float(r.reached) for r in ref_runs)  # type: ignore[arg-type]
                got = [r.reached if measure == "steps" else r.work() for r in ok]
                vals.append(statistics.median(float(g) for g in got if g is not None) / ref)
            xs = [k + (i - (len(arms) - 1) / 2) * width for k in range(len(keys))]
            ax.bar(xs, vals, width, label=arm)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([setups[k].key for k in keys], rotation=30, ha="right", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        ax.set_ylabel(f"median {measure} to target / constant's steps", fontsize=8)
    axes[0].legend(fontsize=6, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------


def run_setup(
    setup: Setup,
    seeds: int,
    exponents: Sequence[int],
    calm: bool,
    free_cache: dict[Any, list[Run]],
    arms: Sequence[str] = DEFAULT_ARMS,
) -> dict[str, Any]:
    data = load_data(setup.model)
    top = 64.0 if setup.optimizer != "adam" else 1.0
    eta_s = stable_lr(setup, data, top)
    grid = [eta_s * 2.0**e for e in exponents]
    runs: dict[str, dict[float, list[Run]]] = {}
    # 1. constant, the whole budget: defines the target (loss of the best LR at half the budget)
    runs["constant"] = {
        lr: [run_one(setup, "constant", lr, s, data, None) for s in range(seeds)] for lr in grid
    }
    half = setup.steps // 2
    best_final = min(
        grid, key=lambda lr: statistics.median(loss_at(r.curve, setup.steps) for r in runs["constant"][lr])
    )
    target = statistics.median(loss_at(r.curve, half) for r in runs["constant"][best_final])
    for rs in runs["constant"].values():
        for r in rs:
            r.reached = first_below(r.curve, target)
    # 2. every other arm stops at the target. LARS scales its LR by trust·‖w‖/‖g‖ per layer: its LR
    #    is tuned on a grid of the same shape around its own largest stable LR.
    grids = {arm: grid for arm in GRID_ARMS}
    if setup.optimizer != "adam" and "LARS" in arms:
        eta_lars = stable_lr(setup, data, 2.0**16, "LARS")
        grids["LARS"] = [eta_lars * 2.0**e for e in exponents]
    for arm in GRID_ARMS[1:]:
        if arm not in arms or (arm == "LARS" and setup.optimizer == "adam"):
            continue
        runs[arm] = {
            lr: [run_one(setup, arm, lr, s, data, target) for s in range(seeds)] for lr in grids[arm]
        }
    for arm in (a for a in FREE_ARMS if a in arms):
        # no LR and no dependence on the setup's optimizer: run once per (model, batch) for the whole
        # budget, then read the steps to this setup's target off the curve
        key = (setup.model, setup.batch_size, setup.steps, arm)
        if key not in free_cache:
            free_cache[key] = [run_one(setup, arm, 1.0, s, data, None) for s in range(seeds)]
        runs[arm] = {
            1.0: [dataclasses.replace(r, reached=first_below(r.curve, target)) for r in free_cache[key]]
        }
    out: dict[str, Any] = {
        "eta_s": eta_s,
        "target": target,
        "grid": grid,
        "runs": runs,
        "seeds": seeds,
        "steps": setup.steps,
    }
    if "LARS" in runs:
        out["eta_lars"] = grids["LARS"][list(exponents).index(0)] if 0 in exponents else math.nan
    if calm:
        out["calm"] = {
            arm: [run_one(setup, arm, eta_s, s, data, None, twin=True) for s in range(seeds)]
            for arm in ("constant", "cap")
        }
    return out


def write_json(results: dict[str, dict[str, Any]], path: Path) -> None:
    """The raw runs (every curve) as JSON."""
    raw = {
        k: {
            **{kk: vv for kk, vv in v.items() if kk not in ("runs", "calm")},
            "runs": {
                a: {str(lr): [asdict(r) for r in rs] for lr, rs in by.items()} for a, by in v["runs"].items()
            },
            "calm": {a: [asdict(r) for r in rs] for a, rs in v.get("calm", {}).items()},
        }
        for k, v in results.items()
    }
    path.write_text(json.dumps(raw))


def read_json(paths: Sequence[Path]) -> tuple[dict[str, dict[str, Any]], dict[str, Setup]]:
    """Results and setups back from :func:`write_json` files (several runs' files merge)."""
    results: dict[str, dict[str, Any]] = {}
    setups: dict[str, Setup] = {}
    for path in paths:
        for key, v in json.loads(Path(path).read_text()).items():
            model, opt, batch = key.split("-")
            bs = None if batch == "full" else int(batch)
            setups[key] = Setup(model, opt, bs, int(v.get("steps", STEPS.get((model, bs), 0))))

            def runs_of(items: list[dict[str, Any]]) -> list[Run]:
                return [Run(**{**r, "curve": [tuple(c) for c in r["curve"]]}) for r in items]

            res = {
                **{kk: vv for kk, vv in v.items() if kk not in ("runs", "calm")},
                "runs": {a: {float(lr): runs_of(rs) for lr, rs in by.items()} for a, by in v["runs"].items()},
                "calm": {a: runs_of(rs) for a, rs in v.get("calm", {}).items()},
            }
            if key in results:  # the same setup in an earlier file: same grid and target, more arms
                old = results[key]
                if (old["eta_s"], old["target"]) != (res["eta_s"], res["target"]):
                    raise ValueError(f"{path}: {key} has another grid or target than an earlier file")
                res["runs"] = {**old["runs"], **res["runs"]}
                res["calm"] = {**old["calm"], **res["calm"]}
            results[key] = res
    return results, setups


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument(
        "--optimizers", nargs="+", default=["sgd", "mom", "adam"], choices=["sgd", "mom", "adam"]
    )
    parser.add_argument("--batches", nargs="+", default=["full", "100"], choices=["full", "100"])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument(
        "--arms",
        nargs="+",
        default=list(DEFAULT_ARMS),
        choices=[*GRID_ARMS[1:], *FREE_ARMS],
        help="arms besides constant (which sets the target and always runs)",
    )
    parser.add_argument("--no-calm", action="store_true", help="skip the twin / held-out accuracy runs")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    parser.add_argument("--json", type=Path, default=None, help="write the raw runs here")
    parser.add_argument("--figures", type=Path, default=None, help="write local_lr_*.png here")
    parser.add_argument(
        "--from-json",
        type=Path,
        nargs="+",
        default=None,
        help="no training: tables and figures from these --json files",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: 1 seed, MLP SGD full batch, 3 LRs, 40 steps"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    exponents: Sequence[int] = GRID_EXPONENTS
    setups: dict[str, Setup] = {}
    for model in args.models:
        for batch in args.batches:
            bs = None if batch == "full" else int(batch)
            if (model, bs) not in STEPS:
                continue
            for opt in args.optimizers:
                s = Setup(model, opt, bs, STEPS[(model, bs)])
                setups[s.key] = s
    if args.quick:
        args.seeds, exponents = 1, (-1, 0, 1)
        args.arms = [*GRID_ARMS[1:], *FREE_ARMS]
        setups = {"mlp-sgd-full": Setup("mlp", "sgd", None, 40)}
    lines: list[str] = []

    def emit(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    if args.from_json is not None:
        results, setups = read_json(args.from_json)
        overview(results, setups, emit)
        for key, setup in setups.items():
            summarize(setup, results[key], emit)
        if args.out is not None:
            args.out.write_text("\n".join(lines) + "\n")
        if args.figures is not None:
            plot(results, setups, args.figures / "local_lr_robustness.png")
            plot_steps(results, setups, args.figures / "local_lr_steps.png")
        return

    t_all = time.process_time()
    emit(
        f"torch {torch.__version__}, 1 thread; {args.seeds} paired seeds; grid η_s·2^e, e = "
        f"{exponents[0]}…{exponents[-1]}; controller defaults (safety 0.8, adaptive refresh 1..{EVERY} "
        "steps, tol 1e-2, warm starts); static = freeze_after "
        f"{STATIC_REFRESHES}"
    )
    results: dict[str, dict[str, Any]] = {}
    free_cache: dict[Any, list[Run]] = {}
    for key, setup in setups.items():
        t0 = time.process_time()
        results[key] = run_setup(setup, args.seeds, exponents, not args.no_calm, free_cache, args.arms)
        summarize(setup, results[key], emit)
        emit("")
        emit(f"({setup.key}: {time.process_time() - t0:.0f} s CPU)")
        if args.json is not None:  # after every setup: a partial run leaves its numbers behind
            write_json(results, args.json)
    emit("")
    emit(f"total CPU time {time.process_time() - t_all:.0f} s")
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n")
    if args.figures is not None:
        plot(results, setups, args.figures / "local_lr_robustness.png")
        plot_steps(results, setups, args.figures / "local_lr_steps.png")


if __name__ == "__main__":
    main()
