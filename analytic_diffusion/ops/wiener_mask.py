"""pca_locality's Wiener locality masks without the float64 D×D product (docs/methods.md §5).

The rule (:func:`analytic_diffusion.ops.local_retrieval.locality_mask` of
:func:`~analytic_diffusion.ops.local_retrieval.wiener_filter_matrix`): W = U diag(f) Uᵀ with f = λ/(λ+σ²), row n
divided by piv_n = W_nn (1 where |W_nn| < 1e-6), mask[n, m] = |W_nm / piv_n| ≥ θ·max|W/piv|. Building W in
float64 costs a dense D³ product per σ, while the decision needs float64 accuracy only near the threshold. So
:class:`WienerMasks` forms W (as F Fᵀ, or U Uᵀ − F Fᵀ when that keeps D/4 fewer columns, after dropping columns
within a bounded budget) in float32 with a rigorous per-entry error bound, forms the pivots in float64, pins
max|W/piv| and re-decides in float64 every entry within its bound of the threshold. Every entry is decided as
the float64 rule decides it, except a float64 tie (within ~1e-13 relative of the threshold);
tests/test_wiener_mask.py checks bitwise equality with the dense rule on random data and on MNIST. The five
steps, their bounds and their costs are in docs/methods.md §5.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import torch

U32 = 2.0**-24  # float32 unit roundoff
DIAG_EPS = 1e-6  # |W_nn| below this: the row is not normalised (divided by 1)
BAND_SLACK = 1e-5  # relative slack on float32 band arithmetic (each float32 op errs by ≤ 6e-8 relative)
BLOCK = 768  # block size of the upper-triangle float32 product
ENTRY_CHUNK = 2048  # entries recomputed per float64 gather


def _gamma(k: int) -> float:
    return k * U32 / (1.0 - k * U32)


def _factor(
    lam: torch.Tensor,
    U2: torch.Tensor,
    colmax: torch.Tensor,
    sigma: float,
    budget_of: Callable[[torch.Tensor], float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """(f, h, keep, tail, diag, complement): W = ±F Fᵀ (+ U Uᵀ for h = 1 − f, the complement form) + R off the
    diagonal, F = U[:, keep]·diag(√h[keep]), |R_nm| ≤ √(tail_n tail_m); f = λ/(λ+σ²); diag = W's diagonal.

    ``budget_of(diag)`` gives the largest tail allowed; columns are dropped smallest weight first while
    Σ_dropped h_k·max_n U_nk² (an upper bound of every row's dropped mass) stays within it."""
    s2 = float(sigma) ** 2
    f = torch.where(lam + s2 > 0, lam / (lam + s2), torch.zeros_like(lam))
    diag = U2 @ f
    budget = budget_of(diag)
    best: tuple[torch.Tensor, int, torch.Tensor] | None = None
    D = f.numel()
    for h in (f, 1.0 - f):
        order = torch.argsort(h, stable=True)
        ndrop = int((torch.cumsum(h[order] * colmax[order], 0) <= budget).sum())
        # I − F Fᵀ leans on U Uᵀ = I, which costs one check of U's orthogonality: only worth a quarter of D
        if best is None or ndrop > best[1] + D // 4:
            best = (h, ndrop, order)
    h, ndrop, order = cast("tuple[torch.Tensor, int, torch.Tensor]", best)  # set by the first form
    keep = torch.ones_like(h, dtype=torch.bool)
    keep[order[:ndrop]] = False
    tail = U2 @ torch.where(keep, torch.zeros_like(h), h)
    return f, h, keep, tail, diag, h is not f


def _upper_gram32(F32: torch.Tensor) -> torch.Tensor:
    """F Fᵀ in float32, computing only the blocks on and above the diagonal (the rest mirrored)."""
    D = F32.shape[0]
    out = torch.empty(D, D, dtype=torch.float32)
    for i in range(0, D, BLOCK):
        rows = F32[i : i + BLOCK]
        blk = rows @ F32[i:].t()
        out[i : i + BLOCK, i:] = blk
        out[i:, i : i + BLOCK] = blk.t()
    return out


def _exact_at(f: torch.Tensor, U: torch.Tensor, n: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """W_nm = Σ_k U_nk f_k U_mk in float64 at the listed entries; rows holding many of them as one GEMM."""
    D = U.shape[0]
    out = torch.empty(n.numel(), dtype=torch.float64)
    rows, inverse, counts = torch.unique(n, return_inverse=True, return_counts=True)
    dense = counts > D // 16
    if bool(dense.any()):
        Wr = (U[rows[dense]] * f[None, :]) @ U.t()
        slot = torch.full((rows.numel(),), -1, dtype=torch.long)
        slot[dense] = torch.arange(int(dense.sum()))
        at = (slot[inverse] >= 0).nonzero().flatten()
        out[at] = Wr[slot[inverse[at]], m[at]]
    rest = (~dense[inverse]).nonzero().flatten()
    for c in range(0, rest.numel(), ENTRY_CHUNK):
        i = rest[c : c + ENTRY_CHUNK]
        out[i] = (U[n[i]] * f[None, :] * U[m[i]]).sum(1)
    return out


class WienerMasks:
    """The masks of one PCA (eigvals descending ≥ 0, U columns) for any σ: holds the float64 factors and the
    per-coordinate quantities that do not depend on σ, so that a new σ costs only the steps above."""

    def __init__(self, eigvals: torch.Tensor, U: torch.Tensor) -> None:
        self.lam = eigvals.detach().to("cpu", torch.float64).clamp_min(0.0)
        self.U = U.detach().to("cpu", torch.float64).contiguous()
        if self.U.dim() != 2 or self.U.shape[0] != self.U.shape[1] or self.lam.shape != (self.U.shape[1],):
            raise ValueError(
                f"U: expected a square (D, D) matrix and D eigenvalues, got {tuple(self.U.shape)} and "
                f"{tuple(self.lam.shape)}"
            )
        self.U2 = self.U * self.U
        self.U32 = self.U.to(torch.float32)
        self.colmax = self.U2.max(0).values
        self._defect: float | None = None

    def orthogonality_defect(self) -> float:
        """An upper bound of max_{n≠m} |(U Uᵀ)_nm| (computed once: one float64 product, plus its rounding)."""
        if self._defect is None:
            G = self.U @ self.U.t()
            G.diagonal().zero_()
            D = self.U.shape[0]
            self._defect = float(G.abs().max()) * (1 + 1e-6) + 2.0 * (D + 2) * 2.0**-53
        return self._defect

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

        def budget_of(diag: torch.Tensor) -> float:
            # dropped columns widen the band by ≤ 1e-3 of the smallest possible threshold θ·max|M|·|piv|
            # (max|M| ≥ 1 when some row is normalised, else ≥ the largest |W_nn|)
            piv = torch.where(diag.abs() < DIAG_EPS, torch.ones_like(diag), diag).abs()
            floor = 1.0 if bool((diag.abs() >= DIAG_EPS).any()) else float(diag.abs().max())
            return 1e-3 * threshold * floor * float(piv.min())

        f, h, keep, tail, diag, complement = _factor(lam, self.U2, self.colmax, sigma, budget_of)
        piv = torch.where(diag.abs() < DIAG_EPS, torch.ones_like(diag), diag)
        apiv = piv.abs()
        K = int(keep.sum())
        # F in float32 from the float32 copy of U: each entry is F_nk(1 + δ), |δ| ≤ 4u. The float32 product then
        # errs by ≤ γ_{K+9}·Σ_k |F_nk F_mk| ≤ γ_{K+9}·‖F_n‖‖F_m‖ (any summation order); taken twice for margin.
        # Entry bound e_nm = 2γ‖F_n‖‖F_m‖ + √(t_n t_m) (dropped columns) + underflow, as the outer product of
        # r = √(2γ)‖F_n‖ + √t_n (cross terms only add).
        sq = h.sqrt().to(torch.float32)
        F32 = self.U32 * sq[None, :] if K == D else self.U32[:, keep] * sq[keep][None, :]
        gam = 2.0 * _gamma(K + 9)
        norms = (self.U2 @ torch.where(keep, h, torch.zeros_like(h))).clamp_min(0.0).sqrt()
        r = math.sqrt(gam) * norms + tail.sqrt()  # float64
        absolute = 4.0 * (K + 1) * 2.0**-149  # float32 underflow
        if complement:  # W_nm = (U Uᵀ)_nm − (F Fᵀ)_nm off the diagonal: add U's measured orthogonality defect
            absolute += self.orthogonality_defect()
        self.last_complement = complement
        W32 = _upper_gram32(F32).abs_() if K else torch.zeros(D, D, dtype=torch.float32)
        del F32
        W32.diagonal().zero_()  # |W̃| off the diagonal in both forms (W = ±F Fᵀ there); the diagonal is float64
        rmax = float(r.max())

        # max|W/piv|: the diagonal is a lower bound; recompute every off-diagonal entry that could reach it.
        # A row can only if (its largest |W̃| + r_n·max r + underflow) / |piv_n| does (a row-level upper bound).
        lower = float((diag.abs() / apiv).max())
        rowmax = W32.max(1).values.to(torch.float64)
        cut = lower * (1.0 - BAND_SLACK)
        rows = (((rowmax * (1 + BAND_SLACK) + r * rmax + absolute) / apiv) >= cut).nonzero().flatten()
        mstar = lower
        if rows.numel():
            sub = W32[rows].to(torch.float64)
            ub = (sub + r[rows, None] * r[None, :] + absolute) * (1 + BAND_SLACK) / apiv[rows, None]
            ub[torch.arange(rows.numel()), rows] = 0.0
            i, m = (ub >= cut).nonzero(as_tuple=True)
            if i.numel():
                n = rows[i]
                mstar = max(mstar, float((_exact_at(f, self.U, n, m) / piv[n]).abs().max()))
        thr = threshold * mstar  # the dense rule's threshold θ·max|M|

        # decided by the float32 value outside the band |W̃ − T_n| ≤ 2e_nm + slack·T_n, in float64 inside it.
        # Candidates first with a row-level half-width (max r for r_m, slightly wider), then the exact band.
        T = thr * apiv
        half = 2.0 * (r * rmax + absolute) * (1 + 2 * BAND_SLACK) + 2 * BAND_SLACK * T  # ⊇ the band, rounding too
        lo32, hi32 = (T - half).to(torch.float32), (T + half).to(torch.float32)
        mask = T.to(torch.float32)[:, None] <= W32
        cand = (lo32[:, None] <= W32).logical_and_(hi32[:, None] >= W32)
        cand.diagonal().zero_()
        n, m = cand.nonzero(as_tuple=True)
        del cand
        w = W32[n, m].to(torch.float64)
        del W32
        inside = (w - T[n]).abs() <= 2.0 * (r[n] * r[m] + absolute) * (1 + BAND_SLACK) + BAND_SLACK * T[n]
        n, m = n[inside], m[inside]
        mask.diagonal().copy_((diag / piv).abs() >= thr)
        self.last_band, self.last_kept = int(n.numel()), K  # diagnostics (bench): entries re-decided, columns kept
        if n.numel():
            mask[n, m] = (_exact_at(f, self.U, n, m) / piv[n]).abs() >= thr
        return mask


MASK_RULES = ("engine", "studio")


def studio_locality_mask(
    cov: torch.Tensor, n: int, sigma: float, threshold: float, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The Analytic Diffusion Studio's locality mask (its rule, our code), (D, D) bool, mask[n, m] as ours.

    From the population covariance ``cov`` of ``n`` candidates: the unbiased covariance cov·n/(n−1) in float32,
    its SVD U·diag(λ)·Vh (float32), s = ᾱλ/(β̄+ᾱλ) with ᾱ = 1/(1+σ²), β̄ = 1−ᾱ (the VP form of λ/(λ+σ²)),
    A = U·diag(s)·Vh, rows divided by their diagonal (|diag| < 1e-6 -> 1), mask = |M| ≥ θ·max|M|; float32 at
    every step, as the studio computes it (θ ≤ 0: the full mask). ``dtype=torch.float64`` evaluates the same
    formula in float64 (tests: it isolates the formula from the float32 rounding)."""
    threshold = float(threshold)
    if math.isnan(threshold):
        raise ValueError("threshold: got NaN")
    if threshold <= 0:
        return torch.ones(cov.shape[0], cov.shape[0], dtype=torch.bool)
    return studio_mask(studio_factors(cov, n, dtype), sigma, threshold)


def studio_factors(
    cov: torch.Tensor, n: int, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The σ-independent part of :func:`studio_locality_mask`: the SVD (U, λ, Vh) of the unbiased covariance."""
    if n < 2:
        raise ValueError(f"mask_rule='studio': the unbiased covariance needs at least 2 candidates, got {n}")
    S = (cov.detach().to("cpu", torch.float64) * (n / (n - 1))).to(dtype)
    return torch.linalg.svd(S)


def studio_mask(
    factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor], sigma: float, threshold: float
) -> torch.Tensor:
    """The per-σ part of :func:`studio_locality_mask` from :func:`studio_factors` (threshold > 0)."""
    Us, lam, Vh = factors
    abar = torch.tensor(1.0 / (1.0 + float(sigma) ** 2), dtype=lam.dtype)
    s = abar * lam / ((1 - abar) + abar * lam)
    A = (Us * s[None, :]) @ Vh
    denom = A.diagonal().clone()
    denom[denom.abs() < DIAG_EPS] = 1.0
    M = (A / denom[:, None]).abs()
    return M.max() * threshold <= M


__all__ = ["MASK_RULES", "WienerMasks", "studio_factors", "studio_locality_mask", "studio_mask"]
