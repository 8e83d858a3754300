"""The reference backend: chunked over candidates, exact online softmax, memory bounded, any device and dtype.

Distances use the expanded form ‖q‖² − 2⟨q, y⟩ + ‖y‖² as a GEMM per chunk, after subtracting the candidate
mean from queries and keys: the distance is translation invariant, and centring removes the catastrophic
cancellation that data far from the origin (every pixel near +1) causes in the expanded form. In float64 this
is the oracle every other backend is tested against.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .keys import KeyBank
from .partial import PartialState


def chunk_rows(keys: KeyBank, batch: int, dtype: torch.dtype, memory_budget: int) -> int:
    """Candidate rows per chunk so that the chunk's temporaries fit in ``memory_budget`` bytes."""
    item = torch.empty((), dtype=dtype).element_size()
    per_row = item * (2 * keys.dim + 4 * batch)  # centred rows (+ a conversion copy) and B×n logit temporaries
    return max(1, min(keys.n, memory_budget // max(1, per_row)))


def _chunk_distances(q: torch.Tensor, q2: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared distances (B, n) between centred queries and centred rows."""
    y2 = (y * y).sum(1)
    d = torch.addmm(y2[None, :], q, y.t(), beta=1.0, alpha=-2.0)
    d += q2[:, None]
    return d.clamp_min_(0.0)


def _label_mask(keys: KeyBank, start: int, stop: int, query_labels: Optional[torch.Tensor]):
    if query_labels is None:
        return None
    return keys.labels[start:stop].to(query_labels.device)[None, :] != query_labels[:, None]


def softmax_partial(q: torch.Tensor, keys: KeyBank, coef: torch.Tensor, *, query_labels=None,
                    dtype: torch.dtype, memory_budget: int, start: int = 0, stop: Optional[int] = None
                    ) -> PartialState:
    """Partial state of logits −coef_b·‖q_b − y_j‖² over candidate rows start:stop."""
    stop = keys.n if stop is None else stop
    dev = q.device
    c = keys.get_center(dtype).to(dev)
    qc = q.to(dtype) - c
    q2 = (qc * qc).sum(1)
    coef = coef.to(device=dev, dtype=dtype)
    state = PartialState.empty(q.shape[0], keys.dim, dtype=dtype, device=dev)
    step = chunk_rows(keys, q.shape[0], dtype, memory_budget)
    for s in range(start, stop, step):
        e = min(s + step, stop)
        y = keys.rows(s, e, dtype, dev) - c
        logits = _chunk_distances(qc, q2, y).mul_(-coef[:, None])
        mask = _label_mask(keys, s, e, query_labels)
        if mask is not None:
            logits.masked_fill_(mask, float("-inf"))
        m_chunk = logits.max(1).values
        finite = torch.isfinite(m_chunk)
        safe = torch.where(finite, m_chunk, torch.zeros_like(m_chunk))
        p = torch.exp(logits - safe[:, None])  # masked entries -> exp(-inf) = 0
        psum = p.sum(1)
        o = p @ y + psum[:, None] * c[None, :]
        chunk_state = PartialState(m=m_chunk, l=psum, l2=(p * p).sum(1), o=o)
        state = state.combine(chunk_state)
    return state


def knn(q: torch.Tensor, keys: KeyBank, k: int, *, query_labels=None, dtype: torch.dtype,
        memory_budget: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """k nearest rows by exact distance: (dist2 (B, k), index (B, k)), ascending, ties by index.

    Candidates are screened with expanded-form distances chunk by chunk, then the survivors are rescored with
    the direct form Σ (q − y)², which has no cancellation.
    """
    dev = q.device
    B = q.shape[0]
    k_screen = min(keys.n, k + 8)  # a small margin so that rescoring can reorder near-ties at the boundary
    c = keys.get_center(dtype).to(dev)
    qc = q.to(dtype) - c
    q2 = (qc * qc).sum(1)
    best_d = torch.empty(B, 0, dtype=dtype, device=dev)
    best_i = torch.empty(B, 0, dtype=torch.long, device=dev)
    step = chunk_rows(keys, B, dtype, memory_budget)
    for s in range(0, keys.n, step):
        e = min(s + step, keys.n)
        d = _chunk_distances(qc, q2, keys.rows(s, e, dtype, dev) - c)
        mask = _label_mask(keys, s, e, query_labels)
        if mask is not None:
            d.masked_fill_(mask, float("inf"))
        idx = torch.arange(s, e, device=dev).expand(B, -1)
        cd = torch.cat([best_d, d], 1)
        ci = torch.cat([best_i, idx], 1)
        kk = min(k_screen, cd.shape[1])
        top = torch.topk(cd, kk, dim=1, largest=False)
        best_d, best_i = top.values, torch.gather(ci, 1, top.indices)
    # Exact rescoring of the survivors, in row blocks to bound memory.
    exact = torch.empty_like(best_d)
    rows_per = max(1, memory_budget // max(1, best_d.shape[1] * keys.dim * best_d.element_size() * 2))
    for b in range(0, B, rows_per):
        y = keys.gather(best_i[b:b + rows_per], dtype).to(dev)
        exact[b:b + rows_per] = ((q[b:b + rows_per, None, :].to(dtype) - y) ** 2).sum(-1)
    exact = torch.where(torch.isinf(best_d), best_d, exact)
    # Sort by (distance, index) for deterministic tie-breaking.
    order = torch.argsort(best_i, dim=1, stable=True)
    exact, best_i = torch.gather(exact, 1, order), torch.gather(best_i, 1, order)
    order = torch.argsort(exact, dim=1, stable=True)[:, :k]
    return torch.gather(exact, 1, order), torch.gather(best_i, 1, order)
