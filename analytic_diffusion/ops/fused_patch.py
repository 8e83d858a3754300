"""Backends ``triton``, ``cuda`` and ``cpu`` of the patch softmax (ELS / bbELS, LS, PSPC): one driver for the three
fused kernels (``kernels.patch_retrieval``, csrc/cuda/patch_retrieval.cu and csrc/cpu/patch_*.{h,cpp}, which share
one partial-state contract). It runs the kernel per label group and mirror pass and combines the per-split
partials in a fixed order. Same semantics as the reference
:func:`analytic_diffusion.ops.patch_retrieval.patch_softmax_partial` (its docstring states the rules)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import cast

import torch

from .keys import KeyBank
from .partial import PartialState

LOG2E = 1.0 / math.log(2.0)
TARGET_SPLITS = 132  # most image-list splits per query tile: one wave of an H100 for a one-tile query batch
TARGET_PROGRAMS = 8 * 132  # programs per launch worth having (8 per H100 SM); more only costs partials
ROWS_PER_PROGRAM = 16  # query rows per program, roughly (Triton 16–32, CUDA ≤ 8): only for the split count


def split_count(rows: int, n_img: int) -> int:
    """Image-list splits for ``rows`` query rows: split the images only while the query tiles alone are too few
    programs. The per-split partials cost S·rows·V floats — for PSPC (V = C·k², rows = B·crops) a fixed 132
    splits would be 0.8 GB at B = 64, k = 3 and 7 GB at k = 15 on CIFAR-10 shapes; here S = 1 there. Depends on
    the shapes only, so results do not depend on the device."""
    tiles = -(-rows // ROWS_PER_PROGRAM)
    return max(1, min(TARGET_SPLITS, n_img, -(-TARGET_PROGRAMS // max(1, tiles))))


# The C++ kernel runs a few threads, not thousands of programs: a split count fixed by the image count alone, so
# that a query row's partials, and their combination order, never depend on how many rows share the call
# (batch size, n): CPU results are bitwise independent of batching. Rows go through in chunks whose partials
# fit CPU_PARTIAL_BYTES.
CPU_SPLITS = 4
CPU_PARTIAL_BYTES = 64 * 2**20


def require_fused_inputs(x: torch.Tensor, keys: KeyBank, dtype: torch.dtype, what: str, backend: str) -> None:
    """Clear errors before a fused kernel: float32 work, queries and dataset on one device."""
    if dtype != torch.float32:
        raise ValueError(f"dtype: the {backend} {what} kernel computes in float32, got {dtype}; use backend='torch'")
    if keys.device != x.device:
        raise ValueError(
            f"backend {backend!r} needs the queries and the dataset on one device "
            f"(queries on {x.device}, dataset on {keys.device})"
        )


def _images(keys: KeyBank, device: torch.device | str) -> torch.Tensor:
    def make() -> torch.Tensor:
        c, h, w = cast("tuple[int, int, int]", keys.image_shape)  # the local family's banks have one
        v = keys.values if keys.values.dtype == torch.uint8 else keys.values.to(torch.float32)
        return v.reshape(-1, c, h, w).to(device).contiguous()

    return keys.cached(f"fused-patch-images:{device}", make)


def _finish(m2: torch.Tensor, l: torch.Tensor, l2: torch.Tensor, o: torch.Tensor) -> PartialState:
    """Combine the kernel's per-split partials (base 2) in a fixed order into one state in nats."""
    m = m2.max(0).values
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp2(m2 - m_safe)
    return PartialState(m=m * math.log(2.0), l=(l * w).sum(0), l2=(l2 * w * w).sum(0), o=(o * w[:, :, None]).sum(0))


def _launcher(backend: str, per_row: bool, whole: bool) -> Callable[..., tuple[torch.Tensor, ...]]:
    """The kernel launch (q, images, image_index, positions, coef2, *, k, scale, shift, splits) -> partials."""
    rule = "same_whole" if whole else ("same_centre" if per_row else "shared")
    if backend == "cuda":
        from . import cuda_backend

        return functools.partial(cuda_backend.patch_partials, rule=rule)
    if backend == "cpu":
        from . import cpu_backend

        return functools.partial(cpu_backend.patch_partials, rule=rule)
    if backend != "triton":
        raise ValueError(f"backend: the fused patch driver runs 'triton', 'cuda' or 'cpu', got {backend!r}")
    from ..kernels import patch_retrieval

    if per_row:
        return functools.partial(patch_retrieval.same_position_partials, whole=whole)
    return patch_retrieval.patch_partials


def _state(
    q: torch.Tensor,
    images: torch.Tensor,
    keys: KeyBank,
    image_idx: torch.Tensor,
    positions: torch.Tensor,
    coef: torch.Tensor,
    k: int,
    per_row: bool,
    whole: bool,
    backend: str,
) -> PartialState:
    launch = _launcher(backend, per_row, whole)
    image_idx = image_idx.to(torch.int32).contiguous()

    def run(rows: slice) -> PartialState:
        pos = positions[rows] if per_row else positions
        return _finish(
            *launch(
                q[rows].to(torch.float32).contiguous(),
                images,
                image_idx,
                pos.to(torch.int32).contiguous(),
                (coef[rows] * LOG2E).to(torch.float32).contiguous(),
                k=k,
                scale=keys.scale,
                shift=keys.shift,
                splits=splits,
            )
        )

    if backend != "cpu":
        splits = split_count(q.shape[0], image_idx.numel())
        return run(slice(None))
    splits = min(CPU_SPLITS, image_idx.numel())
    values = images.shape[1] * k * k if whole else images.shape[1]
    step = max(1, CPU_PARTIAL_BYTES // (4 * (3 + values) * splits))
    parts = [run(slice(s, s + step)) for s in range(0, q.shape[0], step)]
    if len(parts) == 1:
        return parts[0]
    return PartialState(
        m=torch.cat([p.m for p in parts]),
        l=torch.cat([p.l for p in parts]),
        l2=torch.cat([p.l2 for p in parts]),
        o=torch.cat([p.o for p in parts]),
    )


def patch_partial(
    queries: torch.Tensor,
    keys: KeyBank,
    coef64: torch.Tensor,
    positions: torch.Tensor,
    k: int,
    *,
    query_labels: torch.Tensor | None,
    flips: bool,
    start: int,
    stop: int,
    per_row: bool = False,
    whole: bool = False,
    backend: str = "triton",
) -> PartialState:
    """(Q rows, o (Q, C)) float32 partial state over stored images start:stop (validated by the caller).

    ``positions``: candidate centres shared by every row (ELS / bbELS), or with ``per_row`` one centre per query
    row, its own pixel (LS: the same-position rule). A centre is the window's top-left corner + k // 2 (also for
    an even k). ``whole`` (with ``per_row``): the value is the whole C·k² patch, o is (Q, C·k²) (PSPC).
    ``backend``: ``triton``, ``cuda`` or ``cpu``, the fused kernel that computes the partials.
    """
    dev = queries.device
    c, _h, w = cast("tuple[int, int, int]", keys.image_shape)
    feat = c * k * k
    images = _images(keys, dev)
    Q = queries.shape[0]
    state = PartialState.empty(Q, feat if whole else c, dtype=torch.float32, device=dev)
    all_idx = torch.arange(start, stop, device=dev)
    if query_labels is None:
        groups = [(torch.arange(Q, device=dev), all_idx)]
    else:
        img_labels = cast(torch.Tensor, keys.labels)[start:stop].to(dev)  # validated by the caller
        groups = [
            ((query_labels == lab).nonzero().flatten(), all_idx[img_labels == lab])
            for lab in torch.unique(query_labels).tolist()
        ]
    positions = positions.to(dev)
    # the mirrored window of the one whose centre column is p: top-left W − k − (p − k//2), so its centre is
    # W − k + 2·(k//2) − p (W − 1 − p for an odd k)
    mirrored = torch.stack([positions[:, 0], w - k + 2 * (k // 2) - positions[:, 1]], 1)
    for rows, image_idx in groups:
        if image_idx.numel() == 0:
            continue  # rows stay empty: another shard may hold this class
        q = queries[rows]
        pos, mir = (positions[rows], mirrored[rows]) if per_row else (positions, mirrored)
        st = _state(q, images, keys, image_idx, pos, coef64[rows], k, per_row, whole, backend)
        if flips:  # the patch of the mirrored image at p is the mirror of the image's patch at the mirrored p
            qm = q.reshape(-1, c, k, k).flip(-1).reshape(-1, feat)
            sm = _state(qm, images, keys, image_idx, mir, coef64[rows], k, per_row, whole, backend)
            if whole:  # the values came out mirrored too
                sm.o = sm.o.reshape(-1, c, k, k).flip(-1).reshape(-1, feat)
            st = st.combine(sm)
        state.m[rows], state.l[rows], state.l2[rows], state.o[rows] = st.m, st.l, st.l2, st.o
    return state
