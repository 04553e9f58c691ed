"""Benchmark of ``lightning_eos.curvature`` against float64 ground truth and the peer libraries.

Reference problems (scikit-learn's ``load_digits``, standardized; weights after 300 seeded SGD
steps, lr 0.05, batch 64, mean cross-entropy; a fixed 512-sample probe batch):

* ``mlp-small`` MLP 64-32-32-10 tanh, float64 (3,466 parameters)
* ``mlp``       MLP 64-128-128-10 tanh, float64 (26,122)
* ``cnn``       conv 1→16, conv 16→32 (3×3, ReLU), avgpool 2, linear; float32 (9,930)
* ``cnn-bn``    the same with BatchNorm2d after each conv, train mode; float32 (10,026)

Ground truth: ARPACK (``scipy.sparse.linalg.eigsh``, ``which="LA"``, tol 1e-13) on plain float64
double-backprop HVPs of a float64 copy (train-mode BatchNorm with batch statistics), independent of
the code under test. Peers are run in the same process on copies of the same weights; one torch
thread. Times are **CPU seconds of this process** (``time.process_time``, one thread everywhere),
best of ``--repeats`` runs after one warm-up: on a shared, loaded machine wall-clock time mostly
measures the neighbours, CPU time measures the work.

Run: ``.venv/bin/python benchmarks/bench_curvature.py`` (``make bench`` installs the peers with
``pip install --no-deps``). Prints markdown tables.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

# One BLAS/OpenMP thread for numpy/scipy too (set before they load): timings are per-core.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from lightning_eos.curvature import HessianOperator, hessian_eigenvalues  # noqa: E402

Batch = tuple[torch.Tensor, torch.Tensor]
Row = dict[str, str]


def load_digits_std() -> Batch:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.as_tensor(d.data, dtype=torch.float64)
    std = x.std(0, unbiased=False)
    x = (x - x.mean(0)) / torch.where(std > 0, std, torch.ones_like(std))
    return x, torch.as_tensor(d.target, dtype=torch.int64)


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "mlp-small":
        return nn.Sequential(
            nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 10)
        ).double()
    if name == "mlp":
        return nn.Sequential(
            nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 10)
        ).double()
    bn = name == "cnn-bn"
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 16, 3, padding=1),
        *([nn.BatchNorm2d(16)] if bn else []),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        *([nn.BatchNorm2d(32)] if bn else []),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(512, 10),
    )


def trained(name: str, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    model = build(name)
    dt = next(model.parameters()).dtype
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(300):
        idx = torch.randint(0, x.shape[0], (64,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx].to(dt)), y[idx]).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model


def ce(model: nn.Module, batch: Batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def ground_truth(model: nn.Module, probe: Batch) -> tuple[float, float]:
    """λ_1, λ_2 by ARPACK on exact float64 HVPs (graph rebuilt per product: simple and independent)."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    ref = copy.deepcopy(model).double().train()
    for m in ref.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase):
            m.track_running_stats = False
    params = list(ref.parameters())
    x, y = probe[0].double(), probe[1]
    n = sum(p.numel() for p in params)

    def mv(v: np.ndarray) -> np.ndarray:
        g = torch.autograd.grad(ce(ref, (x, y)), params, create_graph=True)
        vt = torch.as_tensor(np.asarray(v).reshape(-1), dtype=torch.float64)
        vs = [c.view(p.shape) for c, p in zip(vt.split([p.numel() for p in params]), params)]
        hv = torch.autograd.grad(g, params, vs)
        return torch.cat([h.reshape(-1) for h in hv]).numpy()

    val = eigsh(LinearOperator((n, n), matvec=mv, dtype=np.float64), k=2, which="LA", tol=1e-13)[0]
    top2 = sorted(val.tolist(), reverse=True)
    return top2[0], top2[1]


Solver = Callable[[nn.Module, Batch], tuple[float, int]]


def timed(fn: Solver, model: nn.Module, probe: Batch, repeats: int) -> tuple[float, int, float]:
    best = float("inf")
    val, hvps = fn(model, probe)  # warm-up (first-call allocations, lazy imports)
    for _ in range(repeats):
        t0 = time.process_time()
        val, hvps = fn(model, probe)
        best = min(best, time.process_time() - t0)
    return val, hvps, best


def cell(val: float, hvps: int, sec: float, truth: float) -> tuple[str, float, float]:
    err = abs(val - truth) / abs(truth)
    return f"{err:.1e} / {hvps} / {sec:.3f}", err, sec


# ---------------------------------------------------------------------------------------------
# Ours
# ---------------------------------------------------------------------------------------------


def ours(model: nn.Module, probe: Batch, tol: float | None, backend: str = "autograd") -> tuple[float, int]:
    kw: dict[str, Any] = {} if tol is None else {"tol": tol}
    r = hessian_eigenvalues(model, ce, probe, backend=backend, **kw)
    return float(r.eigenvalues[0]), r.num_hvps


def hvp_cost(model: nn.Module, probe: Batch, reps: int) -> dict[str, float]:
    """CPU seconds per gradient and per HVP (several ways): min over ``reps`` interleaved rounds in
    shuffled order, so that load changes and cache effects hit every method alike."""
    m = copy.deepcopy(model).train()
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._NormBase):
            mod.track_running_stats = False
    mparams = list(m.parameters())
    gm = torch.autograd.grad(ce(m, probe), mparams, create_graph=True)
    vm = [torch.randn_like(p) for p in mparams]
    op = HessianOperator(model, ce, probe)
    v = torch.randn(op.dim, dtype=op.dtype)
    op2 = HessianOperator(model, ce, probe, cache_graphs=False)
    fns: dict[str, Callable[[], object]] = {
        "grad": lambda: torch.autograd.grad(ce(m, probe), mparams),
        "bare torch.autograd.grad(g, params, v) on a cached graph (floor)": lambda: torch.autograd.grad(
            gm, mparams, vm, retain_graph=True
        ),
        "hvp cached graph (default)": lambda: op @ v,
        "hvp graph rebuilt per product": lambda: op2 @ v,
    }
    try:
        op3 = HessianOperator(model, ce, probe, backend="func")
        fns["hvp backend='func' (jvp of grad)"] = lambda: op3 @ v
    except Exception as err:  # recorded in the table
        print(f"  func backend failed: {type(err).__name__}: {err}".splitlines()[0])
    out = {key: float("inf") for key in fns}
    for fn in fns.values():
        fn()  # warm-up
    order = list(fns)
    shuffler = random.Random(0)
    for _ in range(reps):
        shuffler.shuffle(order)  # no method always runs right after the same neighbour
        for key in order:
            t0 = time.process_time()
            fns[key]()
            out[key] = min(out[key], time.process_time() - t0)
    return out


# ---------------------------------------------------------------------------------------------
# Peers (each on a deep copy: some of them change the model's mode or buffers)
# ---------------------------------------------------------------------------------------------


def peer_pyhessian(model: nn.Module, probe: Batch, tol: float) -> tuple[float, int]:
    import sys

    import pyhessian  # noqa: F401 - its package attribute `hessian` is the class, not the module

    ph = sys.modules["pyhessian.hessian"]

    counter = {"n": 0}
    orig = ph.hessian_vector_product

    def counted(*a: Any, **k: Any) -> Any:
        counter["n"] += 1
        return orig(*a, **k)

    ph.hessian_vector_product = counted
    try:
        m = copy.deepcopy(model)
        h = ph.hessian(m, nn.CrossEntropyLoss(), data=probe, cuda=False)
        vals, _ = h.eigenvalues(maxIter=100, tol=tol, top_n=1)
    finally:
        ph.hessian_vector_product = orig
    return float(vals[0]), counter["n"]


def peer_eigenthings(model: nn.Module, probe: Batch, mode: str, max_iter: int | None) -> tuple[float, int]:
    import hessian_eigenthings as he

    m = copy.deepcopy(model).train()
    op = he.HessianOperator(m, [probe], he.supervised_loss(nn.CrossEntropyLoss()))
    counter = {"n": 0}
    orig = op.matvec

    def counted(v: torch.Tensor) -> torch.Tensor:
        counter["n"] += 1
        return orig(v)

    op.matvec = counted  # type: ignore[method-assign]
    if mode == "lanczos":
        r = he.lanczos(op, k=1, which="LA", max_iter=max_iter, seed=0)
        val = float(r.eigenvalues[0])
    else:
        val = float(he.power_iteration_one(op, seed=0)[0])
    return val, counter["n"]


def peer_curvlinops(model: nn.Module, probe: Batch, tol: float) -> tuple[float, int]:
    from curvlinops import HessianLinearOperator
    from scipy.sparse.linalg import LinearOperator, eigsh

    m = copy.deepcopy(model).train()
    params = [p for p in m.parameters() if p.requires_grad]
    H = HessianLinearOperator(m, nn.CrossEntropyLoss(), params, [probe]).to_scipy()
    counter = {"n": 0}

    def mv(v: np.ndarray) -> np.ndarray:
        counter["n"] += 1
        return H @ v

    op = LinearOperator(H.shape, matvec=mv, dtype=H.dtype)
    val = eigsh(op, k=1, which="LA", tol=tol)[0]
    return float(val[0]), counter["n"]


def trap_table(dim: int = 1000) -> None:
    """λ2/λ1 = 0.95 (the stopping-rule trap of peers.md, not present in these trained weights):
    a quadratic with a Hessian-like spectrum — 1, 0.95, then |N(0, 0.05)| bulk with 10 % negated."""
    from lightning_eos.curvature import FunctionOperator, lanczos, power_iteration

    g = torch.Generator().manual_seed(0)
    bulk = torch.randn(dim - 2, generator=g, dtype=torch.float64).abs() * 0.05
    bulk[: (dim - 2) // 10] *= -1
    lam = torch.cat([torch.tensor([1.0, 0.95], dtype=torch.float64), bulk])
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    a = (q * lam) @ q.T
    op = FunctionOperator(lambda v: a @ v, dim)
    print("\n## λ2/λ1 = 0.95 quadratic (dim 1000): relative error of λ_max / products / converged flag\n")
    print("| solver | result |")
    print("|---|---|")
    for label, solve in [
        ("lanczos, default tol 1e-4", lambda: lanczos(op)),
        ("lanczos, tol 1e-3", lambda: lanczos(op, tol=1e-3)),
        ("power, default tol 1e-4", lambda: power_iteration(op)),
    ]:
        r = solve()
        err = abs(float(r.eigenvalues[0]) - 1.0)
        print(f"| {label} | {err:.1e} / {r.num_hvps} / {bool(r.converged.all())} |")


def configs(with_peers: bool) -> dict[str, Solver]:
    """Every (tool, setting) row of the accuracy table."""
    rows: dict[str, Solver] = {
        "lightning_eos (defaults: lanczos, tol 1e-4)": lambda m, b: ours(m, b, None),
        "lightning_eos tol 1e-3": lambda m, b: ours(m, b, 1e-3),
        "lightning_eos tol 3e-4": lambda m, b: ours(m, b, 3e-4),
        "lightning_eos tol 3e-5": lambda m, b: ours(m, b, 3e-5),
        "lightning_eos backend='func'": lambda m, b: ours(m, b, None, "func"),
    }
    if with_peers:
        rows.update(
            {
                "PyHessian defaults (power, tol 1e-3)": lambda m, b: peer_pyhessian(m, b, 1e-3),
                "PyHessian tol 1e-6": lambda m, b: peer_pyhessian(m, b, 1e-6),
                "hessian-eigenthings lanczos defaults": lambda m, b: peer_eigenthings(m, b, "lanczos", None),
                "hessian-eigenthings lanczos max_iter 30": lambda m, b: peer_eigenthings(m, b, "lanczos", 30),
                "hessian-eigenthings power defaults": lambda m, b: peer_eigenthings(m, b, "power", None),
                "curvlinops + eigsh (defaults, tol 0)": lambda m, b: peer_curvlinops(m, b, 0.0),
                "curvlinops + eigsh tol 1e-4": lambda m, b: peer_curvlinops(m, b, 1e-4),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="*", default=["mlp-small", "mlp", "cnn", "cnn-bn"])
    parser.add_argument("--no-peers", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    print(f"torch {torch.__version__}, 1 thread")
    x, y = load_digits_std()
    acc: dict[str, dict[str, tuple[str, float, float]]] = {}
    costs: dict[str, dict[str, float]] = {}
    truths: dict[str, float] = {}
    for name in args.models:
        model = trained(name, x, y)
        dt = next(model.parameters()).dtype
        probe = (x[:512].to(dt), y[:512])
        t0 = time.process_time()
        truth, second = ground_truth(model, probe)
        truths[name] = truth
        print(
            f"{name}: {sum(p.numel() for p in model.parameters())} params, {dt}, λ_max = {truth:.6f},"
            f" λ2/λ1 = {second / truth:.3f} (ground truth in {time.process_time() - t0:.1f} s)"
        )
        rows = configs(with_peers=not args.no_peers)
        for label, fn in rows.items():
            try:
                val, hvps, sec = timed(fn, model, probe, args.repeats)
                acc.setdefault(label, {})[name] = cell(val, hvps, sec, truth)
            except Exception as err:  # a crash is a result
                msg = f"{type(err).__name__}: {err}".splitlines()[0][:60]
                acc.setdefault(label, {})[name] = (f"crash ({msg})", float("inf"), float("inf"))
                if label.startswith("lightning_eos"):
                    traceback.print_exc()
            print(f"  {label}: {acc[label][name][0]}")
        costs[name] = hvp_cost(model, probe, reps=20 if name.startswith("mlp") else 10)

    names = args.models
    print("\n## Top eigenvalue: relative error / HVPs / seconds\n")
    print("| tool | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for label, per in acc.items():
        print(f"| {label} | " + " | ".join(per.get(n, ("-", 0, 0))[0] for n in names) + " |")
    default = "lightning_eos (defaults: lanczos, tol 1e-4)"
    print("\n## Speed-up of the default over the fastest peer at equal or better accuracy\n")
    print("| model | ours (s) | fastest peer as accurate | its time (s) | speed-up |")
    print("|---|---|---|---|---|")
    for n in names:
        _, err, sec = acc[default][n]
        peers = [
            (per[n][2], label)
            for label, per in acc.items()
            if not label.startswith("lightning_eos") and n in per and per[n][1] <= max(err, 1e-15)
        ]
        if peers:
            t, label = min(peers)
            print(f"| {n} | {sec:.3f} | {label} | {t:.3f} | {t / sec:.1f}× |")
        else:
            print(f"| {n} | {sec:.3f} | none reaches {err:.1e} | - | - |")
    trap_table()
    print("\n## Cost of one product, in gradients (forward+backward = 1)\n")
    keys = list(next(iter(costs.values())))
    print("| method | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    print("| gradient (ms) | " + " | ".join(f"{costs[n]['grad'] * 1e3:.2f}" for n in names) + " |")
    for key in keys:
        if key == "grad":
            continue
        print(
            f"| {key} | "
            + " | ".join(f"{costs[n].get(key, float('nan')) / costs[n]['grad']:.2f}" for n in names)
            + " |"
        )


if __name__ == "__main__":
    main()
