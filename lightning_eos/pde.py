"""The paper's convolution PDE as a calculator: ``PᵀP`` spectra, weight-decay windows, simulations.

Sun et al. (NeurIPS 2022) view gradient descent on a convolution kernel ``K`` as the forward-Euler
discretization (time step ``Δt`` = learning rate) of a PDE in ``K``. For the one-layer model

    image I → z = K∗I (valid cross-correlation) → swish φ(z) = z·σ(βz) → global average pool u
            → sigmoid → binary cross-entropy with label y, plus coupled weight decay (α/2)‖K‖²,

the kernel gradient is ``a·Pᵀ(φ'(z))/|Ω| + αK`` with ``a = σ(u) − y`` and ``P`` the im2col patch
matrix of the image (``P K = K∗I``, ``Pᵀ E`` = correlation of ``I`` with ``E``). Linearized where
``z ≈ 0`` (the *transitioning* region; ``φ'(z) ≈ ½ + βz/2``) and with the paper's normalization
(sum over ``Ω``), the PDE reads ``∂t K = −(a/2)(Ī + β PᵀP K) − αK``. Each eigen-direction of
``PᵀP`` (eigenvalue ``ν``) is multiplied per step by ``G = 1 − Δt(α + (aβ/2)ν)``; stability for all
of them is the weight-decay window of :func:`lightning_eos.bounds.weight_decay_window` applied to the
spectrum of ``(aβ/2)PᵀP``. For circular convolution with a full-size kernel ``PᵀP`` is circulant and
its eigenvalues are ``|Î(ω)|²`` (the paper's DFT form); for a valid convolution with a small kernel
they are not, which is why ``method="exact"`` runs Lanczos on ``PᵀP`` (matrix-free).

Shapes: images are ``(H, W)``, ``(C, H, W)`` or ``(B, C, H, W)``; kernels ``(kh, kw)`` or
``(C, kh, kw)`` (one output channel: with several output channels ``PᵀP`` is block diagonal with
identical blocks, so the spectrum is the same). Everything is computed in float64 unless a dtype is
given. Pure torch: no Lightning import.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from .bounds import WeightDecayWindow, stability_constant, weight_decay_window
from .curvature import FunctionOperator, lanczos

__all__ = [
    "REGION_NAMES",
    "ConvPDEResult",
    "ConvSpectrum",
    "LinearizedResult",
    "PatchOperator",
    "Region",
    "RegionMap",
    "checkerboard",
    "classify_regions",
    "conv_max_stable_lr",
    "conv_operator_spectrum",
    "conv_weight_decay_window",
    "divergence",
    "region_windows",
    "simulate_conv_pde",
    "simulate_linearized",
]


# ---------------------------------------------------------------------------------------------------
# Input handling
# ---------------------------------------------------------------------------------------------------


def _finite(value: float, name: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {out}")
    return out


def _positive(value: float, name: str) -> float:
    out = _finite(value, name)
    if out <= 0.0:
        raise ValueError(f"{name} must be > 0, got {out}")
    return out


def _as_images(
    images: torch.Tensor, name: str = "images", dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Validate and reshape to ``(B, C, H, W)`` in ``dtype``."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (H, W), (C, H, W) or (B, C, H, W)")
    if images.dim() == 2:
        images = images[None, None]
    elif images.dim() == 3:
        images = images[None]
    elif images.dim() != 4:
        raise ValueError(
            f"{name} must have rank 2 (H, W), 3 (C, H, W) or 4 (B, C, H, W), got shape {tuple(images.shape)}"
        )
    if images.numel() == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(images.shape)}")
    if images.is_complex() or not bool(torch.isfinite(images).all()):
        raise ValueError(f"{name} must be real and finite")
    return images.to(dtype)


def _kernel_hw(kernel_size: int | tuple[int, int], height: int, width: int) -> tuple[int, int]:
    """Validate ``kernel_size`` (int or (kh, kw)) against the image size."""
    if isinstance(kernel_size, int) and not isinstance(kernel_size, bool):
        kh = kw = kernel_size
    elif (
        isinstance(kernel_size, (tuple, list))
        and len(kernel_size) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) for s in kernel_size)
    ):
        kh, kw = int(kernel_size[0]), int(kernel_size[1])
    else:
        raise ValueError(f"kernel_size must be an int or a pair of ints, got {kernel_size!r}")
    if kh < 1 or kw < 1:
        raise ValueError(f"kernel_size must be positive, got {(kh, kw)}")
    if kh > height or kw > width:
        raise ValueError(f"kernel_size {(kh, kw)} is larger than the image ({height}, {width})")
    return kh, kw


# ---------------------------------------------------------------------------------------------------
# The patch operator P (matrix-free)
# ---------------------------------------------------------------------------------------------------


class PatchOperator:
    """The im2col matrix ``P`` of a batch of images for a ``kh×kw`` kernel, applied matrix-free.

    ``forward(K) = P K`` (the cross-correlation ``K∗I``, one output channel) and ``adjoint(E) = Pᵀ E``
    (correlation of the images with ``E``, summed over the batch); ``normal(K) = PᵀP K``.

    Args:
        images: ``(H, W)``, ``(C, H, W)`` or ``(B, C, H, W)``.
        kernel_size: ``k`` or ``(kh, kw)``, at most the image size.
        circular: wrap around (periodic images): the output has the full ``H×W`` size. Otherwise a
            valid convolution with output ``(H − kh + 1)×(W − kw + 1)``.
        backend: ``"fft"`` (default: exact for both modes, because an ``H×W`` circular correlation
            of a zero-padded kernel never wraps for the valid output locations; ~100× faster than
            float64 ``conv2d`` for large kernels) or ``"conv"`` (``conv2d`` and its adjoint, which is
            ``conv2d`` of the images with ``E`` as the weight).
        dtype: computation dtype (float64 default).

    Kernels may carry leading batch dimensions ``(..., C, kh, kw)`` (e.g. twin runs); outputs are
    then ``(..., B, Ho, Wo)``.
    """

    def __init__(
        self,
        images: torch.Tensor,
        kernel_size: int | tuple[int, int],
        circular: bool = False,
        backend: Literal["fft", "conv"] = "fft",
        dtype: torch.dtype = torch.float64,
    ) -> None:
        self.images = _as_images(images, dtype=dtype)
        b, c, h, w = self.images.shape
        self.kh, self.kw = _kernel_hw(kernel_size, h, w)
        if backend not in ("fft", "conv"):
            raise ValueError(f"backend must be 'fft' or 'conv', got {backend!r}")
        self.backend = backend
        self.circular = bool(circular)
        self.batch, self.channels, self.height, self.width = b, c, h, w
        self.out_h = h if circular else h - self.kh + 1
        self.out_w = w if circular else w - self.kw + 1
        self.num_matvecs = 0
        if backend == "fft":
            self._spec = torch.fft.rfft2(self.images)  # (B, C, H, W//2+1): computed once
        else:
            # Circular = valid convolution of the periodically extended image.
            self._padded = (
                F.pad(self.images, (0, self.kw - 1, 0, self.kh - 1), mode="circular")
                if circular and (self.kh > 1 or self.kw > 1)
                else self.images
            )

    @property
    def kernel_shape(self) -> tuple[int, int, int]:
        """``(C, kh, kw)``."""
        return (self.channels, self.kh, self.kw)

    @property
    def output_shape(self) -> tuple[int, int, int]:
        """``(B, Ho, Wo)``."""
        return (self.batch, self.out_h, self.out_w)

    @property
    def dim(self) -> int:
        """Number of kernel entries ``C·kh·kw`` (the size of ``PᵀP``)."""
        return self.channels * self.kh * self.kw

    @property
    def num_outputs(self) -> int:
        """``|Ω|·B``: output locations summed over the batch."""
        return self.batch * self.out_h * self.out_w

    def forward(self, kernel: torch.Tensor) -> torch.Tensor:
        """``P K``: ``(..., C, kh, kw)`` → ``(..., B, Ho, Wo)``."""
        lead = kernel.shape[:-3]
        if self.backend == "fft":
            # Correlation theorem: (K∗I)^ = conj(K̂)·Î for real K; rfft2 with s= zero-pads K.
            kh_ = torch.fft.rfft2(kernel, s=(self.height, self.width))  # (..., C, H, W')
            prod = (kh_.conj().unsqueeze(-4) * self._spec).sum(-3)  # (..., B, H, W')
            z = torch.fft.irfft2(prod, s=(self.height, self.width))
            return z[..., : self.out_h, : self.out_w]
        k = kernel.reshape(-1, *self.kernel_shape)
        z = F.conv2d(self._padded, k)  # (B, T, Ho, Wo)
        return z.transpose(0, 1).reshape(*lead, self.batch, self.out_h, self.out_w)

    def adjoint(self, out: torch.Tensor) -> torch.Tensor:
        """``Pᵀ E``: ``(..., B, Ho, Wo)`` → ``(..., C, kh, kw)``; ``g(i) = Σ_b Σ_x E_b(x) I_b(x + i)``."""
        lead = out.shape[:-3]
        if self.backend == "fft":
            e_hat = torch.fft.rfft2(out, s=(self.height, self.width))  # zero-padded for valid mode
            prod = (e_hat.conj().unsqueeze(-3) * self._spec).sum(-4)  # (..., C, H, W')
            g = torch.fft.irfft2(prod, s=(self.height, self.width))
            return g[..., : self.kh, : self.kw]
        e = out.reshape(-1, self.batch, self.out_h, self.out_w)  # (T, B, Ho, Wo) used as conv weights
        g = F.conv2d(self._padded.transpose(0, 1), e)  # (C, T, kh, kw)
        return g.transpose(0, 1).reshape(*lead, *self.kernel_shape)

    def normal(self, kernel: torch.Tensor) -> torch.Tensor:
        """``PᵀP K`` (same shape as ``kernel``)."""
        self.num_matvecs += 1
        return self.adjoint(self.forward(kernel))

    def patch_sum(self) -> torch.Tensor:
        """``Ī = Pᵀ1``: the sum of all patches, shape ``(C, kh, kw)``."""
        ones = torch.ones(self.output_shape, dtype=self.images.dtype)
        return self.adjoint(ones)


# ---------------------------------------------------------------------------------------------------
# Spectrum of PᵀP
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvSpectrum:
    """Extreme eigenvalues of ``PᵀP`` (units: image intensity², summed over output locations).

    Attributes:
        lambda_max, lambda_min: largest / smallest eigenvalue. ``PᵀP`` is positive semi-definite, so
            a negative round-off value is reported as 0.0 (the raw value is in ``lambda_min_raw``).
        method: ``"exact"`` or ``"dft"``.
        converged: the eigensolver's residual test passed for both ends (always True for "dft").
        num_matvecs: products with ``PᵀP`` spent (0 for "dft").
        dim: ``C·kh·kw``.
        lambda_min_raw: the solver's smallest Ritz value before clipping at 0.
    """

    lambda_max: float
    lambda_min: float
    method: str
    converged: bool = True
    num_matvecs: int = 0
    dim: int = 0
    lambda_min_raw: float = 0.0

    @property
    def singular(self) -> bool:
        """True when ``λ_min ≤ 1e-9·λ_max``: ``PᵀP`` is rank deficient to working precision (e.g. the
        checkerboard, where it has rank one), so the window's lower edge is set by a zero mode."""
        return self.lambda_min <= 1e-9 * self.lambda_max

    @property
    def condition(self) -> float:
        """``λ_max/λ_min`` (inf when singular)."""
        return math.inf if self.singular else self.lambda_max / self.lambda_min


def conv_operator_spectrum(
    images: torch.Tensor,
    kernel_size: int | tuple[int, int],
    method: Literal["exact", "dft"] = "exact",
    tol: float = 1e-6,
    max_iter: int | None = None,
    circular: bool = False,
    seed: int = 0,
    backend: Literal["fft", "conv"] = "fft",
) -> ConvSpectrum:
    """Extreme eigenvalues of ``PᵀP`` for one conv layer (one output channel) on a batch of inputs.

    Args:
        images: ``(H, W)``, ``(C, H, W)`` or ``(B, C, H, W)``.
        kernel_size: ``k`` or ``(kh, kw)``.
        method: ``"exact"``: Lanczos (``lightning_eos.curvature.lanczos``) on the matrix-free
            ``PᵀP`` of a valid (or, with ``circular=True``, circular) convolution -- ``P`` is never
            built. ``"dft"``: the power spectrum: per frequency ω the eigenvalues of the ``C×C``
            matrix ``Σ_b Î_b(ω)Î_b(ω)ᴴ`` (``Σ_b |Î_b(ω)|²`` for one channel), max/min over ω. The DFT
            form equals the exact one only for circular convolution with a full-size kernel; for a
            valid convolution with a small kernel it is the paper's approximation.
        tol: Lanczos residual tolerance (relative).
        max_iter: Lanczos Krylov cap (default the solver's: ``min(dim, 200)``).
        circular: periodic boundary for "exact".
        seed: start vector seed.
        backend: how "exact" applies ``P``: "fft" (default) or "conv" (``conv2d``).

    Returns:
        :class:`ConvSpectrum`. ``λ_min`` can be exactly 0 (rank-deficient ``PᵀP``: e.g. fewer
        output locations than kernel entries, or the checkerboard, whose ``PᵀP`` has rank one).
    """
    imgs = _as_images(images)
    _, c, h, w = imgs.shape
    kh, kw = _kernel_hw(kernel_size, h, w)
    if method == "dft":
        return _dft_spectrum(imgs, kh * kw * c)
    if method != "exact":
        raise ValueError(f"method must be 'exact' or 'dft', got {method!r}")
    _positive(tol, "tol")
    op = PatchOperator(imgs, (kh, kw), circular=circular, backend=backend)
    shape = op.kernel_shape
    if op.dim == 1:  # a 1×1 single-channel kernel: PᵀP is the scalar Σ I²
        val = float(op.normal(torch.ones(shape, dtype=torch.float64)).reshape(()))
        return ConvSpectrum(val, max(val, 0.0), "exact", True, 1, 1, val)

    def matvec(v: torch.Tensor) -> torch.Tensor:
        return op.normal(v.reshape(shape)).reshape(-1)

    operator = FunctionOperator(matvec, op.dim, dtype=torch.float64, device="cpu")
    res = lanczos(operator, k=1, which="both", tol=tol, max_iter=max_iter, seed=seed)
    lam_max, lam_min = float(res.eigenvalues[0]), float(res.eigenvalues[-1])
    return ConvSpectrum(
        lambda_max=lam_max,
        lambda_min=max(lam_min, 0.0),
        method="exact",
        converged=bool(res.converged.all()),
        num_matvecs=int(res.num_hvps),
        dim=op.dim,
        lambda_min_raw=lam_min,
    )


def _dft_spectrum(imgs: torch.Tensor, dim: int) -> ConvSpectrum:
    spec = torch.fft.fft2(imgs)  # (B, C, H, W)
    if imgs.shape[1] == 1:
        power = spec.abs().pow(2).sum(dim=(0, 1))
        lam_max, lam_min = float(power.max()), float(power.min())
    else:
        # Per frequency, Σ_b Î_b Î_bᴴ (C×C Hermitian, PSD): the block-circulant PᵀP's eigenvalues.
        s = spec.permute(2, 3, 1, 0)  # (H, W, C, B)
        mats = s @ s.conj().transpose(-1, -2)
        eig = torch.linalg.eigvalsh(mats)
        lam_max, lam_min = float(eig[..., -1].max()), float(eig[..., 0].min())
    return ConvSpectrum(lam_max, max(lam_min, 0.0), "dft", True, 0, dim, lam_min)


# ---------------------------------------------------------------------------------------------------
# Windows
# ---------------------------------------------------------------------------------------------------


def _linear_term_range(
    images: torch.Tensor,
    kernel_size: int | tuple[int, int],
    a: float,
    beta: float,
    method: str,
    pooling: str,
    circular: bool,
    spectrum: ConvSpectrum | None,
) -> tuple[float, float]:
    """Extreme eigenvalues ``(min, max)`` of the transitioning-region Hessian ``(aβ/2)·PᵀP/norm``
    (arguments as in :func:`conv_weight_decay_window`; ``spectrum`` skips the eigensolve)."""
    if pooling not in ("sum", "mean"):
        raise ValueError(f"pooling must be 'sum' (the paper's normalization) or 'mean', got {pooling!r}")
    imgs = _as_images(images)
    if spectrum is None:
        spectrum = conv_operator_spectrum(imgs, kernel_size, method, circular=circular)
    scale = _finite(a, "a") * _finite(beta, "beta") / 2.0
    if pooling == "mean":
        b, _, h, w = imgs.shape
        kh, kw = _kernel_hw(kernel_size, h, w)
        scale /= b * (h * w if circular else (h - kh + 1) * (w - kw + 1))
    ends = (scale * spectrum.lambda_min, scale * spectrum.lambda_max)
    return (min(ends), max(ends))


def conv_weight_decay_window(
    images: torch.Tensor,
    kernel_size: int | tuple[int, int],
    lr: float,
    a: float = -0.5,
    beta: float = 1.0,
    momentum: float = 0.0,
    nesterov: bool = False,
    method: Literal["exact", "dft"] = "exact",
    pooling: Literal["sum", "mean"] = "sum",
    circular: bool = False,
    spectrum: ConvSpectrum | None = None,
) -> WeightDecayWindow:
    """Coupled weight decay ``(alpha_min, alpha_max)`` keeping the transitioning-region PDE stable.

    Stable iff every eigenvalue of ``(aβ/2)PᵀP + αI`` lies in ``[0, c/Δt]`` (``c`` = 2, 2 + 2μ or
    (2 + 2μ)/(1 + 2μ), from :func:`lightning_eos.bounds.stability_constant`). For ``a < 0``:
    ``alpha_min = (|a|β/2)·λ_max(PᵀP)`` (independent of Δt) and
    ``alpha_max = c/Δt + (|a|β/2)·λ_min(PᵀP)``.

    Args:
        images, kernel_size: as in :func:`conv_operator_spectrum`.
        lr: the time step Δt (> 0).
        a: the BCE residual ``σ(u) − y`` treated as a constant (−½ at u = 0 with label 1).
        beta: swish β.
        momentum, nesterov: PyTorch SGD momentum form.
        method: spectrum method ("exact" or "dft").
        pooling: "sum" (the paper's normalization, default) or "mean" (global average pooling, as in
            :func:`simulate_conv_pde`: the operator is divided by ``B·|Ω|``).
        circular: periodic convolution for "exact".
        spectrum: a precomputed :class:`ConvSpectrum` (skips the eigensolve).

    Returns:
        :class:`~lightning_eos.bounds.WeightDecayWindow`, iterable as ``(alpha_min, alpha_max)``.
    """
    lo, hi = _linear_term_range(images, kernel_size, a, beta, method, pooling, circular, spectrum)
    return weight_decay_window(lo, hi, lr, momentum=momentum, nesterov=nesterov)


def conv_max_stable_lr(
    images: torch.Tensor,
    kernel_size: int | tuple[int, int],
    alpha: float,
    a: float = -0.5,
    beta: float = 1.0,
    momentum: float = 0.0,
    nesterov: bool = False,
    method: Literal["exact", "dft"] = "exact",
    pooling: Literal["sum", "mean"] = "sum",
    circular: bool = False,
    spectrum: ConvSpectrum | None = None,
) -> float:
    """Largest Δt for which the transitioning-region PDE with weight decay ``alpha`` is stable.

    ``c/(α + λ_max(H))`` with ``H = (aβ/2)PᵀP``; ``math.inf`` when ``α + λ_max(H) ≤ 0`` (no top-edge
    limit) and ``0.0`` when ``α + λ_min(H) < 0``: the continuous PDE itself is unstable there, so no
    step size helps.
    """
    alpha = _finite(alpha, "alpha")
    lo, hi = _linear_term_range(images, kernel_size, a, beta, method, pooling, circular, spectrum)
    c = stability_constant(momentum, nesterov)
    if alpha + lo < 0.0:
        return 0.0
    total = alpha + hi
    return math.inf if total <= 0.0 else c / total


# ---------------------------------------------------------------------------------------------------
# The three linear regimes
# ---------------------------------------------------------------------------------------------------


class Region(enum.IntEnum):
    """Linear regimes of the one-layer model at an output location ``x`` (by ``βz(x)``, z = K∗I)."""

    NOT_ACTIVATED = 0  # βz ≪ 0: φ ≈ 0, only weight decay acts: ∂tK = −αK
    TRANSITIONING = 1  # βz ≈ 0: φ' ≈ ½ + βz/2, the only region that can be unstable for α > 0
    ACTIVATED = 2  # βz ≫ 0: φ ≈ z, the loss sees K only through ⟨K, Ī⟩


REGION_NAMES: tuple[str, ...] = tuple(r.name.lower() for r in Region)


@dataclass(frozen=True)
class RegionMap:
    """Per-output-location region labels.

    Attributes:
        regions: int64 tensor ``(B, Ho, Wo)`` (``(Ho, Wo)`` for a single 2-D/3-D image) of
            :class:`Region` values.
        names: ``REGION_NAMES`` (index = region value).
        threshold: the ``|βz|`` cut used.
    """

    regions: torch.Tensor
    names: tuple[str, ...] = REGION_NAMES
    threshold: float = 4.0

    def fractions(self) -> dict[str, float]:
        """Share of output locations in each region."""
        n = self.regions.numel()
        return {name: float((self.regions == i).sum()) / n for i, name in enumerate(self.names)}


def classify_regions(
    kernel: torch.Tensor, image: torch.Tensor, threshold: float = 4.0, beta: float = 1.0
) -> RegionMap:
    """Which linear regime each output location of ``K∗I`` is in.

    ``ACTIVATED`` where ``βz > threshold``, ``NOT_ACTIVATED`` where ``βz < −threshold``, else
    ``TRANSITIONING`` (default 4: there swish's slope is within ~5 % of its asymptotes 1 and 0).
    Restrained instability: the transitioning region is the only unstable one (for α inside the
    not-activated window), and an unstable iterate is pushed out of it into a stable region.

    Args:
        kernel: ``(kh, kw)`` or ``(C, kh, kw)``.
        image: ``(H, W)``, ``(C, H, W)`` or ``(B, C, H, W)``.
        threshold: cut on ``|βz|`` (> 0).
        beta: swish β.
    """
    thr = _positive(threshold, "threshold")
    beta = _finite(beta, "beta")
    k = _as_kernel(kernel, image)
    op = PatchOperator(image, (k.shape[-2], k.shape[-1]))
    if k.shape[0] != op.channels:
        raise ValueError(f"kernel has {k.shape[0]} channels but image has {op.channels}")
    z = beta * op.forward(k.to(torch.float64))
    regions = torch.full(z.shape, int(Region.TRANSITIONING), dtype=torch.int64)
    regions[z > thr] = int(Region.ACTIVATED)
    regions[z < -thr] = int(Region.NOT_ACTIVATED)
    if image.dim() < 4:
        regions = regions[0]
    return RegionMap(regions=regions, threshold=thr)


def _as_kernel(kernel: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    if not isinstance(kernel, torch.Tensor) or kernel.dim() not in (2, 3):
        shape = tuple(kernel.shape) if isinstance(kernel, torch.Tensor) else type(kernel).__name__
        raise ValueError(f"kernel must be a tensor of shape (kh, kw) or (C, kh, kw), got {shape}")
    if not bool(torch.isfinite(kernel).all()):
        raise ValueError("kernel must be finite")
    if not isinstance(image, torch.Tensor) or image.dim() not in (2, 3, 4):
        raise ValueError("image must be a tensor of shape (H, W), (C, H, W) or (B, C, H, W)")
    return kernel[None] if kernel.dim() == 2 else kernel


def region_windows(
    images: torch.Tensor,
    kernel_size: int | tuple[int, int],
    lr: float,
    a: float = -0.5,
    beta: float = 1.0,
    momentum: float = 0.0,
    nesterov: bool = False,
    method: Literal["exact", "dft"] = "exact",
    activated_gain: float = 0.25,
) -> dict[Region, WeightDecayWindow]:
    """Stable weight-decay windows of the three linear regimes (the paper's Table 3, sum normalization).

    * not activated: ``H = 0`` → ``(0, c/Δt)``;
    * transitioning: ``H = (aβ/2)PᵀP`` → :func:`conv_weight_decay_window`;
    * activated: the model sees ``K`` only through ``u = ⟨K, Ī⟩`` (``Ī = Pᵀ1``), so ``H = g·ĪĪᵀ``
      with ``g = σ'(u)`` -- ``activated_gain`` (¼ at u = 0, our derivation; the paper's table writes
      1/8 under its own conventions) -- rank one: ``(0, c/Δt − g‖Ī‖²)``.
    """
    imgs = _as_images(images)
    gain = _finite(activated_gain, "activated_gain")
    op = PatchOperator(imgs, kernel_size)
    ibar_sq = float(op.patch_sum().pow(2).sum())
    top = gain * ibar_sq
    low = top if op.dim == 1 else min(0.0, top)
    return {
        Region.NOT_ACTIVATED: weight_decay_window(0.0, 0.0, lr, momentum=momentum, nesterov=nesterov),
        Region.TRANSITIONING: conv_weight_decay_window(
            imgs, kernel_size, lr, a=a, beta=beta, momentum=momentum, nesterov=nesterov, method=method
        ),
        Region.ACTIVATED: weight_decay_window(low, max(top, 0.0), lr, momentum=momentum, nesterov=nesterov),
    }


# ---------------------------------------------------------------------------------------------------
# Simulations
# ---------------------------------------------------------------------------------------------------


def checkerboard(n: int = 256, m: int | None = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The paper's ±1 checkerboard, shape ``(n, m)`` (m defaults to n): pixel (i, j) is −1 where
    ``i + j`` is even, +1 otherwise."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    m = n if m is None else m
    if not isinstance(m, int) or m < 1:
        raise ValueError(f"m must be a positive int, got {m!r}")
    i = torch.arange(n)[:, None]
    j = torch.arange(m)[None, :]
    return torch.where((i + j) % 2 == 0, -1.0, 1.0).to(dtype)


def divergence(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """The paper's twin divergence ``D = 2·mean_i |w1_i − w2_i|/(|w1_i| + |w2_i|)`` in [0, 2].

    Entries where both are 0 count as 0 (0/0 guard). Reduces over the last three dims (a kernel
    ``(C, kh, kw)``) so leading dims are kept; returns a tensor.
    """
    num = (w1 - w2).abs()
    den = w1.abs() + w2.abs()
    ratio = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den))
    return 2.0 * ratio.mean(dim=(-3, -2, -1))


@dataclass
class ConvPDEResult:
    """Output of :func:`simulate_conv_pde`.

    Attributes:
        loss: float64 ``(steps + 1,)``: BCE at the iterate before each step and after the last (NaN
            after a non-finite blow-up).
        kernel_norm: ``(steps + 1,)``: Frobenius norm of the kernel.
        final_kernel: ``(C, kh, kw)`` (the last finite iterate).
        kernels: ``(n_rec, C, kh, kw)`` kernels at ``record_steps`` (None if ``record_every`` is None).
        record_steps: the iterations at which ``kernels`` were taken.
        divergence: ``(steps + 1,)`` twin divergence D per iterate, or None without a twin.
        blew_up: True when the iterate became non-finite.
        blow_up_step: first non-finite iterate index (None if none).
        regions: region fractions of the final kernel (see :func:`classify_regions`).
    """

    loss: torch.Tensor
    kernel_norm: torch.Tensor
    final_kernel: torch.Tensor
    kernels: torch.Tensor | None
    record_steps: list[int]
    divergence: torch.Tensor | None = None
    blew_up: bool = False
    blow_up_step: int | None = None
    regions: dict[str, float] = field(default_factory=dict)


def _init_kernel(
    kernel: int | tuple[int, int] | torch.Tensor, channels: int, seed: int, dtype: torch.dtype
) -> torch.Tensor:
    if isinstance(kernel, torch.Tensor):
        k = kernel.detach().clone().to(dtype)
        if k.dim() == 2:
            k = k[None]
        if k.dim() != 3 or k.shape[0] != channels:
            raise ValueError(
                f"kernel must have shape (kh, kw) or ({channels}, kh, kw) for this image, "
                f"got {tuple(kernel.shape)}"
            )
        if not bool(torch.isfinite(k).all()):
            raise ValueError("kernel must be finite")
        return k
    if isinstance(kernel, int) and not isinstance(kernel, bool):
        kh = kw = kernel
    elif isinstance(kernel, (tuple, list)) and len(kernel) == 2:
        kh, kw = int(kernel[0]), int(kernel[1])
    else:
        raise ValueError(
            f"kernel must be a kernel size (int or pair) or an initial kernel tensor, got {kernel!r}"
        )
    if kh < 1 or kw < 1:
        raise ValueError(f"kernel size must be positive, got {(kh, kw)}")
    gen = torch.Generator().manual_seed(int(seed))
    # Standard-normal init as in the paper; drawn in float64 so every dtype sees the same kernel.
    return torch.randn(channels, kh, kw, generator=gen, dtype=torch.float64).to(dtype)


def _swish_parts(z: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``φ(z) = z·σ(βz)`` and ``φ'(z) = σ(βz) + βz·σ(βz)(1 − σ(βz))``."""
    s = torch.sigmoid(beta * z)
    return z * s, s + beta * z * s * (1.0 - s)


def simulate_conv_pde(
    image: torch.Tensor,
    kernel: int | tuple[int, int] | torch.Tensor,
    lr: float,
    alpha: float,
    steps: int,
    beta: float = 1.0,
    label: float = 1.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    twin: Literal["ulp", "rescale"] | None = None,
    k: float = 3.0,
    record_every: int | None = 1,
) -> ConvPDEResult:
    """Train the paper's one-layer model by explicit Euler steps (full-batch GD, coupled decay).

    Model: ``z = K∗I`` (valid cross-correlation), ``u_b = mean_Ω φ(z_b)`` with swish
    ``φ(z) = z·σ(βz)``, loss ``mean_b BCE(σ(u_b), label)``; step ``K ← K − Δt(∇loss + αK)`` with the
    closed-form gradient ``Pᵀ[(σ(u) − y)·φ'(z)/(B|Ω|)]`` (FFT-based, vectorized; no autograd, no
    per-pixel loops).

    Args:
        image: ``(H, W)``, ``(C, H, W)`` or ``(B, C, H, W)``.
        kernel: kernel size (standard-normal init from ``seed``) or an initial kernel ``(kh, kw)`` /
            ``(C, kh, kw)``.
        lr: Δt > 0.
        alpha: coupled weight decay (finite).
        steps: number of Euler steps (≥ 1).
        beta: swish β; label: BCE target in [0, 1].
        dtype: float64 (default) or float32.
        twin: None; ``"ulp"`` (a second run from the kernel moved one ulp up in every entry) or
            ``"rescale"`` (a second run applying ``(k·Δt)·(grad/k)``: equal in exact arithmetic).
        k: the rescaling factor for ``twin="rescale"`` (k = 1 is bit-identical to the main run).
        record_every: store the kernel every that many iterations (and the last); None: final only.

    Returns:
        :class:`ConvPDEResult`. A non-finite iterate stops the run (``blew_up``), later entries NaN.
    """
    dt = _positive(lr, "lr")
    alpha = _finite(alpha, "alpha")
    beta = _finite(beta, "beta")
    label = _finite(label, "label")
    if not 0.0 <= label <= 1.0:
        raise ValueError(f"label must be in [0, 1], got {label}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if twin not in (None, "ulp", "rescale"):
        raise ValueError(f"twin must be None, 'ulp' or 'rescale', got {twin!r}")
    k_fac = _positive(k, "k")
    if record_every is not None and (not isinstance(record_every, int) or record_every < 1):
        raise ValueError(f"record_every must be a positive int or None, got {record_every!r}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    imgs = _as_images(image, "image", dtype=dtype)
    k0 = _init_kernel(kernel, imgs.shape[1], seed, dtype)
    op = PatchOperator(imgs, (k0.shape[-2], k0.shape[-1]), dtype=dtype)

    kern = k0[None]  # (T, C, kh, kw), T = 1 or 2 twins advanced in one batched FFT
    if twin == "ulp":
        kern = torch.stack([k0, torch.nextafter(k0, torch.full_like(k0, math.inf))])
    elif twin == "rescale":
        kern = torch.stack([k0, k0.clone()])
    y = torch.tensor(label, dtype=dtype)
    n_out = op.out_h * op.out_w

    def loss_and_grad(kk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = op.forward(kk)  # (T, B, Ho, Wo)
        phi, dphi = _swish_parts(z, beta)
        u = phi.mean(dim=(-2, -1))  # (T, B)
        loss = F.binary_cross_entropy_with_logits(u, y.expand_as(u), reduction="none").mean(-1)
        resid = (torch.sigmoid(u) - y) / (op.batch * n_out)  # dloss/du_b times du/dz's 1/|Ω|
        grad = op.adjoint(resid[..., None, None] * dphi)
        return loss, grad

    loss_hist = torch.full((steps + 1,), math.nan, dtype=torch.float64)
    norm_hist = torch.full((steps + 1,), math.nan, dtype=torch.float64)
    div_hist = torch.full((steps + 1,), math.nan, dtype=torch.float64) if twin else None
    records: list[torch.Tensor] = []
    rec_steps: list[int] = []
    blow_up_step: int | None = None
    last = kern[0].clone()
    for t in range(steps + 1):
        norm = float(kern[0].norm())
        # A norm that overflows (entries ~1e160) counts as a blow-up too.
        if not math.isfinite(norm) or not bool(torch.isfinite(kern).all()):
            blow_up_step = t
            break
        last = kern[0].clone()
        loss, grad = loss_and_grad(kern)
        loss_hist[t] = float(loss[0])
        norm_hist[t] = norm
        if div_hist is not None:
            div_hist[t] = float(divergence(kern[0], kern[1]))
        if record_every is not None and (t % record_every == 0 or t == steps):
            records.append(last)
            rec_steps.append(t)
        if t == steps:
            break
        update = grad + alpha * kern  # coupled weight decay enters the gradient
        if twin == "rescale":
            # Twin 1 applies (k·Δt)·(update/k): a different rounding of the same exact step.
            kern = torch.stack([kern[0] - dt * update[0], kern[1] - (k_fac * dt) * (update[1] / k_fac)])
        else:
            kern = kern - dt * update
    return ConvPDEResult(
        loss=loss_hist,
        kernel_norm=norm_hist,
        final_kernel=last,
        kernels=torch.stack(records) if records else None,
        record_steps=rec_steps,
        divergence=div_hist,
        blew_up=blow_up_step is not None,
        blow_up_step=blow_up_step,
        regions=classify_regions(last.to(torch.float64), imgs, beta=beta).fractions()
        if blow_up_step is None
        else {},
    )


@dataclass
class LinearizedResult:
    """Output of :func:`simulate_linearized`.

    Attributes:
        kernel_norm: ``(steps + 1,)`` Frobenius norm of K per iterate.
        loss: ``(steps + 1,)`` the non-linear one-layer model's BCE (mean-pooled swish, sigmoid, the
            given label) evaluated at each iterate: a paper-style loss curve along the linearized
            trajectory (the linearized model itself has no bounded loss when a < 0).
        final_kernel: ``(C, kh, kw)``.
        growth: ``kernel_norm[-1] / kernel_norm[0]``.
    """

    kernel_norm: torch.Tensor
    loss: torch.Tensor
    final_kernel: torch.Tensor

    @property
    def growth(self) -> float:
        """Norm ratio last/first: ≫ 1 for an unstable α, bounded for a stable one."""
        return float(self.kernel_norm[-1] / self.kernel_norm[0])


def simulate_linearized(
    image: torch.Tensor,
    kernel: int | tuple[int, int] | torch.Tensor,
    lr: float,
    alpha: float,
    steps: int,
    a: float = -0.5,
    beta: float = 1.0,
    momentum: float = 0.0,
    nesterov: bool = False,
    seed: int = 0,
    label: float = 1.0,
) -> LinearizedResult:
    """Forward-Euler (or PyTorch-SGD momentum) steps of the transitioning-region PDE.

    ``∂t K = −(a/2)(Ī + β PᵀP K) − αK`` with ``Ī = Pᵀ1`` (the paper's sum normalization, the one
    :func:`conv_weight_decay_window` uses by default), i.e. SGD on a quadratic with gradient
    ``d = (a/2)(Ī + βPᵀPK) + αK``. Momentum follows ``torch.optim.SGD`` (buffer starts at the first
    ``d``; Nesterov step ``d + μ·buf``). Inside the window the iterate converges to the fixed point;
    outside, the worst mode grows by ``|G| > 1`` per step.

    Args:
        image, kernel, lr, alpha, steps, seed: as in :func:`simulate_conv_pde` (kernel = size or init).
        a, beta: the frozen BCE residual and swish β of the linearization.
        momentum, nesterov: optimizer form.
        label: label for the reported BCE curve.
    """
    dt = _positive(lr, "lr")
    alpha = _finite(alpha, "alpha")
    a = _finite(a, "a")
    beta = _finite(beta, "beta")
    mu = _finite(momentum, "momentum")
    stability_constant(mu, nesterov)  # validates momentum ∈ [0, 1) with the same message as bounds
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    imgs = _as_images(image, "image")
    kern = _init_kernel(kernel, imgs.shape[1], seed, torch.float64)
    op = PatchOperator(imgs, (kern.shape[-2], kern.shape[-1]))
    ibar = op.patch_sum()
    y = torch.tensor(_finite(label, "label"), dtype=torch.float64)
    norms = torch.full((steps + 1,), math.nan, dtype=torch.float64)
    losses = torch.full((steps + 1,), math.nan, dtype=torch.float64)
    buf: torch.Tensor | None = None
    for t in range(steps + 1):
        if not bool(torch.isfinite(kern).all()):
            break
        z = op.forward(kern)
        phi, _ = _swish_parts(z, beta)
        u = phi.mean(dim=(-2, -1))
        losses[t] = float(F.binary_cross_entropy_with_logits(u, y.expand_as(u)))
        norms[t] = float(kern.norm())
        if t == steps:
            break
        d = 0.5 * a * (ibar + beta * op.adjoint(z)) + alpha * kern
        if mu > 0.0:
            buf = d.clone() if buf is None else mu * buf + d
            step = d + mu * buf if nesterov else buf
        else:
            step = d
        kern = kern - dt * step
    return LinearizedResult(kernel_norm=norms, loss=losses, final_kernel=kern)
