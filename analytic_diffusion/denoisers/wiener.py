"""The Gaussian (Wiener) denoiser: the exact posterior mean if the data were N(μ, Σ) with the data's moments."""
from __future__ import annotations

from typing import Optional

import torch

from .base import Denoiser


class Wiener(Denoiser):
    """x̂0 = μ + U diag(λ / (λ + σ²)) Uᵀ (x − μ) in the PCA basis (Li, Dai & Qu; Niedoba et al.).

    μ, λ, U come from the dataset's cached PCA (population covariance, flips included when on). ``rank``
    keeps the leading components only. Applied as project → shrink → reconstruct: 2·B·D·r multiply-adds,
    no D×D filter is formed.
    """

    name = "wiener"

    def __init__(self, dataset, *, rank: Optional[int] = None, dtype: torch.dtype = torch.float32):
        super().__init__(dataset.image_shape)
        d = dataset.dim
        if rank is not None and (not isinstance(rank, int) or not 1 <= rank <= d):
            raise ValueError(f"rank: expected an integer in [1, {d}] or None, got {rank!r}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype: expected torch.float32 or torch.float64, got {dtype}")
        mean, eigvals, U = dataset.pca()
        r = d if rank is None else rank
        self.dataset_repr = repr(dataset)
        self.rank = rank
        self.dtype = dtype
        # Kept and applied in float64 whatever ``dtype`` (the answer is cast to it): a float32 GEMM's rounding
        # changes with the batch shape and the thread count, float64's stays far below float32 resolution.
        self.mean = mean.to(torch.float64)
        self.eigvals = eigvals[:r].to(torch.float64)
        self.U = U[:, :r].to(torch.float64).contiguous()

    def denoise(self, x, s, labels):
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

    def config(self):
        return {"method": self.name, "dataset": self.dataset_repr, "rank": self.rank, "dtype": str(self.dtype)}
