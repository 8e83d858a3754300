"""Exact Jacobian products of the posterior mean, and autograd through the optimal denoiser.

With weights w_j = softmax_j(−‖x − y_j‖² / 2σ²T), m(x) = Σ_j w_j y_j has the symmetric Jacobian

    ∂m/∂x = Cov_w[y] / (σ²T) = Σ_j w_j (y_j − m)(y_j − m)ᵀ / (σ²T),

so J·v = Jᵀ·v = Σ_j w_j ((y_j − m)·v)(y_j − m) / (σ²T): one more scan of the candidates with the same online
softmax (running max, rescaled sums) as the retrieval, accumulated centred (docs/design.md §13.4: the uncentred
Σ w (y·v) y − m (m·v) cancels to |y|²·u where the posterior has collapsed). Each sample's Jacobian depends on
that sample only. Distances are direct differences in the working dtype, over
candidate chunks of bounded size; flips and class labels select candidates as the retrieval does. Autograd
reaches it through the custom op's backward (:mod:`.custom_ops`).
"""

from __future__ import annotations

from typing import cast

import torch

from ..ops import KeyBank
from ..ops.retrieval import hflip_rows

__all__ = ["centred_covariance_product", "posterior_jvp"]

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
    """(B, D) J·v (= Jᵀ·v) of the posterior mean at rows x (B, D), σ (B,), for directions v (B, D).

    The covariance product is accumulated centred, never as E[y (y·v)] − m (m·v): that difference cancels to
    |y|²·u where the posterior has collapsed (J ≈ 0), and 1/σ² amplifies it (float32 at σ = 1e-3 returned about
    0.3‖v‖ instead of 0). Each chunk is centred on each row's heaviest candidate r (weight exactly 1, so its own
    term is exactly 0): S = Σ p (y − r)((y − r)·v) − d (d·v) / l with d = Σ p (y − r), the chunk's centred product;
    chunks combine by Chan's update S = S_A + S_B + (l_A l_B / l) Δ (Δ·v), Δ = μ_B − μ_A formed from the
    references' difference plus the offsets d / l, so duplicates and collapsed chunks cancel exactly.
    """
    B, D = x.shape
    dev = x.device
    xq, vq = x.to(dtype), v.to(device=dev, dtype=dtype)
    s = sigma.to(device=dev, dtype=dtype)
    coef = 1.0 / (2.0 * s * s * temperature)
    key_labels = None if query_labels is None else cast(torch.Tensor, keys.labels).to(dev)  # labels: checked
    state: _State | None = None  # (m, l, r, off, S): max logit, Σp, reference row, mean − r, centred product
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
            m = logit.max(1).values
            safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            p = torch.exp(logit - safe[:, None])  # 0 where disallowed
            l = p.sum(1)
            r = y[p.argmax(1)]  # (B, D)
            dy = y[None] - r[:, None, :]  # (B, n, D)
            d = torch.einsum("bn,bnd->bd", p, dy)
            pv = p * torch.einsum("bnd,bd->bn", dy, vq)
            off = d / torch.where(l > 0, l, torch.ones_like(l))[:, None]
            S = torch.einsum("bn,bnd->bd", pv, dy) - off * (d * vq).sum(1, keepdim=True)
            chunk = (m, l, r, off, S)
            state = chunk if state is None else _combine(state, chunk, vq)
    if state is None:
        raise ValueError("keys: the dataset has no images")
    _, l, _, _, S = state
    return S / l[:, None] * (2.0 * coef)[:, None]


# A centred state of the covariance product: (max logit, Σp, reference row, mean − reference, centred product).
_State = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _combine(a: _State, b: _State, v: torch.Tensor) -> _State:
    """Chan's pairwise update of two centred states (m, l, r, off, S) of the covariance product, rescaled to the
    larger max; the combined state keeps the reference of the heavier side."""
    m_a, l_a, r_a, off_a, S_a = a
    m_b, l_b, r_b, off_b, S_b = b
    m = torch.maximum(m_a, m_b)
    finite = torch.isfinite(m)
    safe = torch.where(finite, m, torch.zeros_like(m))
    la = torch.where(finite, l_a * torch.exp(m_a - safe), torch.zeros_like(m))  # exp(-inf) = 0: an empty side
    lb = torch.where(finite, l_b * torch.exp(m_b - safe), torch.zeros_like(m))
    l = la + lb
    pos = l > 0
    wa = torch.where(pos, la / torch.where(pos, l, torch.ones_like(l)), torch.zeros_like(l))[:, None]
    wb = torch.where(pos, lb / torch.where(pos, l, torch.ones_like(l)), torch.zeros_like(l))[:, None]
    delta = (r_b - r_a) + (off_b - off_a)  # μ_B − μ_A
    ra = torch.exp(torch.where(finite, m_a - safe, torch.zeros_like(m)))[:, None] * finite[:, None]
    rb = torch.exp(torch.where(finite, m_b - safe, torch.zeros_like(m)))[:, None] * finite[:, None]
    S = S_a * ra + S_b * rb + (la * wb[:, 0])[:, None] * delta * (delta * v).sum(1, keepdim=True)
    keep_a = (la >= lb)[:, None]
    r = torch.where(keep_a, r_a, r_b)
    off = torch.where(keep_a, off_a + wb * delta, off_b - wa * delta)
    return m, l, r, off, S


def centred_covariance_product(
    w: torch.Tensor, rows: torch.Tensor, v: torch.Tensor, coef: torch.Tensor
) -> torch.Tensor:
    """Cov_w[y]·v · 2·coef for normalised weights w (B, K) over rows (B, K, D), centred on each row's heaviest
    candidate: Σ w (y − r)((y − r)·v) − d (d·v), d = Σ w (y − r) (no cancellation where the posterior collapsed)."""
    r = torch.gather(rows, 1, w.argmax(1)[:, None, None].expand(-1, 1, rows.shape[2]))
    dy = rows - r
    d = torch.einsum("bk,bkd->bd", w, dy)
    S = torch.einsum("bk,bkd->bd", w * torch.einsum("bkd,bd->bk", dy, v), dy) - d * (d * v).sum(1, keepdim=True)
    return S * (2.0 * coef)[:, None]
