"""Triton kernel for pca_locality's per-coordinate softmax (docs/design.md §8.5): sparse stencils.

Every output coordinate m (channel and pixel) has its own input support S(m) (a column of the binary Wiener
mask) and its own softmax over the candidates:

    logit_jm = −coef · Σ_{n ∈ S(m)} (x[n] − y_j[n])²,      value_jm = y_j[vidx[m]]

The reference forms these distances as a dense (B·N, D) × (D, D) matmul with the mask. Here the mask is a stencil
table (NNZ, D) of input indices per output (−1 = padding), so the work is B·N·Σ|S(m)| instead of B·N·D²; the
candidates' values are gathered straight from the resident uint8 (or float32) images with the affine map applied
in registers. A mirrored pass reuses the kernel with the mirrored query, stencil and value index (the caller's).

Program (mb, b, s) owns BLOCK_M output coordinates of query b and candidate range SPLITS[s]:SPLITS[s+1]; it loops
over BLOCK_N candidates at a time, accumulates direct-form distances over the padded support (no cancellation:
exact at every σ), runs an online softmax in base 2 and accumulates the values. Label filtering is per candidate
(XLAB[j] == QLAB[b]). Partials per (split, query, coordinate) are combined by the caller: log-sum-exp for the
exact softmax, or one mean per split when the splits are the chunks of the studio's chunk-averaged softmax.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .global_retrieval import INTERPRET, _empty, _empty_state, _online_softmax_step, _wide

# (output coordinates, candidates) per program; the 2-D distance tile lives in registers on the GPU.
BLOCKS = (32, 64) if INTERPRET else (32, 32)


@triton.jit
def _coordinate_kernel(
    X,
    IMG,
    SUPP,
    VIDX,
    COEF,
    SPLITS,
    XLAB,
    QLAB,
    M,
    L,
    O,
    B,
    D,
    nnz,
    scale,
    shift,
    HAS_LABELS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = offs_m < D
    coef = tl.load(COEF + b)  # base 2
    vidx = tl.load(VIDX + offs_m, mask=mmask, other=0)
    x_row = X + b.to(tl.int64) * D
    if HAS_LABELS:
        qlab = tl.load(QLAB + b)
    j_start = tl.load(SPLITS + pid_s)
    j_stop = tl.load(SPLITS + pid_s + 1)
    m, l, l2 = _empty_state(BLOCK_M)
    o = tl.zeros([BLOCK_M], tl.float32)
    for n0 in range(j_start, j_stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < j_stop
        rows = IMG + offs_n.to(tl.int64) * D
        dist = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for t in range(nnz):
            idx = tl.load(SUPP + t * D + offs_m, mask=mmask, other=-1)  # (NNZ, D): coalesced along m
            on = idx >= 0
            xv = tl.load(x_row + idx, mask=on, other=0.0)
            yv = (
                tl.load(rows[None, :] + idx[:, None], mask=on[:, None] & nmask[None, :], other=0).to(tl.float32) * scale
                + shift
            )
            diff = tl.where(on[:, None], xv[:, None] - yv, 0.0)
            dist += diff * diff
        valid = mmask[:, None] & nmask[None, :]
        if HAS_LABELS:
            lab = tl.load(XLAB + offs_n, mask=nmask, other=0)
            valid = valid & (lab == qlab)[None, :]
        logit = tl.where(valid, -coef * dist, float("-inf"))
        m, l, l2, alpha, p = _online_softmax_step(m, l, l2, logit)
        v = (
            tl.load(rows[None, :] + vidx[:, None], mask=mmask[:, None] & nmask[None, :], other=0).to(tl.float32) * scale
            + shift
        )
        o = o * alpha + tl.sum(p * v, axis=1)
    part = (_wide(pid_s, B) + b) * D + offs_m
    tl.store(M + part, m, mask=mmask)
    tl.store(L + part, l, mask=mmask)
    tl.store(O + part, o, mask=mmask)


def coordinate_partials(
    x: torch.Tensor,
    images: torch.Tensor,
    stencil: torch.Tensor,
    value_index: torch.Tensor,
    coef2: torch.Tensor,
    splits: torch.Tensor,
    *,
    scale: float,
    shift: float,
    image_labels=None,
    query_labels=None,
):
    """(m base 2, l, o), each (S, B, D) float32: the softmax partials of every (split, query, coordinate).

    ``x`` (B, D) float32 queries; ``images`` (N, D) uint8 or float32 candidates (value = scale·raw + shift);
    ``stencil`` (NNZ, D) int32 input indices per output, −1 padded; ``value_index`` (D,) int32; ``coef2`` (B,)
    float32 base-2 coefficients; ``splits`` (S + 1,) int32 increasing candidate boundaries.
    """
    B, D = x.shape
    S = splits.numel() - 1
    bm, bn = BLOCKS
    dev = x.device
    m = _empty((S, B, D), torch.float32, dev)
    l = _empty((S, B, D), torch.float32, dev)
    o = _empty((S, B, D), torch.float32, dev)
    has_labels = image_labels is not None
    dummy = splits  # never read without labels
    _coordinate_kernel[(triton.cdiv(D, bm), B, S)](
        x,
        images,
        stencil,
        value_index,
        coef2,
        splits,
        image_labels if has_labels else dummy,
        query_labels if has_labels else dummy,
        m,
        l,
        o,
        B,
        D,
        stencil.shape[0],
        float(scale),
        float(shift),
        HAS_LABELS=has_labels,
        BLOCK_M=bm,
        BLOCK_N=bn,
        num_warps=4,
    )
    return m, l, o
