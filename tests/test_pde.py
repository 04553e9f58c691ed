"""Tests for lightning_eos.pde: PᵀP spectra, windows, regions and the one-layer simulations.

Reference numbers (issue 3 / Sun et al. 2022, Fig. 3 setting): 256×256 ±1 checkerboard, 32×32
kernel, Δt = 1e-8, a = −½, β = 1 → α_min = ¼·225²·32² = 1.296e7, α_max = 2/Δt = 2e8, and
¼·max|FFT(I)|² = 2^30 ≈ 1.07e9. The non-linear run (α = 20, 1000 steps) converges for Δt ≤ 0.03,
oscillates with the twin divergence growing from round-off to O(1) for 0.05 ≤ Δt ≤ 0.09, and blows
up for Δt ≥ 0.11.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_eos import pde
from lightning_eos.bounds import WeightDecayWindow

DT = 1e-8


@pytest.fixture(scope="module")
def board() -> torch.Tensor:
    return pde.checkerboard(256)


@pytest.fixture(scope="module")
def board_spectrum(board: torch.Tensor) -> pde.ConvSpectrum:
    return pde.conv_operator_spectrum(board, 32)


def _dense_patch_matrix(images: torch.Tensor, kh: int, kw: int, circular: bool) -> torch.Tensor:
    """Materialized P (tests only): rows = (b, output location), columns = (c, i, j)."""
    x = images
    if circular:
        x = F.pad(x, (0, kw - 1, 0, kh - 1), mode="circular")
    cols = F.unfold(x, (kh, kw))  # (B, C·kh·kw, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


# ---------------------------------------------------------------------------------------------------
# Spectrum and windows
# ---------------------------------------------------------------------------------------------------


def test_checkerboard_helper() -> None:
    cb = pde.checkerboard(4)
    assert cb[0, 0] == -1 and cb[0, 1] == 1 and cb[1, 0] == 1 and cb[1, 1] == -1
    assert cb.dtype == torch.float64 and pde.checkerboard(3, 5).shape == (3, 5)
    with pytest.raises(ValueError, match="n"):
        pde.checkerboard(0)


def test_checkerboard_window_matches_paper(board: torch.Tensor, board_spectrum: pde.ConvSpectrum) -> None:
    spec = board_spectrum
    assert spec.converged and spec.method == "exact" and spec.dim == 1024
    assert spec.lambda_max == pytest.approx(225**2 * 32**2, rel=1e-9)
    assert spec.singular and spec.lambda_min == pytest.approx(0.0, abs=1e-6)  # PᵀP has rank one
    win = pde.conv_weight_decay_window(board, 32, DT, a=-0.5, beta=1.0, spectrum=spec)
    alpha_min, alpha_max = win
    assert alpha_min == pytest.approx(1.296e7, rel=0.01)
    assert alpha_max == pytest.approx(2e8, rel=0.01)
    # without the precomputed spectrum: same answer through the whole pipeline
    assert tuple(pde.conv_weight_decay_window(board, 32, DT)) == pytest.approx(
        (alpha_min, alpha_max), rel=1e-9
    )
    dft = pde.conv_operator_spectrum(board, 32, method="dft")
    assert dft.lambda_max / 4 == pytest.approx(1.07e9, rel=0.01)
    assert dft.lambda_max == pytest.approx(256.0**4)  # all energy at the Nyquist frequency (128, 128)
    assert pde.conv_weight_decay_window(board, 32, DT, method="dft").low == pytest.approx(1.07e9, rel=0.01)


@pytest.mark.parametrize(
    ("shape", "expect_singular"),
    [((8, 8), False), ((3, 2, 6, 10), False), ((1, 3, 5, 7), True)],
    ids=["1ch", "batch3-2ch-nonsquare", "3ch-rank-deficient"],
)
def test_exact_matches_dft_for_circular_full_size_kernel(
    shape: tuple[int, ...], expect_singular: bool
) -> None:
    gen = torch.Generator().manual_seed(sum(shape))
    images = torch.randn(*shape, generator=gen, dtype=torch.float64)
    h, w = shape[-2:]
    exact = pde.conv_operator_spectrum(images, (h, w), circular=True, tol=1e-10)
    dft = pde.conv_operator_spectrum(images, (h, w), method="dft")
    assert exact.converged
    assert exact.lambda_max == pytest.approx(dft.lambda_max, rel=1e-9)
    assert exact.lambda_min == pytest.approx(dft.lambda_min, rel=1e-7, abs=1e-9 * dft.lambda_max)
    assert exact.singular == expect_singular == dft.singular


@pytest.mark.parametrize("circular", [False, True])
@pytest.mark.parametrize("backend", ["fft", "conv"])
def test_patch_operator_matches_dense_im2col(circular: bool, backend: str) -> None:
    gen = torch.Generator().manual_seed(7)
    images = torch.randn(2, 2, 7, 9, generator=gen, dtype=torch.float64)
    op = pde.PatchOperator(images, (3, 4), circular=circular, backend=backend)  # type: ignore[arg-type]
    p = _dense_patch_matrix(images, 3, 4, circular)
    kern = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    out = torch.randn(op.output_shape, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(op.forward(kern).reshape(-1), p @ kern.reshape(-1))
    torch.testing.assert_close(op.adjoint(out).reshape(-1), p.T @ out.reshape(-1))
    # leading twin dimension
    two = torch.stack([kern, 2 * kern])
    torch.testing.assert_close(op.forward(two)[1], 2 * op.forward(kern))
    spec = pde.conv_operator_spectrum(images, (3, 4), circular=circular, backend=backend, tol=1e-10)  # type: ignore[arg-type]
    eig = torch.linalg.eigvalsh(p.T @ p)
    assert spec.lambda_max == pytest.approx(float(eig[-1]), rel=1e-9)
    assert spec.lambda_min == pytest.approx(float(eig[0]), rel=1e-6)


def test_one_by_one_kernel_and_pooling_and_max_lr(board: torch.Tensor) -> None:
    img = torch.arange(12, dtype=torch.float64).reshape(3, 4)
    spec = pde.conv_operator_spectrum(img, 1)
    assert spec.lambda_max == spec.lambda_min == pytest.approx(float((img**2).sum()))
    small = board[:64, :64]
    s = pde.conv_operator_spectrum(small, 8)
    sum_win = pde.conv_weight_decay_window(small, 8, 1e-5, spectrum=s)
    mean_win = pde.conv_weight_decay_window(small, 8, 1e-5, spectrum=s, pooling="mean")
    assert mean_win.low == pytest.approx(sum_win.low / 57**2)
    # conv_max_stable_lr is the lr at which alpha sits on the window's upper edge
    for alpha in (2e4, 1e5):
        lr = pde.conv_max_stable_lr(small, 8, alpha, a=0.5, spectrum=s)
        assert pde.conv_weight_decay_window(small, 8, lr, a=0.5, spectrum=s).high == pytest.approx(alpha)
    assert pde.conv_max_stable_lr(small, 8, 1e3, spectrum=s) == 0.0  # α < α_min: the PDE itself is unstable
    assert pde.conv_max_stable_lr(small, 8, 0.0, a=-0.5, spectrum=s) == 0.0
    assert pde.conv_max_stable_lr(small, 8, 6e4, a=-0.5, spectrum=s) == pytest.approx(2 / 6e4)
    assert pde.conv_max_stable_lr(
        small, 8, 6e4, a=-0.5, nesterov=True, momentum=0.9, spectrum=s
    ) == pytest.approx(3.8 / 2.8 / 6e4)


def test_region_windows_and_classifier(board: torch.Tensor) -> None:
    small = board[:64, :64]
    wins = pde.region_windows(small, 8, 1e-5)
    assert set(wins) == set(pde.Region)
    assert tuple(wins[pde.Region.NOT_ACTIVATED]) == pytest.approx((0.0, 2e5))
    assert tuple(wins[pde.Region.TRANSITIONING]) == pytest.approx(
        tuple(pde.conv_weight_decay_window(small, 8, 1e-5))
    )
    ibar = pde.PatchOperator(small, 8).patch_sum()
    assert wins[pde.Region.ACTIVATED].high == pytest.approx(2e5 - 0.25 * float((ibar**2).sum()))
    assert all(isinstance(w, WeightDecayWindow) for w in wins.values())

    gen = torch.Generator().manual_seed(3)
    img = torch.randn(2, 1, 12, 12, generator=gen, dtype=torch.float64)
    kern = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    rmap = pde.classify_regions(kern, img, threshold=1.0, beta=2.0)
    z = 2.0 * F.conv2d(img, kern[None, None])[:, 0]
    assert rmap.regions.shape == (2, 10, 10) and rmap.regions.dtype == torch.int64
    assert torch.equal(rmap.regions == pde.Region.ACTIVATED, z > 1.0)
    assert torch.equal(rmap.regions == pde.Region.NOT_ACTIVATED, z < -1.0)
    assert rmap.names == ("not_activated", "transitioning", "activated")
    assert sum(rmap.fractions().values()) == pytest.approx(1.0)
    assert pde.classify_regions(kern, img[0, 0]).regions.shape == (10, 10)


# ---------------------------------------------------------------------------------------------------
# Linearized PDE: just inside vs just outside each edge of the window
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("alpha", "steps", "stable"),
    [(1.2e7, 1000, False), (1.3e7, 1000, True), (1.9e8, 300, True), (2.1e8, 300, False)],
)
def test_linearized_window_edges(board: torch.Tensor, alpha: float, steps: int, stable: bool) -> None:
    """2.0e8 itself is neutral (|G| = 1 for the zero modes), so the upper pair is 1.9e8 / 2.1e8."""
    res = pde.simulate_linearized(board, 32, DT, alpha, steps)
    norms = res.kernel_norm
    # Predicted worst amplification: the rank-one mode (ν = 225²·32²) or the zero modes (ν = 0).
    g_top = 1 - DT * (alpha - 0.25 * 225**2 * 32**2)
    g_zero = 1 - DT * alpha
    worst = max(abs(g_top), abs(g_zero))
    if stable:
        assert worst < 1 and res.growth < 1.0
        assert float(norms.max()) <= float(norms[0]) * (1 + 1e-9)
    else:
        assert worst > 1 and res.growth > 100.0
        assert float(norms[-1] / norms[-2]) == pytest.approx(worst, rel=1e-6)


@pytest.mark.parametrize(("momentum", "nesterov"), [(0.9, False), (0.9, True), (0.5, True)])
def test_linearized_momentum_window(board: torch.Tensor, momentum: float, nesterov: bool) -> None:
    small, dt = board[:64, :64], 1e-5
    win = pde.conv_weight_decay_window(small, 8, dt, momentum=momentum, nesterov=nesterov)
    c = (2 + 2 * momentum) / ((1 + 2 * momentum) if nesterov else 1.0)
    assert win.high == pytest.approx(c / dt) and win.low == pytest.approx(0.25 * 57**2 * 64)
    for alpha, stable in ((0.97 * win.high, True), (1.03 * win.high, False), (1.03 * win.low, True)):
        g = pde.simulate_linearized(small, 8, dt, alpha, 400, momentum=momentum, nesterov=nesterov).growth
        assert (g < 1.0) if stable else (g > 100.0), (alpha, g)
    # below alpha_min the continuous PDE is unstable whatever the optimizer
    assert (
        pde.simulate_linearized(small, 8, dt, 0.7 * win.low, 400, momentum=momentum, nesterov=nesterov).growth
        > 100
    )


# ---------------------------------------------------------------------------------------------------
# Non-linear one-layer model
# ---------------------------------------------------------------------------------------------------


def test_closed_form_step_matches_autograd() -> None:
    gen = torch.Generator().manual_seed(11)
    img = torch.randn(2, 2, 10, 11, generator=gen, dtype=torch.float64)
    k0 = torch.randn(2, 4, 3, generator=gen, dtype=torch.float64)
    lr, alpha, beta, label = 0.3, 0.7, 1.7, 0.25
    res = pde.simulate_conv_pde(img, k0, lr, alpha, 1, beta=beta, label=label)
    kk = k0.clone().requires_grad_(True)
    z = F.conv2d(img, kk[None])[:, 0]
    u = (z * torch.sigmoid(beta * z)).mean(dim=(-2, -1))
    loss = F.binary_cross_entropy_with_logits(u, torch.full_like(u, label))
    (grad,) = torch.autograd.grad(loss, kk)
    torch.testing.assert_close(res.final_kernel, k0 - lr * (grad + alpha * k0))
    assert float(res.loss[0]) == pytest.approx(float(loss.detach()))
    assert res.kernels is not None and res.kernels.shape == (2, 2, 4, 3) and res.record_steps == [0, 1]


def test_twins_and_divergence_metric() -> None:
    img = pde.checkerboard(24)
    same = pde.simulate_conv_pde(img, 5, 0.07, 20.0, 50, twin="rescale", k=1.0, record_every=None)
    assert same.divergence is not None and float(same.divergence.abs().max()) == 0.0  # k = 1 is bit-identical
    ulp = pde.simulate_conv_pde(img, 5, 0.01, 20.0, 5, twin="ulp", record_every=None)
    assert ulp.divergence is not None and 0.0 < float(ulp.divergence[0]) < 1e-15
    assert ulp.kernels is None and ulp.record_steps == []
    single = pde.simulate_conv_pde(img.float(), 5, 0.01, 20.0, 5, dtype=torch.float32, record_every=2)
    assert single.final_kernel.dtype == torch.float32 and single.record_steps == [0, 2, 4, 5]
    assert bool(torch.isfinite(single.loss).all())
    w = torch.tensor([[[0.0, 1.0], [2.0, -1.0]]])
    assert float(pde.divergence(w, w)) == 0.0
    assert float(pde.divergence(w, torch.zeros_like(w))) == pytest.approx(2.0 * 3 / 4)  # 0/0 entry counts 0
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 1, 300, 300, generator=gen, dtype=torch.float64)
    assert float(pde.divergence(a, b)) == pytest.approx(1.44, abs=0.02)  # unrelated Gaussians


def test_short_paper_run_restrained_instability(board: torch.Tensor) -> None:
    """The paper's setting cut to 200 steps (~0.7 s per run): enough for D to reach O(1) at Δt = 0.07."""
    calm = pde.simulate_conv_pde(board, 32, 0.03, 20.0, 200, twin="rescale", record_every=None)
    wild = pde.simulate_conv_pde(board, 32, 0.07, 20.0, 200, twin="rescale", record_every=None)
    boom = pde.simulate_conv_pde(board, 32, 0.12, 20.0, 100, record_every=None)
    assert calm.divergence is not None and wild.divergence is not None
    assert float(calm.divergence.max()) < 1e-10 and float(calm.loss[-50:].std()) < 1e-9
    assert float(wild.divergence[1:20].min()) < 1e-10 < 0.5 < float(wild.divergence.max())
    assert not wild.blew_up and float(wild.kernel_norm[-100:].max()) < 1.0 < float(wild.kernel_norm[0])
    assert float(wild.loss[-100:].max() - wild.loss[-100:].min()) > 0.1  # oscillating, not converged
    assert boom.blew_up or float(boom.kernel_norm[-1]) > 1e10


@pytest.mark.slow
@pytest.mark.parametrize("dt", [0.01, 0.03, 0.05, 0.07, 0.09, 0.11])
def test_paper_setting_restrained_instability(board: torch.Tensor, dt: float) -> None:
    """The paper's full setting: 256×256 checkerboard, 32×32 N(0,1) kernel, α = 20, 1000 steps."""
    twin = None if dt > 0.1 else "rescale"
    res = pde.simulate_conv_pde(board, 32, dt, 20.0, 1000 if twin else 300, twin=twin, record_every=None)
    if dt > 0.1:  # (1 − Δtα) < −1: the not-activated region itself is unstable
        assert res.blew_up or float(res.kernel_norm[-1]) > 1e10
        return
    assert res.divergence is not None and not res.blew_up
    d = res.divergence
    if dt <= 0.03:  # converges: curvature at the fixed point ≈ 62, 2/62 ≈ 0.032
        assert float(d.max()) < 1e-10
        assert float(res.loss[-1]) == pytest.approx(0.14559, abs=1e-4)
        assert float(res.loss[-100:].std()) < 1e-10
        assert res.regions["transitioning"] == 1.0
    else:  # restrained: bounded oscillation, twin divergence from round-off to O(1)
        assert float(d[1:30].min()) < 1e-8
        assert float(d[-500:].max()) > 0.5
        assert float(res.kernel_norm[-500:].max()) < 1.0 < float(res.kernel_norm[0])
        assert float(res.loss[-200:].max() - res.loss[-200:].min()) > 0.1


# ---------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: pde.conv_weight_decay_window(pde.checkerboard(8), 3, 0.0), "lr"),
        (lambda: pde.conv_weight_decay_window(pde.checkerboard(8), 3, -1.0), "lr"),
        (lambda: pde.conv_weight_decay_window(pde.checkerboard(8), 3, 0.1, momentum=1.0), "momentum"),
        (lambda: pde.conv_weight_decay_window(pde.checkerboard(8), 3, 0.1, momentum=-0.2), "momentum"),
        (lambda: pde.conv_operator_spectrum(pde.checkerboard(8), 9), "kernel_size"),
        (lambda: pde.conv_operator_spectrum(pde.checkerboard(8), (2, 9)), "kernel_size"),
        (lambda: pde.conv_operator_spectrum(pde.checkerboard(8), 0), "kernel_size"),
        (lambda: pde.conv_operator_spectrum(torch.ones(8), 3), "images"),
        (lambda: pde.conv_operator_spectrum(torch.ones(1, 1, 1, 8, 8), 3), "images"),
        (lambda: pde.conv_operator_spectrum(pde.checkerboard(8), 3, method="svd"), "method"),  # type: ignore[arg-type]
        (lambda: pde.conv_max_stable_lr(pde.checkerboard(8), 3, float("nan")), "alpha"),
        (lambda: pde.simulate_conv_pde(pde.checkerboard(8), 3, 0.0, 1.0, 5), "lr"),
        (lambda: pde.simulate_conv_pde(pde.checkerboard(8), 9, 0.1, 1.0, 5), "kernel_size"),
        (lambda: pde.simulate_conv_pde(torch.ones(8), 3, 0.1, 1.0, 5), "image"),
        (lambda: pde.simulate_conv_pde(pde.checkerboard(8), torch.ones(1, 1, 3, 3), 0.1, 1.0, 5), "kernel"),
        (lambda: pde.simulate_conv_pde(pde.checkerboard(8), 3, 0.1, 1.0, 0), "steps"),
        (lambda: pde.simulate_conv_pde(pde.checkerboard(8), 3, 0.1, 1.0, 5, twin="bits"), "twin"),  # type: ignore[arg-type]
        (lambda: pde.simulate_linearized(pde.checkerboard(8), 3, -0.1, 1.0, 5), "lr"),
        (lambda: pde.simulate_linearized(pde.checkerboard(8), 3, 0.1, 1.0, 5, momentum=1.5), "momentum"),
        (lambda: pde.classify_regions(torch.ones(3), pde.checkerboard(8)), "kernel"),
        (lambda: pde.classify_regions(torch.ones(3, 3), torch.ones(8)), "image"),
        (lambda: pde.classify_regions(torch.ones(9, 9), pde.checkerboard(8)), "kernel_size"),
    ],
)
def test_bad_input_raises_value_error(call: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()  # type: ignore[operator]


def test_nan_image_rejected() -> None:
    img = pde.checkerboard(8)
    img[0, 0] = math.nan
    with pytest.raises(ValueError, match="finite"):
        pde.conv_operator_spectrum(img, 3)
