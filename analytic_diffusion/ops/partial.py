"""Partial softmax-retrieval state, so that shards of a dataset combine exactly (DESIGN.md §5).

For one query row b over a set of candidates j with logits z_bj and values y_j:

    m_b  = max_j z_bj                      (-inf when the shard had no allowed candidate)
    l_b  = Σ_j exp(z_bj - m_b)
    l2_b = Σ_j exp(2 (z_bj - m_b))         (for the effective number of neighbours 1/Σw²)
    o_b  = Σ_j exp(z_bj - m_b) · y_j

Logits are in nats. Two states combine by rescaling to the larger max; the combine is associative and,
applied in a fixed order, deterministic.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch


@dataclass
class PartialState:
    m: torch.Tensor  # (B,)
    l: torch.Tensor  # (B,)
    l2: torch.Tensor  # (B,)
    o: torch.Tensor  # (B, D)

    @staticmethod
    def empty(batch: int, dim: int, *, dtype=torch.float32, device=None) -> "PartialState":
        return PartialState(
            m=torch.full((batch,), float("-inf"), dtype=dtype, device=device),
            l=torch.zeros(batch, dtype=dtype, device=device),
            l2=torch.zeros(batch, dtype=dtype, device=device),
            o=torch.zeros(batch, dim, dtype=dtype, device=device),
        )

    def combine(self, other: "PartialState") -> "PartialState":
        m = torch.maximum(self.m, other.m)
        finite = torch.isfinite(m)
        safe_m = torch.where(finite, m, torch.zeros_like(m))
        # A side whose max is -inf contributes nothing; exp(-inf - finite) = 0 already, but -inf - -inf is NaN.
        a = torch.where(finite, torch.exp(self.m - safe_m), torch.zeros_like(m))
        b = torch.where(finite, torch.exp(other.m - safe_m), torch.zeros_like(m))
        return PartialState(
            m=m,
            l=self.l * a + other.l * b,
            l2=self.l2 * a * a + other.l2 * b * b,
            o=self.o * a[:, None] + other.o * b[:, None],
        )

    def mean(self) -> torch.Tensor:
        """Posterior mean Σ w_j y_j. Rows with no candidate raise: a silent zero would be a wrong answer."""
        if bool((self.l <= 0).any()):
            raise ValueError("softmax retrieval: some query rows had no allowed candidate "
                             "(empty dataset shard, or no training image of the requested class)")
        return self.o / self.l[:, None]

    def max_weight(self) -> torch.Tensor:
        """Largest posterior weight: the max logit has unnormalised weight exp(0) = 1."""
        return 1.0 / self.l

    def effective_neighbours(self) -> torch.Tensor:
        """1 / Σ_j w_j², between 1 (one image takes all the weight) and N (uniform)."""
        return self.l * self.l / self.l2

    def to(self, *args, **kwargs) -> "PartialState":
        return PartialState(self.m.to(*args, **kwargs), self.l.to(*args, **kwargs),
                            self.l2.to(*args, **kwargs), self.o.to(*args, **kwargs))

    def map_values(self, fn) -> "PartialState":
        """Apply a linear map to the value sums (e.g. un-flip an image), leaving the weights alone."""
        return PartialState(self.m, self.l, self.l2, fn(self.o))


def combine_partials(states: Iterable[PartialState]) -> PartialState:
    """Combine shard states in the given order (fixed order => deterministic)."""
    out: Optional[PartialState] = None
    for s in states:
        out = s if out is None else out.combine(s)
    if out is None:
        raise ValueError("combine_partials: no partial states given")
    return out
