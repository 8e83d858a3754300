"""Certified pruning of the global softmax retrieval: skip training images whose weight is provably tiny.

Lower bounds on the distances (an orthonormal PCA basis, a float32 GEMM over short augmented key rows in two
stages) give upper bounds on the skipped images' total posterior weight ε; with a ball B(c, R) around the data,
‖mean − exact‖₂ ≤ ε·(R + ‖mean − c‖₂). The survivors are scored exactly by the fused kernels of
:func:`analytic_diffusion.ops.softmax_retrieval`. Every bound is made conservative for the float32 arithmetic
that computes it, and a :class:`CertifiedState` (a :class:`PartialState` plus the certificate) combines across
shards, flips and class filters. The derivation, the bucketing of the skipped weight and the rounding
accounting are in docs/design.md §12; the rounding model behind ``error_bound`` in §13.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast, overload

import torch

from . import cpu_backend, rounding, torch_backend
from .keys import KeyBank
from .keys import take_rows as _rows
from .partial import PartialState

STAGE_DIMS = (32, 128)  # basis vectors used by the prefilter stages (capped at D)
BAND_EDGES = (32, 64, 128)  # residual bands between basis vectors; the last band is everything beyond 128
SEEDS = 16  # candidates with the smallest lower bounds, scored in float64 to bound Z_S from below
BUCKET = 0.25  # nats per gap bucket
NUM_BUCKETS = 512
QUERY_BLOCK = 8  # stage-1 GEMMs run on fixed blocks of queries, so a row's bounds do not depend on the batch
# A row whose survivors exceed this share of its candidates is scored by the full scan: a single query's subset
# scan (gather + one-query kernel) costs about 4× per candidate what a batched full scan does.
EXACT_FRACTION = 0.25
STAGE1_EXACT = 0.6  # ... and one whose stage-1 survivors exceed this share goes there without stage 2
PROBE_STRIDE = 16  # the high-σ probe looks at every 16th candidate
DENSE_STAGE2 = 0.05  # stage 2 as one GEMM over all N (not gathers) once a row keeps this share after stage 1
PCA_SAMPLE = 4096  # rows used to find the basis
U32 = 2.0**-24

# (chain, K, κ, values) of the scan that served a row: its rounding as ops/rounding.py states it.
ScanTerms = tuple[float, float, float, float]


def check_tolerance(tolerance: float) -> float:
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
    """Per-dataset constants of the prefilter (built once per KeyBank, see :func:`pruning_index`).

    Stage s compares augmented vectors [P_{k_s} v, ‖B_i v‖ for the bands beyond k_s]: their squared distance is
    exactly the stage's lower bound, so one GEMM gives it (``aug[s]`` rows, ``keycol[s]`` the keys' squared
    norms, deflated for rounding).
    """

    center: torch.Tensor  # (D,) float64, mirror-symmetric when the image shape is known
    basis: torch.Tensor  # (D, k_max) float64, orthonormal columns
    aug: tuple[torch.Tensor, ...]  # per stage (N, K_s) float32
    keycol: tuple[torch.Tensor, ...]  # per stage (N,) float32
    eta_max: float  # largest float64 error of a key's residual norm
    stages: tuple[int, ...]
    band_edges: tuple[
        int, ...
    ]  # band i spans basis vectors band_edges[i]:band_edges[i+1]; the last one is the residual
    radius: float  # every candidate (and its mirror image) lies in the ball B(center, radius)
    abs_max: float = 1.0  # max |y_jd| over the candidates (the rounding model's input perturbation)
    norm_max: float = 0.0  # max ‖y_j‖₂ (uncentred: the sums of the kernels add uncentred values)

    def probe(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every PROBE_STRIDE-th candidate's stage-1 (aug, keycol), contiguous (made once)."""
        if not hasattr(self, "_probe"):
            self._probe = (self.aug[0][::PROBE_STRIDE].contiguous(), self.keycol[0][::PROBE_STRIDE].contiguous())
        return self._probe


def _augment(
    v64: torch.Tensor, basis: torch.Tensor, stages: tuple[int, ...], edges: tuple[int, ...], dim: int
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Per stage the float32 augmented rows (B, K_s) of centred float64 rows, with their float64 squared norms
    (of the float32 values), and the error bound η of each row's residual norm; also ‖v‖."""
    p = v64 @ basis
    total2 = (v64 * v64).sum(1)
    band_norms = [(p[:, a:b] * p[:, a:b]).sum(1).sqrt() for a, b in zip(edges[:-2], edges[1:-1])]
    band_norms.append((total2 - (p * p).sum(1)).clamp_min(0.0).sqrt())
    bands = torch.stack(band_norms, 1)
    # float64 error of ‖v‖² − ‖P v‖² is below 4·D·2⁻⁵³·‖v‖² (+ the basis' orthonormality), hence of its root
    # below the root of that.
    eta = (8.0 * dim * 2.0**-53 * total2).sqrt()
    aug, norms2 = [], []
    for k in stages:
        a32 = torch.cat([p[:, :k], bands[:, list(edges).index(k) :]], 1).to(torch.float32)
        aug.append(a32)
        norms2.append((a32.to(torch.float64) ** 2).sum(1))
    return aug, norms2, eta, total2.sqrt()


def _shrink(k: int) -> float:
    """Deflation of both squared norms for a float32 expanded-form distance over K terms (module docstring)."""
    return (1.0 - 2.0**-20) * (1.0 - (k + 16) * U32)


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
    edges = tuple(e for e in edges if e >= stages[0]) + (dim,)
    sample = torch.linspace(0, n - 1, min(n, PCA_SAMPLE)).round().long()
    ys = keys.gather(sample.to(keys.device), torch.float64).cpu() - center
    # Leading principal directions by a seeded randomized subspace iteration (Halko et al.): three GEMM passes
    # over the sample and a small eigh. Dense SVD / eigh of the full D×D problem took 6–30 s on the loaded
    # 2-core machine; any orthonormal basis keeps the bounds valid, a good one keeps them tight.
    width = min(dim, k_max + 16)
    q = torch.randn(dim, width, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for _ in range(3):
        q, _ = torch.linalg.qr(ys.t() @ (ys @ q))
    _, vecs = torch.linalg.eigh(q.t() @ (ys.t() @ (ys @ q)))
    basis = q @ vecs.flip(1)[:, :k_max]
    basis, _ = torch.linalg.qr(basis.contiguous())  # orthonormal to float64 rounding
    widths = [k + len(edges) - 1 - list(edges).index(k) for k in stages]
    aug = [torch.empty(n, w, dtype=torch.float32) for w in widths]
    keycol = [torch.empty(n, dtype=torch.float32) for _ in stages]
    eta_max, radius, abs_max, norm_max = 0.0, 0.0, 0.0, 0.0
    step = max(1, (1 << 22) // dim)
    for s in range(0, n, step):
        e = min(n, s + step)
        rows = keys.rows(s, e, torch.float64).cpu()
        a32, n2, eta, norm = _augment(rows - center, basis, stages, edges, dim)
        for i, _k in enumerate(stages):
            aug[i][s:e] = a32[i]
            keycol[i][s:e] = (n2[i] * _shrink(widths[i]) * (1.0 - 2 * U32)).to(torch.float32)
        eta_max, radius = max(eta_max, float(eta.max())), max(radius, float(norm.max()))
        abs_max, norm_max = max(abs_max, float(rows.abs().max())), max(norm_max, float(rows.norm(dim=1).max()))
    radius = radius * (1.0 + 1e-9) + 1e-12
    return PruningIndex(
        center,
        basis,
        tuple(aug),
        tuple(keycol),
        eta_max * (1.0 + 1e-9),
        stages,
        edges,
        radius,
        abs_max * (1.0 + 1e-9),
        norm_max * (1.0 + 1e-9),
    )


def _query_side(x64: torch.Tensor, index: PruningIndex) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Per stage the queries' float32 augmented rows and row terms (module docstring); and ‖x − c‖."""
    dim = x64.shape[1]
    aug, n2, eta, norm = _augment(x64 - index.center, index.basis, index.stages, index.band_edges, dim)
    rows = []
    for i, a in enumerate(aug):
        # The residual norms' float64 errors move the augmented distance by ≤ 2(η_x + η_y)(‖x−c‖ + ‖y−c‖).
        rowterm = n2[i] * _shrink(a.shape[1]) - 2.0 * (eta + index.eta_max) * (norm + index.radius) * 1.01
        rows.append((a, (rowterm * (1.0 - 2 * U32) - 1e-30).to(torch.float32)))
    return rows, norm


@dataclass
class CertifiedState:
    """A partial state of the scored candidates with its pruning certificate (module docstring).

    ``skipped`` ≥ Σ_K e^{ℓ_j − m} and ``z_scored`` ≤ Σ_S e^{ℓ_j − m} (float64, m = state.m); ``scored`` and
    ``candidates`` count scored and allowed candidates per row; every candidate lies in B(center, radius);
    ``rounding`` says what the working precision can have done to the scored state (ops/rounding.py).
    """

    state: PartialState
    skipped: torch.Tensor
    z_scored: torch.Tensor
    scored: torch.Tensor
    candidates: torch.Tensor
    center: torch.Tensor
    radius: float
    rounding: rounding.RoundingModel

    def combine(self, other: CertifiedState) -> CertifiedState:
        state = self.state.combine(other.state)
        m = state.m.to(torch.float64)

        def rescale(own_m: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
            own_m = own_m.to(torch.float64)
            ok = torch.isfinite(own_m) & torch.isfinite(m)
            return torch.where(
                ok, value * torch.exp(torch.where(ok, own_m - m, torch.zeros_like(m))), torch.zeros_like(value)
            )

        shift = float((other.center.to(self.center) - self.center).norm())
        return CertifiedState(
            state,
            rescale(self.state.m, self.skipped) + rescale(other.state.m, other.skipped),
            rescale(self.state.m, self.z_scored) + rescale(other.state.m, other.z_scored),
            self.scored + other.scored,
            self.candidates + other.candidates,
            self.center,
            max(self.radius, other.radius + shift) * (1.0 + 1e-12),
            self.rounding.combine(other.rounding),
        )

    def map_values(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> CertifiedState:
        return CertifiedState(
            self.state.map_values(fn),
            self.skipped,
            self.z_scored,
            self.scored,
            self.candidates,
            self.center,
            self.radius,
            self.rounding,
        )

    def skipped_weight(self) -> torch.Tensor:
        """ε ≥ the posterior weight of the skipped candidates (B,) float64."""
        total = self.z_scored + self.skipped
        return torch.where(
            self.skipped > 0,
            self.skipped / torch.where(total > 0, total, torch.ones_like(total)),
            torch.zeros_like(total),
        ).clamp(max=1.0)

    def rounding_error(self, mean: torch.Tensor) -> torch.Tensor:
        """Bound on ‖mean − the exact softmax mean over the scored candidates‖₂ per row (module docstring)."""
        st = self.state
        dev = mean.device
        return self.rounding.mean_error(
            st.m.to(dev), st.l.to(dev), self.scored.to(dev), mean, self.center.to(dev), self.radius
        )

    def error_bound(self, mean: torch.Tensor) -> torch.Tensor:
        """Bound on ‖mean − exact posterior mean‖₂ per row: the rounding bound E of the scored mean plus
        ε·(R + ‖mean − c‖ + E) for the skipped weight ε; never above R + ‖mean − c‖ (the exact mean lies in the
        data's ball: that value says the working precision cannot certify the row more closely)."""
        e = self.rounding_error(mean)
        dist = (mean.to(torch.float64) - self.center.to(mean.device)).norm(dim=1)
        eps = self.skipped_weight().to(mean.device) * (1.0 + 1e-6)
        return torch.minimum(e + eps * (self.radius + dist + e), self.radius + dist)

    def scored_fraction(self) -> torch.Tensor:
        return self.scored.to(torch.float64) / self.candidates.clamp_min(1).to(torch.float64)


def _allowed(keys: KeyBank, labels: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    if labels is None:
        return None
    return cast(torch.Tensor, keys.labels)[None, :].cpu() == labels[rows, None].cpu()  # validated: labels exist


def _stage_lower_bound(xa: torch.Tensor, xrow: torch.Tensor, ya: torch.Tensor, ycol: torch.Tensor) -> torch.Tensor:
    """Lower bounds (B, M) float32 on ‖x − y‖²: the augmented distance as one GEMM, with the rounding slack
    already folded into the deflated norms ``xrow`` (B,) and ``ycol`` (M,). Negative values mean 'no bound'."""
    lb = torch.addmm(ycol[None, :], xa, ya.t(), beta=1.0, alpha=-2.0 * (1.0 - 2.0**-20))
    return lb.add_(xrow[:, None])


def _gaps(lb: torch.Tensor, d_ref: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """g = coef·(lb − d_ref) in float32, lowered by its own rounding error (≤ 4u|g| + 4u·coef·d_ref + the
    float32 roundings of d_ref and coef), so that g ≤ the exact gap."""
    c32 = coef.to(torch.float32)[:, None]
    g = (lb - d_ref.to(torch.float32)[:, None]).mul_(c32)
    kappa = (8.0 * U32 * coef * d_ref + 1e-6).to(torch.float32)[:, None]
    return g.mul_(1.0 - 8.0 * U32).sub_(kappa)


def _bucket_counts(g: torch.Tensor) -> torch.Tensor:
    """Per row, the number of candidates in each gap bucket; (B, NUM_BUCKETS) int64. Excluded candidates
    (g = +inf) land in the last bucket: charging them e^{−(NUM_BUCKETS−1)·BUCKET} each is harmless (≈ 1e-56)."""
    bucket = torch.div(g, BUCKET).floor_().clamp_(0, NUM_BUCKETS - 1).to(torch.long)
    bucket += (torch.arange(g.shape[0]) * NUM_BUCKETS)[:, None]
    return torch.bincount(bucket.reshape(-1), minlength=g.shape[0] * NUM_BUCKETS).reshape(g.shape[0], NUM_BUCKETS)


_CHARGE = torch.exp(-BUCKET * torch.arange(NUM_BUCKETS, dtype=torch.float64)) * (1.0 + 1e-6)


def _cut(counts: torch.Tensor, budget: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first skipped bucket i* ≥ 1, its mass bound) per row: the most buckets whose charged mass fits."""
    tail = torch.flip(torch.cumsum(torch.flip(counts.to(torch.float64) * _CHARGE, [1]), 1), [1])
    fits = (tail <= budget[:, None]) & (torch.arange(NUM_BUCKETS) >= 1)[None, :]
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.full_like(budget, NUM_BUCKETS).long())
    mass = torch.where(
        first < NUM_BUCKETS,
        torch.gather(tail, 1, first.clamp(max=NUM_BUCKETS - 1)[:, None])[:, 0],
        torch.zeros_like(budget),
    )
    return first, mass


def _stage1_cut(
    block: tuple[torch.Tensor, torch.Tensor],
    keyside: tuple[torch.Tensor, torch.Tensor],
    nb: int,
    allow: torch.Tensor | None,
    x64: torch.Tensor,
    keys: KeyBank,
    key_index: torch.Tensor | None,
    c: torch.Tensor,
    tolerance: float,
    weight: int,
    eta64: float,
) -> tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
]:
    """Stage 1 for a block of queries over ``keyside`` (aug, keycol of some candidate rows, which are
    ``key_index`` of ``keys`` or all of them); each candidate stands for ``weight`` candidates (the probe)."""
    lb = _stage_lower_bound(*block, *keyside)[:nb]
    if allow is not None:
        lb.masked_fill_(~allow, float("inf"))
    # Seeds: the smallest lower bounds, scored exactly in float64 (always kept): z_S ≥ their weight.
    seeds = torch.topk(lb, min(SEEDS, lb.shape[1]), dim=1, largest=False).indices
    valid = torch.isfinite(torch.gather(lb, 1, seeds))
    rows = seeds if key_index is None else key_index[seeds]
    ys = keys.gather(rows.to(keys.device), torch.float64).cpu()
    # float64 distances from float64 rows (each value within eta64 of the exact one, in norm): inflated to bounds
    d_seed = (((x64[:, None, :] - ys) ** 2).sum(-1).sqrt() * (1.0 + 1e-12) + eta64) ** 2
    d_seed = torch.where(valid, d_seed, torch.full_like(d_seed, float("inf")))
    d_ref = d_seed.min(1).values
    z_seed = torch.exp(-c[:, None] * (d_seed - d_ref[:, None])).sum(1)  # ≥ 1, relative to e^{−c·d_ref}
    budget = tolerance / (1.0 + 1e-6) * z_seed
    g = _gaps(lb, d_ref, c)
    # Seeds fall in bucket 0: never skipped (a disallowed "seed", when a class has < SEEDS images, stays out).
    g.scatter_(1, seeds, torch.where(valid, -1.0, float("inf")))
    first, mass = _cut(_bucket_counts(g) * weight, budget)
    survive = g < (first.to(torch.float32) * BUCKET)[:, None]
    return seeds, valid, d_seed, d_ref, budget, g, first, mass, survive


def pruned_partial(
    x: torch.Tensor,
    keys: KeyBank,
    coef: torch.Tensor,
    tolerance: float,
    *,
    score: Callable[[int, KeyBank], PartialState],
    query_labels: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    exact: Callable[[torch.Tensor], PartialState],
    model: Callable[[torch.Tensor, KeyBank], ScanTerms] | None = None,
) -> CertifiedState:
    """The certified state of queries x (B, D) over the N rows of ``keys`` (no flips: the caller mirrors).

    ``score(b, subset KeyBank) -> PartialState`` scores query row b over its survivors and
    ``exact(rows (n,) long) -> PartialState`` runs the full scan for the rows whose survivors are too many
    (both wrap :func:`analytic_diffusion.ops.softmax_retrieval`, so they use the fused kernels).
    ``model(query rows (b, D), KeyBank) -> (chain, K, κ, values)`` describes the rounding of the scan that serves
    those rows (:class:`analytic_diffusion.ops.rounding.RoundingModel`); None: any backend (the generic chain and
    the torch reference's K, κ and values).
    """
    index = pruning_index(keys)
    B, N = x.shape[0], keys.n
    cpu = torch.device("cpu")
    x64 = x.detach().to(cpu, torch.float64)
    coef64 = coef.detach().to(cpu, torch.float64)
    labels = None if query_labels is None else query_labels.to(cpu)
    qside, xnorm = _query_side(x64, index)
    two_stage = len(index.stages) > 1
    if model is None:

        def any_backend(q: torch.Tensor, bank: KeyBank) -> ScanTerms:
            terms = rounding.backend_terms("torch", "exact", dtype)
            return rounding.generic_chain(bank.n), *terms, _values_bound(keys, index, centred=True)

        model = any_backend

    eta = input_rounding(x, keys, dtype, index)
    eta64 = math.sqrt(keys.dim) * 2.0**-53 * (4.0 * index.abs_max + 5.0 * abs(keys.shift))  # float64 seed rows
    out_states: list[PartialState | None]
    out_states, skipped, z_scored, scored, allowed_n = [None] * B, [0.0] * B, [0.0] * B, [0] * B, [0] * B
    terms: list[ScanTerms | None] = [None] * B  # (chain, K, κ, values) of the scan that served each row
    exact_rows = []
    for b0 in range(0, B, QUERY_BLOCK):
        b1 = min(B, b0 + QUERY_BLOCK)
        nb, pad = b1 - b0, QUERY_BLOCK - (b1 - b0)  # fixed-shape GEMMs: a row's bounds do not depend on the batch

        def padded(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t[b0:b1], t[b0 : b0 + 1].expand(pad, *t.shape[1:])]) if pad else t[b0:b1]

        block = (padded(qside[0][0]), padded(qside[0][1]))
        c = coef64[b0:b1]
        allow = _allowed(keys, labels, slice(b0, b1))
        n_allowed = allow.sum(1) if allow is not None else torch.full((nb,), N)
        if bool((n_allowed == 0).any()):
            raise ValueError(
                "query_labels: some query rows had no allowed candidate (no training image of the requested class)"
            )
        if N >= PROBE_STRIDE * 64:  # a 1/16 probe tells the rows that will not prune (high σ): full scan at once
            probe = index.probe()
            pidx = torch.arange(0, N, PROBE_STRIDE)
            pr = _stage1_cut(
                block,
                probe,
                nb,
                None if allow is None else allow[:, pidx],
                x64[b0:b1],
                keys,
                pidx,
                c,
                tolerance,
                PROBE_STRIDE,
                eta64,
            )
            hopeless = pr[-1].sum(1) > STAGE1_EXACT * n_allowed / PROBE_STRIDE
            if bool(hopeless.all()):
                for r in range(nb):
                    allowed_n[b0 + r] = int(n_allowed[r])
                    exact_rows.append(b0 + r)
                continue
        full = (index.aug[0], index.keycol[0])
        seeds, _valid, d_seed, d_ref, budget, g, _first, mass, survive = _stage1_cut(
            block, full, nb, allow, x64[b0:b1], keys, None, c, tolerance, 1, eta64
        )
        n1 = survive.sum(1)
        cands = torch.split(torch.nonzero(survive)[:, 1], n1.tolist())  # one nonzero for the block, row-major
        dense2 = None
        if two_stage and bool((n1 > DENSE_STAGE2 * N).any()):  # many survivors: one fixed-shape GEMM, else gathers
            block2 = (padded(qside[1][0]), padded(qside[1][1]))
            dense2 = _gaps(_stage_lower_bound(*block2, index.aug[1], index.keycol[1])[:nb], d_ref, c)
        for r in range(nb):
            b = b0 + r
            na = int(n_allowed[r])
            allowed_n[b] = na
            if int(n1[r]) > STAGE1_EXACT * na:  # nothing to gain from refining: the full scan
                exact_rows.append(b)
                continue
            cand = cands[r]
            row_mass = mass[r : r + 1]
            if two_stage and cand.numel() > SEEDS:  # stage 2: refine the survivors with more coordinates
                if dense2 is not None and int(n1[r]) > DENSE_STAGE2 * N:
                    g2 = dense2[r, cand]
                else:
                    lb2 = _stage_lower_bound(
                        qside[1][0][b : b + 1], qside[1][1][b : b + 1], _rows(index.aug[1], cand), index.keycol[1][cand]
                    )
                    g2 = _gaps(lb2, d_ref[r : r + 1], c[r : r + 1])[0]
                g2 = torch.maximum(g2, g[r, cand])
                g2[torch.isin(cand, seeds[r])] = -1.0
                # What stage 1 skipped stays skipped (charged ``mass``); stage 2 cuts its survivors in what is left.
                first2, mass2 = _cut(_bucket_counts(g2[None]), budget[r : r + 1] - row_mass)
                cand = cand[g2 < float(first2[0]) * BUCKET]
                row_mass = row_mass + mass2
            if cand.numel() > EXACT_FRACTION * na:
                exact_rows.append(b)
                continue
            sub = KeyBank(_rows(keys.values, cand), keys.scale, keys.shift, None, keys.image_shape, keys.center)
            st = score(b, sub)
            terms[b] = row_terms = model(x[b : b + 1], sub)
            m_t = float(st.m[0])
            # z_S from the kernel's normaliser: each of its logits (|ℓ| ≤ L) is within δ of the exact one.
            rm = _model_rows(dtype, keys.dim, coef64[b : b + 1], eta[b : b + 1], [row_terms])
            L = torch.tensor([float(c[r]) * (float(xnorm[b]) + index.radius) ** 2], dtype=torch.float64)
            delta = float(rm.logit_error(L, L)[0])
            z_kernel = (
                float(st.l[0])
                * math.exp(-delta)
                / (1.0 + rounding.gamma(row_terms[0] + 4, rounding.unit_roundoff(dtype)))
            )
            z_seeds = float(torch.exp(-float(c[r]) * d_seed[r] - m_t).sum())
            out_states[b] = st
            skipped[b] = float(row_mass[0]) * math.exp(-float(c[r]) * float(d_ref[r]) - m_t)
            z_scored[b] = max(z_kernel, z_seeds)
            scored[b] = cand.numel()
    if exact_rows:
        rows = torch.tensor(exact_rows, dtype=torch.long)
        st = exact(rows)
        t = model(x[rows.to(x.device)], keys)
        for i, b in enumerate(exact_rows):
            terms[b] = t
            out_states[b] = PartialState(st.m[i : i + 1], st.l[i : i + 1], st.l2[i : i + 1], st.o[i : i + 1])
            skipped[b], z_scored[b], scored[b] = 0.0, float(st.l[i]), allowed_n[b]
    dev = x.device
    state = PartialState(*(torch.cat([getattr(s, f).to(dev) for s in out_states]) for f in ("m", "l", "l2", "o")))
    f64: dict[str, Any] = dict(dtype=torch.float64, device=dev)
    return CertifiedState(
        state,
        torch.tensor(skipped, **f64),
        torch.tensor(z_scored, **f64),
        torch.tensor(scored, dtype=torch.long, device=dev),
        torch.tensor(allowed_n, dtype=torch.long, device=dev),
        index.center.to(dev),
        index.radius,
        _model_rows(dtype, keys.dim, coef64, eta, terms).to(dev),
    )


def input_rounding(x: torch.Tensor, keys: KeyBank, dtype: torch.dtype, index: PruningIndex) -> torch.Tensor:
    """(B,) float64 η ≥ ‖x̃ − x‖ + max_j ‖ỹ_j − y_j‖: the queries' and rows' rounding to the working dtype. A row
    y = scale·v + shift formed in it (scale, shift and v rounded first, a product and a sum) is within
    u·(3|y| + 4|shift|) of the exact one per value (≤ u·(4·max|y| + 5|shift|) with margin); a query is exact unless
    its own dtype is wider than the working one."""
    u = rounding.unit_roundoff(dtype)
    rows = math.sqrt(keys.dim) * u * (4.0 * index.abs_max + 5.0 * abs(keys.shift))
    x64 = x.detach().to("cpu", torch.float64)
    wider = torch.finfo(x.dtype).eps < torch.finfo(dtype).eps
    return (x64.norm(dim=1) * u * 1.01 if wider else torch.zeros(x.shape[0], dtype=torch.float64)) + rows


def _values_bound(keys: KeyBank, index: PruningIndex, centred: bool) -> float:
    """≥ the norm of the largest absolute values a scan's sums add: max_j ‖y_j‖ for the C++ kernel, which adds the
    rows themselves; with ``centred`` also 2‖c‖ (c the dataset mean: the torch reference adds rows centred on c,
    then the centre times the weights' sum) and 2√D·|shift| (GPU kernels that add the stored values times the
    scale and then the shift times the weights' sum)."""
    if not centred:
        return index.norm_max
    extra = 2.0 * float(keys.get_center(torch.float64).norm()) + 2.0 * math.sqrt(keys.dim) * abs(keys.shift)
    return index.norm_max + extra * (1.0 + 1e-9)


def _model_rows(
    dtype: torch.dtype, dim: int, coef: torch.Tensor, eta: torch.Tensor, terms: Sequence[ScanTerms | None]
) -> rounding.RoundingModel:
    rows = [cast(ScanTerms, t) for t in terms]  # every row was served by a scan
    return rounding.RoundingModel(
        dtype,
        dim,
        coef.to(torch.float64).cpu(),
        eta,
        *(torch.tensor([float(t[i]) for t in rows], dtype=torch.float64) for i in range(4)),
    )


@dataclass
class CertifiedResult:
    """The retrieval result with its certificate, per query row."""

    mean: torch.Tensor  # (B, D)
    max_weight: torch.Tensor  # (B,)
    effective_neighbours: torch.Tensor  # (B,)
    skipped_weight: torch.Tensor  # (B,) float64 ε ≥ posterior weight of the skipped candidates
    error_bound: torch.Tensor  # (B,) float64 ≥ ‖mean − exact posterior mean‖₂
    scored_fraction: torch.Tensor  # (B,) float64 candidates scored / allowed candidates


@overload
def certified_retrieval(
    x: torch.Tensor,
    keys: KeyBank,
    sigma: float | Sequence[float] | torch.Tensor,
    *,
    tolerance: float,
    temperature: float = ...,
    query_labels: torch.Tensor | None = ...,
    flips: bool = ...,
    backend: str = ...,
    dtype: torch.dtype | None = ...,
    memory_budget: int | None = ...,
    precision: str = ...,
    return_partial: Literal[False] = ...,
) -> CertifiedResult: ...


@overload
def certified_retrieval(
    x: torch.Tensor,
    keys: KeyBank,
    sigma: float | Sequence[float] | torch.Tensor,
    *,
    tolerance: float,
    temperature: float = ...,
    query_labels: torch.Tensor | None = ...,
    flips: bool = ...,
    backend: str = ...,
    dtype: torch.dtype | None = ...,
    memory_budget: int | None = ...,
    precision: str = ...,
    return_partial: Literal[True],
) -> CertifiedState: ...


@overload
def certified_retrieval(
    x: torch.Tensor,
    keys: KeyBank,
    sigma: float | Sequence[float] | torch.Tensor,
    *,
    tolerance: float,
    temperature: float = ...,
    query_labels: torch.Tensor | None = ...,
    flips: bool = ...,
    backend: str = ...,
    dtype: torch.dtype | None = ...,
    memory_budget: int | None = ...,
    precision: str = ...,
    return_partial: bool = ...,
) -> CertifiedResult | CertifiedState: ...


def certified_retrieval(
    x: torch.Tensor,
    keys: KeyBank,
    sigma: float | Sequence[float] | torch.Tensor,
    *,
    tolerance: float,
    temperature: float = 1.0,
    query_labels: torch.Tensor | None = None,
    flips: bool = False,
    backend: str = "auto",
    dtype: torch.dtype | None = None,
    memory_budget: int | None = None,
    precision: str = "exact",
    return_partial: bool = False,
) -> CertifiedResult | CertifiedState:
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
    opts: dict[str, Any] = dict(
        temperature=temperature,
        backend=backend,
        dtype=dtype,
        precision=precision,
        memory_budget=R.DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget,
    )
    index = pruning_index(keys)
    coef = 1.0 / (2.0 * s * s * temperature)

    def model(q: torch.Tensor, bank: KeyBank) -> ScanTerms:
        """(chain, K, κ, values) of the scan softmax_retrieval runs for queries q over bank (ops/rounding.py)."""
        name = R.choose_backend(backend, q, bank, dtype)[0]
        if bank.pages is not None or bank.shard is not None:  # streamed blocks, ranks: any order
            chain = rounding.generic_chain(bank.total)
        elif name == "cpu":
            chain = cpu_backend.accumulation_chain(bank.n)
        elif name == "torch":
            chain = torch_backend.accumulation_chain(bank.n, q.shape[0], bank.dim, dtype, opts["memory_budget"])
        else:
            chain = rounding.generic_chain(bank.n)
        values = _values_bound(keys, index, centred=name != "cpu")
        return (chain, *rounding.backend_terms(name, precision, dtype), values)

    if tolerance == 0.0:
        st = R.softmax_retrieval(x, keys, s, query_labels=query_labels, flips=flips, return_partial=True, **opts)
        n = (
            keys.n
            if query_labels is None
            else (cast(torch.Tensor, keys.labels)[None, :].to(query_labels.device) == query_labels[:, None]).sum(1)
        )
        n = torch.as_tensor(n, device=x.device).expand(x.shape[0]) * (2 if flips else 1)
        f64: dict[str, Any] = dict(dtype=torch.float64, device=x.device)
        chain, slack, floor, values = model(x, keys)
        rm = _model_rows(
            dtype,
            keys.dim,
            coef,
            input_rounding(x, keys, dtype, index),
            [(chain + (6 if flips else 0), slack, floor, values)] * x.shape[0],
        )
        cert = CertifiedState(
            st,
            torch.zeros(x.shape[0], **f64),
            st.l.to(torch.float64),
            n.long(),
            n.long(),
            index.center.to(x.device),
            index.radius,
            rm.to(x.device),
        )
    else:

        def run(q: torch.Tensor) -> CertifiedState:
            def score(b: int, sub: KeyBank) -> PartialState:
                return R.softmax_retrieval(q[b : b + 1], sub, s[b : b + 1], return_partial=True, **opts)

            def exact(rows: torch.Tensor) -> PartialState:
                return R.softmax_retrieval(
                    q[rows],
                    keys,
                    s[rows],
                    return_partial=True,
                    query_labels=None if query_labels is None else query_labels[rows],
                    **opts,
                )

            return pruned_partial(
                q,
                keys,
                coef,
                tolerance,
                score=score,
                exact=exact,
                query_labels=query_labels,
                dtype=dtype,
                model=model,
            )

        cert = run(x)
        if flips:  # the mirrored half: retrieve with the mirrored query, mirror the values back (as the exact path)
            shape = cast("tuple[int, int, int]", keys.image_shape)  # flips: _validate checked it is set
            mirrored = run(R.hflip_rows(x, shape)).map_values(lambda o: R.hflip_rows(o, shape))
            cert = cert.combine(mirrored)
    if return_partial:
        return cert
    r = R.RetrievalResult.from_partial(cert.state)
    return CertifiedResult(
        r.mean,
        r.max_weight,
        r.effective_neighbours,
        cert.skipped_weight(),
        cert.error_bound(r.mean),
        cert.scored_fraction(),
    )
