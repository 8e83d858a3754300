"""Exact float64 work over an explicit candidate list per query: the k-NN denoisers' rescoring and weighted mean.

``relative_d2`` and ``weighted_sum`` take (B, K) candidate indices (−1: an empty slot; i ≥ N: row i − N mirrored,
as from :func:`~analytic_diffusion.ops.knn_search` with flips). On the CPU they run in the C++ kernels
(csrc/cpu/subset_isa_impl.h), which read the stored uint8 / float rows straight from the bank: nothing of shape
(B, K, D) is built. Elsewhere (GPU, a sharded bank, or an argument that autograd must differentiate) they gather
the rows and compute the same formula in torch. Either way a row's values depend on that row only.
"""

from __future__ import annotations

from typing import cast

import torch

from . import cpu_backend
from .keys import KeyBank
from .retrieval import gather_rows

__all__ = ["relative_d2", "weighted_sum"]


def _native(keys: KeyBank, *tensors: torch.Tensor) -> bool:
    """Whether the C++ subset kernels can serve this call (and autograd does not need to see it)."""
    if not cpu_backend.available() or keys.shard is not None or keys.device.type != "cpu":
        return False
    if keys.values.dtype not in (torch.uint8, torch.float32, torch.float64) or not keys.values.is_contiguous():
        return False
    if any(t.device.type != "cpu" for t in tensors):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def _width(keys: KeyBank, flips: bool) -> int:
    return int(cast("tuple[int, int, int]", keys.image_shape)[2]) if flips else 0


def _rows(keys: KeyBank, index: torch.Tensor) -> torch.Tensor:
    return gather_rows(keys, index.clamp_min(0), torch.float64)


def relative_d2(
    q: torch.Tensor, keys: KeyBank, index: torch.Tensor, ref: torch.Tensor, *, flips: bool = False
) -> torch.Tensor:
    """(B, K) float64 ‖q_b − y_index[b,j]‖² − ‖q_b − y_ref[b]‖², +inf in empty slots (index −1).

    Computed as ⟨y − y_ref, y + y_ref − 2q⟩: no ‖q‖² term, so exact in float64 however far the query is from
    the data, and exactly 0 for the reference row itself. ``ref`` (B,) must hold valid indices.
    """
    if _native(keys, q):
        out = cpu_backend.subset_relative_d2(q, keys, index, ref, _width(keys, flips))
        return out.to(q.device)
    rows = _rows(keys, index)
    r = gather_rows(keys, ref, torch.float64)[:, None]
    qd = q.double()[:, None]
    rel = ((rows - r) * (rows + r - 2.0 * qd)).sum(-1)
    return torch.where(index >= 0, rel, torch.full_like(rel, float("inf")))


def weighted_sum(keys: KeyBank, index: torch.Tensor, weight: torch.Tensor, *, flips: bool = False) -> torch.Tensor:
    """(B, D) float64 Σ_j weight[b, j] y_index[b, j] over the non-empty slots."""
    if _native(keys, weight):
        return cpu_backend.subset_weighted_sum(keys, index, weight, _width(keys, flips)).to(weight.device)
    w = torch.where(index >= 0, weight.double(), torch.zeros_like(weight, dtype=torch.float64))
    return torch.einsum("bk,bkd->bd", w, _rows(keys, index))
