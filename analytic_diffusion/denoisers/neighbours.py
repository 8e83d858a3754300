"""Denoisers built on the exact k-nearest-neighbour scan: top-k posterior, nearest image, kNN estimator."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch

from ..ops import KeyBank, all_labels, gather_rows, knn_search, subset
from .base import Posterior
from .gradients import centred_covariance_product
from .optimal import RetrievalDenoiser
from .sample_seeds import row_generators

if TYPE_CHECKING:
    from ..data import Dataset

# The working-dtype screen may mis-rank near-ties at the k-th place: it starts this many wider, and is widened
# (doubled) until an error bound proves that it holds the k nearest by float64 distance (_screen).
RESCORE_MARGIN = 8
# Relative weight below which a candidate's row is left out of the weighted mean (see _softmax_summary).
NEGLIGIBLE_WEIGHT = 2.0**-64


def _coef(s: torch.Tensor, temperature: float) -> torch.Tensor:
    """1 / (2σ²T) in float64, clamped to the largest finite value (σ → 0: logits −inf, never NaN)."""
    c = 1.0 / (2.0 * s.double() ** 2 * temperature)
    return c.clamp_max(torch.finfo(torch.float64).max)


def _softmax_summary(
    logits: torch.Tensor, index: torch.Tensor, keys: KeyBank, flips: bool, extra_weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Self-normalised weights over (B, K) logits (−inf allowed, the largest finite) of the candidates ``index``
    with optional multipliers -> (mean, max w, 1/Σw²), in float64; a row-by-row reduction so that the batch never
    changes a row. The mean is a weighted sum over the listed rows (:func:`..ops.subset.weighted_sum`): on the CPU
    nothing of shape (B, K, D) is built."""
    w = torch.exp(logits - logits.max(1, keepdim=True).values)
    if extra_weight is not None:
        w = w * extra_weight
    w = w / w.sum(1, keepdim=True)
    wmax = w.max(1, keepdim=True).values
    # Rows weighing under 2^-64 of the largest move the mean by at most K·2^-64 of the data's range (below float64
    # resolution for any K here): the weighted sum skips them, which at low σ is nearly all of them.
    mean = subset.weighted_sum(keys, index, w.masked_fill(w < wmax * NEGLIGIBLE_WEIGHT, 0.0), flips=flips)
    return mean, wmax[:, 0], 1.0 / (w * w).sum(1)


# A candidate whose logit is provably below the nearest's by more than this (nats) weighs under 2^-64 of it:
# 64 ln 2 = 44.4, plus a margin for the float64 rounding of the logits themselves.
NEGLIGIBLE_LOGIT_GAP = 46.0


def _row_norm_max(keys: KeyBank) -> float:
    """max_j ‖y_j‖₂ over the stored rows (mirrored rows have the same norms), in float64, kept with the dataset;
    over every shard when the bank is one rank's shard (a collective, the same value on every rank)."""

    def make() -> float:
        step = max(1, (1 << 22) // max(1, keys.dim))
        local = max(
            float(keys.rows(s, min(s + step, keys.n), torch.float64).norm(dim=1).max()) for s in range(0, keys.n, step)
        )
        if keys.shard is None:
            return local
        return max(float(v) for v in keys.shard.group.all_gather(torch.tensor([local]), "row norms"))

    return keys.cached("row_norm_max", make)


def _screen_error(den: RetrievalDenoiser, q: torch.Tensor, dtype: torch.dtype) -> tuple[float, torch.Tensor]:
    """(γ, A (B,)): a screen distance d̃ computed in ``dtype`` and the true ‖q − y‖² = d satisfy
    √(d̃ / (1 + γ)) − A ≤ √d ≤ √(d̃ / (1 − γ)) + A.

    The screen computes ‖q̃ − ỹ‖² with q̃, ỹ the query and row rounded to the working dtype (unit roundoff u) as a
    sum, in any order, of D rounded non-negative terms: its value is within a factor 1 ± γ, γ = (D + 2)u / (1 − (D + 2)u),
    of ‖q̃ − ỹ‖², and ‖q̃ − ỹ‖ is within A = 4u(‖q‖ + 2 max‖y‖ + 2√D |shift|) of ‖q − y‖ (generous for the affine
    map's rounding)."""
    keys = den.keys
    u = torch.finfo(dtype).eps / 2
    dim = keys.dim
    gamma = (dim + 2) * u / (1 - (dim + 2) * u)
    a = 4 * u * (q.detach().double().norm(dim=1) + 2 * _row_norm_max(keys) + 2 * dim**0.5 * abs(keys.shift))
    return gamma, a


def _negligible(
    den: RetrievalDenoiser, q: torch.Tensor, d2: torch.Tensor, valid: torch.Tensor, coef: torch.Tensor
) -> torch.Tensor:
    """(B, S) bool: screened candidates whose weight is provably under 2^-64 of the row's nearest, from the screen's
    working-dtype direct distances alone (their float64 distances need not be computed).

    By :func:`_screen_error`, ‖q − y_j‖² ≥ L_j = (√(d_j / (1 + γ)) − A)²₊ and the nearest's true distance is at most
    U = (√(d_0 / (1 − γ)) + A)²; a candidate with coef · (L_j − U) > NEGLIGIBLE_LOGIT_GAP weighs under 2^-64.
    Empty for a sharded bank.
    """
    skip = torch.zeros_like(valid)
    if den.keys.shard is not None or d2.shape[1] < 2:
        return skip
    gamma, a = _screen_error(den, q, d2.dtype)
    d = torch.where(valid, d2.detach().double(), torch.zeros_like(d2, dtype=torch.float64)).clamp_min(0)
    lower = ((d / (1 + gamma)).sqrt() - a[:, None]).clamp_min(0) ** 2
    upper = ((d[:, :1] / (1 - gamma)).sqrt() + a[:, None]) ** 2
    skip = valid & (coef[:, None] * (lower - upper) > NEGLIGIBLE_LOGIT_GAP)
    skip[:, 0] = False  # the screen's nearest is the reference row
    return skip


def _screen(
    den: RetrievalDenoiser, q: torch.Tensor, k: int, labels: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d2, index) of a working-dtype k-NN screen that provably holds each row's k nearest by exact distance.

    A row's screen of s candidates is complete when it holds every allowed candidate, or when no unscreened
    candidate can beat its k-th: every unscreened one has a screen distance ≥ d̃_(s), so a true distance
    ≥ L = (√(d̃_(s)/(1 + γ)) − A)²₊, and k screened ones have true distances ≤ U = (√(d̃_(k)/(1 − γ)) + A)²
    (:func:`_screen_error`); L > U proves it. Rows not yet proven are screened again twice as wide. A count alone
    (k + 8) is no proof: more than 8 candidates within float32 resolution of the k-th distance made float32 and
    float64 keep different sets. Each row's screen depends on that row only, so the batch changes nothing; rows of
    different widths are padded with (inf, −1).
    """
    n = den.num_candidates
    width = min(n, k + RESCORE_MARGIN)
    d2, idx = knn_search(q, den.keys, width, query_labels=labels, **den._retrieval_kwargs())
    rows = torch.arange(q.shape[0], device=q.device)
    while width < n:
        d = d2[rows].double()
        gamma, a = _screen_error(den, q[rows], d2.dtype)
        exhausted = ~torch.isfinite(d[:, width - 1]) | (idx[rows, width - 1] < 0)
        lower = ((d[:, width - 1].clamp_min(0) / (1 + gamma)).sqrt() - a).clamp_min(0) ** 2
        upper = ((d[:, k - 1].clamp_min(0) / (1 - gamma)).sqrt() + a) ** 2
        rows = rows[~(exhausted | (lower > upper))]
        if rows.numel() == 0:
            break
        width = min(n, 2 * width)
        more_d, more_i = knn_search(
            q[rows], den.keys, width, query_labels=None if labels is None else labels[rows], **den._retrieval_kwargs()
        )
        pad = width - d2.shape[1]
        d2 = torch.cat([d2, torch.full((d2.shape[0], pad), float("inf"), dtype=d2.dtype, device=d2.device)], 1)
        idx = torch.cat([idx, torch.full((idx.shape[0], pad), -1, dtype=idx.dtype, device=idx.device)], 1)
        d2[rows], idx[rows] = more_d, more_i
    return d2, idx


def _nearest_exact(
    den: RetrievalDenoiser, q: torch.Tensor, k: int, labels: torch.Tensor | None, coef: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest allowed candidates per row, ranked in float64 (ties: lower index).

    Returns (index (B, k), rel d2 (B, k) float64 relative to the row's nearest). A row with fewer than k allowed
    candidates has index −1 (and rel +inf) in its last slots. The working-dtype screen provably holds the k
    nearest (:func:`_screen`), so the k-th boundary is decided in float64 whatever ``dtype``; the float64 distances come from
    :func:`..ops.subset.relative_d2` (C++ on the CPU, straight from the stored rows).

    With ``coef`` (1/2σ²T per row), candidates that the screen's distances already prove to weigh under 2^-64 of
    the nearest (:func:`_negligible`) are not rescored: they keep their index, rank after the rescored ones in the
    screen's order, and get rel = +inf (weight 0, a change of the mean below K·2^-64 of the data's range).
    """
    d2, idx = _screen(den, q, k, labels)
    valid = torch.isfinite(d2) & (idx >= 0)
    idx = torch.where(valid, idx, torch.full_like(idx, -1))
    ref = idx[:, 0].clamp_min(0)  # every row has an allowed candidate (the class check ran before)
    skip = _negligible(den, q, d2, valid, coef) if coef is not None else torch.zeros_like(valid)
    rel = subset.relative_d2(q, den.keys, torch.where(skip, torch.full_like(idx, -1), idx), ref, flips=den.flips)
    # rank by (float64 distance, index). The screen's order is by (working-dtype distance, index): one stable sort
    # by distance settles every pair unless two float64 distances tie, and then only an index-first order is right.
    order = torch.argsort(rel, dim=1, stable=True)
    r, i = torch.gather(rel, 1, order), torch.gather(idx, 1, order)
    if bool(((r[:, 1:] == r[:, :-1]) & torch.isfinite(r[:, 1:]) & (i[:, 1:] < i[:, :-1])).any()):
        order = torch.argsort(torch.where(valid, idx, torch.full_like(idx, 2**62)), dim=1)
        order = torch.gather(order, 1, torch.argsort(torch.gather(rel, 1, order), dim=1, stable=True))
    order = order[:, :k]
    idx, rel = torch.gather(idx, 1, order), torch.gather(rel, 1, order)
    # relative to the (new) nearest, whose logit is then exactly 0: recomputed only for the rows whose float64
    # nearest is not the screen's (a near-tie at the top)
    moved = torch.nonzero(idx[:, 0] != ref).reshape(-1)
    if moved.numel():
        again = subset.relative_d2(q[moved], den.keys, idx[moved], idx[moved, 0], flips=den.flips)
        rel = rel.index_put((moved,), again)
    return idx, rel


def _exact_mask(idx: torch.Tensor, total: int) -> torch.Tensor:
    """(B, total) bool: the candidates a row took among its exact neighbours (index −1: none)."""
    m = torch.zeros(idx.shape[0], total, dtype=torch.bool, device=idx.device)
    valid = idx >= 0
    b = torch.arange(idx.shape[0], device=idx.device)[:, None].expand_as(idx)
    m[b[valid], idx[valid]] = True
    return m


class TopK(RetrievalDenoiser):
    """The posterior restricted to the k nearest training images by exact distance (the studio uses k = 200).

    ``k=None`` means 200, or every candidate when the dataset has fewer.
    """

    name = "topk"
    hidden_options = ("tolerance",)  # ranks by exact k-NN distances: no softmax tail to prune

    def __init__(self, dataset: Dataset, k: int | None = None, **kw: Any) -> None:
        super().__init__(dataset, **kw)
        if k is None:
            k = min(200, self.num_candidates)
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k: expected a positive integer, got {k!r}")
        if k > self.num_candidates:
            raise ValueError(f"k: {k} exceeds the {self.num_candidates} training candidates")
        self.k = k

    def _scored(
        self, x: torch.Tensor, s: torch.Tensor, labels: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(candidate indices (B, k), float64 logits (B, k), 1/(2σ²T)) of the k nearest: the posterior's support."""
        coef = _coef(s, self.temperature)
        idx, rel = _nearest_exact(self, x.reshape(x.shape[0], -1), self.k, labels, coef)
        return idx, torch.where(idx >= 0, -rel * coef[:, None], float("-inf")), coef

    def _posterior(self, x: torch.Tensor, s: torch.Tensor, labels: torch.Tensor | None) -> Posterior:
        idx, logits, _ = self._scored(x, s, labels)
        mean, wmax, neff = _softmax_summary(logits, idx, self.keys, self.flips)
        return Posterior(mean.reshape(x.shape).to(x.dtype), wmax.to(self.dtype), neff.to(self.dtype))

    def _has_exact_jacobian(self) -> bool:
        return True

    def _exact_jvp(
        self, x: torch.Tensor, s: torch.Tensor, labels: torch.Tensor | None, v: torch.Tensor
    ) -> torch.Tensor:
        """J·v = Cov_w[y | top k] v / σ²T: the optimal identity over the k retained images (the top-k set is
        locally constant, so it does not move with x). Autograd gets the same from the float64 formula above."""
        idx, logits, coef = self._scored(x, s, labels)
        rows = gather_rows(self.keys, idx.clamp_min(0), torch.float64)
        w = torch.softmax(logits, 1)  # (B, k) float64; the nearest has logit 0, so no row is all -inf
        vf = v.reshape(v.shape[0], -1).double()
        # centred on the heaviest row: E[y (y·v)] − m (m·v) cancels to |y|²·2^-53 where the posterior collapsed
        return centred_covariance_product(w, rows, vf, coef).reshape(x.shape).to(self.dtype)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "k": self.k}


class Nearest(RetrievalDenoiser):
    """The training image nearest to x. In σ-space this is noise-aware: it is the σ → 0 limit of ``optimal``."""

    name = "nearest"
    hidden_options = ("tolerance",)  # ranks by exact k-NN distances: no softmax tail to prune

    def _posterior(self, x: torch.Tensor, s: torch.Tensor, labels: torch.Tensor | None) -> Posterior:
        _, idx = knn_search(x.reshape(x.shape[0], -1), self.keys, 1, query_labels=labels, **self._retrieval_kwargs())
        rows = gather_rows(self.keys, idx[:, 0], self.dtype)
        one = torch.ones(x.shape[0], dtype=self.dtype, device=x.device)
        return Posterior(rows.reshape(x.shape).to(x.dtype), one, one)

    def denoise(self, x: torch.Tensor, s: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        out = self._posterior(x, s, labels).mean
        # Piecewise constant in x: its Jacobian is 0 wherever it is defined (off the ties). Adding 0·x gives
        # autograd that zero instead of a "does not require grad" error in a larger graph.
        return out + x.mul(0) if torch.is_grad_enabled() and x.requires_grad else out

    def _has_exact_jacobian(self) -> bool:
        return True

    def _exact_jvp(
        self, x: torch.Tensor, s: torch.Tensor, labels: torch.Tensor | None, v: torch.Tensor
    ) -> torch.Tensor:
        return torch.zeros_like(x, dtype=self.dtype)


class KNNEstimator(RetrievalDenoiser):
    """Nearest-neighbour importance-sampled posterior mean (Niedoba et al., arXiv 2402.08018).

    The k nearest candidates enter exactly; the tail (every other allowed candidate) is estimated from
    ``ref_size`` candidates drawn uniformly without replacement, each standing for (N_tail / ref_size)
    candidates. Weights are self-normalised over both parts. With k ≥ N (no tail) this is the exact posterior
    mean. Each query's tail draws come from a stream of its own, seeded by a hash of (``seed``, the sample's
    identity in the sampler, σ, label) (:mod:`.sample_seeds`), never from the sampler's streams nor from x's
    values: batch size, call order and the number of samples change nothing, shards and instruction sets only
    by rounding.
    """

    name = "knn"
    hidden_options = ("tolerance",)  # ranks by exact k-NN distances: no softmax tail to prune

    def __init__(self, dataset: Dataset, k: int = 2048, ref_size: int = 256, seed: int = 0, **kw: Any) -> None:
        super().__init__(dataset, **kw)
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k: expected a positive integer, got {k!r}")
        if not isinstance(ref_size, int) or ref_size < 0:
            raise ValueError(f"ref_size: expected a non-negative integer, got {ref_size!r}")
        self.k = min(k, self.num_candidates)
        self.ref_size = ref_size
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
        self.seed = seed

    def _allowed(self, labels: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        """(B, N_total) bool: candidates each query may use (class filter; flipped copies share labels)."""
        if labels is None:
            return torch.ones(batch, self.num_candidates, dtype=torch.bool, device=device)
        key_labels = cast(torch.Tensor, all_labels(self.keys)).to(device)  # class labels: the dataset has labels
        if self.flips:
            key_labels = torch.cat([key_labels, key_labels])
        return key_labels[None, :] == labels[:, None]

    def _posterior(self, x: torch.Tensor, s: torch.Tensor, labels: torch.Tensor | None) -> Posterior:
        q = x.reshape(x.shape[0], -1)
        B = q.shape[0]
        allowed = self._allowed(labels, B, q.device)
        # Each row keeps min(k, its allowed count) exact neighbours (padding slots are not valid): no row's
        # answer depends on the classes of the other rows in its batch.
        k = min(self.k, int(allowed.sum(1).max()))
        coef = _coef(s, self.temperature)
        idx, rel = _nearest_exact(self, q, k, labels, coef)
        logits = torch.where(idx >= 0, -rel * coef[:, None], float("-inf"))
        mult = torch.ones_like(logits)
        tail = allowed & ~_exact_mask(idx, allowed.shape[1])
        n_tail = tail.sum(1)
        draws = min(self.ref_size, int(n_tail.max()))
        if draws > 0:
            # Uniform sampling without replacement per row: the top-L of iid uniforms over the allowed tail,
            # each row from its own stream (a pure function of the row).
            gens = row_generators(self.name, self.seed, s, labels)
            u = torch.stack([torch.rand(tail.shape[1], generator=g, dtype=torch.float64) for g in gens]).to(q.device)
            u = torch.where(tail, u, torch.full_like(u, -1.0))
            tidx = torch.topk(u, draws, dim=1).indices
            tvalid = torch.gather(tail, 1, tidx)  # rows whose tail is shorter than L pick some invalid slots
            taken = tvalid.sum(1).clamp_min(1).double()
            tidx = torch.where(tvalid, tidx, torch.full_like(tidx, -1))
            trel = subset.relative_d2(q, self.keys, tidx, idx[:, 0], flips=self.flips)
            tlogits = torch.where(tvalid, -trel * coef[:, None], float("-inf"))
            logits = torch.cat([logits, tlogits], 1)
            idx = torch.cat([idx, tidx], 1)
            mult = torch.cat([mult, (n_tail.double() / taken)[:, None].expand(B, draws)], 1)
        mean, wmax, neff = _softmax_summary(logits, idx, self.keys, self.flips, mult)
        return Posterior(mean.reshape(x.shape).to(x.dtype), wmax.to(self.dtype), neff.to(self.dtype))

    def config(self) -> dict[str, Any]:
        return {**super().config(), "k": self.k, "ref_size": self.ref_size, "seed": self.seed}
