"""Partial softmax-retrieval state, so that shards of a dataset combine exactly (docs/design.md §6).

For one query row b over a set of candidates j with logits z_bj and values y_j:

    m_b  = max_j z_bj                      (-inf when the shard had no allowed candidate)
    l_b  = Σ_j exp(z_bj - m_b)
    l2_b = Σ_j exp(2 (z_bj - m_b))         (for the effective number of neighbours 1/Σw²)
    o_b  = Σ_j exp(z_bj - m_b) · y_j

Logits are in nats. Two states combine by rescaling to the larger max; the combine is associative and,
applied in a fixed order, deterministic.

Optional second moment (``o2``, None unless asked for, so the default path carries nothing extra):

    o2_b = Σ_j exp(z_bj - m_b) · (y_j − μ_b)²,   μ_b = o_b / l_b          (per value coordinate)

i.e. the *centred* unnormalised second moment, so that the posterior variance is o2 / l. It is stored centred
about the state's own mean (Chan, Golub & LeVeque's pairwise update) rather than as Σ p·y²: the raw second
moment minus mean² cancels catastrophically when the spread is small next to |y| (data far from the origin,
or σ → 0 where the variance vanishes), while the centred form combines shards with only well-conditioned
terms and does not depend on any shard's own reference point (each shard may centre its data differently).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, cast

import torch


def output_buffers(
    poison: bool, device: torch.device | str | None, *shapes: tuple[int, ...]
) -> tuple[torch.Tensor, ...]:
    """float32 arrays for a kernel's partial outputs: zeros, or NaN when ``poison`` (tests), so that a kernel
    that leaves any element unwritten fails loudly."""
    fill = float("nan") if poison else 0.0
    return tuple(torch.full(shape, fill, dtype=torch.float32, device=device) for shape in shapes)


@dataclass
class PartialState:
    m: torch.Tensor  # (B,)
    l: torch.Tensor  # (B,)
    l2: torch.Tensor  # (B,)
    o: torch.Tensor  # (B, D)
    o2: torch.Tensor | None = None  # (B, D) centred second moment Σ p (y − o/l)², only when asked for

    @staticmethod
    def empty(
        batch: int,
        dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        second_moment: bool = False,
    ) -> PartialState:
        return PartialState(
            m=torch.full((batch,), float("-inf"), dtype=dtype, device=device),
            l=torch.zeros(batch, dtype=dtype, device=device),
            l2=torch.zeros(batch, dtype=dtype, device=device),
            o=torch.zeros(batch, dim, dtype=dtype, device=device),
            o2=torch.zeros(batch, dim, dtype=dtype, device=device) if second_moment else None,
        )

    def combine(self, other: PartialState) -> PartialState:
        m = torch.maximum(self.m, other.m)
        finite = torch.isfinite(m)
        safe_m = torch.where(finite, m, torch.zeros_like(m))
        # A side whose max is -inf contributes nothing; exp(-inf - finite) = 0 already, but -inf - -inf is NaN.
        a = torch.where(finite, torch.exp(self.m - safe_m), torch.zeros_like(m))
        b = torch.where(finite, torch.exp(other.m - safe_m), torch.zeros_like(m))
        if (self.o2 is None) != (other.o2 is None):
            raise ValueError(
                "PartialState.combine: one state carries the second moment (o2) and the other "
                "does not; compute every shard with second_moment=True"
            )
        la, lb = self.l * a, other.l * b
        l = la + lb
        o2 = None
        if self.o2 is not None:
            # Chan et al.: M2 = M2_a + M2_b + (l_a l_b / l) (μ_b − μ_a)², each side rescaled to the common max.
            # A side with no weight (l = 0) has an undefined mean; its factor l_a l_b / l is 0 then.
            mu_a = self.o / torch.where(self.l > 0, self.l, torch.ones_like(self.l))[:, None]
            mu_b = other.o / torch.where(other.l > 0, other.l, torch.ones_like(other.l))[:, None]
            f = torch.where(l > 0, la * lb / torch.where(l > 0, l, torch.ones_like(l)), torch.zeros_like(l))
            delta = mu_b - mu_a
            # other.o2 is set too: the check above
            o2 = self.o2 * a[:, None] + cast(torch.Tensor, other.o2) * b[:, None] + f[:, None] * delta * delta
        return PartialState(
            m=m,
            l=l,
            l2=self.l2 * a * a + other.l2 * b * b,
            o=self.o * a[:, None] + other.o * b[:, None],
            o2=o2,
        )

    def mean(self) -> torch.Tensor:
        """Posterior mean Σ w_j y_j. Rows with no candidate raise: a silent zero would be a wrong answer."""
        if bool((self.l <= 0).any()):
            raise ValueError(
                "softmax retrieval: some query rows had no allowed candidate "
                "(empty dataset shard, or no training image of the requested class)"
            )
        return self.o / self.l[:, None]

    def variance(self) -> torch.Tensor:
        """Posterior variance per value coordinate, Σ_j w_j (y_j − mean)² = o2 / l (needs the second moment).

        Tiny negatives cannot arise from the centred combine itself; the per-chunk moments are clamped at 0
        where they are made (see torch_backend.softmax_partial), and this clamps once more for safety.
        """
        if self.o2 is None:
            raise ValueError("variance: this state has no second moment; retrieve with second_moment=True")
        if bool((self.l <= 0).any()):
            raise ValueError(
                "softmax retrieval: some query rows had no allowed candidate "
                "(empty dataset shard, or no training image of the requested class)"
            )
        return (self.o2 / self.l[:, None]).clamp_min(0.0)

    def max_weight(self) -> torch.Tensor:
        """Largest posterior weight: the max logit has unnormalised weight exp(0) = 1."""
        return 1.0 / self.l

    def effective_neighbours(self) -> torch.Tensor:
        """1 / Σ_j w_j², between 1 (one image takes all the weight) and N (uniform)."""
        return self.l * self.l / self.l2

    def to(self, *args: Any, **kwargs: Any) -> PartialState:
        return PartialState(
            self.m.to(*args, **kwargs),
            self.l.to(*args, **kwargs),
            self.l2.to(*args, **kwargs),
            self.o.to(*args, **kwargs),
            None if self.o2 is None else self.o2.to(*args, **kwargs),
        )

    def map_values(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> PartialState:
        """Apply a linear map to the value sums (e.g. un-flip an image), leaving the weights alone.

        The second moment, when present, goes through the same ``fn``: that is right for coordinate
        permutations such as the left-right mirror (the only use here), not for general linear maps.
        """
        return PartialState(self.m, self.l, self.l2, fn(self.o), None if self.o2 is None else fn(self.o2))


def combine_partials(states: Iterable[PartialState]) -> PartialState:
    """Combine shard states in the given order (fixed order => deterministic)."""
    out: PartialState | None = None
    for s in states:
        out = s if out is None else out.combine(s)
    if out is None:
        raise ValueError("combine_partials: no partial states given")
    return out


def merge_knn_lists(d: torch.Tensor, i: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest (distance, index) pairs of concatenated (B, m) k-NN lists, ascending, ties by index.

    Index −1 marks an empty slot (distance inf) and sorts after every real candidate. Exact (a selection), so
    per-shard or per-chunk lists merge into the single-scan answer."""
    key = torch.where(i < 0, torch.full_like(i, torch.iinfo(torch.long).max), i)
    order = torch.argsort(key, dim=1, stable=True)
    d, i = torch.gather(d, 1, order), torch.gather(i, 1, order)
    order = torch.argsort(d, dim=1, stable=True)[:, :k]
    return torch.gather(d, 1, order), torch.gather(i, 1, order)
