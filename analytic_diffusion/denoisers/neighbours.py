"""Denoisers built on the exact k-nearest-neighbour scan: top-k posterior, nearest image, kNN estimator."""
from __future__ import annotations

from typing import Optional

import torch

from ..ops import all_labels, gather_rows, knn_search
from .base import Posterior
from .optimal import RetrievalDenoiser


def _softmax_summary(logits: torch.Tensor, rows: torch.Tensor, extra_weight=None):
    """Self-normalised weights over (B, K) logits (−inf allowed) with optional multipliers -> (mean, max w, 1/Σw²)."""
    w = torch.exp(logits - logits.max(1, keepdim=True).values)
    if extra_weight is not None:
        w = w * extra_weight
    w = w / w.sum(1, keepdim=True)
    mean = torch.einsum("bk,bkd->bd", w, rows)
    return mean, w.max(1).values, 1.0 / (w * w).sum(1)


class TopK(RetrievalDenoiser):
    """The posterior restricted to the k nearest training images by exact distance (the studio uses k = 200).

    ``k=None`` means 200, or every candidate when the dataset has fewer.
    """

    name = "topk"

    def __init__(self, dataset, k: Optional[int] = None, **kw):
        super().__init__(dataset, **kw)
        if k is None:
            k = min(200, self.num_candidates)
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k: expected a positive integer, got {k!r}")
        if k > self.num_candidates:
            raise ValueError(f"k: {k} exceeds the {self.num_candidates} training candidates")
        self.k = k

    def _posterior(self, x, s, labels) -> Posterior:
        q = x.reshape(x.shape[0], -1)
        d2, idx = knn_search(q, self.keys, self.k, query_labels=labels, **self._retrieval_kwargs())
        logits = -d2.to(self.dtype) / (2.0 * s[:, None].to(self.dtype) ** 2 * self.temperature)
        rows = gather_rows(self.keys, idx.clamp_min(0), self.dtype)
        mean, wmax, neff = _softmax_summary(logits, rows)
        return Posterior(mean.reshape(x.shape).to(x.dtype), wmax, neff)

    def config(self):
        return {**super().config(), "k": self.k}


class Nearest(RetrievalDenoiser):
    """The training image nearest to x. In σ-space this is noise-aware: it is the σ → 0 limit of ``optimal``."""

    name = "nearest"

    def _posterior(self, x, s, labels) -> Posterior:
        _, idx = knn_search(x.reshape(x.shape[0], -1), self.keys, 1, query_labels=labels,
                            **self._retrieval_kwargs())
        rows = gather_rows(self.keys, idx[:, 0], self.dtype)
        one = torch.ones(x.shape[0], dtype=self.dtype, device=x.device)
        return Posterior(rows.reshape(x.shape).to(x.dtype), one, one)


class KNNEstimator(RetrievalDenoiser):
    """Nearest-neighbour importance-sampled posterior mean (Niedoba et al., arXiv 2402.08018).

    The k nearest candidates enter exactly; the tail (every other allowed candidate) is estimated from
    ``ref_size`` candidates drawn uniformly without replacement, each standing for (N_tail / ref_size)
    candidates. Weights are self-normalised over both parts. With k ≥ N (no tail) this is the exact posterior
    mean; the estimate draws from a generator of its own (``seed``), never from the sampler's.
    """

    name = "knn"

    def __init__(self, dataset, k: int = 2048, ref_size: int = 256, seed: int = 0, **kw):
        super().__init__(dataset, **kw)
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k: expected a positive integer, got {k!r}")
        if not isinstance(ref_size, int) or ref_size < 0:
            raise ValueError(f"ref_size: expected a non-negative integer, got {ref_size!r}")
        self.k = min(k, self.num_candidates)
        self.ref_size = ref_size
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def _allowed(self, labels, batch, device):
        """(B, N_total) bool: candidates each query may use (class filter; flipped copies share labels)."""
        if labels is None:
            return torch.ones(batch, self.num_candidates, dtype=torch.bool, device=device)
        key_labels = all_labels(self.keys).to(device)
        if self.flips:
            key_labels = torch.cat([key_labels, key_labels])
        return key_labels[None, :] == labels[:, None]

    def _posterior(self, x, s, labels) -> Posterior:
        q = x.reshape(x.shape[0], -1)
        B = q.shape[0]
        allowed = self._allowed(labels, B, q.device)
        k = min(self.k, int(allowed.sum(1).min()))
        d2, idx = knn_search(q, self.keys, k, query_labels=labels, **self._retrieval_kwargs())
        coef = 1.0 / (2.0 * s.to(self.dtype) ** 2 * self.temperature)
        logits = -d2.to(self.dtype) * coef[:, None]
        rows = gather_rows(self.keys, idx, self.dtype)
        mult = torch.ones_like(logits)
        tail = allowed.clone()
        tail.scatter_(1, idx, False)
        n_tail = tail.sum(1)
        draws = min(self.ref_size, int(n_tail.max()))
        if draws > 0:
            # Uniform sampling without replacement per row: the top-L of iid uniforms over the allowed tail.
            u = torch.rand(tail.shape, generator=self.generator, dtype=torch.float64).to(q.device)
            u = torch.where(tail, u, torch.full_like(u, -1.0))
            tidx = torch.topk(u, draws, dim=1).indices
            valid = torch.gather(tail, 1, tidx)  # rows whose tail is shorter than L pick some invalid slots
            taken = valid.sum(1).clamp_min(1).to(self.dtype)
            trows = gather_rows(self.keys, tidx, self.dtype)
            td2 = ((q[:, None, :].to(self.dtype) - trows) ** 2).sum(-1)
            tlogits = torch.where(valid, -td2 * coef[:, None], torch.full_like(td2, float("-inf")))
            logits = torch.cat([logits, tlogits], 1)
            rows = torch.cat([rows, trows], 1)
            mult = torch.cat([mult, (n_tail.to(self.dtype) / taken)[:, None].expand(B, draws)], 1)
        mean, wmax, neff = _softmax_summary(logits, rows, mult)
        return Posterior(mean.reshape(x.shape).to(x.dtype), wmax, neff)

    def config(self):
        return {**super().config(), "k": self.k, "ref_size": self.ref_size, "seed": self.seed}
