"""Certified pruning of the global softmax retrieval: skip training images whose weight is provably tiny.

With logits ℓ_j = −‖x − y_j‖² / (2σ²T), a scored set S and a skipped set K with upper bounds u_j ≥ ℓ_j, write
Z_S = Σ_S e^{ℓ_j}, Z_K = Σ_K e^{ℓ_j} ≤ U_K = Σ_K e^{u_j}. The skipped posterior weight is

    w_K = Z_K / (Z_S + Z_K) ≤ U_K / (Z_S + U_K) =: ε          (increasing in Z_K; needs only Z_S ≥ z_S > 0)

and the exact mean m = (1 − w_K)·m_S + w_K·m_K, m_S and m_K being the means over S and K. So
m − m_S = w_K (m_K − m_S), and m_K is a convex combination of points y_j, j ∈ K, so by convexity of the norm
‖m_K − m_S‖ ≤ max_{j∈K} ‖y_j − m_S‖ ≤ R + ‖m_S − c‖ for any ball B(c, R) holding every candidate:

    ‖m − m_S‖₂ ≤ ε · (R + ‖m_S − c‖₂)   ≤ 2εR.

Upper bounds on the logits come from lower bounds on the distances. With an orthonormal basis V (the leading
principal directions of the data, from a subsample: any orthonormal basis is valid, a good one is tight), split
v = x − y into its coordinates on V[:, :k] and the bands of the remaining orthogonal complement (later basis
vectors in bands, then the residual beyond them); band by band the reverse triangle inequality gives

    ‖x − y‖² = ‖P_k v‖² + Σ_bands ‖B_i v‖² ≥ ‖P_k x − P_k y‖² + Σ_bands (‖B_i x‖ − ‖B_i y‖)².

The first term is a GEMM of the (B, k) query projections against the stored (N, k) key projections (the
prefilter); the band norms are one number per image and band. Stage 1 uses k = 32 over all N candidates,
stage 2 refines each query's stage-1 survivors with k = 128; the survivors are then scored exactly by the
fused kernels of :func:`analytic_diffusion.ops.softmax_retrieval` on the survivor subset. The skip set is
chosen per query so that U_K ≤ tolerance·z_S, hence ε ≤ tolerance.

z_S starts as the exact float64 weight of a few seed candidates (those with the smallest lower bounds, always
scored); after scoring it is also bounded from the kernel's own normaliser. U_K is bounded by bucketing the
gaps g_j = u_ref − u_j in steps of Δ nats and charging each bucket e^{−(bucket floor)} per image (integer
counts: exact and deterministic).

Rounding (the guarantee holds in float32). Every bound is made conservative for the arithmetic that computes
it: the float32 prefilter GEMM ⟨P x, P y⟩ over k terms is off by at most (k + 2)·u·‖Px‖‖Py‖ (plus the float32
storage of both operands), so (k + 12)·u·(‖Px‖² + ‖Py‖²) is subtracted; each band term loses 3u·(a_x + a_y)
and the float64 error of the residual norm √(‖v‖² − ‖P v‖²); the sum is scaled by (1 − 2⁻²⁰). The kernel's
float32 logits (direct distances, D terms) are off by at most coef·(D + 3)·u·d ≤ δ, d ≤ (‖x − c‖ + R)², so
z_S ≥ l̃·e^{−δ}/(1 + (n + 8)u). ``error_bound`` adds the rounding slack of the scored mean itself,
ROUNDING_SLACK[dtype]·(R + ‖m_S − c‖): a documented model of the working precision's own error (the exact
float32 scan measured against float64 on MNIST and random data), not a worst case — the exact scan (tolerance
0) carries the same slack.

Shards, flips and class labels: a :class:`CertifiedState` is a :class:`PartialState` of the scored
candidates plus ``skipped`` (≥ U_K) and ``z_scored`` (≤ Z_S), both relative to e^{m}, plus the bounding
ball. Two states combine like partial states (rescale to the larger max, add), so certificates add across
shards, across the mirrored candidate half, and the ball grows to hold both. A class filter simply removes the
other classes from both S and K.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .keys import KeyBank
from .partial import PartialState

STAGE_DIMS = (32, 128)  # basis vectors used by the prefilter stages (capped at D)
BAND_EDGES = (32, 64, 128)  # residual bands between basis vectors; the last band is everything beyond 128
SEEDS = 16  # candidates with the smallest lower bounds, scored in float64 to bound Z_S from below
BUCKET = 0.25  # nats per gap bucket
NUM_BUCKETS = 512
QUERY_BLOCK = 8  # stage-1 GEMMs run on fixed blocks of queries, so a row's bounds do not depend on the batch
EXACT_FRACTION = 0.5  # a row whose survivors exceed this share of its candidates is scored by the full scan
PCA_SAMPLE = 4096  # rows used to find the basis
U32 = 2.0 ** -24
ROUNDING_SLACK = {torch.float32: 2.0 ** -17, torch.float64: 2.0 ** -40}


def check_tolerance(tolerance) -> float:
    """``tolerance`` as a float in [0, 1]; a clear ValueError otherwise (NaN, negative, > 1, not a number)."""
    if isinstance(tolerance, bool):
        raise ValueError(f"tolerance: expected a number in [0, 1], got {tolerance!r}")
    try:
        t = float(tolerance)
    except (TypeError, ValueError):
        raise ValueError(f"tolerance: expected a number in [0, 1], got {tolerance!r}") from None
    if not (0.0 <= t <= 1.0):  # also rejects NaN
        raise ValueError(f"tolerance: expected a skipped-weight bound in [0, 1], got {tolerance!r}")
    return t


@dataclass
class PruningIndex:
    """Per-dataset constants of the prefilter (built once per KeyBank, see :func:`pruning_index`)."""
    center: torch.Tensor  # (D,) float64, mirror-symmetric when the image shape is known
    basis: torch.Tensor  # (D, k_max) float64, orthonormal columns
    proj: torch.Tensor  # (N, k_max) float32 key coordinates on the basis
    prefix2: torch.Tensor  # (N, stages) float64 ‖P_k (y − c)‖² per stage dimension k
    bands: torch.Tensor  # (N, bands) float64 band norms ‖B_i (y − c)‖
    band_slack: torch.Tensor  # (N, bands) float64 deflation of each band norm (rounding, see module doc)
    stages: tuple
    band_edges: tuple  # (k_0, …, k_max); band i spans basis vectors k_i:k_{i+1}, the last one the residual
    radius: float  # every candidate (and its mirror image) lies in the ball B(center, radius)


def _coords(v64: torch.Tensor, index: PruningIndex):
    """(projections (B, k_max) float64, prefix² (B, stages), band norms (B, bands), band slack) of centred rows."""
    p = v64 @ index.basis
    total2 = (v64 * v64).sum(1)
    return (p,) + _norm_parts(p, total2, index.stages, index.band_edges[:-1], v64.shape[1])


def _norm_parts(p, total2, stages, edges, dim):
    prefix2 = torch.stack([(p[:, :k] * p[:, :k]).sum(1) for k in stages], 1)
    bands = [(p[:, a:b] * p[:, a:b]).sum(1).sqrt() for a, b in zip(edges[:-1], edges[1:])]
    resid2 = total2 - (p * p).sum(1)
    # float64 error of ‖v‖² − ‖P v‖² is below 4·D·2⁻⁵³·‖v‖², hence of its square root below the root of that.
    eta = (4.0 * dim * 2.0 ** -53 * total2).sqrt()
    bands.append(resid2.clamp_min(0.0).sqrt())
    bands = torch.stack(bands, 1)
    slack = 3.0 * U32 * bands
    slack[:, -1] += eta
    return prefix2, bands, slack


def pruning_index(keys: KeyBank) -> PruningIndex:
    """The prefilter constants of ``keys``, computed once (float64, chunked) and cached with the dataset."""
    return keys.cached("pruning_index", lambda: _build_index(keys))


def _build_index(keys: KeyBank) -> PruningIndex:
    n, dim = keys.n, keys.dim
    center = keys.get_center(torch.float64).clone()
    if keys.image_shape is not None:  # the mirrored candidates then lie in the same ball
        c, h, w = keys.image_shape
        center = 0.5 * (center + center.reshape(c, h, w).flip(-1).reshape(-1))
    k_max = min(STAGE_DIMS[-1], dim)
    stages = tuple(sorted({min(k, dim) for k in STAGE_DIMS}))
    edges = tuple(sorted({min(e, dim) for e in BAND_EDGES} | {stages[0], k_max}))
    edges = tuple(e for e in edges if e >= stages[0])
    sample = torch.linspace(0, n - 1, min(n, PCA_SAMPLE)).round().long()
    ys = keys.gather(sample.to(keys.device), torch.float64).cpu() - center
    _, _, vh = torch.linalg.svd(ys, full_matrices=False)
    basis = vh[:k_max].t().contiguous()
    if basis.shape[1] < k_max:  # fewer sample rows than basis vectors: complete with a QR of random directions
        extra = torch.randn(dim, k_max - basis.shape[1], generator=torch.Generator().manual_seed(0),
                            dtype=torch.float64)
        basis = torch.cat([basis, extra], 1)
    basis, _ = torch.linalg.qr(basis)  # orthonormal to float64 rounding
    proj = torch.empty(n, k_max, dtype=torch.float32)
    prefix2 = torch.empty(n, len(stages), dtype=torch.float64)
    bands = torch.empty(n, len(edges), dtype=torch.float64)
    slack = torch.empty_like(bands)
    radius2 = 0.0
    step = max(1, (1 << 22) // dim)
    for s in range(0, n, step):
        e = min(n, s + step)
        v = keys.rows(s, e, torch.float64).cpu() - center
        p = v @ basis
        total2 = (v * v).sum(1)
        proj[s:e] = p.to(torch.float32)
        prefix2[s:e], bands[s:e], slack[s:e] = _norm_parts(p, total2, stages, edges, dim)
        radius2 = max(radius2, float(total2.max()))
    radius = math.sqrt(radius2) * (1.0 + 1e-9) + 1e-12
    return PruningIndex(center, basis, proj, prefix2, bands, slack, stages, edges + (dim,), radius)


@dataclass
class CertifiedState:
    """A partial state of the scored candidates with its pruning certificate (module docstring).

    ``skipped`` ≥ Σ_K e^{ℓ_j − m} and ``z_scored`` ≤ Σ_S e^{ℓ_j − m} (float64, m = state.m); ``scored`` and
    ``candidates`` count scored and allowed candidates per row; every candidate lies in B(center, radius).
    """
    state: PartialState
    skipped: torch.Tensor
    z_scored: torch.Tensor
    scored: torch.Tensor
    candidates: torch.Tensor
    center: torch.Tensor
    radius: float

    def combine(self, other: "CertifiedState") -> "CertifiedState":
        state = self.state.combine(other.state)
        m = state.m.to(torch.float64)

        def rescale(own_m, value):
            own_m = own_m.to(torch.float64)
            ok = torch.isfinite(own_m) & torch.isfinite(m)
            return torch.where(ok, value * torch.exp(torch.where(ok, own_m - m, torch.zeros_like(m))),
                               torch.zeros_like(value))

        shift = float((other.center.to(self.center) - self.center).norm())
        return CertifiedState(state, rescale(self.state.m, self.skipped) + rescale(other.state.m, other.skipped),
                              rescale(self.state.m, self.z_scored) + rescale(other.state.m, other.z_scored),
                              self.scored + other.scored, self.candidates + other.candidates, self.center,
                              max(self.radius, other.radius + shift) * (1.0 + 1e-12))

    def map_values(self, fn) -> "CertifiedState":
        return CertifiedState(self.state.map_values(fn), self.skipped, self.z_scored, self.scored,
                              self.candidates, self.center, self.radius)

    def skipped_weight(self) -> torch.Tensor:
        """ε ≥ the posterior weight of the skipped candidates (B,) float64."""
        total = self.z_scored + self.skipped
        return torch.where(self.skipped > 0, self.skipped / torch.where(total > 0, total, torch.ones_like(total)),
                           torch.zeros_like(total)).clamp(max=1.0)

    def error_bound(self, mean: torch.Tensor) -> torch.Tensor:
        """Bound on ‖mean − exact posterior mean‖₂ per row: ε·(R + ‖mean − c‖) plus the rounding slack."""
        spread = self.radius + (mean.to(torch.float64) - self.center.to(mean.device)).norm(dim=1)
        slack = ROUNDING_SLACK.get(self.state.o.dtype, ROUNDING_SLACK[torch.float32])
        return (self.skipped_weight().to(mean.device) * (1.0 + 1e-6) + slack) * spread

    def scored_fraction(self) -> torch.Tensor:
        return self.scored.to(torch.float64) / self.candidates.clamp_min(1).to(torch.float64)


def _allowed(keys: KeyBank, labels: Optional[torch.Tensor], rows: slice) -> Optional[torch.Tensor]:
    if labels is None:
        return None
    return keys.labels[None, :].cpu() == labels[rows, None].cpu()


def _stage_lower_bound(px, prefix_x, bands_x, slack_x, py, prefix_y, bands_y, slack_y, k: int, stage: int,
                       first_band: int) -> torch.Tensor:
    """Lower bounds (B, M) float64 on ‖x − y‖² from k basis coordinates and the bands beyond them."""
    a = prefix_x[:, stage:stage + 1].to(torch.float32)
    b = prefix_y[:, stage].to(torch.float32)[None, :]
    dot = px[:, :k].to(torch.float32) @ py[:, :k].t()
    lb = (a + b) * (1.0 - (k + 12) * U32) - 2.0 * dot
    lb = lb.clamp_min_(0.0).to(torch.float64)
    for i in range(first_band, bands_x.shape[1]):
        gap = (bands_x[:, i:i + 1] - bands_y[None, :, i]).abs() - slack_x[:, i:i + 1] - slack_y[None, :, i]
        lb += gap.clamp_min_(0.0).square_()
    return lb * (1.0 - 2.0 ** -20)


def _bucket_counts(g: torch.Tensor) -> torch.Tensor:
    """Per row, the number of candidates in each gap bucket (finite g only); (B, NUM_BUCKETS) int64."""
    finite = torch.isfinite(g)
    bucket = torch.floor(torch.where(finite, g, torch.zeros_like(g)) / BUCKET).clamp_(0, NUM_BUCKETS - 1).long()
    bucket = torch.where(finite, bucket, torch.full_like(bucket, NUM_BUCKETS))  # an overflow slot, dropped
    rows = torch.arange(g.shape[0])[:, None] * (NUM_BUCKETS + 1)
    counts = torch.bincount((bucket + rows).reshape(-1), minlength=g.shape[0] * (NUM_BUCKETS + 1))
    return counts.reshape(g.shape[0], NUM_BUCKETS + 1)[:, :NUM_BUCKETS]


_CHARGE = torch.exp(-BUCKET * torch.arange(NUM_BUCKETS, dtype=torch.float64)) * (1.0 + 1e-6)


def _cut(counts: torch.Tensor, budget: torch.Tensor):
    """(first skipped bucket i* ≥ 1, its mass bound) per row: the most buckets whose charged mass fits."""
    tail = torch.flip(torch.cumsum(torch.flip(counts.to(torch.float64) * _CHARGE, [1]), 1), [1])
    fits = (tail <= budget[:, None]) & (torch.arange(NUM_BUCKETS) >= 1)[None, :]
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.full_like(budget, NUM_BUCKETS).long())
    mass = torch.where(first < NUM_BUCKETS, torch.gather(tail, 1, first.clamp(max=NUM_BUCKETS - 1)[:, None])[:, 0],
                       torch.zeros_like(budget))
    return first, mass


def _dtype_roundoff(dtype) -> float:
    return U32 if dtype != torch.float64 else 2.0 ** -53


def pruned_partial(x: torch.Tensor, keys: KeyBank, coef: torch.Tensor, tolerance: float, *, score,
                   query_labels: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float32,
                   exact=None) -> CertifiedState:
    """The certified state of queries x (B, D) over the N rows of ``keys`` (no flips: the caller mirrors).

    ``score(b, subset KeyBank) -> PartialState`` scores query row b over its survivors and
    ``exact(rows (n,) long) -> PartialState`` runs the full scan for the rows whose survivors are too many
    (both wrap :func:`analytic_diffusion.ops.softmax_retrieval`, so they use the fused kernels).
    """
    index = pruning_index(keys)
    B, N = x.shape[0], keys.n
    cpu = torch.device("cpu")
    x64 = x.detach().to(cpu, torch.float64)
    coef64 = coef.detach().to(cpu, torch.float64)
    labels = None if query_labels is None else query_labels.to(cpu)
    v = x64 - index.center
    px, prefix_x, bands_x, slack_x = _coords(v, index)
    xnorm = v.norm(dim=1)
    k1 = index.stages[0]
    out_states, skipped, z_scored, scored, allowed_n = [None] * B, [None] * B, [None] * B, [0] * B, [0] * B
    exact_rows = []
    eps_budget = tolerance / (1.0 + 1e-6)
    for b0 in range(0, B, QUERY_BLOCK):
        b1 = min(B, b0 + QUERY_BLOCK)
        pad = QUERY_BLOCK - (b1 - b0)  # fixed-shape GEMMs: a row's bounds do not depend on the batch

        def padded(t):
            return torch.cat([t[b0:b1], t[b0:b0 + 1].expand(pad, *t.shape[1:])]) if pad else t[b0:b1]

        lb = _stage_lower_bound(padded(px), padded(prefix_x), padded(bands_x), padded(slack_x), index.proj,
                                index.prefix2, index.bands, index.band_slack, k1, 0, 0)[:b1 - b0]
        allow = _allowed(keys, labels, slice(b0, b1))
        if allow is not None:
            lb = torch.where(allow, lb, torch.full_like(lb, float("inf")))
        n_allowed = allow.sum(1) if allow is not None else torch.full((b1 - b0,), N)
        seeds = torch.topk(lb, min(SEEDS, N), dim=1, largest=False).indices
        for r in range(b1 - b0):
            b = b0 + r
            na = int(n_allowed[r])
            allowed_n[b] = na
            s_idx = seeds[r][torch.isfinite(lb[r, seeds[r]])][:max(1, min(SEEDS, na))]
            ys = keys.gather(s_idx.to(keys.device), torch.float64).cpu()
            d_seed = ((x64[b][None] - ys) ** 2).sum(1) * (1.0 + 1e-12)
            d_ref = float(d_seed.min())
            c = float(coef64[b])
            z_seed = float(torch.exp(-c * (d_seed - d_ref)).sum())  # ≥ 1, relative to e^{−c·d_ref}
            budget = torch.tensor([eps_budget * z_seed])
            g = c * (lb[r] - d_ref)
            g[s_idx] = -1.0  # seeds are always scored (bucket 0)
            first, mass = _cut(_bucket_counts(g[None]), budget)
            cand = torch.nonzero(g < float(first[0]) * BUCKET).reshape(-1)
            if cand.numel() > 0 and len(index.stages) > 1:  # stage 2: refine the survivors with more coordinates
                k2 = index.stages[1]
                lb2 = _stage_lower_bound(px[b:b + 1], prefix_x[b:b + 1], bands_x[b:b + 1], slack_x[b:b + 1],
                                         index.proj[cand], index.prefix2[cand], index.bands[cand],
                                         index.band_slack[cand], k2, 1, index.band_edges.index(k2))[0]
                g2 = torch.maximum(g[cand], c * (lb2 - d_ref))
                g2 = torch.where(torch.isin(cand, s_idx), torch.full_like(g2, -1.0), g2)
                # What stage 1 skipped stays skipped (charged ``mass``); stage 2 cuts its survivors in what is left.
                first2, mass2 = _cut(_bucket_counts(g2[None]), budget - mass)
                cand = cand[g2 < float(first2[0]) * BUCKET]
                mass = mass + mass2
            if cand.numel() > EXACT_FRACTION * na:
                exact_rows.append(b)
                continue
            sub = KeyBank(keys.values[cand.to(keys.device)], keys.scale, keys.shift, None, keys.image_shape,
                          keys.center)
            st = score(b, sub)
            m_t = float(st.m[0])
            # z_S from the kernel's normaliser: each of its logits is within δ of the exact one.
            d_up = (float(xnorm[b]) + index.radius) ** 2
            u = _dtype_roundoff(dtype)
            delta = c * d_up * (keys.dim + 3) * u + 128 * u
            n_s = cand.numel()
            z_kernel = float(st.l[0]) * math.exp(-delta) * max(0.0, 1.0 - (n_s + 8) * u)
            z_seeds = float(torch.exp(-c * d_seed - m_t).sum())
            out_states[b] = st
            skipped[b] = float(mass[0]) * math.exp(-c * d_ref - m_t)
            z_scored[b] = max(z_kernel, z_seeds)
            scored[b] = n_s
    if exact_rows:
        rows = torch.tensor(exact_rows, dtype=torch.long)
        st = exact(rows)
        for i, b in enumerate(exact_rows):
            out_states[b] = PartialState(st.m[i:i + 1], st.l[i:i + 1], st.l2[i:i + 1], st.o[i:i + 1])
            skipped[b], z_scored[b], scored[b] = 0.0, float(st.l[i]), allowed_n[b]
    dev = x.device
    state = PartialState(*(torch.cat([getattr(s, f).to(dev) for s in out_states]) for f in ("m", "l", "l2", "o")))
    f64 = dict(dtype=torch.float64, device=dev)
    return CertifiedState(state, torch.tensor(skipped, **f64), torch.tensor(z_scored, **f64),
                          torch.tensor(scored, dtype=torch.long, device=dev),
                          torch.tensor(allowed_n, dtype=torch.long, device=dev), index.center.to(dev),
                          index.radius)


@dataclass
class CertifiedResult:
    """The retrieval result with its certificate, per query row."""
    mean: torch.Tensor  # (B, D)
    max_weight: torch.Tensor  # (B,)
    effective_neighbours: torch.Tensor  # (B,)
    skipped_weight: torch.Tensor  # (B,) float64 ε ≥ posterior weight of the skipped candidates
    error_bound: torch.Tensor  # (B,) float64 ≥ ‖mean − exact posterior mean‖₂
    scored_fraction: torch.Tensor  # (B,) float64 candidates scored / allowed candidates


def certified_retrieval(x: torch.Tensor, keys: KeyBank, sigma, *, tolerance: float, temperature: float = 1.0,
                        query_labels: Optional[torch.Tensor] = None, flips: bool = False, backend: str = "auto",
                        dtype: Optional[torch.dtype] = None, memory_budget: Optional[int] = None,
                        precision: str = "exact", return_partial: bool = False):
    """:func:`analytic_diffusion.ops.softmax_retrieval` that skips candidates whose total posterior weight is
    provably below ``tolerance`` (per query), and says by how much the result can be off (module docstring).

    ``tolerance=0`` runs the exact scan itself (bitwise the same mean) with a zero skipped weight. Returns a
    :class:`CertifiedResult`, or with ``return_partial=True`` the :class:`CertifiedState` (which combines
    across shards of a dataset with :meth:`CertifiedState.combine`).
    """
    from . import retrieval as R
    tolerance = check_tolerance(tolerance)
    dtype = R._validate(x, keys, query_labels, flips, dtype)
    if not temperature > 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")
    s = R.sigma_rows(sigma, x.shape[0], x.device)
    opts = dict(temperature=temperature, backend=backend, dtype=dtype, precision=precision,
                memory_budget=R.DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget)
    index = pruning_index(keys)
    if tolerance == 0.0:
        st = R.softmax_retrieval(x, keys, s, query_labels=query_labels, flips=flips, return_partial=True, **opts)
        n = keys.n if query_labels is None else (keys.labels[None, :].to(query_labels.device)
                                                  == query_labels[:, None]).sum(1)
        n = torch.as_tensor(n, device=x.device).expand(x.shape[0]) * (2 if flips else 1)
        f64 = dict(dtype=torch.float64, device=x.device)
        cert = CertifiedState(st, torch.zeros(x.shape[0], **f64), st.l.to(torch.float64), n.long(), n.long(),
                              index.center.to(x.device), index.radius)
    else:
        coef = 1.0 / (2.0 * s * s * temperature)

        def run(q: torch.Tensor) -> CertifiedState:
            def score(b, sub):
                return R.softmax_retrieval(q[b:b + 1], sub, s[b:b + 1], return_partial=True, **opts)

            def exact(rows):
                return R.softmax_retrieval(q[rows], keys, s[rows], return_partial=True,
                                           query_labels=None if query_labels is None else query_labels[rows],
                                           **opts)

            return pruned_partial(q, keys, coef, tolerance, score=score, exact=exact, query_labels=query_labels,
                                  dtype=dtype)

        cert = run(x)
        if flips:  # the mirrored half: retrieve with the mirrored query, mirror the values back (as the exact path)
            mirrored = run(R.hflip_rows(x, keys.image_shape)).map_values(lambda o: R.hflip_rows(o, keys.image_shape))
            cert = cert.combine(mirrored)
    if return_partial:
        return cert
    r = R.RetrievalResult.from_partial(cert.state)
    return CertifiedResult(r.mean, r.max_weight, r.effective_neighbours, cert.skipped_weight(),
                           cert.error_bound(r.mean), cert.scored_fraction())

