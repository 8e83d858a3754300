"""pca_locality's Wiener locality masks without the float64 D×D product (docs/methods.md §5).

The rule (:func:`analytic_diffusion.ops.local_retrieval.locality_mask` of
:func:`~analytic_diffusion.ops.local_retrieval.wiener_filter_matrix`): W = U diag(f) Uᵀ with f = λ/(λ+σ²), row n
divided by piv_n = W_nn (1 where |W_nn| < 1e-6), mask[n, m] = |W_nm / piv_n| ≥ θ·max|W/piv|. Building W in
float64 costs a dense D³ product per σ (2 s at D = 3072 on one core), while the decision needs float64 accuracy
only near the threshold. So, per σ:

1. W is written as A Aᵀ (plus a bounded remainder) with A = U diag(√f) — or, when that keeps fewer columns,
   W = I − B Bᵀ with B = U diag(√(1−f)). Columns whose weight is negligible are dropped: their contribution to
   entry (n, m) is at most √(t_n t_m) (Cauchy–Schwarz), t_n = Σ_dropped h_k U_nk².
2. The kept product is formed in float32 (upper block triangle only: W is symmetric). Its error is bounded by
   the standard dot-product bound γ_{K+3}·‖a_n‖‖a_m‖ (γ_k = k·u/(1 − k·u), u = 2⁻²⁴, any summation order), plus
   an absolute underflow term.
3. The diagonal W_nn = Σ_k f_k U_nk² is formed in float64 (D² work), so the pivots are float64 values.
4. max|W/piv| is bracketed: the diagonal gives a lower bound, float32 value + bound an upper one per entry;
   every entry whose upper bound reaches the lower bound is recomputed in float64, which fixes the max.
5. An entry whose float32 value lies farther than its bound (plus a relative slack of 1e-5 for the float32
   band arithmetic) from θ·max·|piv_n| is decided by the float32 value; every other entry is recomputed in
   float64 as Σ_k U_nk f_k U_mk and decided by the float64 rule.

So every entry is decided as the float64 rule decides it, except where the float64 evaluations themselves
disagree (an entry within a few float64 rounding units of the threshold, relative ~1e-13, where the old dense
product's own rounding is arbitrary); tests/test_wiener_mask.py checks bitwise equality with the dense rule on
random data and on MNIST. On data whose spectrum is spread (real images) step 1 drops most columns at small and
large σ; on white-noise data it drops none and the float32 product dominates.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

U32 = 2.0 ** -24  # float32 unit roundoff
DIAG_EPS = 1e-6  # |W_nn| below this: the row is not normalised (divided by 1)
BAND_SLACK = 1e-5  # relative slack on float32 band arithmetic (each float32 op errs by ≤ 6e-8 relative)
BLOCK = 768  # block size of the upper-triangle float32 product
ENTRY_CHUNK = 2048  # entries recomputed per float64 gather


def _gamma(k: int) -> float:
    return k * U32 / (1.0 - k * U32)


def _factor(lam: torch.Tensor, U: torch.Tensor, U2: torch.Tensor, colmax: torch.Tensor, sigma: float, budget_of
            ) -> Tuple[torch.Tensor, float, torch.Tensor, torch.Tensor]:
    """(F, sign, tail, diag): W = sign·F Fᵀ (+ I when sign = −1) + R with |R_nm| ≤ √(tail_n tail_m), float64.

    ``budget_of(diag)`` gives the largest tail allowed; columns are dropped smallest weight first while
    Σ_dropped h_k·max_n U_nk² (an upper bound of every row's dropped mass) stays within it."""
    s2 = float(sigma) ** 2
    f = torch.where(lam + s2 > 0, lam / (lam + s2), torch.zeros_like(lam))
    diag = U2 @ f
    budget = budget_of(diag)
    best = None
    for h, sign in ((f, 1.0), (1.0 - f, -1.0)):
        order = torch.argsort(h, stable=True)
        ndrop = int((torch.cumsum(h[order] * colmax[order], 0) <= budget).sum())
        if best is None or order.numel() - ndrop < best[0].numel():
            best = (order[ndrop:], order[:ndrop], h, sign)
    keep, drop, h, sign = best
    tail = U2[:, drop] @ h[drop] if drop.numel() else torch.zeros_like(diag)
    return U[:, keep] * h[keep].sqrt()[None, :], sign, tail, diag


def _upper_gram32(F32: torch.Tensor) -> torch.Tensor:
    """F Fᵀ in float32, computing only the blocks on and above the diagonal (the rest mirrored)."""
    D = F32.shape[0]
    out = torch.empty(D, D, dtype=torch.float32)
    for i in range(0, D, BLOCK):
        rows = F32[i:i + BLOCK]
        blk = rows @ F32[i:].t()
        out[i:i + BLOCK, i:] = blk
        out[i:, i:i + BLOCK] = blk.t()
    return out


def _exact_entries(Uf: torch.Tensor, U: torch.Tensor, n: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """W_nm = Σ_k U_nk f_k U_mk in float64 for the listed entries (Uf = U diag f)."""
    out = torch.empty(n.numel(), dtype=torch.float64)
    for c in range(0, n.numel(), ENTRY_CHUNK):
        out[c:c + ENTRY_CHUNK] = (Uf[n[c:c + ENTRY_CHUNK]] * U[m[c:c + ENTRY_CHUNK]]).sum(1)
    return out


def _exact_at(Uf: torch.Tensor, U: torch.Tensor, where: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor,
                                                                               torch.Tensor]:
    """(rows, cols, float64 W values) at the True entries of ``where``; rows with many of them as one GEMM."""
    D = where.shape[0]
    per_row = where.sum(1)
    dense = (per_row > D // 16).nonzero().flatten()
    ns, ms, vs = [], [], []
    if dense.numel():
        Wr = Uf[dense] @ U.t()
        r, c = where[dense].nonzero(as_tuple=True)
        ns.append(dense[r]), ms.append(c), vs.append(Wr[r, c])
    sparse_rows = where.clone()
    sparse_rows[dense] = False
    n, m = sparse_rows.nonzero(as_tuple=True)
    if n.numel():
        ns.append(n), ms.append(m), vs.append(_exact_entries(Uf, U, n, m))
    if not ns:
        e = torch.zeros(0, dtype=torch.long)
        return e, e, torch.zeros(0, dtype=torch.float64)
    return torch.cat(ns), torch.cat(ms), torch.cat(vs)


class WienerMasks:
    """The masks of one PCA (eigvals descending ≥ 0, U columns) for any σ: holds the float64 factors and the
    per-coordinate quantities that do not depend on σ, so that a new σ costs only the steps above."""

    def __init__(self, eigvals: torch.Tensor, U: torch.Tensor):
        self.lam = eigvals.detach().to("cpu", torch.float64).clamp_min(0.0)
        self.U = U.detach().to("cpu", torch.float64).contiguous()
        if self.U.dim() != 2 or self.U.shape[0] != self.U.shape[1] or self.lam.shape != (self.U.shape[1],):
            raise ValueError(f"U: expected a square (D, D) matrix and D eigenvalues, got {tuple(self.U.shape)} and "
                             f"{tuple(self.lam.shape)}")
        self.U2 = self.U * self.U
        self.colmax = self.U2.max(0).values

    def __call__(self, sigma: float, threshold: float) -> torch.Tensor:
        """(D, D) bool mask — the same booleans as ``locality_mask(wiener_filter_matrix(eigvals, U, sigma),
        threshold)`` (module docstring: how, and the one caveat)."""
        threshold = float(threshold)
        if math.isnan(threshold):
            raise ValueError("threshold: got NaN")
        lam, U = self.lam, self.U
        D = U.shape[0]
        if threshold <= 0:
            return torch.ones(D, D, dtype=torch.bool)

        def budget_of(diag):
            # dropped columns widen the band by ≤ 1e-3 of the smallest possible threshold θ·max|M|·|piv|
            # (max|M| ≥ 1 when some row is normalised, else ≥ the largest |W_nn|)
            piv = torch.where(diag.abs() < DIAG_EPS, torch.ones_like(diag), diag).abs()
            floor = 1.0 if bool((diag.abs() >= DIAG_EPS).any()) else float(diag.abs().max())
            return 1e-3 * threshold * floor * float(piv.min())

        Fk, sign, tail, diag = _factor(lam, U, self.U2, self.colmax, sigma, budget_of)
        piv = torch.where(diag.abs() < DIAG_EPS, torch.ones_like(diag), diag)
        K = Fk.shape[1]
        # entry bound e_nm ≥ |W̃_nm − W_nm|: 2·γ_{K+3}‖f_n‖‖f_m‖ (float32 product) + √(t_n t_m) (dropped columns)
        # + underflow; as an outer product of r = √(2γ)‖f_n‖ + √t_n (cross terms only add)
        gam = 2.0 * _gamma(K + 3)
        r32 = (math.sqrt(gam) * (Fk * Fk).sum(1).sqrt() + tail.sqrt()).to(torch.float32)
        absolute = 4.0 * (K + 1) * 2.0 ** -149  # off the diagonal neither form involves the identity
        bound = torch.outer(r32, r32).add_(absolute)
        G = _upper_gram32(Fk.to(torch.float32)) if K else torch.zeros(D, D, dtype=torch.float32)
        del Fk
        W32 = G.abs_()  # |W̃| off the diagonal in both forms (W = ±F Fᵀ there); the diagonal is taken in float64
        del G
        apiv32 = piv.abs().to(torch.float32)
        f = torch.where(lam + float(sigma) ** 2 > 0, lam / (lam + float(sigma) ** 2), torch.zeros_like(lam))
        Uf = U * f[None, :]

        # max|W/piv|: the diagonal is a lower bound; recompute every off-diagonal entry that could reach it
        lower = float((diag.abs() / piv.abs()).max())
        ub = (W32 + bound).div_(apiv32[:, None])
        ub.diagonal().zero_()
        reach = ub >= lower * (1.0 - BAND_SLACK)
        del ub
        mstar = lower
        if bool(reach.any()):
            n, m, v = _exact_at(Uf, U, reach)
            mstar = max(mstar, float((v / piv[n]).abs().max()))
        del reach
        thr = threshold * mstar  # the dense rule's threshold θ·max|M|

        # decided by the float32 value outside the band, by the float64 value inside
        T32 = (thr * piv.abs()).to(torch.float32)
        mask = W32 >= T32[:, None]
        band = (W32 - T32[:, None]).abs_() <= bound.mul_(2.0).add_((BAND_SLACK * T32)[:, None])
        del W32, bound
        band.diagonal().zero_()
        mask.diagonal().copy_((diag / piv).abs() >= thr)
        self.last_band = int(band.sum())  # entries re-decided in float64 (diagnostics for the bench)
        self.last_kept = K
        if self.last_band:
            n, m, v = _exact_at(Uf, U, band)
            mask[n, m] = (v / piv[n]).abs() >= thr
        return mask


def wiener_locality_mask(eigvals: torch.Tensor, U: torch.Tensor, sigma: float, threshold: float) -> torch.Tensor:
    """One-off form of :class:`WienerMasks` (reuse an instance when several σ share the PCA)."""
    return WienerMasks(eigvals, U)(sigma, threshold)


MASK_RULES = ("engine", "studio")


def studio_locality_mask(cov: torch.Tensor, n: int, sigma: float, threshold: float,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The Analytic Diffusion Studio's locality mask (its rule, our code), (D, D) bool, mask[n, m] as ours.

    From the population covariance ``cov`` of ``n`` candidates: the unbiased covariance cov·n/(n−1) in float32,
    its SVD U·diag(λ)·Vh (float32), s = ᾱλ/(β̄+ᾱλ) with ᾱ = 1/(1+σ²), β̄ = 1−ᾱ (the VP form of λ/(λ+σ²)),
    A = U·diag(s)·Vh, rows divided by their diagonal (|diag| < 1e-6 -> 1), mask = |M| ≥ θ·max|M|; float32 at
    every step, as the studio computes it (θ ≤ 0: the full mask). ``dtype=torch.float64`` evaluates the same
    formula in float64 (tests: it isolates the formula from the float32 rounding)."""
    threshold = float(threshold)
    if math.isnan(threshold):
        raise ValueError("threshold: got NaN")
    D = cov.shape[0]
    if threshold <= 0:
        return torch.ones(D, D, dtype=torch.bool)
    if n < 2:
        raise ValueError(f"mask_rule='studio': the unbiased covariance needs at least 2 candidates, got {n}")
    S = (cov.detach().to("cpu", torch.float64) * (n / (n - 1))).to(dtype)
    Us, lam, Vh = torch.linalg.svd(S)
    abar = torch.tensor(1.0 / (1.0 + float(sigma) ** 2), dtype=dtype)
    s = abar * lam / ((1 - abar) + abar * lam)
    A = (Us * s[None, :]) @ Vh
    denom = A.diagonal().clone()
    denom[denom.abs() < DIAG_EPS] = 1.0
    M = (A / denom[:, None]).abs()
    return M >= M.max() * threshold


__all__ = ["WienerMasks", "wiener_locality_mask", "studio_locality_mask", "MASK_RULES"]
