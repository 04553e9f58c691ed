"""One eigen-solver for any :class:`~lightning_eos.curvature.operator.SymmetricOperator`.

* :func:`lanczos` — Lanczos with full re-orthogonalization (classical Gram–Schmidt applied twice,
  in float64) that records every projection coefficient. With ``A V_m = V_{m+1} H_m`` holding for
  the actual (rounded) operator outputs, the residual of each Ritz pair is computed *exactly* from
  the small matrix ``H_m`` — no extra products — so the stopping test
  ``||A y − θ y|| ≤ tol·|θ|`` and the per-pair ``converged`` flags are honest even when the operator
  is float32 noise-level asymmetric. ``block_size > 1`` starts from several vectors (band Lanczos)
  to resolve exactly repeated eigenvalues.
* ``method="power"`` — (shifted) subspace iteration with Rayleigh–Ritz, same stopping test.
* :func:`eigsh` — dispatch on ``method``.

Torch only: no Lightning import.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

from .operator import SymmetricOperator

__all__ = ["DEFAULT_TOL", "EigenResult", "check_choices", "eigsh", "lanczos", "power_iteration", "wants"]

#: Default residual tolerance ``||A y − θ y|| ≤ tol·|θ|``. The eigenvalue error is about
#: ``r²/gap = tol²·θ²/gap``, i.e. ≤ 2e-7 relative for relative gaps down to 0.05. Measured on the
#: digits benchmark models: ≤ 2e-7 relative error of λ_max in 8–14 products, where 1e-3 gives
#: 1.9e-6 on one of them (see benchmarks/README.md).
DEFAULT_TOL = 1e-4
#: Default Krylov dimension cap (memory: dim × max_iter float64 numbers).
DEFAULT_MAX_ITER = 200
#: Default iteration cap of the power method (each iteration costs ``k`` products).
DEFAULT_POWER_MAX_ITER = 1000

_WHICH = ("largest", "smallest", "both")
_METHODS = ("lanczos", "power")


@dataclass
class EigenResult:
    """Eigenpairs of a symmetric operator.

    Attributes:
        eigenvalues: 1-D float64 tensor, algebraically descending. ``which="largest"``: the ``k``
            largest; ``"smallest"``: the ``k`` smallest (the most negative last); ``"both"``: the
            ``k`` largest followed by the ``k`` smallest (``2k`` values, still descending).
        eigenvectors: ``None`` unless requested; else float64 tensor of shape ``(dim, n)``, column
            ``i`` (unit norm) pairs with ``eigenvalues[i]``.
        num_hvps: operator products spent.
        converged: bool tensor, one per eigenvalue: ``residuals[i] ≤ tol·|eigenvalues[i]|``, or at
            the operator's rounding level ``10·eps(dtype)·||A||`` (for eigenvalues ≈ 0).
        residuals: float64 tensor, ``||A y_i − θ_i y_i||`` for unit ``y_i`` (same units as the
            eigenvalues).
        iterations: Krylov dimension reached (Lanczos) or iterations run (power).
        method: the solver used.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor | None = None
    num_hvps: int = 0
    converged: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    residuals: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    iterations: int = 0
    method: str = "lanczos"

    @property
    def all_converged(self) -> bool:
        """True when every returned pair passed the residual test."""
        return bool(self.converged.all()) if self.converged.numel() else False

    @property
    def max(self) -> float:
        """The first (largest returned) eigenvalue as a Python float."""
        return float(self.eigenvalues[0])


def check_choices(which: str, method: str) -> None:
    """``ValueError`` unless ``which`` and ``method`` name a supported end and solver (cheap: callers
    run it before building a costly operator)."""
    if which not in _WHICH:
        raise ValueError(f"which must be one of {_WHICH}, got {which!r}")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")


def wants(k: int, which: str) -> int:
    """Number of eigenpairs a request returns: ``2k`` for ``which="both"``, else ``k``."""
    return 2 * k if which == "both" else k


def _validate(operator: SymmetricOperator, k: int, which: str, tol: float) -> int:
    if which not in _WHICH:
        raise ValueError(f"which must be one of {_WHICH}, got {which!r}")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if k >= operator.dim:
        raise ValueError(f"k must be < dim = {operator.dim} (the operator's size), got k={k}")
    n_want = wants(k, which)
    if n_want > operator.dim:
        raise ValueError(f"which='both' needs 2k <= dim = {operator.dim}, got k={k}")
    if not (tol > 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a positive finite number, got {tol}")
    return n_want


def _threshold(theta: torch.Tensor, scale: float, tol: float, dtype: torch.dtype) -> torch.Tensor:
    """Residual bound ``max(tol·|θ|, 10·eps·||A||)``: relative to each eigenvalue, with a floor at the
    operator's rounding level (``eps`` of its dtype) so that an eigenvalue that is zero to working
    precision can still be declared converged: no smaller residual is attainable for it."""
    return torch.clamp(tol * theta.abs(), min=10 * torch.finfo(dtype).eps * scale)


def _select(theta: torch.Tensor, k: int, which: str) -> torch.Tensor:
    """Indices (into ascending ``theta``) of the wanted Ritz values, in descending order."""
    m = theta.numel()
    top = torch.arange(m - 1, m - 1 - k, -1)
    bottom = torch.arange(k - 1, -1, -1)
    if which == "largest":
        return top
    if which == "smallest":
        return bottom
    return torch.cat([top, bottom])


def _result(
    method: str,
    vals: torch.Tensor,
    vecs: torch.Tensor | None,
    res: torch.Tensor,
    scale: float,
    tol: float,
    dtype: torch.dtype,
    num_hvps: int,
    iterations: int,
) -> EigenResult:
    """Assemble the result: per-pair ``converged`` flags from the residuals (``scale`` = ``||A||``
    estimate for the rounding floor), with a ``RuntimeWarning`` when any pair failed the test."""
    conv = res <= _threshold(vals, scale, tol, dtype)
    if not bool(conv.all()):
        warnings.warn(
            f"{method}: {int((~conv).sum())} of {conv.numel()} eigenpairs not converged to tol={tol}"
            f" after {num_hvps} products; see EigenResult.converged/residuals",
            RuntimeWarning,
            stacklevel=3,
        )
    return EigenResult(
        eigenvalues=vals,
        eigenvectors=vecs,
        num_hvps=num_hvps,
        converged=conv,
        residuals=res,
        iterations=iterations,
        method=method,
    )


def _nan_result(n_want: int, dim: int, num_hvps: int, it: int, vecs: bool, method: str) -> EigenResult:
    warnings.warn(
        f"{method}: the operator returned a non-finite product after {num_hvps} products;"
        " returning NaN eigenvalues (converged=False)",
        RuntimeWarning,
        stacklevel=3,
    )
    nan = torch.full((n_want,), float("nan"), dtype=torch.float64)
    return EigenResult(
        eigenvalues=nan,
        eigenvectors=torch.full((dim, n_want), float("nan"), dtype=torch.float64) if vecs else None,
        num_hvps=num_hvps,
        converged=torch.zeros(n_want, dtype=torch.bool),
        residuals=nan.clone(),
        iterations=it,
        method=method,
    )


def _start_vector(dim: int, seed: int, device: torch.device) -> torch.Tensor:
    # A local generator: the caller's global RNG stream is never consumed.
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    v = torch.randn(dim, generator=gen, dtype=torch.float64)
    return (v / v.norm()).to(device)


def _apply(operator: SymmetricOperator, v: torch.Tensor) -> torch.Tensor:
    out = operator.matvec(v.to(operator.dtype))
    assert isinstance(out, torch.Tensor)
    return out.to(torch.float64)


def lanczos(
    operator: SymmetricOperator,
    k: int = 1,
    which: str = "largest",
    tol: float = DEFAULT_TOL,
    max_iter: int | None = None,
    seed: int = 0,
    return_eigenvectors: bool = False,
    block_size: int = 1,
) -> EigenResult:
    """Extreme eigenpairs of a symmetric operator by Lanczos with full re-orthogonalization.

    Args:
        operator: any :class:`SymmetricOperator` (Hessian, block, preconditioned, ``PᵀP``, ...).
        k: number of eigenpairs per end, ``1 <= k < dim``.
        which: ``"largest"`` (algebraically), ``"smallest"``, or ``"both"`` (``k`` of each).
        tol: stop when every wanted Ritz pair has ``||A y − θ y|| ≤ tol·|θ|``.
        max_iter: cap on the Krylov dimension (= products); default ``min(dim, 200)``.
        seed: seed of the random start vector (a private generator).
        return_eigenvectors: also return the Ritz vectors, shape ``(dim, n)``.
        block_size: number of random start vectors (band Lanczos). A single-vector Krylov space
            holds one copy of an *exactly* repeated eigenvalue; ``block_size >= multiplicity``
            finds every copy (e.g. 2 for ``PᵀP`` of a periodic convolution, whose Fourier modes
            ``±ω`` pair up). Costs a few more products; 1 is right for Hessians of trained nets.

    A product with a NaN/inf ends the iteration at once: NaN eigenvalues, ``converged`` all False
    and a ``RuntimeWarning``. Reaching ``max_iter`` unconverged also warns. Memory: ``dim × max_iter``
    float64 numbers for the basis.
    """
    n_want = _validate(operator, k, which, tol)
    n = operator.dim
    m_max = min(n, DEFAULT_MAX_ITER if max_iter is None else int(max_iter))
    if m_max < n_want:
        raise ValueError(f"max_iter={max_iter} is smaller than the {n_want} eigenpairs requested")
    b = int(block_size)
    if not 1 <= b <= n:
        raise ValueError(f"block_size must be in [1, dim={n}], got {block_size}")
    device = operator.device
    hvps0 = operator.num_hvps
    # Basis vectors are the *rows* of V (contiguous slices for the Gram–Schmidt products); the
    # buffer grows geometrically instead of allocating dim × max_iter up front. Product j is
    # A v_j; the basis runs b vectors ahead of the products ("band" Lanczos; b = 1: plain Lanczos),
    # so A V_m = V_{nb} H[:nb, :m] with nb ≤ m + b basis vectors.
    cap = min(m_max + b, n)
    V = torch.empty(min(cap, 32 + b), n, dtype=torch.float64, device=device)
    H = torch.zeros(cap, m_max, dtype=torch.float64)
    if b == 1:
        V[0] = _start_vector(n, seed, device)
    else:
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        V[:b] = torch.linalg.qr(torch.randn(n, b, generator=gen, dtype=torch.float64)).Q.T.to(device)
    nb = b
    restart_gen = torch.Generator(device="cpu").manual_seed(int(seed) + 1)
    theta = S = sel = res = None
    m = 0
    for j in range(m_max):
        w = _apply(operator, V[j])
        Vb = V[:nb]
        # Classical Gram–Schmidt twice ("twice is enough"): orthogonal to working precision.
        h = Vb @ w
        w = w - Vb.T @ h
        h2 = Vb @ w
        w = w - Vb.T @ h2
        h = h + h2
        beta = float(w.norm())
        # A NaN/inf anywhere in the product propagates into h and beta (cheaper than scanning w).
        if not math.isfinite(beta) or not bool(torch.isfinite(h).all()):
            return _nan_result(n_want, n, operator.num_hvps - hvps0, j + 1, return_eigenvectors, "lanczos")
        H[:nb, j] = h.cpu()
        m = j + 1
        Hm = H[:m, :m]
        T = 0.5 * (Hm + Hm.T)
        theta, S = torch.linalg.eigh(T)
        scale = float(theta.abs().max())
        if nb < n:  # extend the basis by one vector (once it spans R^n, the remainder is rounding)
            if nb + 1 > V.shape[0]:
                extra = torch.empty(min(V.shape[0], cap - V.shape[0]), n, dtype=V.dtype, device=device)
                V = torch.cat([V, extra])
            if beta > 1e-12 * max(scale, 1e-300):
                V[nb] = w / beta
                H[nb, j] = beta
                nb += 1
            else:
                # Invariant subspace: continue with a fresh random direction orthogonal to it
                # (coupling coefficient 0, so the recorded relation stays exact).
                r = torch.randn(n, generator=restart_gen, dtype=torch.float64).to(device)
                for _ in range(2):
                    r = r - Vb.T @ (Vb @ r)
                rn = float(r.norm())
                if rn > 1e-10:
                    V[nb] = r / rn
                    nb += 1
        # Exact residual of each Ritz pair (θ, y = V_m s) for the recorded relation:
        #   A y − θ y = V_m (H_m − T) s + V[m:nb] H[m:nb, :m] s   (orthonormal V).
        asym = (Hm - T) @ S
        tail = H[m:nb, :m] @ S
        res = torch.sqrt(asym.pow(2).sum(0) + tail.pow(2).sum(0))
        if m >= n_want:
            sel = _select(theta, k, which)
            ok = res[sel] <= _threshold(theta[sel], scale, tol, operator.dtype)
            if bool(ok.all()):
                break
        if m == n:
            break
    assert theta is not None and S is not None and res is not None and sel is not None
    vecs = None
    if return_eigenvectors:
        vecs = V[:m].T @ S[:, sel].to(device)
        vecs = vecs / vecs.norm(dim=0, keepdim=True)
    scale = float(theta.abs().max())
    return _result(
        "lanczos",
        theta[sel].clone(),
        vecs,
        res[sel].clone(),
        scale,
        tol,
        operator.dtype,
        operator.num_hvps - hvps0,
        m,
    )


def _subspace_iteration(
    operator: SymmetricOperator,
    b: int,
    shift: float,
    sign: float,
    tol: float,
    max_iter: int,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, bool]:
    """Top-``b`` eigenpairs of ``B = sign·A + shift·I`` by subspace iteration with Rayleigh–Ritz.

    Returns eigenvalues *of A* (descending in B), vectors, residuals ``||A y − θ y||``, the number
    of iterations, and whether a non-finite product occurred.
    """
    n = operator.dim
    X = torch.linalg.qr(torch.randn(n, b, generator=gen, dtype=torch.float64)).Q.to(operator.device)
    vals = torch.zeros(b, dtype=torch.float64)
    Y = X
    res = torch.full((b,), float("inf"), dtype=torch.float64)
    it = 0
    for it in range(1, max_iter + 1):
        AX = torch.stack([_apply(operator, X[:, i]) for i in range(b)], dim=1)
        if not bool(torch.isfinite(AX).all()):
            return vals, Y, res, it, True
        G = X.T @ AX
        theta, S = torch.linalg.eigh(0.5 * (G + G.T))  # Ritz values of A on span(X)
        Y = X @ S
        AY = AX @ S
        res_dev = (AY - Y * theta).norm(dim=0)
        order = torch.argsort(sign * theta, descending=True)  # B's order
        theta, Y, AY = theta[order], Y[:, order], AY[:, order]
        res, vals = res_dev[order].cpu(), theta.cpu()
        if bool((res <= _threshold(vals, float(vals.abs().max()), tol, operator.dtype)).all()):
            break
        X = torch.linalg.qr(sign * AY + shift * Y).Q
    return vals, Y, res, it, False


def power_iteration(
    operator: SymmetricOperator,
    k: int = 1,
    which: str = "largest",
    tol: float = DEFAULT_TOL,
    max_iter: int | None = None,
    seed: int = 0,
    return_eigenvectors: bool = False,
) -> EigenResult:
    """Extreme eigenpairs by (shifted) power / subspace iteration; same result type as :func:`lanczos`.

    First a single-vector power iteration finds the dominant eigenvalue ``θ_d`` (largest ``|λ|``).
    For ``which="largest"`` and ``k=1`` with ``θ_d ≥ 0`` that is the answer; otherwise the iteration
    runs on ``A + |θ_d|·I`` (largest) or ``|θ_d|·I − A`` (smallest), whose dominant eigenvalues are
    the wanted algebraic ones — so a large negative eigenvalue is never returned as "largest".
    Converges like ``(λ_{k+1}/λ_k)^t``: much slower than Lanczos on clustered spectra.
    """
    n_want = _validate(operator, k, which, tol)
    iters = DEFAULT_POWER_MAX_ITER if max_iter is None else int(max_iter)
    if iters < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    hvps0 = operator.num_hvps
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    d_vals, d_vecs, d_res, total_it, bad = _subspace_iteration(operator, 1, 0.0, 1.0, tol, iters, gen)
    if bad:
        return _nan_result(
            n_want, operator.dim, operator.num_hvps - hvps0, total_it, return_eigenvectors, "power"
        )
    theta_d = float(d_vals[0])
    rho = abs(theta_d) * (1.0 + 1e-3)
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for end in ("largest", "smallest") if which == "both" else (which,):
        if k == 1 and ((end == "largest" and theta_d >= 0) or (end == "smallest" and theta_d <= 0)):
            parts.append((d_vals, d_vecs, d_res))
            continue
        sign = 1.0 if end == "largest" else -1.0
        vals, vecs, res, it, bad = _subspace_iteration(operator, k, rho, sign, tol, iters, gen)
        total_it += it
        if bad:
            return _nan_result(
                n_want, operator.dim, operator.num_hvps - hvps0, total_it, return_eigenvectors, "power"
            )
        parts.append((vals, vecs, res))
    vals = torch.cat([p[0] for p in parts])
    vecs = torch.cat([p[1] for p in parts], dim=1)
    res = torch.cat([p[2] for p in parts])
    order = torch.argsort(vals, descending=True)
    vals, vecs, res = vals[order], vecs[:, order.to(vecs.device)], res[order]
    return _result(
        "power",
        vals,
        vecs if return_eigenvectors else None,
        res,
        float(vals.abs().max()),
        tol,
        operator.dtype,
        operator.num_hvps - hvps0,
        total_it,
    )


def eigsh(
    operator: SymmetricOperator,
    k: int = 1,
    which: str = "largest",
    method: str = "lanczos",
    tol: float = DEFAULT_TOL,
    max_iter: int | None = None,
    seed: int = 0,
    return_eigenvectors: bool = False,
    block_size: int = 1,
) -> EigenResult:
    """Dispatch to :func:`lanczos` (``method="lanczos"``) or :func:`power_iteration` (``"power"``;
    ``block_size`` applies to Lanczos only: power iteration already iterates ``k`` vectors)."""
    check_choices(which, method)
    kw = {"k": k, "which": which, "tol": tol, "max_iter": max_iter, "seed": seed}
    if method == "lanczos":
        return lanczos(operator, return_eigenvectors=return_eigenvectors, block_size=block_size, **kw)
    return power_iteration(operator, return_eigenvectors=return_eigenvectors, **kw)
