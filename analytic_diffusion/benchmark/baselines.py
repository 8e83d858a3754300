"""PyTorch baselines for the global retrieval, as a user would write them (the fused kernels must beat these).

All take the query batch q (B, D) float32, the candidate rows y (N, D) float32 *resident* (conversion from
uint8 is not timed: a PyTorch user would keep float rows) and coef (B,) = 1 / (2σ²), and return the posterior
mean (B, D).

* ``naive``: cdist → softmax → matmul, everything materialised (B×N distances and weights).
* ``chunked``: the best plain PyTorch we could write: GEMM-softmax-GEMM over key chunks with an online softmax
  (expanded-form distances, centred on the data mean), memory bounded.
* ``sdpa``: scaled_dot_product_attention with the key norm folded into an extra column,
  logit = [2·coef·q, −coef] · [y, ‖y‖²]; PyTorch picks its fused (flash / memory-efficient / math) kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def naive(q: torch.Tensor, y: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    d2 = torch.cdist(q, y) ** 2
    w = torch.softmax(-coef[:, None] * d2, dim=1)
    return w @ y


def chunked(
    q: torch.Tensor, y: torch.Tensor, coef: torch.Tensor, chunk: int = 8192, center: torch.Tensor | None = None
) -> torch.Tensor:
    c = y.mean(0) if center is None else center
    qc = q - c
    m = torch.full((q.shape[0],), float("-inf"), device=q.device, dtype=q.dtype)
    l = torch.zeros_like(m)
    o = torch.zeros_like(q)
    for s in range(0, y.shape[0], chunk):
        yc = y[s : s + chunk] - c
        z = coef[:, None] * (2.0 * (qc @ yc.t()) - (yc * yc).sum(1)[None, :])  # the ‖q‖² term cancels
        m_new = torch.maximum(m, z.max(1).values)
        a = torch.exp(m - m_new)
        p = torch.exp(z - m_new[:, None])
        l = l * a + p.sum(1)
        o = o * a[:, None] + p @ yc
        m = m_new
    return o / l[:, None] + c


def sdpa_inputs(y: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys [y, ‖y‖²] and values y as (1, 1, N, ·) tensors, built once per dataset (not timed)."""
    k = torch.cat([y, (y * y).sum(1, keepdim=True)], 1)
    dtype = dtype or y.dtype
    return k.to(dtype)[None, None], y.to(dtype)[None, None]


def sdpa(q: torch.Tensor, keys_aug: torch.Tensor, values: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    qa = torch.cat([2.0 * coef[:, None] * q, -coef[:, None]], 1).to(keys_aug.dtype)[None, None]
    out = F.scaled_dot_product_attention(qa, keys_aug, values, scale=1.0)
    return out[0, 0].to(q.dtype)
