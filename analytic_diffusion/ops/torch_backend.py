"""The reference backend: chunked over candidates, exact online softmax, memory bounded, any device and dtype.

Distances use the expanded form ‖q‖² − 2⟨q, y⟩ + ‖y‖² as a GEMM per chunk, after subtracting the candidate
mean from queries and keys: the distance is translation invariant, and centring removes the catastrophic
cancellation that data far from the origin (every pixel near +1) causes in the expanded form. In float64 this
is the oracle every other backend is tested against.
"""

from __future__ import annotations

import torch

from . import counter_rng
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


def _label_mask(keys: KeyBank, start: int, stop: int, query_labels: torch.Tensor | None):
    if query_labels is None:
        return None
    return keys.labels[start:stop].to(query_labels.device)[None, :] != query_labels[:, None]


def softmax_partial(
    q: torch.Tensor,
    keys: KeyBank,
    coef: torch.Tensor,
    *,
    query_labels=None,
    dtype: torch.dtype,
    memory_budget: int,
    start: int = 0,
    stop: int | None = None,
    second_moment: bool = False,
) -> PartialState:
    """Partial state of logits −coef_b·‖q_b − y_j‖² over candidate rows start:stop.

    ``second_moment`` also accumulates o2 (see :class:`PartialState`). Per chunk it is formed around the dataset
    centre c, where the values are already centred: M2 = Σ p (y−c)² − (Σ p (y−c))² / Σ p, one extra GEMM on
    the squared centred rows (a temporary of the size the budget already allows for the conversion copy, so
    the chunking, and hence o, are bit-identical to the default path). Rounding can leave M2 a few ulps of
    Σ p (y−c)² below 0 where the true value is ~0; those are clamped to 0. Chunks then combine through the
    centred (Chan) update, which has no cancellation.
    """
    stop = keys.n if stop is None else stop
    dev = q.device
    c = keys.get_center(dtype).to(dev)
    qc = q.to(dtype) - c
    q2 = (qc * qc).sum(1)
    coef = coef.to(device=dev, dtype=dtype)
    state = PartialState.empty(q.shape[0], keys.dim, dtype=dtype, device=dev, second_moment=second_moment)
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
        oc = p @ y
        o = oc + psum[:, None] * c[None, :]
        o2 = None
        if second_moment:
            mu = oc / torch.where(psum > 0, psum, torch.ones_like(psum))[:, None]
            o2 = (p @ (y * y)).sub_(oc * mu).clamp_min_(0.0)
        chunk_state = PartialState(m=m_chunk, l=psum, l2=(p * p).sum(1), o=o, o2=o2)
        state = state.combine(chunk_state)
    return state


def gumbel_argmax(
    q: torch.Tensor,
    keys: KeyBank,
    coef: torch.Tensor,
    generator: torch.Generator | None,
    *,
    query_labels=None,
    dtype: torch.dtype,
    memory_budget: int,
    row_seeds: torch.Tensor | None = None,
    index_offset: int = 0,
    skip_before: int = 0,
    skip_after: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One exact draw j ~ softmax_j(−coef_b·‖q_b − y_j‖²) per query row, by the Gumbel-max trick.

    argmax_j (logit_j + G_j) with G_j i.i.d. standard Gumbel is distributed as softmax(logit); the argmax runs
    over chunks, so the whole draw is one streaming scan with O(B) state. Returns (score (B,), index (B,)),
    score = the winning logit + its Gumbel (float64; −inf where no candidate is allowed), so that draws over
    disjoint candidate sets (shards, mirrored copies) combine by taking the larger score.

    The noise is float64, drawn from ``generator`` (on its own device) candidate-major, chunk after chunk: one
    (N, B) stream whatever the chunk size or the working dtype, so the draw is a deterministic function of the
    generator's state. With ``row_seeds`` (B,) int64 instead, the uniform of candidate j for row b is the
    counter-based :func:`counter_rng.uniform` (row_seeds[b], j + index_offset): each row's draw is then a pure
    function of its own seed, whatever the batch it shares. Ties (probability 0) go to the lower index.

    ``skip_before`` / ``skip_after`` (generator streams only): rows of that stream to draw and discard before and
    after these keys (the other shards' rows, so that a shard's draw is its part of the whole set's stream). With
    ``row_seeds`` a shard passes its global offset as ``index_offset`` instead: nothing needs skipping.
    """
    dev = q.device
    B = q.shape[0]
    c = keys.get_center(dtype).to(dev)
    qc = q.to(dtype) - c
    q2 = (qc * qc).sum(1)
    coef = coef.to(device=dev, dtype=dtype)
    best_s = torch.full((B,), float("-inf"), dtype=torch.float64, device=dev)
    best_i = torch.zeros(B, dtype=torch.long, device=dev)
    gdev = None if generator is None else generator.device
    tiny = torch.finfo(torch.float64).tiny
    step = chunk_rows(keys, B, dtype, memory_budget // 2)  # + the float64 noise and scores per chunk

    def skip(rows: int) -> None:
        if row_seeds is not None:  # counter-based: candidate j's noise depends on j alone
            return
        for s in range(0, rows, step):
            torch.rand((min(step, rows - s), B), generator=generator, dtype=torch.float64, device=gdev)

    skip(skip_before)
    for s in range(0, keys.n, step):
        e = min(s + step, keys.n)
        logits = _chunk_distances(qc, q2, keys.rows(s, e, dtype, dev) - c).mul_(-coef[:, None])
        mask = _label_mask(keys, s, e, query_labels)
        if mask is not None:
            logits.masked_fill_(mask, float("-inf"))
        if row_seeds is not None:
            u = counter_rng.uniform(row_seeds, torch.arange(s, e) + index_offset).to(dev)
        else:
            u = torch.rand((e - s, B), generator=generator, dtype=torch.float64, device=gdev).to(dev)
        g = u.clamp_min_(tiny).log_().neg_().log_().neg_()  # −log(−log u), u ∈ (0, 1)
        score = logits.to(torch.float64) + g.t()
        cs, ci = score.max(1)
        better = cs > best_s  # strict: an earlier chunk keeps ties
        best_s = torch.where(better, cs, best_s)
        best_i = torch.where(better, ci + s, best_i)
    skip(skip_after)
    return best_s, best_i


def knn(
    q: torch.Tensor, keys: KeyBank, k: int, *, query_labels=None, dtype: torch.dtype, memory_budget: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """k nearest rows by exact distance: (dist2 (B, k), index (B, k)), ascending, ties by index.

    Candidates are screened with expanded-form distances chunk by chunk, then the survivors are rescored with
    the direct form Σ (q − y)², which has no cancellation. The screen keeps k + 8 survivors to begin with and is
    widened, for the rows that need it, until the expanded form's error bound proves it holds the k nearest
    (:func:`_screen_complete`); a count alone is no proof when many candidates tie within rounding.
    """
    B = q.shape[0]
    width = min(keys.n, k + 8)
    best_d, best_i, y2max = _knn_screen(q, keys, width, query_labels, dtype, memory_budget)
    rows = torch.arange(B, device=q.device)
    while width < keys.n:
        c = keys.get_center(dtype).to(q.device)
        q2 = ((q[rows].to(torch.float64) - c.double()) ** 2).sum(1)
        rows = rows[~_screen_complete(best_d[rows], k, width, q2, y2max, keys.dim, dtype)]
        if rows.numel() == 0:
            break
        width = min(keys.n, 2 * width)
        labels = None if query_labels is None else query_labels[rows]
        more_d, more_i, _ = _knn_screen(q[rows], keys, width, labels, dtype, memory_budget)
        pad = width - best_d.shape[1]
        best_d = torch.cat([best_d, best_d.new_full((B, pad), float("inf"))], 1)
        best_i = torch.cat([best_i, best_i.new_full((B, pad), 0)], 1)
        best_d[rows], best_i[rows] = more_d, more_i
    # Exact rescoring of the survivors, in row blocks to bound memory.
    exact = torch.empty_like(best_d)
    rows_per = max(1, memory_budget // max(1, best_d.shape[1] * keys.dim * best_d.element_size() * 2))
    for b in range(0, B, rows_per):
        y = keys.gather(best_i[b : b + rows_per], dtype).to(q.device)
        exact[b : b + rows_per] = ((q[b : b + rows_per, None, :].to(dtype) - y) ** 2).sum(-1)
    exact = torch.where(torch.isinf(best_d), best_d, exact)
    # Sort by (distance, index) for deterministic tie-breaking.
    order = torch.argsort(best_i, dim=1, stable=True)
    exact, best_i = torch.gather(exact, 1, order), torch.gather(best_i, 1, order)
    order = torch.argsort(exact, dim=1, stable=True)[:, :k]
    return torch.gather(exact, 1, order), torch.gather(best_i, 1, order)


def _knn_screen(q, keys: KeyBank, width: int, query_labels, dtype, memory_budget: int):
    """(expanded-form distances (B, width), indices, max ‖y − c‖² over the rows) of each row's ``width`` nearest
    by the expanded form, ascending; (inf, ·) where fewer candidates are allowed."""
    dev = q.device
    B = q.shape[0]
    c = keys.get_center(dtype).to(dev)
    qc = q.to(dtype) - c
    q2 = (qc * qc).sum(1)
    best_d = torch.empty(B, 0, dtype=dtype, device=dev)
    best_i = torch.empty(B, 0, dtype=torch.long, device=dev)
    y2max = 0.0
    step = chunk_rows(keys, B, dtype, memory_budget)
    for s in range(0, keys.n, step):
        e = min(s + step, keys.n)
        yc = keys.rows(s, e, dtype, dev) - c
        y2max = max(y2max, float((yc.double() ** 2).sum(1).max()))
        d = _chunk_distances(qc, q2, yc)
        mask = _label_mask(keys, s, e, query_labels)
        if mask is not None:
            d.masked_fill_(mask, float("inf"))
        idx = torch.arange(s, e, device=dev).expand(B, -1)
        cd = torch.cat([best_d, d], 1)
        ci = torch.cat([best_i, idx], 1)
        kk = min(width, cd.shape[1])
        top = torch.topk(cd, kk, dim=1, largest=False)
        best_d, best_i = top.values, torch.gather(ci, 1, top.indices)
    return best_d, best_i, y2max


def _screen_complete(d: torch.Tensor, k: int, width: int, q2, y2max: float, dim: int, dtype) -> torch.Tensor:
    """(B,) bool: the expanded-form screen of ``width`` candidates provably holds each row's k nearest.

    The expanded form d̃ = ‖q − c‖² + ‖y − c‖² − 2⟨q − c, y − c⟩, summed over D terms in ``dtype`` (unit roundoff
    u), is within E = 2γ(‖q − c‖² + max‖y − c‖²) of the exact value, γ = (D + 2)u / (1 − (D + 2)u), with 4u more
    for the rounding of the centred operands. Every unscreened candidate has d̃ ≥ d̃_(width), so an exact distance
    ≥ d̃_(width) − E, and k screened ones are within d̃_(k) + E: the screen is complete when the first exceeds the
    second, or when fewer than ``width`` candidates are allowed (all of them are screened)."""
    u = torch.finfo(dtype).eps / 2
    gamma = (dim + 2) * u / (1 - (dim + 2) * u)
    err = (2 * gamma + 4 * u) * (q2 + y2max)
    d = d.double()
    exhausted = ~torch.isfinite(d[:, width - 1])
    return exhausted | (d[:, width - 1] - err > d[:, k - 1] + err)
