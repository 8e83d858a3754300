"""Exact Jacobian products of the posterior mean, and autograd through the optimal denoiser.

With weights w_j = softmax_j(−‖x − y_j‖² / 2σ²T), m(x) = Σ_j w_j y_j has the symmetric Jacobian

    ∂m/∂x = Cov_w[y] / (σ²T) = (Σ_j w_j y_j y_jᵀ − m mᵀ) / (σ²T),

so J·v = Jᵀ·v = (Σ_j w_j (y_j·v) y_j − m (m·v)) / (σ²T): one more scan of the candidates, with values y_j
scaled by y_j·v, accumulated with the same online softmax (running max, rescaled sums) as the retrieval. Each
sample's Jacobian depends on that sample only. Distances are direct differences in the working dtype, over
candidate chunks of bounded size; flips and class labels select candidates as the retrieval does. Autograd
reaches it through the custom op's backward (:mod:`.custom_ops`).
"""

from __future__ import annotations

from typing import cast

import torch

from ..ops import KeyBank
from ..ops.retrieval import hflip_rows

__all__ = ["covariance_product", "posterior_jvp"]

# Elements of the (B, chunk, D) difference tensor per chunk: 32 MiB of float64.
_CHUNK_ELEMENTS = 1 << 22


def posterior_jvp(
    x: torch.Tensor,
    keys: KeyBank,
    sigma: torch.Tensor,
    v: torch.Tensor,
    *,
    temperature: float = 1.0,
    flips: bool = False,
    query_labels: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """(B, D) J·v (= Jᵀ·v) of the posterior mean at rows x (B, D), σ (B,), for directions v (B, D)."""
    B, D = x.shape
    dev = x.device
    xq, vq = x.to(dtype), v.to(device=dev, dtype=dtype)
    s = sigma.to(device=dev, dtype=dtype)
    coef = 1.0 / (2.0 * s * s * temperature)
    key_labels = None if query_labels is None else cast(torch.Tensor, keys.labels).to(dev)  # labels: checked
    m = torch.full((B,), float("-inf"), dtype=dtype, device=dev)
    l = torch.zeros(B, dtype=dtype, device=dev)
    o = torch.zeros(B, D, dtype=dtype, device=dev)
    q = torch.zeros(B, D, dtype=dtype, device=dev)
    step = max(1, _CHUNK_ELEMENTS // max(1, B * D))
    for start in range(0, keys.n, step):
        stop = min(start + step, keys.n)
        rows = keys.rows(start, stop, dtype, dev)
        variants = [rows] + ([hflip_rows(rows, cast("tuple[int, int, int]", keys.image_shape))] if flips else [])
        for y in variants:
            logit = -((xq[:, None, :] - y[None]) ** 2).sum(-1) * coef[:, None]  # (B, n)
            if key_labels is not None:
                allowed = key_labels[start:stop][None, :] == cast(torch.Tensor, query_labels)[:, None]
                logit = torch.where(allowed, logit, torch.full_like(logit, float("-inf")))
            new_m = torch.maximum(m, logit.max(1).values)
            safe = torch.where(torch.isfinite(new_m), new_m, torch.zeros_like(new_m))
            rescale = torch.exp(m - safe)  # exp(-inf) = 0 before any allowed candidate
            p = torch.exp(logit - safe[:, None])
            l = l * rescale + p.sum(1)
            o = o * rescale[:, None] + p @ y
            q = q * rescale[:, None] + (p * (vq @ y.t())) @ y
            m = new_m
    return covariance_product(o / l[:, None], q / l[:, None], vq, coef)


def covariance_product(mean: torch.Tensor, second: torch.Tensor, v: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """Cov·v / σ²T = (E[y (y·v)] − m (m·v)) · 2·coef from the weighted mean m and second moment E[y (y·v)], (B, D);
    coef = 1/(2σ²T) per row."""
    return (second - mean * (mean * v).sum(1, keepdim=True)) * (2.0 * coef)[:, None]
