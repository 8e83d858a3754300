"""The Gaussian (Wiener) denoiser: the exact posterior mean if the data were N(μ, Σ) with the data's moments."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .base import Denoiser

if TYPE_CHECKING:
    from ..data import Dataset


class Wiener(Denoiser):
    """x̂0 = μ + U diag(λ / (λ + σ²)) Uᵀ (x − μ) in the PCA basis (Li, Dai & Qu; Niedoba et al.).

    μ, λ, U come from the dataset's cached PCA (population covariance, flips included when on). ``rank``
    keeps the leading components only. Applied as project → shrink → reconstruct: 2·B·D·r multiply-adds,
    no D×D filter is formed.

    Eigenvalues at or below ``RANK_RTOL``·D·λ_max (docs/design.md §13.5) are null directions of the covariance (fewer images than
    dimensions, constant pixels) and count as exactly 0: the float64 eigensolver returns them as rounding noise of
    that size (~1e-15 on MNIST), and λ / (λ + σ²) would turn noise of 1e-15 into a shrink factor of 1e-9 at
    σ = 1e-3, 1e-7 at 1e-4, leaking the null space into the output and the Jacobian. ``effective_rank`` says how
    many components remain.
    """

    name = "wiener"
    mean: torch.Tensor  # non-persistent buffers: the PCA, float64
    eigvals: torch.Tensor
    U: torch.Tensor
    # The covariance's null eigenvalues come back from a backward-stable eigensolver as |λ| ≤ c·D·2^-52·λ_max;
    # genuine ones of real data sit far above (embedded MNIST, λ_max ≈ 21: null ones ≤ 8e-16, the cut 3.7e-12,
    # the smallest kept 8e-12).
    RANK_RTOL = 2.0**-52

    def __init__(self, dataset: Dataset, *, rank: int | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(dataset.image_shape)
        d = dataset.dim
        if rank is not None and (not isinstance(rank, int) or not 1 <= rank <= d):
            raise ValueError(f"rank: expected an integer in [1, {d}] or None, got {rank!r}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype: expected torch.float32 or torch.float64, got {dtype}")
        mean, eigvals, U = dataset.pca()
        eigvals = eigvals.to(torch.float64)
        eigvals = torch.where(eigvals > self.RANK_RTOL * d * eigvals.max(), eigvals, torch.zeros_like(eigvals))
        r = d if rank is None else rank
        self.effective_rank = int((eigvals[:r] > 0).sum())
        self.dataset_repr = repr(dataset)
        self.rank = rank
        self.dtype = dtype
        # Non-persistent buffers (.to(device) moves them, state_dict() stays empty), kept and applied in float64
        # whatever ``dtype`` (the answer is cast to it): a float32 GEMM's rounding changes with the batch shape and
        # the thread count, float64's stays far below float32 resolution.
        self.register_buffer("mean", mean.to(torch.float64), persistent=False)
        self.register_buffer("eigvals", eigvals[:r].to(torch.float64), persistent=False)
        self.register_buffer("U", U[:, :r].to(torch.float64).contiguous(), persistent=False)

    def denoise(self, x: torch.Tensor, s: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if labels is not None:
            raise ValueError("class_labels: the wiener denoiser is unconditional")
        dev = x.device
        mu, lam, U = self.mean.to(dev), self.eigvals.to(dev), self.U.to(dev)
        xc = x.reshape(x.shape[0], -1).to(torch.float64) - mu
        # λ / (λ + σ²), written so that a zero-variance direction gives 0 at every σ (never 0/0 at tiny σ)
        denom = (lam[None, :] + s.to(torch.float64)[:, None] ** 2).clamp_min(torch.finfo(torch.float64).tiny)
        shrink = lam[None, :] / denom
        out = mu + ((xc @ U) * shrink) @ U.t()
        return out.reshape(x.shape).to(self.dtype)

    def flow(self, x: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
        """The exact solution of the probability-flow ODE dx/dσ = (x − D(x, σ))/σ of this Gaussian, σ_from → σ_to.

        In the PCA basis each coordinate z_i = u_iᵀ(x − μ) obeys dz_i/dσ = z_i·σ/(λ_i + σ²), so
        z_i(σ_to) = z_i(σ_from)·sqrt((λ_i + σ_to²)/(λ_i + σ_from²)); directions outside the kept components
        (``rank`` < D) have λ = 0 and scale by σ_to/σ_from. Computed in float64, returned in x's dtype. Either σ may
        be 0 only as σ_to (the ODE's end point); σ_from > 0.
        """
        if not torch.is_tensor(x) or x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(
                f"x: expected shape (B, {', '.join(map(str, self.image_shape))}), got {tuple(getattr(x, 'shape', ()))}"
            )
        s0, s1 = float(sigma_from), float(sigma_to)
        if not (s0 > 0 and s0 < float("inf")):
            raise ValueError(f"sigma_from: expected a finite σ > 0, got {sigma_from!r}")
        if not (0 <= s1 < float("inf")):
            raise ValueError(f"sigma_to: expected a finite σ >= 0, got {sigma_to!r}")
        dev = x.device
        mu = self.mean.to(dev, torch.float64)
        lam, U = self.eigvals.to(dev, torch.float64), self.U.to(dev, torch.float64)
        xc = x.reshape(x.shape[0], -1).to(torch.float64) - mu
        z = xc @ U
        rest = xc - z @ U.t()  # the part outside the kept components (zero at full rank, up to rounding)
        scale = torch.sqrt((lam + s1 * s1) / (lam + s0 * s0))
        out = mu + (z * scale[None, :]) @ U.t() + rest * (s1 / s0)
        return out.reshape(x.shape).to(x.dtype)

    def config(self) -> dict[str, Any]:
        return {"method": self.name, "dataset": self.dataset_repr, "rank": self.rank, "dtype": str(self.dtype)}
