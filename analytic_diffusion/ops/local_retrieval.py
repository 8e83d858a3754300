"""Same-location retrieval: the reference (``torch``) primitives of the local denoisers (docs/methods.md §1.2, §2, §5).

Every candidate is a training image (± its left-right mirror) *at the same location* as the query; what varies
is which input pixels enter each distance (a window, a crop, a mask) and which outputs share one softmax:

* :func:`local_score`  — LS (Kamb & Ganguli): one softmax per pixel p over the N images; the logit is minus the
  k×k window sum around p of the per-pixel squared differences (zero padding of both images); value: the
  candidate's pixel p (all channels).
* :func:`pspc_square`  — PSPC-Square (Niedoba et al.): one softmax per k×k crop fully inside the image; value: the
  whole crop; each pixel averages the posterior-mean patches of the crops covering it.
* :func:`mask_composite` — PSPC-Flex: the same overlap average over arbitrary (H, W) masks.
* :func:`coordinate_retrieval` — pca_locality (Lukoianov et al.): one softmax per output coordinate m (pixel and
  channel) with its own input support mask[:, m]; value: the candidate's coordinate m. Exact online softmax, or the
  studio's chunk-averaged ("WSSM") mode for parity.

This is the exactness oracle for the fused kernels, not the fast path: distances are formed in the DIRECT form
(differences, squares, then window/mask sums of non-negative terms: no expanded-form cancellation at small σ),
candidates are streamed in chunks bounded by ``memory_budget`` bytes, and the softmax is an exact online one
(running max, rescale). With ``flips`` every stored image's mirror is an extra candidate, generated per chunk and
never stored. Class-conditional retrieval: a (B,) label per sample keeps only the images of that label (a mirror
shares its image's label). σ-space throughout: logits −d / (2 σ² T).

Candidate order (it matters only for the chunk-averaged softmax): the N stored images, then their N mirrors,
i.e. the order of :meth:`Dataset.images_float`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Literal, cast, overload

import torch
import torch.nn.functional as F

from .keys import KeyBank
from .partial import PartialState
from .retrieval import DEFAULT_MEMORY_BUDGET, sigma_rows

SOFTMAX_MODES = ("exact", "chunked")

__all__ = [
    "SOFTMAX_MODES",
    "coordinate_retrieval",
    "crop_masks",
    "local_score",
    "locality_mask",
    "mask_composite",
    "masks_from_heatmap",
    "pspc_square",
    "wiener_filter_matrix",
]


# ----------------------------------------------------------------------------------------------- helpers
def _prepare(
    x: torch.Tensor,
    keys: KeyBank,
    sigma: float | Sequence[float] | torch.Tensor,
    temperature: float,
    query_labels: torch.Tensor | None,
    flips: bool,
    dtype: torch.dtype | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.dtype]:
    """Validate the common arguments; return (x in dtype, coef (B,) in dtype, labels, dtype)."""
    if not isinstance(keys, KeyBank):
        raise TypeError(f"keys: expected a KeyBank, got {type(keys).__name__}")
    if keys.image_shape is None:
        raise ValueError("keys: same-location retrieval needs the dataset's image shape (C, H, W)")
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise TypeError(f"x: expected a floating tensor, got {getattr(x, 'dtype', type(x))}")
    shape = tuple(keys.image_shape)
    if x.dim() == 2 and x.shape[1] == keys.dim:
        x = x.reshape(x.shape[0], *shape)
    if x.dim() != 4 or tuple(x.shape[1:]) != shape:
        raise ValueError(f"x: expected shape (B, {', '.join(map(str, shape))}), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("x: the query batch is empty")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x: contains NaN or Inf")
    if not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature: expected a finite value > 0, got {temperature}")
    dtype = dtype or (x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype: expected torch.float32 or torch.float64, got {dtype}")
    if query_labels is not None:
        if keys.labels is None:
            raise ValueError("query_labels: class-conditional retrieval needs a dataset with labels")
        query_labels = torch.as_tensor(query_labels, device=x.device).reshape(-1)
        if query_labels.shape != (x.shape[0],):
            raise ValueError(f"query_labels: expected shape ({x.shape[0]},), got {tuple(query_labels.shape)}")
    s = sigma_rows(sigma, x.shape[0], x.device, x)
    coef = 1.0 / (2.0 * s * s * float(temperature))
    # σ so small that 1/(2σ²T) overflows the working dtype: clamp, so that d = 0 gives 0, never 0·inf = NaN.
    coef = coef.clamp_max(torch.finfo(dtype).max).to(dtype)
    return x.to(dtype), coef, query_labels, dtype


def _combine_stats(
    keys: KeyBank, m: torch.Tensor, l: torch.Tensor, l2: torch.Tensor, what: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pass 1 of a two-pass op on a sharded bank: every rank's (max, normaliser) per output unit, combined in rank
    order, so that pass 2 forms the whole set's weights on each shard (then :func:`_sum_shards`)."""
    if keys.shard is None:
        return m, l, l2
    st = keys.shard.group.combine(
        PartialState(m.reshape(-1), l.reshape(-1), l2.reshape(-1), m.new_zeros(m.numel(), 0)), what
    )
    return st.m.reshape(m.shape), st.l.reshape(l.shape), st.l2.reshape(l2.shape)


def _sum_shards(keys: KeyBank, t: torch.Tensor, what: str) -> torch.Tensor:
    return t if keys.shard is None else keys.shard.group.sum(t, what)


def _item(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _num_candidates(keys: KeyBank, flips: bool) -> int:
    return keys.n * (2 if flips else 1)


def _candidate_chunks(
    keys: KeyBank, flips: bool, step: int, dtype: torch.dtype, device: torch.device | str, block: int | None = None
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]:
    """(first candidate index, images (n, C, H, W), labels (n,) or None) in candidate order.

    The order is the N stored images then their N mirrors; chunks hold at most ``step`` candidates, never straddle
    the stored/mirrored boundary, and never straddle a multiple of ``block`` when given.
    """
    n_stored = keys.n
    total = _num_candidates(keys, flips)
    c, h, w = cast("tuple[int, int, int]", keys.image_shape)  # _prepare checked it
    a = 0
    while a < total:
        b = min(a + max(1, step), total)
        if a < n_stored < b:
            b = n_stored
        if block is not None:
            b = min(b, (a // block + 1) * block)
        src = a - n_stored if a >= n_stored else a
        y = keys.rows(src, src + (b - a), dtype, device).reshape(b - a, c, h, w)
        if a >= n_stored:
            y = y.flip(-1)  # the mirrored copy exists only for this chunk
        labels = None if keys.labels is None else keys.labels[src : src + (b - a)].to(device)
        yield a, y, labels
        a = b


def _label_mask(query_labels: torch.Tensor | None, labels: torch.Tensor | None) -> torch.Tensor | None:
    """(B, n) True where candidate j is NOT allowed for sample b."""
    if query_labels is None:
        return None
    return cast(torch.Tensor, labels)[None, :] != query_labels[:, None]  # query labels: the bank has labels


def _sqdiff_map(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-pixel squared differences summed over channels, (B, n, H, W), channel by channel (direct form)."""
    out: torch.Tensor | None = None
    for ch in range(x.shape[1]):
        d = x[:, None, ch] - y[None, :, ch]
        d = d * d
        out = d if out is None else out.add_(d)
    return cast(torch.Tensor, out)  # C >= 1 channels


def _box_valid(t: torch.Tensor, kh: int, kw: int) -> torch.Tensor:
    """Sums over every kh×kw window fully inside the last two dims (direct separable sums, no cumsum)."""
    lead = t.shape[:-2]
    h, w = t.shape[-2:]
    v = t.reshape(-1, 1, h, w)
    if kh > 1:
        v = F.avg_pool2d(v, (kh, 1), stride=1, divisor_override=1)
    if kw > 1:
        v = F.avg_pool2d(v, (1, kw), stride=1, divisor_override=1)
    return v.reshape(*lead, v.shape[-2], v.shape[-1])


def _box_same(t: torch.Tensor, k: int) -> torch.Tensor:
    """k×k window sums centred on every pixel, positions outside the image adding 0 (zero padding)."""
    d = k // 2
    return _box_valid(F.pad(t, (d, d, d, d)), k, k)


def _box_full(t: torch.Tensor, k: int) -> torch.Tensor:
    """Transpose of :func:`_box_valid`: spreads each crop value (top-left at (i, j)) over the k×k pixels it covers.
    (Hc, Wc) -> (Hc + k − 1, Wc + k − 1)."""
    return _box_valid(F.pad(t, (k - 1, k - 1, k - 1, k - 1)), k, k)


def _weighted_values(w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Σ_j w[:, j] · y[j] over candidates: w (B, n, *S), y (n, C, *S) -> (B, C, *S).

    An elementwise product and one ``sum`` over the candidate dim (a cascade sum: error ~u·log n), not an einsum:
    "bn…,nc…->bc…" becomes a batched GEMM of 1×n by n×1 products, summed sequentially by MKL (error ~u·n, 1e-5
    over 600 float32 candidates), which took a float32 convex combination of values in [−1, 1] to 1 + 1e-5.
    """
    return (w.unsqueeze(2) * y.unsqueeze(0)).sum(1)


def _spread_average(spread: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Σ_j spread_j(q)·y_j(q) and Σ_j spread_j(q) of one candidate chunk in one reduction, (B, C + 1, *S): the
    overlap averages (PSPC, PSPC-Flex) divide the first by the second rather than by the exact count of covering
    crops, so that the numerator and its normaliser are rounded alike and the result stays a convex combination to
    within a few ulps (the count equals the weight total only up to pass 1's separately rounded normalisers)."""
    ones = torch.ones_like(y[:, :1])
    return _weighted_values(spread, torch.cat([y, ones], 1))


def _softmax_step(
    m: torch.Tensor, l: torch.Tensor, l2: torch.Tensor, logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One exact online-softmax update over dim 1 of ``logits`` (B, n, *R); state m, l, l2 is (B, *R).

    Returns (m, l, l2, p, alpha): p = exp(logits − m_new) (masked -inf logits give 0) and alpha = exp(m_old − m_new)
    rescales the caller's value sums. Rows with no allowed candidate yet keep m = −inf and l = 0, never NaN.
    """
    m_new = torch.maximum(m, logits.amax(1))
    safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
    alpha = torch.exp(m - safe)
    p = torch.exp(logits - safe.unsqueeze(1))
    l = l * alpha + p.sum(1)
    l2 = l2 * alpha * alpha + (p * p).sum(1)
    return m_new, l, l2, p, alpha


def _require_candidates(l: torch.Tensor, what: str) -> None:
    if bool((l <= 0).any()):
        raise ValueError(f"{what}: some samples had no allowed candidate (no training image of the requested class)")


def _chunk_rows(budget: int, per_candidate_bytes: int, total: int) -> int:
    return max(1, min(total, int(budget) // max(1, per_candidate_bytes)))


# ----------------------------------------------------------------------------------------------- LS
@overload
def local_score(
    x: torch.Tensor,
    keys: KeyBank,
    sigma: float | Sequence[float] | torch.Tensor,
    *,
    patch: int,
    temperature: float = ...,
    query_labels: torch.Tensor | None = ...,
    flips: bool = ...,
    dtype: torch.dtype | None = ...,
    memory_budget: int = ...,
    return_partial: Literal[False] = ...,
    backend: str = ...,
) -> torch.Tensor: ...


@overload
def local_score(
    x: torch.Tensor,
    keys: KeyBank,
    sigma: float | Sequence[float] | torch.Tensor,
    *,
    patch: int,
    temperature: float = ...,
    query_labels: torch.Tensor | None = ...,
    flips: bool = ...,
    dtype: torch.dtype | None = ...,
    memory_budget: int = ...,
    return_partial: Literal[True],
    backend: str = ...,
) -> PartialState: ...


@overload
def local_score(
    x: torch.Tensor,
    keys: KeyBank,
    sigma: float | Sequence[float] | torch.Tensor,
    *,
    patch: int,
    temperature: float = ...,
    query_labels: torch.Tensor | None = ...,
    flips: bool = ...,
    dtype: torch.dtype | None = ...,
    memory_budget: int = ...,
    return_partial: bool = ...,
    backend: str = ...,
) -> torch.Tensor | PartialState: ...


def local_score(
    x: torch.Tensor,
    keys: KeyBank,
    sigma: float | Sequence[float] | torch.Tensor,
    *,
    patch: int,
    temperature: float = 1.0,
    query_labels: torch.Tensor | None = None,
    flips: bool = False,
    dtype: torch.dtype | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    return_partial: bool = False,
    backend: str = "auto",
) -> torch.Tensor | PartialState:
    """LS (Kamb & Ganguli): per pixel p, softmax over the N (± mirrored) images of −Σ_{q ∈ win_k(p)} ‖x(q) − y_j(q)‖²
    / (2σ²T), window positions outside the image adding 0; value y_j(p) (all C channels).

    ``backend``: ``torch`` (this reference: box-summed squared-difference maps), ``triton``, ``cuda`` or ``cpu``
    (the fused same-position patch kernels, direct distances, float32) or ``auto`` (a fused kernel for float32:
    the C++ one on CPU, Triton / CUDA on a GPU).

    ``patch`` is any odd k ≥ 1; k ≥ 2·max(H, W) − 1 covers the whole image from every pixel (= the optimal
    denoiser), larger k is the same. Returns the (B, C, H, W) posterior mean, or with ``return_partial`` a
    :class:`PartialState` whose rows are the (sample, pixel) pairs in (b, h, w) order and whose ``o`` holds the C
    values, so that shards of a dataset combine exactly (reshape ``state.mean()`` to (B, H, W, C)).
    Memory per chunk O(B·n·H·W).
    """
    if keys.shard is not None:  # this rank's shard, then every rank's per-pixel state combined in rank order
        from .retrieval import _local_view

        state = local_score(
            x,
            _local_view(keys),
            sigma,
            patch=patch,
            temperature=temperature,
            query_labels=query_labels,
            flips=flips,
            dtype=dtype,
            memory_budget=memory_budget,
            return_partial=True,
            backend=backend,
        )
        state = keys.shard.group.combine(state, "LS retrieval")
        if return_partial:
            return state
        _require_candidates(state.l, "query_labels")
        B, C, H, W = x.shape[0], *cast("tuple[int, int, int]", keys.image_shape)
        return state.mean().reshape(B, H, W, C).permute(0, 3, 1, 2).contiguous()
    x, coef, query_labels, dtype = _prepare(x, keys, sigma, temperature, query_labels, flips, dtype)
    if isinstance(patch, bool) or not isinstance(patch, int) or patch < 1 or patch % 2 == 0:
        raise ValueError(f"patch: LS needs an odd patch size k >= 1, got {patch!r}")
    B, C, H, W = x.shape
    k = min(patch, 2 * max(H, W) - 1)  # beyond this the window only adds zero padding
    d = k // 2
    dev = x.device
    from .patch_retrieval import choose_patch_backend

    name = choose_patch_backend(backend, x, keys, dtype)[0]
    if name != "torch":
        return _local_score_fused(x, keys, coef, k, query_labels, flips, dtype, return_partial, name)
    item = _item(dtype)
    per_cand = item * (2 * C * H * W + B * (2 * (H + 2 * d) * (W + 2 * d) + 6 * H * W + C * H * W))
    step = _chunk_rows(memory_budget, per_cand, _num_candidates(keys, flips))
    m = torch.full((B, H, W), float("-inf"), dtype=dtype, device=dev)
    l = torch.zeros(B, H, W, dtype=dtype, device=dev)
    l2 = torch.zeros_like(l)
    o = torch.zeros(B, C, H, W, dtype=dtype, device=dev)
    neg = -coef.view(B, 1, 1, 1)
    for _, y, labels in _candidate_chunks(keys, flips, step, dtype, dev):
        logits = _box_same(_sqdiff_map(x, y), k).mul_(neg)  # (B, n, H, W)
        mask = _label_mask(query_labels, labels)
        if mask is not None:
            logits.masked_fill_(mask[:, :, None, None], float("-inf"))
        m, l, l2, p, alpha = _softmax_step(m, l, l2, logits)
        o = o * alpha[:, None] + _weighted_values(p, y)
    state = PartialState(
        m=m.reshape(-1), l=l.reshape(-1), l2=l2.reshape(-1), o=o.permute(0, 2, 3, 1).reshape(B * H * W, C)
    )
    if return_partial:
        return state
    _require_candidates(l, "query_labels")
    return o / l[:, None]


def _local_score_fused(
    x: torch.Tensor,
    keys: KeyBank,
    coef: torch.Tensor,
    k: int,
    query_labels: torch.Tensor | None,
    flips: bool,
    dtype: torch.dtype,
    return_partial: bool,
    backend: str,
) -> torch.Tensor | PartialState:
    """LS on the fused same-position kernel: query patches by unfold (zero padding), each row's own pixel."""
    from . import fused_patch

    fused_patch.require_fused_inputs(x, keys, dtype, "LS", backend)
    B, C, H, W = x.shape
    q = F.unfold(x, k, padding=k // 2).transpose(1, 2).reshape(B * H * W, C * k * k)
    pix = torch.cartesian_prod(torch.arange(H, device=x.device), torch.arange(W, device=x.device))
    rows_coef = coef.to(torch.float64).repeat_interleave(H * W)
    labels = None if query_labels is None else query_labels.repeat_interleave(H * W)
    state = fused_patch.patch_partial(
        q,
        keys,
        rows_coef,
        pix.repeat(B, 1),
        k,
        query_labels=labels,
        flips=flips,
        start=0,
        stop=keys.n,
        per_row=True,
        backend=backend,
    )
    if return_partial:
        return state
    _require_candidates(state.l, "query_labels")
    return state.mean().reshape(B, H, W, C).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------------------------- PSPC-Square
def crop_masks(image_hw: tuple[int, int], patch: int) -> torch.Tensor:
    """The (H−k+1)(W−k+1) k×k crops fully inside an H×W image as (P, H, W) bool masks, row-major by top-left."""
    H, W = image_hw
    out = torch.zeros((H - patch + 1) * (W - patch + 1), H, W, dtype=torch.bool)
    i = 0
    for r in range(H - patch + 1):
        for c in range(W - patch + 1):
            out[i, r : r + patch, c : c + patch] = True
            i += 1
    return out


def pspc_square(
    x: torch.Tensor,
    keys: KeyBank,
    sigma: float | Sequence[float] | torch.Tensor,
    *,
    patch: int,
    temperature: float = 1.0,
    query_labels: torch.Tensor | None = None,
    flips: bool = True,
    dtype: torch.dtype | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    backend: str = "auto",
) -> torch.Tensor:
    """PSPC-Square (Niedoba et al.): for every k×k crop c fully inside the image, the posterior mean of the whole crop
    over the same crop of every training image (logits −‖x_c − y_{j,c}‖² / (2σ²T)); each pixel then averages the
    crop means of the crops covering it. Any 1 ≤ k ≤ min(H, W) (k = H = W is the optimal denoiser).

    Two exact passes over the candidates, memory O(B·n·H·W) per chunk whatever k is: pass 1 keeps the online
    softmax state (max, normaliser) of every crop; pass 2 forms the normalised weights w_j(c) and spreads them onto
    the pixels (Σ_{c ∋ q} w_j(c), a transposed box sum), so that out(q) = Σ_j y_j(q)·Σ_{c ∋ q} w_j(c) / #{c ∋ q}.

    ``backend``: ``torch`` (this reference), ``triton``, ``cuda`` or ``cpu`` (every crop of every sample in one
    launch of the fused same-position kernel with whole-crop values, direct distances, float32; the overlap average
    is a fold) or ``auto`` (a fused kernel for float32: the C++ one on CPU, Triton / CUDA on a GPU).
    """
    x, coef, query_labels, dtype = _prepare(x, keys, sigma, temperature, query_labels, flips, dtype)
    B, C, H, W = x.shape
    if isinstance(patch, bool) or not isinstance(patch, int) or not 1 <= patch <= min(H, W):
        raise ValueError(f"patch: PSPC crops must fit inside the {H}×{W} image (1 <= k <= {min(H, W)}), got {patch!r}")
    k = patch
    Hc, Wc = H - k + 1, W - k + 1
    dev = x.device
    from .patch_retrieval import choose_patch_backend

    name = choose_patch_backend(backend, x, keys, dtype)[0]
    if name != "torch":
        return _pspc_square_fused(x, keys, coef, k, query_labels, flips, dtype, name)
    item = _item(dtype)
    per_cand = item * (3 * (C + 1) * H * W + B * (4 * H * W + 2 * (Hc + 2 * k) * (Wc + 2 * k) + (C + 1) * H * W))
    step = _chunk_rows(memory_budget, per_cand, _num_candidates(keys, flips))
    neg = -coef.view(B, 1, 1, 1)

    def chunk_logits(y: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        logits = _box_valid(_sqdiff_map(x, y), k, k).mul_(neg)  # (B, n, Hc, Wc)
        mask = _label_mask(query_labels, labels)
        if mask is not None:
            logits.masked_fill_(mask[:, :, None, None], float("-inf"))
        return logits

    m = torch.full((B, Hc, Wc), float("-inf"), dtype=dtype, device=dev)
    l = torch.zeros(B, Hc, Wc, dtype=dtype, device=dev)
    l2 = torch.zeros_like(l)
    for _, y, labels in _candidate_chunks(keys, flips, step, dtype, dev):
        m, l, l2, _, _ = _softmax_step(m, l, l2, chunk_logits(y, labels))
    m, l, l2 = _combine_stats(keys, m, l, l2, "PSPC pass 1")
    _require_candidates(l, "query_labels")
    acc = torch.zeros(B, C + 1, H, W, dtype=dtype, device=dev)  # Σ_j y_j(q)·spread_j(q), then Σ_j spread_j(q)
    for _, y, labels in _candidate_chunks(keys, flips, step, dtype, dev):
        w = torch.exp(chunk_logits(y, labels) - m[:, None]) / l[:, None]
        acc += _spread_average(_box_full(w, k), y)
    acc = _sum_shards(keys, acc, "PSPC pass 2")
    return acc[:, :C] / acc[:, C:]


def _pspc_square_fused(
    x: torch.Tensor,
    keys: KeyBank,
    coef: torch.Tensor,
    k: int,
    query_labels: torch.Tensor | None,
    flips: bool,
    dtype: torch.dtype,
    backend: str,
) -> torch.Tensor:
    """PSPC-Square on the same-position kernel: rows = (sample, crop), each crop's own position, whole-crop values;
    the crop means are overlap-averaged by a fold."""
    from . import fused_patch

    fused_patch.require_fused_inputs(x, keys, dtype, "PSPC", backend)
    B, C, H, W = x.shape
    P = (H - k + 1) * (W - k + 1)
    q = F.unfold(x, k).transpose(1, 2).reshape(B * P, C * k * k)  # crops in row-major top-left order
    top_left = torch.cartesian_prod(torch.arange(H - k + 1, device=x.device), torch.arange(W - k + 1, device=x.device))
    labels = None if query_labels is None else query_labels.repeat_interleave(P)
    state = fused_patch.patch_partial(
        q,
        keys,
        coef.to(torch.float64).repeat_interleave(P),
        (top_left + k // 2).repeat(B, 1),
        k,
        query_labels=labels,
        flips=flips,
        start=0,
        stop=keys.n,
        per_row=True,
        whole=True,
        backend=backend,
    )
    if keys.shard is not None:
        state = keys.shard.group.combine(state, "PSPC retrieval")
    _require_candidates(state.l, "query_labels")
    crops = state.mean().reshape(B, P, C * k * k).transpose(1, 2)
    count = F.fold(torch.ones(1, C * k * k, P, dtype=crops.dtype, device=x.device), (H, W), k)
    return F.fold(crops, (H, W), k) / count


# ----------------------------------------------------------------------------------------------- PSPC-Flex
def _check_masks(masks: torch.Tensor, image_shape: tuple[int, int, int]) -> torch.Tensor:
    _, H, W = image_shape
    if not torch.is_tensor(masks) or masks.dtype != torch.bool:
        raise ValueError(
            f"masks: expected a bool tensor of shape ({H * W}, {H}, {W}), got "
            f"{getattr(masks, 'dtype', type(masks).__name__)}"
        )
    if masks.dim() != 3 or tuple(masks.shape[1:]) != (H, W) or masks.shape[0] < 1:
        raise ValueError(
            f"masks: expected shape (P, {H}, {W}), e.g. ({H * W}, {H}, {W}) for one mask per pixel, "
            f"got {tuple(masks.shape)}"
        )
    flat = masks.reshape(masks.shape[0], H * W)
    empty = (~flat.any(1)).nonzero().flatten()
    if empty.numel():
        raise ValueError(f"masks: {empty.numel()} mask(s) cover no pixel (first: mask {int(empty[0])})")
    uncovered = (~flat.any(0)).nonzero().flatten()
    if uncovered.numel():
        q = int(uncovered[0])
        raise ValueError(
            f"masks: {uncovered.numel()} pixel(s) are covered by no mask, so the overlap average is "
            f"undefined there (first: pixel ({q // W}, {q % W}))"
        )
    return flat


def mask_composite(
    x: torch.Tensor,
    keys: KeyBank,
    sigma: float | Sequence[float] | torch.Tensor,
    masks: torch.Tensor,
    *,
    temperature: float = 1.0,
    query_labels: torch.Tensor | None = None,
    flips: bool = True,
    dtype: torch.dtype | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> torch.Tensor:
    """PSPC-Flex composite: for every mask p ((P, H, W) bool, any number P of masks, applied to all channels) the posterior mean of the masked
    pixels over the same pixels of every training image (logits −Σ_{q ∈ mask_p} ‖x(q) − y_j(q)‖² / (2σ²T)); then
    out(q) = Σ_p [q ∈ mask_p]·mean_p(q) / #{p : q ∈ mask_p}.

    Every mask must cover a pixel and every pixel must be covered (ValueError otherwise). Identical masks are
    evaluated once and weighted by their multiplicity (exactly the same average). Two exact passes as in
    :func:`pspc_square`; the mask matrix is applied in blocks so that memory stays within ``memory_budget``.
    """
    x, coef, query_labels, dtype = _prepare(x, keys, sigma, temperature, query_labels, flips, dtype)
    shape = cast("tuple[int, int, int]", keys.image_shape)  # _prepare checked it
    flat = _check_masks(masks.to(x.device) if torch.is_tensor(masks) else masks, shape)
    uniq, mult = torch.unique(flat, dim=0, return_counts=True)
    _, C, H, W = x.shape
    HW, U, item = H * W, uniq.shape[0], _item(dtype)
    ub = max(1, min(U, (int(memory_budget) // 4) // max(1, HW * item)))  # masks per block
    # One query at a time, candidates in chunks sized for one query: the chunking and every product's shape, and so
    # each sample's summation order, are the same whatever the batch size (a pure function of each sample; the
    # batched form differed by 5e-5 between batch sizes, and was no faster on CPU).
    per_cand = item * (4 * (C + 1) * HW + 3 * HW + 4 * ub)
    step = _chunk_rows(memory_budget // 2, per_cand, _num_candidates(keys, flips))
    rows = [
        _mask_composite_one(
            x[b : b + 1],
            keys,
            coef[b : b + 1],
            None if query_labels is None else query_labels[b : b + 1],
            flips,
            dtype,
            uniq,
            mult,
            ub,
            step,
        )
        for b in range(x.shape[0])
    ]
    return torch.cat(rows) if rows else x.new_zeros(x.shape, dtype=dtype)


def _mask_composite_one(
    x: torch.Tensor,
    keys: KeyBank,
    coef: torch.Tensor,
    query_labels: torch.Tensor | None,
    flips: bool,
    dtype: torch.dtype,
    uniq: torch.Tensor,
    mult: torch.Tensor,
    ub: int,
    step: int,
) -> torch.Tensor:
    """:func:`mask_composite` for one query (1, C, H, W), both passes."""
    B, C, H, W = x.shape
    HW, U, dev = H * W, uniq.shape[0], x.device
    blocks = [(u, min(u + ub, U)) for u in range(0, U, ub)]
    multf = mult.to(dtype)

    def block_logits(s_flat: torch.Tensor, u0: int, u1: int, n: int, mask_bn: torch.Tensor | None) -> torch.Tensor:
        mf = uniq[u0:u1].to(dtype)
        logits = (s_flat @ mf.t()).view(B, n, u1 - u0).mul_(-coef.view(B, 1, 1))
        if mask_bn is not None:
            logits.masked_fill_(mask_bn[:, :, None], float("-inf"))
        return logits

    # Per-block state, replaced rather than written in place (autograd differentiates this reference).
    st = [
        (
            torch.full((B, u1 - u0), float("-inf"), dtype=dtype, device=dev),
            torch.zeros(B, u1 - u0, dtype=dtype, device=dev),
            torch.zeros(B, u1 - u0, dtype=dtype, device=dev),
        )
        for u0, u1 in blocks
    ]
    for _, y, labels in _candidate_chunks(keys, flips, step, dtype, dev):
        n = y.shape[0]
        s_flat = _sqdiff_map(x, y).reshape(B * n, HW)
        mask_bn = _label_mask(query_labels, labels)
        for i, (u0, u1) in enumerate(blocks):
            st[i] = _softmax_step(*st[i], block_logits(s_flat, u0, u1, n, mask_bn))[:3]
    m, l, l2 = (torch.cat([part[i] for part in st], 1) for i in range(3))
    m, l, l2 = _combine_stats(keys, m, l, l2, "PSPC-Flex pass 1")
    _require_candidates(l, "query_labels")
    acc = torch.zeros(B, C + 1, HW, dtype=dtype, device=dev)  # Σ_j y_j(q)·spread_j(q), then Σ_j spread_j(q)
    for _, y, labels in _candidate_chunks(keys, flips, step, dtype, dev):
        n = y.shape[0]
        s_flat = _sqdiff_map(x, y).reshape(B * n, HW)
        mask_bn = _label_mask(query_labels, labels)
        spread = torch.zeros(B * n, HW, dtype=dtype, device=dev)  # Σ_p mult_p·[q ∈ mask_p]·w_j(p)
        for u0, u1 in blocks:
            w = torch.exp(block_logits(s_flat, u0, u1, n, mask_bn) - m[:, None, u0:u1]) / l[:, None, u0:u1]
            spread.addmm_(w.reshape(B * n, u1 - u0), uniq[u0:u1].to(dtype) * multf[u0:u1, None])
        acc += _spread_average(spread.view(B, n, HW), y.reshape(n, C, HW))
    acc = _sum_shards(keys, acc, "PSPC-Flex pass 2")
    return (acc[:, :C] / acc[:, C:]).reshape(B, C, H, W)


TIE_TOLERANCE = 1e-9  # relative: heatmap shares this close to the mask's cut-off count as tied with it


def masks_from_heatmap(heatmap: torch.Tensor, tau: float) -> torch.Tensor:
    """PSPC-Flex masks from (H, W, H, W) non-negative heatmaps (heatmap[i, j] = sensitivity of output pixel (i, j)
    to every input pixel): for each output pixel keep the smallest set of input pixels holding a fraction ``tau``
    of its mass, as the PSPC code does (normalise, sort ascending, keep where the cumulative sum ≥ 1 − τ; τ = 1 keeps
    every pixel), plus every pixel tied with the smallest kept one to within ``TIE_TOLERANCE`` (the PSPC code
    keeps whichever the sort put last). Returns (H·W, H, W) bool, ready for :func:`mask_composite`.
    """
    if not torch.is_tensor(heatmap) or heatmap.dim() != 4 or tuple(heatmap.shape[:2]) != tuple(heatmap.shape[2:]):
        raise ValueError(f"heatmap: expected an (H, W, H, W) tensor, got {tuple(getattr(heatmap, 'shape', ()))}")
    tau = float(tau)
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"tau: expected a mass fraction in (0, 1], got {tau}")
    H, W = heatmap.shape[:2]
    h = heatmap.reshape(H * W, H * W).to(torch.float64)
    if not bool(torch.isfinite(h).all()) or bool((h < 0).any()):
        raise ValueError("heatmap: values must be finite and non-negative")
    total = h.sum(1, keepdim=True)
    if bool((total <= 0).any()):
        raise ValueError(f"heatmap: {int((total <= 0).sum())} output pixel(s) have zero heatmap mass")
    share = h / total
    vals = torch.sort(share, dim=1).values
    keep_sorted = torch.cumsum(vals, dim=1) >= 1.0 - tau
    keep_sorted[:, -1] = True  # the largest entry always holds mass (guards rounding when τ is tiny)
    # Entries equal to the smallest kept one up to rounding are kept with it: which of two tied pixels the sort puts
    # first is decided by rounding noise (thread count, eigensolver), and must not decide the mask.
    smallest_kept = torch.where(keep_sorted, vals, torch.full_like(vals, float("inf"))).min(1, keepdim=True).values
    return (share >= smallest_kept * (1 - TIE_TOLERANCE)).reshape(H * W, H, W)


# ----------------------------------------------------------------------------------------------- pca_locality
def wiener_filter_matrix(eigvals: torch.Tensor, U: torch.Tensor, sigma: float) -> torch.Tensor:
    """The σ-space Wiener filter W_σ = U diag(λ / (λ + σ²)) Uᵀ, (D, D) float64."""
    lam = eigvals.to(torch.float64)
    Uf = U.to(torch.float64)
    return (Uf * (lam / (lam + float(sigma) ** 2))[None, :]) @ Uf.t()


def locality_mask(wiener: torch.Tensor, threshold: float) -> torch.Tensor:
    """pca_locality's binary mask (D, D) bool, mask[n, m] = input n enters the distance of output m.

    Rows of W are divided by their diagonal entry (|diag| < 1e-6 -> 1), then binarised |M[n, m]| ≥ θ·max|M|.
    θ ≤ 0 gives the full mask (note: the studio keeps the real-valued matrix for θ ≤ 0; here it means "no locality").
    """
    threshold = float(threshold)
    if math.isnan(threshold):
        raise ValueError("threshold: got NaN")
    D = wiener.shape[0]
    if threshold <= 0:
        return torch.ones(D, D, dtype=torch.bool, device=wiener.device)
    diag = wiener.diagonal().clone()
    diag = torch.where(diag.abs() < 1e-6, torch.ones_like(diag), diag)
    M = (wiener / diag[:, None]).abs()
    return threshold * M.max() <= M


COORDINATE_FUSED_KERNELS = ("triton", "cuda", "cpu")  # pca_locality's fused kernels


def coordinate_retrieval(
    x: torch.Tensor,
    keys: KeyBank,
    sigma: float | Sequence[float] | torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    query_labels: torch.Tensor | None = None,
    flips: bool = False,
    softmax: str = "exact",
    chunk_size: int | None = None,
    dtype: torch.dtype | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    backend: str = "auto",
) -> torch.Tensor:
    """pca_locality retrieval: for every output coordinate m (channel and pixel, D of them), a softmax over the
    candidates of −d_j(m) / (2σ²T) with d_j(m) = Σ_n mask[n, m]·(x[n] − y_j[n])²; value y_j[m].

    ``mask`` is (D, D) bool (column m = the input support of output m; an empty column gives equal weights, i.e. the
    dataset mean at m). The masked distances are a dense matmul of the (b·n, D) squared-difference rows with column
    blocks of the mask, sized by ``memory_budget``.

    ``softmax="exact"``: the true posterior mean per coordinate (exact online softmax). ``softmax="chunked"``: the
    Analytic Diffusion Studio's "WSSM" — the softmax is normalised within each consecutive block of ``chunk_size``
    candidates in candidate order (stored images, then mirrors), and the per-block means are averaged with equal
    weight (blocks holding no candidate of the sample's class are skipped). That is NOT the posterior mean; it
    exists only to reproduce the studio's numbers (it depends on the block size and on the dataset order).

    ``backend``: ``torch`` (this reference, dense mask matmul), ``triton``, ``cuda`` or ``cpu`` (the fused Triton /
    CUDA-extension / C++ kernels with the mask as a sparse stencil table: work ∝ the mask's nonzeros instead of D²,
    float32) or ``auto`` (for float32 work: Triton on CUDA, else the CUDA extension; the C++ kernel on the CPU).
    """
    if softmax not in SOFTMAX_MODES:
        raise ValueError(f"softmax: expected one of {', '.join(SOFTMAX_MODES)}, got {softmax!r}")
    if softmax == "chunked" and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size: the chunked softmax needs an integer block size >= 1, got {chunk_size!r}")
    x, coef, query_labels, dtype = _prepare(x, keys, sigma, temperature, query_labels, flips, dtype)
    B = x.shape[0]
    D = keys.dim
    if not torch.is_tensor(mask) or mask.dtype != torch.bool or tuple(mask.shape) != (D, D):
        raise ValueError(
            f"mask: expected a ({D}, {D}) bool tensor, got "
            f"{tuple(getattr(mask, 'shape', ()))} {getattr(mask, 'dtype', type(mask).__name__)}"
        )
    dev = x.device
    mask = mask.to(dev)
    xf = x.reshape(B, D)
    from .patch_retrieval import choose_patch_backend

    name = choose_patch_backend(backend, x, keys, dtype, fused=COORDINATE_FUSED_KERNELS)[0]
    if keys.shard is not None and softmax == "chunked":
        raise ValueError(
            "softmax: the chunked softmax averages blocks in the whole set's candidate order, "
            "which a dataset sharded over ranks does not keep; use softmax='exact' or "
            "--parallel samples"
        )
    if name != "torch":
        # A shard makes the whole set's choice (and its refusals): the fused kernel's per-coordinate state,
        # combined over the ranks in rank order as the reference's is.
        return _coordinate_retrieval_fused(name, xf, keys, coef, mask, query_labels, flips, chunk_size, dtype).reshape(
            x.shape
        )
    item = _item(dtype)
    mb = max(1, min(D, (int(memory_budget) // 4) // max(1, D * item)))  # output coordinates per block
    per_cand = item * (2 * D + B * (2 * D + 5 * mb))
    step = _chunk_rows(memory_budget // 2, per_cand, _num_candidates(keys, flips))
    blocks = [(c, min(c + mb, D)) for c in range(0, D, mb)]
    neg = -coef.view(B, 1, 1)

    # Per-column-block state, replaced rather than written in place, so that autograd can differentiate the
    # reference (a denoiser called on x that requires grad runs it).
    def fresh() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        return [
            (
                torch.full((B, c1 - c0), float("-inf"), dtype=dtype, device=dev),
                torch.zeros(B, c1 - c0, dtype=dtype, device=dev),
                torch.zeros(B, c1 - c0, dtype=dtype, device=dev),
                torch.zeros(B, c1 - c0, dtype=dtype, device=dev),
            )
            for c0, c1 in blocks
        ]

    def joined(st: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        return [torch.cat([part[i] for part in st], 1) for i in range(4)]

    st = fresh()
    acc = torch.zeros(B, D, dtype=dtype, device=dev)  # chunked mode: Σ over blocks of the block means
    nblocks = torch.zeros(B, dtype=dtype, device=dev)
    block = chunk_size if softmax == "chunked" else None
    current: int | None = None

    def close_block() -> None:
        nonlocal st, acc, nblocks
        _, l, _, o = joined(st)
        has = l[:, 0] > 0
        acc = acc + torch.where(has[:, None], o / torch.where(has[:, None], l, torch.ones_like(l)), torch.zeros_like(o))
        nblocks = nblocks + has.to(dtype)
        st = fresh()

    for a, y, labels in _candidate_chunks(keys, flips, step, dtype, dev, block=block):
        if block is not None:
            if current is not None and a // block != current:
                close_block()
            current = a // block
        n = y.shape[0]
        yf = y.reshape(n, D)
        e = xf[:, None, :] - yf[None, :, :]
        e = (e * e).reshape(B * n, D)
        lab = _label_mask(query_labels, labels)
        for i, (c0, c1) in enumerate(blocks):
            logits = (e @ mask[:, c0:c1].to(dtype)).view(B, n, c1 - c0).mul_(neg)
            if lab is not None:
                logits.masked_fill_(lab[:, :, None], float("-inf"))
            mm, ll, ll2, p, alpha = _softmax_step(*st[i][:3], logits)
            st[i] = (mm, ll, ll2, st[i][3] * alpha + torch.einsum("bnm,nm->bm", p, yf[:, c0:c1]))
    if block is not None:
        close_block()
        _require_candidates(nblocks, "query_labels")
        return (acc / nblocks[:, None]).reshape(x.shape)
    m, l, l2, o = joined(st)
    if keys.shard is not None:
        combined = keys.shard.group.combine(
            PartialState(m.reshape(-1), l.reshape(-1), l2.reshape(-1), o.reshape(-1, 1)), "pca_locality retrieval"
        )
        l, o = combined.l.reshape(B, D), combined.o.reshape(B, D)
    _require_candidates(l, "query_labels")
    return (o / l).reshape(x.shape)


def _coordinate_retrieval_fused(
    backend: str,
    xf: torch.Tensor,
    keys: KeyBank,
    coef: torch.Tensor,
    mask: torch.Tensor,
    query_labels: torch.Tensor | None,
    flips: bool,
    chunk_size: int | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    from . import fused_coordinate, fused_patch

    fused_patch.require_fused_inputs(xf, keys, dtype, "pca_locality", backend)
    if keys.shard is not None:
        m, l, o = fused_coordinate.coordinate_mean(
            xf,
            keys,
            coef,
            mask,
            query_labels=query_labels,
            flips=flips,
            chunk_size=None,
            backend=backend,
            return_state=True,
        )
        B, D = o.shape
        st = keys.shard.group.combine(
            PartialState(m.reshape(-1), l.reshape(-1), torch.zeros_like(l).reshape(-1), o.reshape(-1, 1)),
            "pca_locality retrieval",
        )
        l, o = st.l.reshape(B, D), st.o.reshape(B, D)
        _require_candidates(l, "query_labels")
        return (o / l).to(torch.float32)
    mean, had = fused_coordinate.coordinate_mean(
        xf, keys, coef, mask, query_labels=query_labels, flips=flips, chunk_size=chunk_size, backend=backend
    )
    _require_candidates(had.to(torch.float32), "query_labels")
    return mean
