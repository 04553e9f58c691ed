"""The eigen-solver on operators with prescribed spectra: ends, clusters, negatives, honesty of the
residuals and converged flags, NaN handling, power iteration."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_eos.curvature import DEFAULT_TOL, FunctionOperator, eigsh, lanczos, power_iteration

from ._helpers import quadratic


def _true_residuals(a: torch.Tensor, vals: torch.Tensor, vecs: torch.Tensor) -> torch.Tensor:
    return (a @ vecs - vecs * vals).norm(dim=0)


@pytest.mark.parametrize("which", ["largest", "smallest", "both"])
@pytest.mark.parametrize("k", [1, 3])
def test_prescribed_spectrum_with_negatives(which: str, k: int) -> None:
    eigs = torch.cat([torch.tensor([5.0, 4.0, 3.5, -7.0, -6.5, -6.0]), torch.linspace(-2, 2, 54)])
    op, a = quadratic(eigs)
    res = lanczos(op, k=k, which=which, tol=1e-8, return_eigenvectors=True)
    srt = eigs.double().sort(descending=True).values
    want = {"largest": srt[:k], "smallest": srt[-k:], "both": torch.cat([srt[:k], srt[-k:]])}[which]
    torch.testing.assert_close(res.eigenvalues, want, rtol=1e-10, atol=1e-10)
    assert res.eigenvalues.dtype == torch.float64
    assert bool(res.converged.all()) and res.num_hvps == op.num_hvps < 60
    assert res.eigenvectors is not None and res.eigenvectors.shape == (60, want.numel())
    # reported residuals are the true ones
    torch.testing.assert_close(
        res.residuals, _true_residuals(a, res.eigenvalues, res.eigenvectors), atol=1e-12, rtol=1e-6
    )


def test_close_top_pair_is_not_fooled() -> None:
    # λ2/λ1 = 0.95 (the mlp-small trap): the residual test, not a stalled Rayleigh quotient, decides.
    eigs = torch.cat(
        [torch.tensor([1.0, 0.95], dtype=torch.float64), torch.linspace(-0.2, 0.8, 200, dtype=torch.float64)]
    )
    op, _ = quadratic(eigs, seed=3)
    res = lanczos(op)
    assert bool(res.converged.all())
    assert abs(float(res.eigenvalues[0]) - 1.0) <= 1e-6
    res2 = lanczos(op, k=2, tol=1e-8)
    torch.testing.assert_close(
        res2.eigenvalues, torch.tensor([1.0, 0.95], dtype=torch.float64), rtol=1e-12, atol=0
    )


def test_clustered_eigenvalues() -> None:
    eigs = torch.cat(
        [
            torch.tensor([3.0, 2.999, 2.998, 2.997], dtype=torch.float64),
            torch.linspace(0, 1, 96, dtype=torch.float64),
        ]
    )
    op, _ = quadratic(eigs, seed=1)
    res = lanczos(op, k=4, tol=1e-10)
    torch.testing.assert_close(res.eigenvalues, eigs[:4].double(), rtol=1e-11, atol=0)
    assert bool(res.converged.all())


def test_largest_is_algebraic_never_a_large_negative() -> None:
    # The dominant eigenvalue is -10: "largest" must still be +5 (power iteration shifts).
    eigs = torch.cat([torch.tensor([-10.0, -9.0, 5.0]), torch.linspace(-1, 1, 40)])
    op, _ = quadratic(eigs)
    for method in ("lanczos", "power"):
        res = eigsh(op, k=1, which="largest", method=method, tol=1e-7)
        assert abs(float(res.eigenvalues[0]) - 5.0) < 1e-6, method
        small = eigsh(op, k=1, which="smallest", method=method, tol=1e-7)
        assert abs(float(small.eigenvalues[0]) + 10.0) < 1e-6, method


def test_power_iteration_k2_both() -> None:
    eigs = torch.cat([torch.tensor([10.0, 6.0, -8.0, -5.0]), torch.linspace(-1, 1, 26)])
    op, _ = quadratic(eigs)
    res = power_iteration(op, k=2, which="both", tol=1e-8)
    torch.testing.assert_close(res.eigenvalues, torch.tensor([10.0, 6.0, -5.0, -8.0], dtype=torch.float64))
    assert bool(res.converged.all()) and res.method == "power"


def test_low_rank_operator_exhausts_krylov_space() -> None:
    # rank 2: the Krylov space becomes invariant after 2 steps; the solver restarts orthogonally.
    eigs = torch.cat([torch.tensor([2.0, 1.0]), torch.zeros(18)])
    op, _ = quadratic(eigs)
    res = lanczos(op, k=3, tol=1e-6)
    torch.testing.assert_close(
        res.eigenvalues, torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64), atol=1e-10, rtol=0
    )
    assert bool(res.converged.all())


def test_unconverged_is_reported_honestly() -> None:
    eigs = torch.cat([torch.tensor([1.0, 0.999]), torch.linspace(0, 0.99, 298)])
    op, a = quadratic(eigs)
    with pytest.warns(RuntimeWarning, match="not converged"):
        res = lanczos(op, k=1, max_iter=5, return_eigenvectors=True)
    assert not bool(res.converged.any()) and res.num_hvps == 5
    assert res.eigenvectors is not None
    torch.testing.assert_close(
        res.residuals, _true_residuals(a, res.eigenvalues, res.eigenvectors), rtol=1e-6, atol=1e-12
    )
    assert float(res.residuals[0]) > DEFAULT_TOL * float(res.eigenvalues[0].abs())


def test_nan_product_stops_with_nan_and_warning() -> None:
    calls = []

    def bad(v: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return v * (float("nan") if len(calls) >= 3 else 1.0)

    op = FunctionOperator(bad, 10)
    for method in ("lanczos", "power"):
        calls.clear()
        with pytest.warns(RuntimeWarning, match="non-finite"):
            res = eigsh(op, k=2, which="both", method=method, return_eigenvectors=True)
        assert res.eigenvalues.shape == (4,) and bool(torch.isnan(res.eigenvalues).all())
        assert not bool(res.converged.any()) and len(calls) <= 4


def test_seeded_and_global_rng_untouched() -> None:
    op, _ = quadratic(torch.linspace(-1, 3, 40))
    torch.manual_seed(7)
    state = torch.get_rng_state()
    r1 = lanczos(op, k=2, seed=11, tol=1e-3)
    r2 = lanczos(op, k=2, seed=11, tol=1e-3)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(r1.eigenvalues, r2.eigenvalues) and r1.num_hvps == r2.num_hvps


def test_validation() -> None:
    op, _ = quadratic(torch.arange(5.0))
    with pytest.raises(ValueError, match="k must be"):
        lanczos(op, k=0)
    with pytest.raises(ValueError, match="k must be < dim"):
        lanczos(op, k=5)
    with pytest.raises(ValueError, match="2k <= dim"):
        lanczos(op, k=3, which="both")
    with pytest.raises(ValueError, match="which must be one of"):
        lanczos(op, which="top")
    with pytest.raises(ValueError, match="method must be one of"):
        eigsh(op, method="arpack")
    with pytest.raises(ValueError, match="tol"):
        lanczos(op, tol=0.0)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.floats(-50, 50, allow_nan=False), min_size=8, max_size=40, unique=True),
    st.integers(1, 3),
    st.sampled_from(["largest", "smallest", "both"]),
    st.integers(0, 2**16),
)
def test_random_spectra(eigs: list[float], k: int, which: str, seed: int) -> None:
    lam = torch.tensor(eigs, dtype=torch.float64)
    if torch.diff(lam.sort().values).min() < 1e-3 or lam.abs().max() < 1e-2:
        return  # near-multiple eigenvalues: single-vector Krylov may resolve one copy only
    op, _ = quadratic(lam, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # must converge without warnings
        res = lanczos(op, k=k, which=which, tol=1e-9, seed=seed)
    srt = lam.sort(descending=True).values
    want = {"largest": srt[:k], "smallest": srt[-k:], "both": torch.cat([srt[:k], srt[-k:]])}[which]
    scale = float(lam.abs().max())
    assert torch.allclose(res.eigenvalues, want, rtol=0, atol=1e-7 * scale)
    assert bool((res.eigenvalues[:-1] >= res.eigenvalues[1:]).all())


@pytest.mark.parametrize("seed", [0, 1])
def test_exactly_repeated_eigenvalues_with_block_size(seed: int) -> None:
    # e.g. PᵀP of a periodic convolution: Fourier modes ±ω give exact multiplicity 2
    eigs = torch.cat(
        [
            torch.tensor([4.0, 4.0, 4.0, 2.0, 2.0, -3.0, -3.0], dtype=torch.float64),
            torch.linspace(-1, 1, 53).double(),
        ]
    )
    op, a = quadratic(eigs, seed=seed)
    res = lanczos(op, k=5, which="largest", block_size=3, tol=1e-9, seed=seed, return_eigenvectors=True)
    torch.testing.assert_close(res.eigenvalues, eigs[:5], rtol=1e-10, atol=0)
    assert bool(res.converged.all())
    assert res.eigenvectors is not None
    torch.testing.assert_close(
        res.residuals, _true_residuals(a, res.eigenvalues, res.eigenvectors), rtol=1e-6, atol=1e-12
    )
    # the eigenvectors of the repeated eigenvalue span its 3-dimensional eigenspace
    Y = res.eigenvectors[:, :3]
    torch.testing.assert_close(Y.T @ Y, torch.eye(3, dtype=torch.float64), atol=1e-8, rtol=0)
    both = eigsh(op, k=2, which="both", block_size=2, tol=1e-9, seed=seed)
    torch.testing.assert_close(both.eigenvalues, torch.tensor([4.0, 4.0, -3.0, -3.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="block_size"):
        lanczos(op, block_size=0)


@settings(max_examples=20, deadline=None)
@given(
    st.lists(st.floats(-20, 20, allow_nan=False), min_size=6, max_size=20, unique=True),
    st.lists(st.integers(1, 3), min_size=20, max_size=20),
    st.integers(1, 4),
    st.sampled_from(["largest", "smallest", "both"]),
)
def test_random_spectra_with_multiplicities(values: list[float], mult: list[int], k: int, which: str) -> None:
    lam = torch.tensor([v for v, r in zip(values, mult) for _ in range(r)], dtype=torch.float64)
    distinct = torch.tensor(values, dtype=torch.float64).sort().values
    if torch.diff(distinct).min() < 1e-2 or 2 * k > lam.numel() - 1:
        return
    op, _ = quadratic(lam, seed=len(values))
    res = lanczos(op, k=k, which=which, tol=1e-9, block_size=3)
    srt = lam.sort(descending=True).values
    want = {"largest": srt[:k], "smallest": srt[-k:], "both": torch.cat([srt[:k], srt[-k:]])}[which]
    assert torch.allclose(res.eigenvalues, want, rtol=0, atol=1e-7 * float(lam.abs().max()))
    assert bool(res.converged.all())
