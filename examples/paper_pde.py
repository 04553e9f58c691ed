"""Regenerate the paper-style figures of the convolution-PDE analysis (Sun et al., NeurIPS 2022).

Writes three PNGs into ``--out``:

* ``cfl_heat.png`` -- forward Euler on the heat equation just below / above the CFL limit
  Δt/Δx² = ½, started from round-off-level noise;
* ``linearized_window.png`` -- the linearized (transitioning-region) PDE on the 256×256 checkerboard
  with a 32×32 kernel, Δt = 1e-8, for α across the predicted window (1.296e7, 2e8);
* ``nonlinear_restrained.png`` -- the non-linear one-layer model (α = 20, 1000 steps): loss, twin
  divergence D (``(k·Δt)·(grad/k)`` twin, k = 3) and kernel norm for Δt ∈ {0.01, ..., 0.09, 0.11}.

Offline, CPU only, well under a minute (``--steps`` shortens the runs). Usage::

    python examples/paper_pde.py --out docs/figures
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display needed
import matplotlib.pyplot as plt
import numpy as np
import torch

from lightning_eos import pde

DPI = 80  # keeps each PNG well below 200 KB


def heat_cfl_figure(out: Path) -> Path:
    """Forward Euler for u_t = u_xx on a periodic grid, r = Δt/Δx² = 0.45 (stable) vs 0.55."""
    rng = np.random.default_rng(0)
    n, steps = 64, 400
    x = np.linspace(0.0, 1.0, n, endpoint=False)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for r, color in ((0.45, "C0"), (0.5, "C1"), (0.55, "C3")):
        # A smooth profile plus round-off-sized noise: the noise excites every Fourier mode.
        u = np.sin(2 * np.pi * x) + 1e-15 * rng.standard_normal(n)
        norms = []
        for _ in range(steps):
            u = u + r * (np.roll(u, 1) - 2 * u + np.roll(u, -1))
            norms.append(np.abs(u).max())
        axes[0].semilogy(norms, color=color, label=f"Δt/Δx² = {r}")
        if r != 0.5:
            axes[1].plot(x, np.clip(u, -2, 2), color=color, label=f"Δt/Δx² = {r} (clipped)")
    axes[0].set(xlabel="step", ylabel="max |u|", title="forward Euler, heat equation")
    axes[0].legend(fontsize=8)
    axes[1].set(xlabel="x", ylabel=f"u after {steps} steps", title="round-off amplified above r = ½")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    path = out / "cfl_heat.png"
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def linearized_figure(out: Path, steps: int) -> tuple[Path, dict[float, float]]:
    """Kernel norm of the linearized PDE for α across the checkerboard's window, and the measured
    per-step growth against the von Neumann prediction max|G|."""
    image = pde.checkerboard(256)
    dt = 1e-8
    spec = pde.conv_operator_spectrum(image, 32)
    low, high = pde.conv_weight_decay_window(image, 32, dt, spectrum=spec)
    alphas = [1.1e7, 1.2e7, 1.3e7, 1.9e8, 2.0e8, 2.1e8, 2.2e8]
    growth: dict[float, float] = {}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    measured = []
    for alpha in alphas:
        res = pde.simulate_linearized(image, 32, dt, alpha, steps)
        growth[alpha] = res.growth
        # The dominant mode's factor per step, read off the last two iterates.
        measured.append(float(res.kernel_norm[-1] / res.kernel_norm[-2]))
        style = "-" if low < alpha < high else "--"
        axes[0].semilogy(res.kernel_norm.numpy(), style, label=f"α = {alpha:.2g}")
    axes[0].set(xlabel="iteration", ylabel="‖K‖", title=f"linearized PDE, window ({low:.4g}, {high:.3g})")
    axes[0].set_ylim(1e-8, 1e40)
    axes[0].legend(fontsize=7, ncol=2, title="dashed: outside", title_fontsize=7)
    # Prediction: the modes of (aβ/2)PᵀP + αI are α − ¼λ_max(PᵀP) (one mode) and α (the others).
    grid = np.geomspace(5e6, 3e8, 400)
    g_max = np.maximum(np.abs(1 - dt * (grid - spec.lambda_max / 4)), np.abs(1 - dt * grid))
    axes[1].semilogx(grid, g_max, label="predicted max |G(ω)|")
    axes[1].semilogx(alphas, measured, "o", label=f"measured ‖K_T‖/‖K_T-1‖ (T = {steps})")
    axes[1].axhline(1.0, color="gray", lw=0.8)
    for edge in (low, high):
        axes[1].axvline(edge, color="gray", ls=":", lw=0.8)
    axes[1].set(xlabel="α", ylabel="growth per step", title="checkerboard 256², kernel 32², Δt = 1e-8")
    axes[1].set_ylim(0.8, 1.25)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    path = out / "linearized_window.png"
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path, growth


def nonlinear_figure(out: Path, steps: int) -> tuple[Path, dict[float, str]]:
    """Loss, twin divergence and kernel norm of the non-linear one-layer model across Δt."""
    image = pde.checkerboard(256)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    summary: dict[float, str] = {}
    for dt in (0.01, 0.03, 0.05, 0.07, 0.09, 0.11):
        twin = "rescale" if dt < 0.1 else None
        # The blow-up needs no twin and is unmistakable after 300 steps (1.2^300 ≈ 5e23).
        n_steps = steps if twin else min(steps, 300)
        res = pde.simulate_conv_pde(image, 32, dt, 20.0, n_steps, twin=twin, record_every=None)
        if dt < 0.1:  # the blown-up run's loss is 0 (saturated sigmoid): nothing to see
            calm = dt < 0.032  # below 2/62: drawn on top, the oscillating runs would hide it
            axes[0].plot(
                res.loss.numpy(), lw=2.0 if calm else 0.8, zorder=3 if calm else 2, label=f"Δt = {dt}"
            )
        if res.divergence is not None:
            axes[1].semilogy(res.divergence.numpy() + 1e-18, label=f"Δt = {dt}")
        axes[2].semilogy(res.kernel_norm.numpy(), label=f"Δt = {dt}")
        d_end = float(res.divergence[-200:].mean()) if res.divergence is not None else float("nan")
        summary[dt] = (
            f"final loss {float(res.loss[-1]):.3g}, "
            f"max ‖K‖ last 200 {float(res.kernel_norm[-200:].max()):.3g}, "
            f"mean D last 200 {d_end:.3g}, blew up: {res.blew_up}"
        )
    axes[0].set(xlabel="iteration", ylabel="BCE loss", title="one-layer model, α = 20 (first 300 steps)")
    axes[0].set_xlim(0, min(steps, 300))
    axes[1].set(
        xlabel="iteration", ylabel="D (twin k = 3; 0 drawn at 1e-18)", title="divergence of twin runs"
    )
    axes[2].set(xlabel="iteration", ylabel="‖K‖", title="kernel norm (Δt = 0.11 blows up)")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "nonlinear_restrained.png"
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/paper_pde"), help="output folder for the PNGs")
    parser.add_argument("--steps", type=int, default=1000, help="iterations per run (paper: 1000)")
    args = parser.parse_args()
    # Small FFTs and element-wise ops: extra threads only add contention (measured 4-60x slower with
    # the default thread count on a busy 2-core host).
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    print("wrote", heat_cfl_figure(args.out))
    path, growth = linearized_figure(args.out, args.steps)
    print("wrote", path)
    for alpha, g in growth.items():
        print(f"  linearized α = {alpha:.3g}: ‖K_T‖/‖K_0‖ = {g:.3g}")
    path, summary = nonlinear_figure(args.out, args.steps)
    print("wrote", path)
    for dt, line in summary.items():
        print(f"  non-linear Δt = {dt}: {line}")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
