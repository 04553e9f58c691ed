"""Cost and accuracy of one Hessian-vector product of ``lightning_eos.curvature.HessianOperator``.

Two tables, on the digits problems of ``bench_curvature.py`` (same models, same trained weights, the
same 512-sample probe batch; one torch thread):

* ``--part cost``: CPU time of one product, in gradients (forward + backward of the same loss = 1),
  for the default exact product (and, with ``--baseline FILE``, for another version of
  ``operator.py`` loaded from ``FILE``, measured in the same run and interleaved with it), the bare
  ``torch.autograd.grad(g, params, v)`` on a cached graph (the floor of reverse-over-reverse; for
  models with BatchNorm or ReLU once with the native kernels in the graph and once with the forms
  the operator records, ``lightning_eos.curvature.operator.second_order_forms``), the
  finite-difference product, and the candidate speed-ups that were measured and rejected
  (``is_grads_batched`` over 8 vectors, per vector; channels-last activations and weights).
  Times are CPU seconds of this process (``time.process_time``: user + system, so page faults
  count), median over ``--repeats`` interleaved rounds in shuffled order, after one warm-up.
* ``--part fd``: relative error ``‖Hv_fd − Hv‖/‖Hv‖`` of the finite-difference product against the
  exact product of a float64 copy, for float64 and float32 copies of the MLP (tanh) and CNN (ReLU),
  over 4 random vectors and the top eigenvector, at step factors 0.1–10 around the default
  (``lightning_eos.curvature.operator.FD_STEP_FACTOR``); and λ_max computed with
  ``hvp="finite_difference"`` against the exact float64 λ_max.

Run: ``.venv/bin/python benchmarks/bench_hvp.py [--part cost|fd|all] [--models mlp cnn cnn-bn]
[--repeats 15] [--baseline /tmp/operator_before.py]`` (``git show HEAD:lightning_eos/curvature/
operator.py > /tmp/operator_before.py`` gives the committed version). Prints markdown tables.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_curvature import build, ce, load_digits_std, trained  # noqa: E402

import lightning_eos.curvature.operator as operator_module  # noqa: E402
from lightning_eos.curvature import HessianOperator, hessian_eigenvalues  # noqa: E402
from lightning_eos.curvature.operator import second_order_forms  # noqa: E402

Batch = tuple[torch.Tensor, torch.Tensor]


def _smooth_cnn(x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    """``cnn`` with SiLU instead of ReLU, trained by the same recipe (300 seeded SGD steps)."""
    torch.manual_seed(0)
    model = build("cnn")
    for i, layer in enumerate(model):
        if isinstance(layer, nn.ReLU):
            model[i] = nn.SiLU()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randint(0, x.shape[0], (64,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx].float()), y[idx]).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model


def problem(name: str) -> tuple[nn.Module, Batch]:
    """The trained digits model ``name`` and its fixed 512-sample probe batch (as bench_curvature).

    ``cnn-silu``: the ``cnn`` with SiLU activations (smooth), for the finite-difference table.
    """
    x, y = load_digits_std()
    model = _smooth_cnn(x, y) if name == "cnn-silu" else trained(name, x, y)
    dt = next(model.parameters()).dtype
    return model, (x[:512].to(dt), y[:512])


def cast(model: nn.Module, probe: Batch, dtype: torch.dtype) -> tuple[nn.Module, Batch]:
    return copy.deepcopy(model).to(dtype), (probe[0].to(dtype), probe[1])


def load_operator(path: str) -> type:
    """``HessianOperator`` from another version of ``operator.py`` (the "before" of a comparison)."""
    spec = importlib.util.spec_from_file_location("operator_baseline", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.HessianOperator


# ---------------------------------------------------------------------------------------------
# Cost
# ---------------------------------------------------------------------------------------------


def _train_mode_copy(model: nn.Module, channels_last: bool = False) -> nn.Module:
    m = copy.deepcopy(model).train()
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._NormBase):
            mod.track_running_stats = False
    if channels_last:
        m = m.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        # the probe is (N, 64), unflattened inside the model: make the image channels-last there
        m = nn.Sequential(m[0], _ChannelsLast(), *list(m)[1:])
    return m


class _ChannelsLast(nn.Module):
    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t.contiguous(memory_format=torch.channels_last)


def _cost_one(name: str, repeats: int, before_cls: type | None) -> dict[str, float]:
    """CPU seconds of each way of computing one product on problem ``name`` (and of a gradient)."""
    model, probe = problem(name)
    m = _train_mode_copy(model)
    mp = list(m.parameters())
    g_cached = torch.autograd.grad(ce(m, probe), mp, create_graph=True)
    gen = torch.Generator().manual_seed(0)
    vm = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) for p in mp]
    vb = [torch.randn((8, *p.shape), generator=gen, dtype=torch.float64).to(p.dtype) for p in mp]
    op = HessianOperator(model, ce, probe)
    v = torch.randn(op.dim, generator=gen, dtype=torch.float64).to(op.dtype)
    op_fd = HessianOperator(model, ce, probe, hvp="finite_difference")
    fns: dict[str, tuple[Callable[[], Any], int]] = {
        "gradient": (lambda: torch.autograd.grad(ce(m, probe), mp), 1),
        "product (this version)": (lambda: op @ v, 1),
        "bare autograd.grad on a cached graph (native kernels)": (
            lambda: torch.autograd.grad(g_cached, mp, vm, retain_graph=True),
            1,
        ),
        "finite differences (2 gradients)": (lambda: op_fd @ v, 1),
        "is_grads_batched, 8 vectors (per vector)": (
            lambda: torch.autograd.grad(g_cached, mp, vb, retain_graph=True, is_grads_batched=True),
            8,
        ),
    }
    if any(isinstance(mod, (nn.modules.batchnorm._BatchNorm, nn.ReLU)) for mod in m.modules()):
        # the graph the operator records: BatchNorm as x·a + c, ReLU as x·mask
        with second_order_forms(m):
            g_forms = torch.autograd.grad(ce(m, probe), mp, create_graph=True)
        fns["bare autograd.grad, second-order forms graph"] = (
            lambda: torch.autograd.grad(g_forms, mp, vm, retain_graph=True),
            1,
        )
    if before_cls is not None:
        op_before = before_cls(model, ce, probe)
        fns["product (baseline)"] = (lambda: op_before @ v, 1)
        torch.testing.assert_close(op_before @ v, op @ v, rtol=1e-5, atol=1e-6)
    if name.startswith("cnn"):
        mc = _train_mode_copy(model, channels_last=True)
        mcp = list(mc.parameters())
        g_cl = torch.autograd.grad(ce(mc, probe), mcp, create_graph=True)
        vcl = [t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in vm]
        fns["channels-last, bare autograd.grad"] = (
            lambda: torch.autograd.grad(g_cl, mcp, vcl, retain_graph=True),
            1,
        )
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for fn, _ in fns.values():
        fn()
    order = list(fns)
    shuffler = random.Random(0)
    for _ in range(repeats):
        shuffler.shuffle(order)  # no method always runs right after the same neighbour
        for key in order:
            fn, per = fns[key]
            t0 = time.process_time()
            fn()
            samples[key].append((time.process_time() - t0) / per)
    return {k: statistics.median(v) for k, v in samples.items()}


def cost_table(names: list[str], repeats: int, baseline: str | None) -> None:
    before_cls = load_operator(baseline) if baseline else None
    rows = {name: _cost_one(name, repeats, before_cls) for name in names}
    keys = list(dict.fromkeys(k for r in rows.values() for k in r))
    print(f"\n### One product, in gradients (CPU time, 1 thread, median of {repeats})\n")
    print("| | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for key in keys:
        cells = []
        for name in names:
            t = rows[name].get(key)
            if t is None:
                cells.append("—")
            elif key == "gradient":
                cells.append(f"1 ({1e3 * t:.2f} ms)")
            else:
                cells.append(f"{t / rows[name]['gradient']:.2f}")
        print(f"| {key} | " + " | ".join(cells) + " |")


# ---------------------------------------------------------------------------------------------
# Finite-difference accuracy
# ---------------------------------------------------------------------------------------------


def fd_table(names: list[str]) -> None:
    factors = [0.03, 0.1, 0.3, 1.0, 3.0]
    print("\n### Finite-difference product: relative error ‖Hv_fd − Hv‖/‖Hv‖ (median / max of 5 vectors)\n")
    head = " | ".join(f"factor {f:g}" for f in factors)
    print(f"| model | dtype | {head} | λ_max: rel. error, products | same, exact products |")
    print("|---|---|" + "---|" * (len(factors) + 2))
    default = operator_module.FD_STEP_FACTOR
    for name in names:
        model, probe = problem(name)
        m64, p64 = cast(model, probe, torch.float64)
        exact = HessianOperator(m64, ce, p64, hvp="exact")
        top = hessian_eigenvalues(m64, ce, p64, tol=1e-10, return_eigenvectors=True, hvp="exact")
        lam = float(top.eigenvalues[0])
        assert top.eigenvectors is not None
        gen = torch.Generator().manual_seed(3)
        vecs = [torch.randn(exact.dim, generator=gen, dtype=torch.float64) for _ in range(4)]
        vecs.append(top.eigenvectors[:, 0].clone())  # where a Lanczos basis ends up
        refs = [exact @ u for u in vecs]
        for dtype in (torch.float64, torch.float32):
            md, pd = cast(model, probe, dtype)
            fd = HessianOperator(md, ce, pd, hvp="finite_difference")
            cells = []
            try:
                for f in factors:
                    operator_module.FD_STEP_FACTOR = f
                    outs = [(fd @ u.to(fd.dtype)).double() for u in vecs]
                    errs = [float((o - r).norm() / r.norm()) for o, r in zip(outs, refs)]
                    cell = f"{statistics.median(errs):.1e} / {max(errs):.1e}"
                    cells.append(f"**{cell}**" if f == default else cell)
            finally:
                operator_module.FD_STEP_FACTOR = default
            for method in ("finite_difference", "exact"):  # the solver at its defaults either way
                res = hessian_eigenvalues(md, ce, pd, hvp=method, max_iter=60)
                cells.append(f"{abs(float(res.eigenvalues[0]) - lam) / abs(lam):.1e}, {res.num_hvps}")
            print(f"| {name} | {str(dtype).replace('torch.', '')} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["cost", "fd", "all"], default="all")
    ap.add_argument("--models", nargs="+", default=["mlp", "cnn", "cnn-bn"])
    ap.add_argument("--fd-models", nargs="+", default=["mlp", "cnn-silu", "cnn"])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--baseline", default=None, help="another operator.py to time against (same run)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread")
    if args.part in ("cost", "all"):
        cost_table(args.models, args.repeats, args.baseline)
    if args.part in ("fd", "all"):
        fd_table(args.fd_models)


if __name__ == "__main__":
    main()
