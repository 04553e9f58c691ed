"""Seeds vs one-ulp perturbations: the paper's headline experiment at the scale of the digits.

The claim being checked (Sun et al., NeurIPS 2022, with ResNet-56 on CIFAR-10): perturbing a
trained-from-scratch network by one floating-point ulp — or computing every update as the
mathematically equal ``(k·lr)·(step/k)`` — changes the final test accuracy about as much as changing
the random seed.

Scaled down: a small CNN with BatchNorm (the demo's, ``examples/demo.py``, with cross-entropy) on
scikit-learn's 1797 digits (1344 train = 21 batches of 64, 453 test, a fixed split), minibatch SGD
with the paper's recipe — batch 64, Nesterov momentum 0.9, coupled weight decay, lr ÷10 at fixed
epochs (the paper's epochs 40/80/120/160 become 8/16/24/32 of 40). Two changes of scale, both
stated in the output: the weight decay is 0.05 instead of 5e-4 — with BatchNorm the weight norms
settle on a time scale of 1/(lr·wd) steps, and 0.1 · 0.05 · 168 steps before the first decay =
0.84 matches the paper's 0.1 · 5e-4 · 40 epochs · 391 steps = 0.78 — and two initial learning rates
are run, the paper's 0.1 and 0.2 (``--lrs``). Groups, per learning rate, each trained the same
number of epochs and evaluated on the same test set:

* **seeds**: ``N`` runs, seed ``s`` = 0..N−1 changes the initialization *and* the batch order;
* **ulp twins**: ``N`` runs of seed 0 (same initialization, same batches), each with exactly one
  initial weight moved one ulp (``lightning_eos.twin.apply_ulp(single_weight=True, seed=j)``: a
  different entry for each ``j``);
* **rescaled steps**: seed 0 with every update taken as ``(k·lr)·(step/k)``
  (``lightning_eos.twin.perturb.rescaled_step``) for k = 3, 5, 7.

Each perturbed run is compared with the unperturbed seed-0 reference: its final relative weight gap
``Σ|w − w'| / Σ|w|`` and the fraction of test images the two classify differently. The reference is
trained twice to check that the pipeline itself is deterministic (the second run must be bitwise
equal, otherwise the differences would not be the perturbation's).

    python examples/paper_seeds_vs_ulp.py --out docs/figures     # N = 10, 2 lrs: ≈ 2–5 min on one core
    python examples/paper_seeds_vs_ulp.py --out /tmp/p --n 3 --epochs 10  # a quick look

Prints the markdown table and writes ``seeds_vs_ulp.png`` (accuracies per group, and the gap to the
reference epoch by epoch) into ``--out``; ``--json PATH`` also saves every run's numbers, from which
``--from-json PATH`` redraws the table and the figure without training.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the demo's model, next to this file
from demo import DigitsCNN

from lightning_eos.twin import apply_ulp
from lightning_eos.twin.perturb import rescaled_step


@dataclass
class Recipe:
    """The paper's recipe, scaled down (see the module docstring)."""

    epochs: int = 40
    milestones: tuple[int, ...] = (8, 16, 24, 32)
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.05
    batch_size: int = 64
    width: int = 8


@dataclass
class RunResult:
    group: str
    label: str
    test_acc: float
    final_gap: float = math.nan  # relative L1 gap to the reference's final weights
    disagreement: float = math.nan  # fraction of test images classified differently from the reference
    gap_per_epoch: list[float] = field(default_factory=list)


def load_split(seed: int = 0, n_test: int = 453) -> tuple[torch.Tensor, ...]:
    """1797 digits as standardized ``(1, 8, 8)`` images; a fixed train/test split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.as_tensor(data.images, dtype=torch.float32).unsqueeze(1)
    x = (x - x.mean()) / x.std()
    y = torch.as_tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(10_000 + seed))
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def flat_weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def relative_gap(w: torch.Tensor, ref: torch.Tensor) -> float:
    return float((w - ref).abs().sum() / ref.abs().sum())


def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(x).argmax(-1)
    model.train()
    return out


def train(
    recipe: Recipe,
    data: tuple[torch.Tensor, ...],
    seed: int,
    perturb: Callable[[nn.Module], None] | None = None,
    rescale_k: float | None = None,
) -> tuple[nn.Module, list[torch.Tensor]]:
    """One run; returns the model and its flat weights after every epoch."""
    x_tr, y_tr, _, _ = data
    model = DigitsCNN(width=recipe.width, seed=seed).net  # the plain nn.Sequential (no Lightning)
    if perturb is not None:
        perturb(model)
    opt = torch.optim.SGD(
        model.parameters(),
        lr=recipe.lr,
        momentum=recipe.momentum,
        nesterov=True,
        weight_decay=recipe.weight_decay,
    )
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(recipe.milestones), gamma=0.1)
    order = torch.Generator().manual_seed(seed)
    snapshots = []
    for _ in range(recipe.epochs):
        perm = torch.randperm(len(y_tr), generator=order)
        for start in range(0, len(perm), recipe.batch_size):
            idx = perm[start : start + recipe.batch_size]
            loss = nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if rescale_k is None:
                opt.step()
            else:
                rescaled_step(opt, opt.step, rescale_k)
        sched.step()
        snapshots.append(flat_weights(model).clone())
    return model, snapshots


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((predict(model, x) == y).float().mean())


def run_all(recipe: Recipe, n: int, ks: Sequence[float], log: Callable[[str], None]) -> dict:
    """The reference (twice), ``n`` seeds, ``n`` one-ulp twins and one rescaled run per ``k``."""
    data = load_split()
    _, _, x_te, y_te = data
    t0 = time.perf_counter()
    ref, ref_snaps = train(recipe, data, seed=0)
    ref_pred, ref_w = predict(ref, x_te), ref_snaps[-1]
    per_run = time.perf_counter() - t0
    acc = accuracy(ref, x_te, y_te)
    log(f"lr {recipe.lr:g}: reference (seed 0) test accuracy {acc:.4f} ({per_run:.1f} s/run)")
    _, again_snaps = train(recipe, data, seed=0)
    deterministic = bool(torch.equal(again_snaps[-1], ref_w))
    log(f"  reference trained again: bitwise equal = {deterministic}")

    def compare(group: str, label: str, model: nn.Module, snaps: list[torch.Tensor]) -> RunResult:
        res = RunResult(
            group,
            label,
            accuracy(model, x_te, y_te),
            final_gap=relative_gap(snaps[-1], ref_w),
            disagreement=float((predict(model, x_te) != ref_pred).float().mean()),
            gap_per_epoch=[relative_gap(w, r) for w, r in zip(snaps, ref_snaps)],
        )
        log(
            f"  {group:<15} {label:<14} acc {res.test_acc:.4f}  gap {res.final_gap:.3g}  "
            f"disagree {res.disagreement:.4f}"
        )
        return res

    results: list[RunResult] = [compare("seeds", "seed 0", ref, ref_snaps)]
    for s in range(1, n):
        results.append(compare("seeds", f"seed {s}", *train(recipe, data, seed=s)))
    for j in range(n):

        def one_ulp(model: nn.Module, j: int = j) -> None:
            moved = apply_ulp(dict(model.named_parameters()), single_weight=True, seed=j)
            assert moved == 1

        results.append(compare("ulp twins", f"ulp entry #{j}", *train(recipe, data, seed=0, perturb=one_ulp)))
    for k in ks:
        results.append(compare("rescaled steps", f"k = {k:g}", *train(recipe, data, seed=0, rescale_k=k)))
    return {
        "recipe": asdict(recipe),
        "n": n,
        "ks": list(ks),
        "deterministic": deterministic,
        "reference_acc": results[0].test_acc,
        "test_size": len(y_te),
        "runs": [asdict(r) for r in results],
        "seconds": time.perf_counter() - t0,
    }


GROUPS = ("seeds", "ulp twins", "rescaled steps")


def table(experiments: Sequence[dict]) -> str:
    """The markdown table: one row per learning rate and group."""
    lines = [
        "| lr | group | runs | test accuracy, mean | std | min – max | final weight gap to seed 0 (median) "
        "| prediction disagreement with seed 0 (mean) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for out in experiments:
        runs = [RunResult(**r) for r in out["runs"]]
        for group in GROUPS:
            rs = [r for r in runs if r.group == group]
            accs = [r.test_acc for r in rs]
            # The seed group's reference (seed 0) is left out of its gap and disagreement columns.
            others = [r for r in rs if r.label != "seed 0"]
            gap = statistics.median(r.final_gap for r in others) if others else math.nan
            dis = statistics.fmean(r.disagreement for r in others) if others else math.nan
            std = f"{100 * statistics.stdev(accs):.2f} %" if len(accs) > 1 else "—"
            mean = 100 * statistics.fmean(accs)
            lines.append(
                f"| {out['recipe']['lr']:g} | {group} | {len(rs)} | {mean:.2f} % | {std} | "
                f"{100 * min(accs):.2f} – {100 * max(accs):.2f} % | {gap:.2g} | {100 * dis:.2f} % |"
            )
    return "\n".join(lines)


def figure(experiments: Sequence[dict], path: Path) -> None:
    """Left: every run's test accuracy per group and lr; right: its gap to seed 0, epoch by epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"seeds": "C0", "ulp twins": "C3", "rescaled steps": "C2"}
    short = {"seeds": "seeds", "ulp twins": "1 ulp", "rescaled steps": "k·lr, g/k"}
    fig, axes = plt.subplots(
        1,
        1 + len(experiments),
        figsize=(6 + 4.2 * len(experiments), 4.2),
        gridspec_kw={"width_ratios": [1.4] + [1] * len(experiments)},
    )
    left, gap_axes = axes[0], axes[1:]
    ticks, labels = [], []
    for e, out in enumerate(experiments):
        runs = [RunResult(**r) for r in out["runs"]]
        for g, group in enumerate(GROUPS):
            x0 = e * (len(GROUPS) + 1) + g
            accs = [100 * r.test_acc for r in runs if r.group == group]
            jitter = [x0 - 0.1 + 0.05 * ((j % 5) - 2) for j in range(len(accs))]
            left.scatter(jitter, accs, color=colors[group], alpha=0.7, s=16, zorder=3)
            if len(accs) > 1:
                mean, std = statistics.fmean(accs), statistics.stdev(accs)
                left.errorbar([x0 + 0.25], [mean], yerr=[std], fmt="o", ms=4, color="k", capsize=3, zorder=4)
            ticks.append(x0)
            labels.append(f"{short[group]}\nn = {len(accs)}")
        left.text(
            e * (len(GROUPS) + 1) + 1,
            0.97,
            f"lr {out['recipe']['lr']:g}",
            transform=left.get_xaxis_transform(),
            ha="center",
            va="top",
            fontsize=10,
            fontweight="bold",
        )
        if e:
            left.axvline(e * (len(GROUPS) + 1) - 1, color="gray", lw=0.6)
        ax = gap_axes[e]
        epochs = range(1, out["recipe"]["epochs"] + 1)
        for r in runs:
            if r.label != "seed 0":
                ax.semilogy(
                    epochs, [max(v, 1e-9) for v in r.gap_per_epoch], color=colors[r.group], alpha=0.55, lw=1
                )
        for group in GROUPS:
            ax.plot([], [], color=colors[group], label=group)
        for m in out["recipe"]["milestones"]:
            ax.axvline(m, color="gray", lw=0.6, ls="--")
        ax.set_ylim(1e-9, 5)
        ax.set_xlabel("epoch (dashed: lr ÷ 10)")
        ax.set_ylabel("relative L1 gap to seed 0 (0 at 1e-9)")
        ax.set_title(f"distance from the seed-0 run, lr {out['recipe']['lr']:g}")
        ax.legend(fontsize=7, loc="center right")
    lo, hi = left.get_ylim()
    left.set_ylim(lo, hi + 0.25 * (hi - lo))  # room for the lr labels
    left.set_xticks(ticks)
    left.set_xticklabels(labels, fontsize=7)
    left.set_ylabel("test accuracy (%)")
    left.set_title("final test accuracy (black: mean ± std)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/seeds_vs_ulp"), help="folder for the PNG/JSON")
    parser.add_argument("--n", type=int, default=10, help="runs in the seed group and in the ulp group")
    parser.add_argument(
        "--epochs", type=int, default=40, help="epochs (lr ÷10 after 1/5, 2/5, 3/5, 4/5 of them)"
    )
    parser.add_argument(
        "--lrs", type=str, default="0.1,0.2", help="initial learning rates, one experiment each"
    )
    parser.add_argument("--weight-decay", type=float, default=0.05, help="coupled weight decay")
    parser.add_argument("--ks", type=str, default="3,5,7", help="rescale factors k of (k·lr)·(step/k)")
    parser.add_argument("--json", type=Path, default=None, help="also save every run's numbers here")
    parser.add_argument(
        "--from-json",
        type=Path,
        default=None,
        help="redraw the table and figure from a --json file",
    )
    args = parser.parse_args(argv)
    if args.from_json is not None:
        experiments = json.loads(args.from_json.read_text())["experiments"]
        print(table(experiments))
        args.out.mkdir(parents=True, exist_ok=True)
        figure(experiments, args.out / "seeds_vs_ulp.png")
        return experiments
    torch.set_num_threads(1)  # one core; also keeps every run deterministic
    start = time.perf_counter()
    e = args.epochs
    milestones = tuple(sorted({max(1, round(e * f / 5)) for f in (1, 2, 3, 4)}))
    ks = [float(k) for k in args.ks.split(",") if k]
    experiments = []
    for lr in (float(v) for v in args.lrs.split(",") if v):
        recipe = Recipe(epochs=e, milestones=milestones, lr=lr, weight_decay=args.weight_decay)
        experiments.append(run_all(recipe, args.n, ks, log=print))
    args.out.mkdir(parents=True, exist_ok=True)
    md = table(experiments)
    first = experiments[0]
    print(
        f"\n{args.n} seeds vs {args.n} one-ulp twins vs {len(ks)} rescaled runs (k = {args.ks}) per lr; "
        f"{e} epochs, batch {first['recipe']['batch_size']}, Nesterov 0.9, "
        f"weight decay {args.weight_decay:g}, "
        f"lr ÷10 at epochs {', '.join(map(str, milestones))}; test set {first['test_size']} images; "
        f"reference bitwise reproducible: {all(x['deterministic'] for x in experiments)}; "
        f"{time.perf_counter() - start:.0f} s\n"
    )
    print(md)
    figure(experiments, args.out / "seeds_vs_ulp.png")
    print(f"\nwrote {args.out / 'seeds_vs_ulp.png'}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"table": md, "experiments": experiments}, indent=1))
        print(f"wrote {args.json}")
    return experiments


if __name__ == "__main__":
    main()
