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
        # Non-persistent buffers: .to(device) moves them, state_dict() stays empty.
        self.register_buffer("mean", mean.to(dtype), persistent=False)
        self.register_buffer("eigvals", eigvals[:r].to(dtype), persistent=False)
        self.register_buffer("U", U[:, :r].to(dtype).contiguous(), persistent=False)

    def denoise(self, x, s, labels):
        if labels is not None:
            raise ValueError("class_labels: the wiener denoiser is unconditional")
        dev = x.device
        mu, lam, U = self.mean.to(dev), self.eigvals.to(dev), self.U.to(dev)
        xc = x.reshape(x.shape[0], -1).to(self.dtype) - mu
        shrink = lam[None, :] / (lam[None, :] + s.to(self.dtype)[:, None] ** 2)
        out = mu + ((xc @ U) * shrink) @ U.t()
        return out.reshape(x.shape)

    def config(self):
        return {"method": self.name, "dataset": self.dataset_repr, "rank": self.rank, "dtype": str(self.dtype)}
