"""The fused backends of pca_locality's coordinate retrieval, ``triton`` (``kernels.coordinate_retrieval``),
``cuda`` (csrc/cuda/coordinate_retrieval.cuh) and ``cpu`` (the C++ kernel, csrc/cpu/coordinate.h): the binary mask
becomes a stencil table, the kernel scans the stored images and, with flips, their mirrors, and the per-split
partials are combined here in a fixed order. The three kernels share one contract (partials m base 2, l, o per
split, query and coordinate). Same semantics as the reference
:func:`analytic_diffusion.ops.local_retrieval.coordinate_retrieval` (its docstring states the rules)."""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import cast

import torch

from .fused_patch import LOG2E, _images
from .keys import KeyBank
from .triton_backend import interpreting

# Triton / CUDA: split the candidates until the grid has this many programs: two waves of an H100's 132 SMs. (Under
# the CPU interpreter every program costs time, so it gets one split; tests set more to exercise the combine.)
TARGET_PROGRAMS = 1 if interpreting() else 264
# C++: split the candidates until there are this many tasks (split x group of 8 queries), each split keeping at
# least CPU_MIN_SPLIT candidates. Fixed numbers, not the thread count: results do not depend on the machine.
CPU_TARGET_TASKS = 32
CPU_MIN_SPLIT = 256


def stencil_table(mask: torch.Tensor) -> torch.Tensor:
    """(NNZ, D) int32: column m lists the inputs n with mask[n, m] (ascending), padded with −1."""
    D = mask.shape[1]
    in_idx, out_idx = mask.nonzero(as_tuple=True)  # ordered by input, then output
    order = torch.argsort(out_idx, stable=True)  # grouped by output, inputs still ascending within a group
    in_idx, out_idx = in_idx[order], out_idx[order]
    counts = torch.bincount(out_idx, minlength=D)
    nnz = int(counts.max()) if counts.numel() else 0
    rank = torch.arange(out_idx.numel(), device=mask.device) - (counts.cumsum(0) - counts)[out_idx]
    table = torch.full((nnz, D), -1, dtype=torch.int32, device=mask.device)
    table[rank, out_idx] = in_idx.to(torch.int32)
    return table


# Stencil tables of the masks in use (the denoiser keeps one mask per σ): keyed by id(mask), dropped when the mask
# is freed, checked against the mask object and its version counter (an in-place change is never served stale).
_STENCILS: dict[int, tuple[weakref.ref[torch.Tensor], int, torch.Tensor]] = {}


def cached_stencil_table(mask: torch.Tensor) -> torch.Tensor:
    key = id(mask)
    entry = _STENCILS.get(key)
    if entry is None or entry[0]() is not mask or entry[1] != mask._version:
        if entry is None or entry[0]() is not mask:
            weakref.finalize(mask, _STENCILS.pop, key, None)
        entry = (weakref.ref(mask), mask._version, stencil_table(mask))
        _STENCILS[key] = entry
    return entry[2]


def _mirror_permutation(image_shape: tuple[int, int, int], device: torch.device | str) -> torch.Tensor:
    """π on flattened (C, H, W) coordinates: π(c, r, w) = (c, r, W − 1 − w) (an involution)."""
    c, h, w = image_shape
    return torch.arange(c * h * w, device=device).reshape(c, h, w).flip(-1).reshape(-1)


def _even_splits(n: int, pieces: int) -> list[int]:
    pieces = max(1, min(pieces, n))
    return [n * i // pieces for i in range(pieces + 1)]


def _chunk_splits(n: int, offset: int, chunk: int) -> tuple[list[int], list[int]]:
    """Boundaries in [0, n) of the candidates offset … offset + n cut at multiples of ``chunk`` (global candidate
    order), and the global chunk id of each piece."""
    cuts = [0] + [c * chunk - offset for c in range(offset // chunk + 1, (offset + n - 1) // chunk + 1)] + [n]
    return cuts, [(offset + a) // chunk for a in cuts[:-1]]


def _partials_fn(backend: str) -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The backend's ``coordinate_partials`` (one signature for all three kernels)."""
    if backend == "cpu":
        from . import cpu_backend

        return cpu_backend.coordinate_partials
    if backend == "cuda":
        from . import cuda_backend

        return cuda_backend.coordinate_partials
    from ..kernels import coordinate_retrieval

    return coordinate_retrieval.coordinate_partials


def _launch(
    backend: str,
    x: torch.Tensor,
    images: torch.Tensor,
    stencil: torch.Tensor,
    vidx: torch.Tensor,
    coef2: torch.Tensor,
    cuts: list[int],
    keys: KeyBank,
    query_labels: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dev = x.device
    labels = None if query_labels is None else cast(torch.Tensor, keys.labels).to(dev).to(torch.int64).contiguous()
    qlab = None if query_labels is None else query_labels.to(dev).to(torch.int64).contiguous()
    return _partials_fn(backend)(
        x,
        images,
        stencil,
        vidx,
        coef2,
        torch.tensor(cuts, dtype=torch.int32, device=dev),
        scale=keys.scale,
        shift=keys.shift,
        image_labels=labels,
        query_labels=qlab,
    )


def _exact_pieces(backend: str, n: int, B: int, D: int) -> int:
    """How many candidate splits the exact softmax runs in (each split's partials are combined afterwards)."""
    if backend == "cpu":
        from . import cpu_backend

        groups = -(-B // cpu_backend.coordinate_queries_per_task())
        return max(1, min(-(-CPU_TARGET_TASKS // groups), n // CPU_MIN_SPLIT))
    if backend == "cuda":
        from . import cuda_backend

        per_split = B * -(-D // cuda_backend._require().COORDINATE_THREADS)  # CTAs per candidate split
    else:
        from ..kernels.coordinate_retrieval import BLOCKS

        per_split = B * -(-D // BLOCKS[0])  # programs per candidate split
    return -(-TARGET_PROGRAMS // per_split)


def _lse_combine(
    m2: torch.Tensor, l: torch.Tensor, o: torch.Tensor, groups: torch.Tensor, n_groups: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Combine (S, B, D) base-2 partials that share a group id (log-sum-exp) into (G, B, D) unnormalised states
    (l, o) relative to each group's max, which comes back too (base 2)."""
    shape = (n_groups,) + tuple(m2.shape[1:])
    index = groups.view(-1, *([1] * (m2.dim() - 1))).expand_as(m2)
    m = torch.full(shape, float("-inf"), dtype=m2.dtype, device=m2.device).scatter_reduce_(0, index, m2, "amax")
    w = torch.exp2(m2 - torch.where(torch.isfinite(m), m, torch.zeros_like(m))[groups])
    return (
        torch.zeros(shape, dtype=l.dtype, device=l.device).index_add_(0, groups, l * w),
        torch.zeros(shape, dtype=o.dtype, device=o.device).index_add_(0, groups, o * w),
        m,
    )


def coordinate_mean(
    x: torch.Tensor,
    keys: KeyBank,
    coef: torch.Tensor,
    mask: torch.Tensor,
    *,
    query_labels: torch.Tensor | None,
    flips: bool,
    chunk_size: int | None,
    backend: str = "triton",
    return_state: bool = False,
) -> tuple[torch.Tensor, ...]:
    """(B, D) float32 posterior mean per coordinate (``chunk_size``: the chunk-averaged softmax instead), and (B,)
    bool "had a candidate" per query. ``x`` (B, D) float32, ``coef`` (B,) 1/(2σ²T); ``backend`` ``triton``,
    ``cuda`` or ``cpu``. ``return_state=True`` (exact softmax only) gives the unnormalised per-coordinate state
    (m in nats, l, o), each (B, D) float64, instead of the mean, so that shards of a dataset combine it like the
    reference's."""
    if return_state and chunk_size is not None:
        raise ValueError("return_state: only the exact softmax has a state that combines (chunk_size=None)")
    if backend not in ("triton", "cuda", "cpu"):
        raise ValueError(f"backend: expected 'triton', 'cuda' or 'cpu', got {backend!r}")
    dev = x.device
    B, D = x.shape
    n = keys.n
    images = _images(keys, dev).reshape(n, D)
    stencil = cached_stencil_table(mask.to(dev))  # .to returns the cached mask itself when already on dev
    coef2 = (coef.to(torch.float64) * LOG2E).to(torch.float32).contiguous()
    passes = [(x.contiguous(), stencil, torch.arange(D, dtype=torch.int32, device=dev), 0)]
    if flips:  # the mirror of y seen by x over S(m) = y seen by flip(x) over π(S(m)), with value y[π(m)]
        pi = _mirror_permutation(cast("tuple[int, int, int]", keys.image_shape), dev)
        mir = torch.where(stencil >= 0, pi.to(torch.int32)[stencil.clamp_min(0).long()], stencil)
        passes.append((x[:, pi].contiguous(), mir.contiguous(), pi.to(torch.int32), n))
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    groups: list[int] = []
    for xq, st, vidx, offset in passes:
        if chunk_size is None:
            cuts = _even_splits(n, _exact_pieces(backend, n, B, D))
            ids = [0] * (len(cuts) - 1)
        else:
            cuts, ids = _chunk_splits(n, offset, chunk_size)
        parts.append(_launch(backend, xq, images, st, vidx, coef2, cuts, keys, query_labels))
        groups += ids
    m2, l, o = (torch.cat([p[i] for p in parts]) for i in range(3))
    uniq, inverse = torch.unique(torch.tensor(groups, device=dev), return_inverse=True)
    l, o, m2 = _lse_combine(m2, l, o, inverse, uniq.numel())
    if return_state:  # in float64: m·ln 2 in float32 would move a shard's weights by 2^-24·|m| nats against another's
        return m2[0].double() * math.log(2.0), l[0].double(), o[0].double()
    has = l[:, :, 0] > 0  # (G, B): the group held a candidate of the query's class
    means = torch.where(has[:, :, None], o / torch.where(has[:, :, None], l, torch.ones_like(l)), 0.0)
    count = has.sum(0)
    return means.sum(0) / count.clamp_min(1)[:, None].to(means.dtype), count > 0


__all__ = ["coordinate_mean", "stencil_table"]
