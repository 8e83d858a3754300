"""Backend ``triton`` of pca_locality's coordinate retrieval: the binary mask becomes a stencil table, the fused
kernel (``kernels.coordinate_retrieval``) scans the stored images and, with flips, their mirrors, and the
per-split partials are combined here in a fixed order. Same semantics as the reference
:func:`analytic_diffusion.ops.local_retrieval.coordinate_retrieval` (its docstring states the rules)."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .keys import KeyBank
from .fused_patch import LOG2E, _images
from .triton_backend import interpreting

# Split the candidates until the grid has this many programs: two waves of an H100's 132 SMs. (Under the CPU
# interpreter every program costs time, so it gets one split; tests set more to exercise the combine.)
TARGET_PROGRAMS = 1 if interpreting() else 264


def stencil_table(mask: torch.Tensor) -> torch.Tensor:
    """(NNZ, D) int32: column m lists the inputs n with mask[n, m] (ascending), padded with −1."""
    cols = mask.t().contiguous()  # row m = output m's support
    counts = cols.sum(1)
    nnz = int(counts.max()) if counts.numel() else 0
    table = torch.full((nnz, cols.shape[0]), -1, dtype=torch.int32, device=mask.device)
    out_idx, in_idx = cols.nonzero(as_tuple=True)
    rank = cols.to(torch.int32).cumsum(1)[out_idx, in_idx] - 1
    table[rank.long(), out_idx] = in_idx.to(torch.int32)
    return table


def _mirror_permutation(image_shape, device) -> torch.Tensor:
    """π on flattened (C, H, W) coordinates: π(c, r, w) = (c, r, W − 1 − w) (an involution)."""
    c, h, w = image_shape
    return torch.arange(c * h * w, device=device).reshape(c, h, w).flip(-1).reshape(-1)


def _even_splits(n: int, pieces: int) -> List[int]:
    pieces = max(1, min(pieces, n))
    return [n * i // pieces for i in range(pieces + 1)]


def _chunk_splits(n: int, offset: int, chunk: int) -> Tuple[List[int], List[int]]:
    """Boundaries in [0, n) of the candidates offset … offset + n cut at multiples of ``chunk`` (global candidate
    order), and the global chunk id of each piece."""
    cuts = [0] + [c * chunk - offset for c in range(offset // chunk + 1, (offset + n - 1) // chunk + 1)] + [n]
    return cuts, [(offset + a) // chunk for a in cuts[:-1]]


def _launch(x, images, stencil, vidx, coef2, cuts, keys, query_labels):
    from ..kernels import coordinate_retrieval
    dev = x.device
    labels = None if query_labels is None else keys.labels.to(dev).to(torch.int64).contiguous()
    return coordinate_retrieval.coordinate_partials(
        x, images, stencil, vidx, coef2, torch.tensor(cuts, dtype=torch.int32, device=dev),
        scale=keys.scale, shift=keys.shift, image_labels=labels,
        query_labels=None if query_labels is None else query_labels.to(dev).to(torch.int64).contiguous())


def _lse_combine(m2, l, o, groups: torch.Tensor, n_groups: int):
    """Combine (S, B, D) base-2 partials that share a group id (log-sum-exp) into (G, B, D) unnormalised states."""
    shape = (n_groups,) + tuple(m2.shape[1:])
    index = groups.view(-1, *([1] * (m2.dim() - 1))).expand_as(m2)
    m = torch.full(shape, float("-inf"), dtype=m2.dtype, device=m2.device).scatter_reduce_(0, index, m2, "amax")
    w = torch.exp2(m2 - torch.where(torch.isfinite(m), m, torch.zeros_like(m))[groups])
    return (torch.zeros(shape, dtype=l.dtype, device=l.device).index_add_(0, groups, l * w),
            torch.zeros(shape, dtype=o.dtype, device=o.device).index_add_(0, groups, o * w))


def coordinate_mean(x: torch.Tensor, keys: KeyBank, coef: torch.Tensor, mask: torch.Tensor, *,
                    query_labels: Optional[torch.Tensor], flips: bool, chunk_size: Optional[int]):
    """(B, D) float32 posterior mean per coordinate (``chunk_size``: the chunk-averaged softmax instead), and (B,)
    bool "had a candidate" per query. ``x`` (B, D) float32, ``coef`` (B,) 1/(2σ²T)."""
    dev = x.device
    B, D = x.shape
    n = keys.n
    images = _images(keys, dev).reshape(n, D)
    stencil = stencil_table(mask.to(dev))
    coef2 = (coef.to(torch.float64) * LOG2E).to(torch.float32).contiguous()
    passes = [(x.contiguous(), stencil, torch.arange(D, dtype=torch.int32, device=dev), 0)]
    if flips:  # the mirror of y seen by x over S(m) = y seen by flip(x) over π(S(m)), with value y[π(m)]
        pi = _mirror_permutation(keys.image_shape, dev)
        mir = torch.where(stencil >= 0, pi.to(torch.int32)[stencil.clamp_min(0).long()], stencil)
        passes.append((x[:, pi].contiguous(), mir.contiguous(), pi.to(torch.int32), n))
    from ..kernels.coordinate_retrieval import BLOCKS
    parts, groups = [], []
    programs = B * -(-D // BLOCKS[0])  # programs per candidate split
    for xq, st, vidx, offset in passes:
        if chunk_size is None:
            cuts = _even_splits(n, -(-TARGET_PROGRAMS // programs))
            ids = [0] * (len(cuts) - 1)
        else:
            cuts, ids = _chunk_splits(n, offset, chunk_size)
        parts.append(_launch(xq, images, st, vidx, coef2, cuts, keys, query_labels))
        groups += ids
    m2, l, o = (torch.cat([p[i] for p in parts]) for i in range(3))
    uniq, inverse = torch.unique(torch.tensor(groups, device=dev), return_inverse=True)
    l, o = _lse_combine(m2, l, o, inverse, uniq.numel())
    has = l[:, :, 0] > 0  # (G, B): the group held a candidate of the query's class
    means = torch.where(has[:, :, None], o / torch.where(has[:, :, None], l, torch.ones_like(l)), 0.0)
    count = has.sum(0)
    return means.sum(0) / count.clamp_min(1)[:, None].to(means.dtype), count > 0


__all__ = ["coordinate_mean", "stencil_table"]
