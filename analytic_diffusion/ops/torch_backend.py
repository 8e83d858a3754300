"""The reference backend: chunked over candidates, exact online softmax, memory bounded, any device and dtype.

Distances use the expanded form ‖q‖² − 2⟨q, y⟩ + ‖y‖² as a GEMM per chunk, after subtracting the candidate
mean from queries and keys: the distance is translation invariant, and centring removes the catastrophic
cancellation that data far from the origin (every pixel near +1) causes in the expanded form. What cancellation is
left grows like coef·(‖q − c‖² + ‖y − c‖²), i.e. like 1/σ² near the data; on the rows where that bound exceeds what
the direct form's own rounding allows (:func:`analytic_diffusion.ops.rounding.needs_direct`), the candidates that
carry weight are rescored in the direct form Σ (q − y)², as the fused kernels compute it (docs/design.md §13). In float64 this is the oracle every other backend is tested against.
"""

from __future__ import annotations

from typing import cast

import torch

from . import counter_rng, rounding
from .keys import KeyBank
from .partial import PartialState


def chunk_size(n: int, dim: int, batch: int, dtype: torch.dtype, memory_budget: int) -> int:
    """Candidate rows per chunk of ``n`` rows of ``dim`` features so that the temporaries fit ``memory_budget``."""
    item = torch.empty((), dtype=dtype).element_size()
    per_row = item * (2 * dim + 4 * batch)  # centred rows (+ a conversion copy) and B×n logit temporaries
    return max(1, min(n, memory_budget // max(1, per_row)))


def chunk_rows(keys: KeyBank, batch: int, dtype: torch.dtype, memory_budget: int) -> int:
    """Candidate rows per chunk so that the chunk's temporaries fit in ``memory_budget`` bytes."""
    return chunk_size(keys.n, keys.dim, batch, dtype, memory_budget)


def accumulation_chain(n: int, batch: int, dim: int, dtype: torch.dtype, memory_budget: int) -> int:
    """Roundings a weight can go through in l and o (and rescaling factors it can meet) in :func:`softmax_partial`
    over ``n`` candidates for ``batch`` rows (docs/design.md §13.1): a chunk's GEMM over its rows (any order: as
    many roundings as rows), the centre added back, one combine per chunk (two products and a sum); rescored rows
    take the same chunks, or one sum over at most WINDOW_CANDIDATES listed candidates."""
    n = max(1, int(n))
    step = chunk_size(n, dim, batch, dtype, memory_budget)
    return max(step + 3 * -(-n // step), min(n, WINDOW_CANDIDATES)) + 10


def _chunk_distances(
    q: torch.Tensor, q2: torch.Tensor, y: torch.Tensor, y2: torch.Tensor | None = None
) -> torch.Tensor:
    """Squared distances (B, n) between centred queries and centred rows."""
    if y2 is None:
        y2 = (y * y).sum(1)
    d = torch.addmm(y2[None, :], q, y.t(), beta=1.0, alpha=-2.0)
    d += q2[:, None]
    return d.clamp_min_(0.0)


def _label_mask(keys: KeyBank, start: int, stop: int, query_labels: torch.Tensor | None) -> torch.Tensor | None:
    if query_labels is None:
        return None
    return cast(torch.Tensor, keys.labels)[start:stop].to(query_labels.device)[None, :] != query_labels[:, None]


# Weights at least this large (relative to the chunk's max, 1) enter the second moment as direct differences
# (y_j − y_r)², which are exactly 0 where two images agree; the lighter ones, expanded around y_r, leave at most
# n·u·HEAVY·4 per coordinate there: √ of it (optimal-draw's noise mode) stays below float32 / float64 resolution.
HEAVY = {torch.float32: 2.0**-40, torch.float64: 2.0**-80}


def _centred_second_moment(p: torch.Tensor, psum: torch.Tensor, y: torch.Tensor, max_pairs: int) -> torch.Tensor:
    """Σ_j p_j (y_j − μ)² (B, D), μ = Σ p y / Σ p, for one chunk's weights p (B, n) and rows y (n, D).

    Centred on each row's own reference r = its heaviest candidate (weight exactly 1): Σ p (y − μ)² =
    Σ_{j≠r} p_j (y_j − y_r)² − (Σ_{j≠r} p_j (y_j − y_r))² / Σ p. The reference's own term is exactly 0. The other
    heavy candidates (p ≥ HEAVY) enter as direct differences when there are at most ``max_pairs`` of them in the
    chunk (a narrow posterior: σ → 0, a gap of tens of nats to the second candidate); the rest, and all of them in
    a broad posterior, are expanded around y_r, each with an error of a few u·p_j·(|y_j| + |y_r|)², relative to its
    own weight. Centring on the dataset mean instead left u·‖y − c‖² per coordinate: all of a narrow variance.
    """
    B = p.shape[0]
    rows = torch.arange(B, device=p.device)
    ref = p.argmax(1)
    r = y[ref]
    heavy = p >= HEAVY.get(p.dtype, 0.0)
    heavy[rows, ref] = False
    pairs = torch.nonzero(heavy)
    direct = pairs.shape[0] <= max_pairs
    pr = p.masked_fill(heavy, 0.0) if direct else p.clone()
    pr[rows, ref] = 0.0
    s0 = pr.sum(1)[:, None]
    t1 = pr @ y
    s1 = t1 - s0 * r
    s2 = (pr @ (y * y)).sub_(2.0 * r * t1).add_(r * r * s0)
    if direct and pairs.shape[0]:
        b, j = pairs[:, 0], pairs[:, 1]
        dy = y[j] - r[b]
        w = p[b, j][:, None]
        s1 = s1.index_add(0, b, w * dy)
        s2 = s2.index_add(0, b, w * dy * dy)
    denom = torch.where(psum > 0, psum, torch.ones_like(psum))[:, None]
    return s2.sub_(s1 * s1 / denom).clamp_min_(0.0)


def _pairs_cap(dim: int, dtype: torch.dtype, memory_budget: int) -> int:
    """Heavy (row, candidate) pairs one chunk's second moment may form as direct differences (three (P, D)
    temporaries within a quarter of the budget)."""
    return max(1, memory_budget // max(1, 12 * dim * torch.empty((), dtype=dtype).element_size()))


def _chunk_state(
    logits: torch.Tensor, y: torch.Tensor, c: torch.Tensor, second_moment: bool, max_pairs: int = 0
) -> PartialState:
    """The partial state of one chunk's logits (B, n) over its centred rows y (n, D); values y + c."""
    m_chunk = logits.max(1).values
    finite = torch.isfinite(m_chunk)
    safe = torch.where(finite, m_chunk, torch.zeros_like(m_chunk))
    p = torch.exp(logits - safe[:, None])  # masked entries -> exp(-inf) = 0
    psum = p.sum(1)
    oc = p @ y
    o = oc + psum[:, None] * c[None, :]
    o2 = _centred_second_moment(p, psum, y, max_pairs) if second_moment else None
    return PartialState(m=m_chunk, l=psum, l2=(p * p).sum(1), o=o, o2=o2)


# The mean's pass keeps each row's best few expanded-form logits: where a rescored row's window holds no more
# candidates than this (low σ: nearly always), the direct form needs no second pass over the data.
WINDOW_CANDIDATES = 64


def softmax_partial(
    q: torch.Tensor,
    keys: KeyBank,
    coef: torch.Tensor,
    *,
    query_labels: torch.Tensor | None = None,
    dtype: torch.dtype,
    memory_budget: int,
    start: int = 0,
    stop: int | None = None,
    second_moment: bool = False,
) -> PartialState:
    """Partial state of logits −coef_b·‖q_b − y_j‖² over candidate rows start:stop.

    The logits come from the centred expanded form; rows whose bound on its error exceeds the direct form's
    (:func:`analytic_diffusion.ops.rounding.needs_direct`: low σ, queries near the data) are computed again: every
    candidate whose expanded-form logit lies within ``kept_nats`` (``moment_nats`` with the second moment) + twice
    that bound + 1 of the row's max is rescored in the direct form Σ (q − y)². For the mean (and the float32
    second moment, whose window reaches float32's underflow) a row whose window holds at most WINDOW_CANDIDATES
    candidates (kept from the first pass) is the state of those alone (the others weigh under e^{−window} of the
    max and may be dropped); other rows take a second pass over the same chunks in which the candidates outside
    the window keep their expanded-form logits.

    ``second_moment`` also accumulates o2 (see :class:`PartialState`), centred within each chunk on each row's
    heaviest candidate (:func:`_centred_second_moment`; one more GEMM than the mean, and o is bit-identical to the
    default path). Chunks then combine through the centred (Chan) update, which has no cancellation.
    """
    stop = keys.n if stop is None else stop
    dev = q.device
    B = q.shape[0]
    c = keys.get_center(dtype).to(dev)
    qt = q.to(dtype)
    qc = qt - c
    q2 = (qc * qc).sum(1)
    coef_t = coef.to(device=dev, dtype=dtype)
    state = PartialState.empty(B, keys.dim, dtype=dtype, device=dev, second_moment=second_moment)
    step = chunk_rows(keys, B, dtype, memory_budget)
    pairs_cap = _pairs_cap(keys.dim, dtype, memory_budget)
    y2_max = torch.zeros((), dtype=dtype, device=dev)
    # each row's best expanded-form logits, for rows the direct form will rescore: the mean's candidates beyond
    # the window may be dropped, and so may the variance's in float32 (its window reaches float32's underflow)
    track = not second_moment or dtype == torch.float32
    best_v = torch.empty(B, 0, dtype=dtype, device=dev)
    best_i = torch.empty(B, 0, dtype=torch.long, device=dev)
    for s in range(start, stop, step):
        e = min(s + step, stop)
        y = keys.rows(s, e, dtype, dev) - c
        y2 = (y * y).sum(1)
        y2_max = torch.maximum(y2_max, y2.max())
        logits = _chunk_distances(qc, q2, y, y2).mul_(-coef_t[:, None])
        mask = _label_mask(keys, s, e, query_labels)
        if mask is not None:
            logits.masked_fill_(mask, float("-inf"))
        state = state.combine(_chunk_state(logits, y, c, second_moment, pairs_cap))
        if track:
            v, i = logits.topk(min(WINDOW_CANDIDATES, logits.shape[1]), dim=1)
            best_v, best_i = torch.cat([best_v, v], 1), torch.cat([best_i, i + s], 1)
            if best_v.shape[1] > WINDOW_CANDIDATES:
                v, i = best_v.topk(WINDOW_CANDIDATES, dim=1)
                best_v, best_i = v, torch.gather(best_i, 1, i)
    if stop <= start or B == 0:
        return state
    err = rounding.expanded_error(coef.to(dev), q2, float(y2_max), keys.dim, dtype)
    redo = torch.nonzero(rounding.needs_direct(state.m, err, keys.dim, dtype)).reshape(-1)
    if redo.numel() == 0:
        return state
    window = rounding.moment_nats(dtype) if second_moment else rounding.kept_nats(dtype)
    floor = (state.m.to(torch.float64) - window - 2.0 * err - 1.0).to(dtype)
    listed = torch.zeros(B, dtype=torch.bool, device=dev)
    if track:  # rows whose whole window is among the kept candidates
        listed[redo] = (best_v.shape[1] < WINDOW_CANDIDATES) | (best_v[redo, -1] < floor[redo])
    parts = []
    rows = redo[listed[redo]]
    item = torch.empty((), dtype=dtype).element_size()
    per = max(1, memory_budget // max(1, 4 * WINDOW_CANDIDATES * keys.dim * item))  # rows per (R, K, D) block
    for a in range(0, rows.numel(), per):
        r = rows[a : a + per]
        parts.append((r, _listed_state(qt[r], keys, coef_t[r], best_v[r], best_i[r], floor[r], second_moment)))
    rows = redo[~listed[redo]]
    if rows.numel():
        # a second pass over the same chunks (the certificate's count of roundings, ops.rounding.chain, assumes
        # this chunking)
        sub = _direct_window(
            qt[rows],
            qc[rows],
            q2[rows],
            keys,
            coef[rows],
            floor[rows],
            None if query_labels is None else query_labels[rows],
            dtype=dtype,
            centre=c,
            span=(start, stop, step),
            second_moment=second_moment,
            memory_budget=memory_budget,
        )
        parts.append((rows, sub))

    def put(full: torch.Tensor | None, name: str) -> torch.Tensor | None:
        if full is None:
            return None
        for rows, sub in parts:
            full = full.index_copy(0, rows, getattr(sub, name))
        return full

    m, l, l2, o = (cast(torch.Tensor, put(getattr(state, f), f)) for f in ("m", "l", "l2", "o"))
    return PartialState(m, l, l2, o, put(state.o2, "o2"))


def _listed_state(
    qt: torch.Tensor,
    keys: KeyBank,
    coef_t: torch.Tensor,
    best_v: torch.Tensor,
    best_i: torch.Tensor,
    floor: torch.Tensor,
    second_moment: bool,
) -> PartialState:
    """The state of rows ``qt`` over their listed candidates ``best_i`` whose expanded-form logit ``best_v`` is at
    least ``floor``, with direct-form logits; every other candidate dropped. The second moment is centred on each
    row's heaviest candidate, as :func:`_centred_second_moment` does for a chunk."""
    inside = best_v >= floor[:, None]
    y = keys.gather(best_i, qt.dtype)  # (R, K, D) raw values
    diff = qt[:, None, :] - y
    logits = torch.where(inside, -(coef_t[:, None] * (diff * diff).sum(-1)), float("-inf"))
    m = logits.max(1).values  # the row's own max is inside (finite)
    p = torch.exp(logits - m[:, None])
    l = p.sum(1)
    o2 = None
    if second_moment:
        dy = y - torch.gather(y, 1, p.argmax(1)[:, None, None].expand(-1, 1, y.shape[2]))
        s1 = torch.einsum("rk,rkd->rd", p, dy)
        o2 = (torch.einsum("rk,rkd->rd", p, dy * dy) - s1 * s1 / l[:, None]).clamp_min_(0.0)
    return PartialState(m, l, (p * p).sum(1), torch.einsum("rk,rkd->rd", p, y), o2)


def _direct_window(
    qt: torch.Tensor,
    qc: torch.Tensor,
    q2: torch.Tensor,
    keys: KeyBank,
    coef: torch.Tensor,
    floor: torch.Tensor,
    query_labels: torch.Tensor | None,
    *,
    dtype: torch.dtype,
    centre: torch.Tensor,
    span: tuple[int, int, int],
    second_moment: bool,
    memory_budget: int,
) -> PartialState:
    """The state of rows ``qt`` whose logits are the direct form's on every candidate whose expanded-form logit is
    at least ``floor`` (the expanded-form max − window − 2·err − 1 nat), the expanded form's elsewhere. A
    candidate whose exact logit is within the window of the exact max is inside: its expanded-form logit is within
    err of it, and the exact max at least the expanded-form max − err."""
    dev = qt.device
    R, D = qt.shape
    coef_t = coef.to(device=dev, dtype=dtype)
    per = max(1, memory_budget // max(1, 2 * D * torch.empty((), dtype=dtype).element_size()))  # pairs per block
    pairs_cap = _pairs_cap(D, dtype, memory_budget)
    state = PartialState.empty(R, D, dtype=dtype, device=dev, second_moment=second_moment)
    start, stop, step = span
    for s in range(start, stop, step):
        e = min(s + step, stop)
        raw = keys.rows(s, e, dtype, dev)
        y = raw - centre
        logits = _chunk_distances(qc, q2, y).mul_(-coef_t[:, None])
        mask = _label_mask(keys, s, e, query_labels)
        if mask is not None:
            logits.masked_fill_(mask, float("-inf"))
        pairs = torch.nonzero(logits >= floor[:, None])
        direct = logits.clone()
        for a in range(0, pairs.shape[0], per):
            b, j = pairs[a : a + per, 0], pairs[a : a + per, 1]
            diff = qt[b] - raw[j]
            direct[b, j] = -(coef_t[b] * (diff * diff).sum(1))
        state = state.combine(_chunk_state(direct, y, centre, second_moment, pairs_cap))
    return state


def gumbel_argmax(
    q: torch.Tensor,
    keys: KeyBank,
    coef: torch.Tensor,
    generator: torch.Generator | None,
    *,
    query_labels: torch.Tensor | None = None,
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
    q: torch.Tensor,
    keys: KeyBank,
    k: int,
    *,
    query_labels: torch.Tensor | None = None,
    dtype: torch.dtype,
    memory_budget: int,
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


def _knn_screen(
    q: torch.Tensor,
    keys: KeyBank,
    width: int,
    query_labels: torch.Tensor | None,
    dtype: torch.dtype,
    memory_budget: int,
) -> tuple[torch.Tensor, torch.Tensor, float]:
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


def _screen_complete(
    d: torch.Tensor, k: int, width: int, q2: torch.Tensor, y2max: float, dim: int, dtype: torch.dtype
) -> torch.Tensor:
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
