"""Triton kernel for the patch softmax of ELS / bbELS (docs/design.md §8.4): implicit im2col.

For query row r (the C·k² patch around one output pixel) and candidates j = (training image n, centre position
p) from an image list × a position list:

    logit_rj = −coef_r · ‖q_r − patch_k(image n, centre p)‖²,     value_j = the centre pixel (C values)

where the training patch is cut from the image zero-padded (in [-1, 1] space: the value 0.0) by k//2. The key
patches are never materialised: each program gathers its key tile straight from the resident uint8 images
(affine map and padding applied in registers), so the training set is the only large input whatever k is.

Program (t, s) owns a tile of BLOCK_Q query rows and the s-th contiguous slice of the image list; it loops over
its images and over BLOCK_P positions at a time, computes direct-form distances Σ (q − y)² over C·k² in
BLOCK_F chunks on CUDA cores (no cancellation: exact at every σ), runs an online softmax in base 2, and
accumulates the C centre values. Tile skipping: when no row of the query tile gets a weight above 2^-SKIP
of its running maximum from a key tile, the exponentials and the value update of that tile are skipped (a
large win at low noise; the neglected mass is below N·P·2^-SKIP of the total). Partials per (split, row) are
combined by the caller in a fixed order.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .global_retrieval import _empty, _empty_state, _online_softmax_step, _store_state, _wide

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
SKIP_BITS = 64.0  # base-2 logit margin below the running max beyond which a whole key tile is skipped
# (query rows, positions, feature chunk) per program; the 3-D difference tile lives in registers on the GPU.
BLOCKS = (16, 32, 32) if INTERPRET else (32, 16, 16)  # GPU: no ptxas spills for C ∈ {1, 3}, k ≤ 15


@triton.jit
def _patch_kernel(
    Q,
    IMG,
    IMGIDX,
    POS,
    COEF,
    M,
    L,
    L2,
    O,
    n_rows,
    n_img,
    n_pos,
    imgs_per_split,
    H,
    W,
    scale,
    shift,
    stride_q,
    SKIP,
    K: tl.constexpr,
    C: tl.constexpr,
    C_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    pid_q = tl.program_id(0)
    pid_s = tl.program_id(1)
    F: tl.constexpr = C * K * K
    D: tl.constexpr = K // 2
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    qmask = offs_q < n_rows
    coef = tl.load(COEF + offs_q, mask=qmask, other=0.0)  # base 2
    m, l, l2 = _empty_state(BLOCK_Q)
    o = tl.zeros([BLOCK_Q, C_PAD], tl.float32)
    offs_c = tl.arange(0, C_PAD)
    cmask = offs_c < C
    hw = H * W
    q_rows = Q + _wide(offs_q, stride_q)  # row pointers once, outside the loops (int64 offsets cost registers)
    i_start = pid_s * imgs_per_split
    i_stop = tl.minimum(i_start + imgs_per_split, n_img)
    for i in range(i_start, i_stop):
        base = tl.load(IMGIDX + i).to(tl.int64) * (C * hw)
        for p0 in range(0, n_pos, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            pmask = offs_p < n_pos
            pr = tl.load(POS + 2 * offs_p, mask=pmask, other=0)
            pc = tl.load(POS + 2 * offs_p + 1, mask=pmask, other=0)
            dist = tl.zeros([BLOCK_Q, BLOCK_P], tl.float32)
            for f0 in range(0, F, BLOCK_F):
                offs_f = f0 + tl.arange(0, BLOCK_F)
                fmask = offs_f < F
                ch = offs_f // (K * K)
                a = (offs_f // K) % K - D
                b = offs_f % K - D
                rr = pr[:, None] + a[None, :]
                cc = pc[:, None] + b[None, :]
                inside = (rr >= 0) & (rr < H) & (cc >= 0) & (cc < W) & pmask[:, None] & fmask[None, :]
                u = tl.load(IMG + base + ch[None, :] * hw + rr * W + cc, mask=inside, other=0)
                key = tl.where(inside, u.to(tl.float32) * scale + shift, 0.0)  # zero padding in value space
                q = tl.load(q_rows[:, None] + offs_f[None, :], mask=qmask[:, None] & fmask[None, :], other=0.0)
                diff = tl.where(fmask[None, None, :], q[:, None, :] - key[None, :, :], 0.0)
                dist += tl.sum(diff * diff, axis=2)
            logit = tl.where(qmask[:, None] & pmask[None, :], -coef[:, None] * dist, float("-inf"))
            tile_max = tl.max(logit, axis=1)
            # Skip the tile when every row's best key here is negligible next to that row's running max.
            # Huge while a row has no candidate yet (m = −inf is clamped so that −inf − −inf never occurs).
            gap = tl.where(qmask, tile_max - tl.maximum(m, -3.0e38), float("-inf"))
            if tl.max(gap, axis=0) > -SKIP:
                m, l, l2, alpha, p = _online_softmax_step(m, l, l2, logit)
                v = (
                    tl.load(
                        IMG + base + offs_c[None, :] * hw + (pr * W + pc)[:, None],
                        mask=pmask[:, None] & cmask[None, :],
                        other=0,
                    ).to(tl.float32)
                    * scale
                    + shift
                )
                o = o * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
    part = pid_s * n_rows + offs_q  # the slot: S·rows stays far below 2^31 (the host sizes S·rows·C to its budget)
    _store_state(M, L, L2, part, m, l, l2, qmask)
    tl.store(O + _wide(part, C)[:, None] + offs_c[None, :], o, mask=qmask[:, None] & cmask[None, :])


def patch_partials(
    q: torch.Tensor,
    images: torch.Tensor,
    image_index: torch.Tensor,
    positions: torch.Tensor,
    coef2: torch.Tensor,
    *,
    k: int,
    scale: float,
    shift: float,
    splits: int,
    skip_bits=SKIP_BITS,
):
    """Partials (m base 2, l, l2 (S, Q); o (S, Q, C)) of the patch softmax.

    q (Q, C·k²) float32 in (C, k, k) layout; images (N, C, H, W) uint8 or float32 (candidate = scale·u + shift,
    zero outside); image_index (n,) int32 images to scan; positions (P, 2) int32 centres; coef2 (Q,) base 2.
    """
    Qn = q.shape[0]
    _, C, H, W = images.shape
    n_img = image_index.numel()
    per = triton.cdiv(n_img, max(1, splits))
    S = triton.cdiv(n_img, per)
    dev = q.device
    m = _empty((S, Qn), torch.float32, dev)
    l = _empty((S, Qn), torch.float32, dev)
    l2 = _empty((S, Qn), torch.float32, dev)
    o = _empty((S, Qn, C), torch.float32, dev)
    bq, bp, bf = BLOCKS
    _patch_kernel[(triton.cdiv(Qn, bq), S)](
        q,
        images,
        image_index,
        positions,
        coef2,
        m,
        l,
        l2,
        o,
        Qn,
        n_img,
        positions.shape[0],
        per,
        H,
        W,
        float(scale),
        float(shift),
        q.stride(0),
        float(skip_bits),
        K=k,
        C=C,
        C_PAD=max(2, triton.next_power_of_2(C)),
        BLOCK_Q=bq,
        BLOCK_P=bp,
        BLOCK_F=bf,
        num_warps=4,
    )
    return m, l, l2, o


@triton.jit
def _same_position_keys(
    IMG, base, nmask, pr, pc, f0, H, W, scale, shift, K: tl.constexpr, C: tl.constexpr, BLOCK_F: tl.constexpr
):
    """Features f0 … f0 + BLOCK_F of the k×k patches centred at (pr, pc) (one per row) of the images at ``base``:
    a (rows, images, BLOCK_F) tile, zero outside the image and beyond C·k²; also the feature offsets and mask."""
    F: tl.constexpr = C * K * K
    D: tl.constexpr = K // 2
    offs_f = f0 + tl.arange(0, BLOCK_F)
    fmask = offs_f < F
    ch = offs_f // (K * K)
    rr = pr[:, None] + ((offs_f // K) % K - D)[None, :]
    cc = pc[:, None] + (offs_f % K - D)[None, :]
    inside = (rr >= 0) & (rr < H) & (cc >= 0) & (cc < W) & fmask[None, :]  # (Q, F)
    where = ch[None, :] * (H * W) + rr * W + cc
    lmask = inside[:, None, :] & nmask[None, :, None]
    u = tl.load(IMG + base[None, :, None] + where[:, None, :], mask=lmask, other=0)
    return offs_f, fmask, tl.where(lmask, u.to(tl.float32) * scale + shift, 0.0)


@triton.jit
def _same_position_kernel(
    Q,
    IMG,
    IMGIDX,
    POS,
    COEF,
    M,
    L,
    L2,
    O,
    n_rows,
    n_img,
    imgs_per_split,
    H,
    W,
    scale,
    shift,
    stride_q,
    K: tl.constexpr,
    C: tl.constexpr,
    C_PAD: tl.constexpr,
    WHOLE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """The same-position rule: row r's candidates are the k×k patches of every listed image centred at row r's
    own position POS[r]; keys are gathered per (row, image) from the uint8 images, zero-padded. Values: the
    centre pixel (C values, LS) or, with WHOLE, the whole patch (C·k² values, PSPC), accumulated in the
    program's own slot of O (too large for registers)."""
    pid_q = tl.program_id(0)
    pid_s = tl.program_id(1)
    F: tl.constexpr = C * K * K
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    qmask = offs_q < n_rows
    coef = tl.load(COEF + offs_q, mask=qmask, other=0.0)
    pr = tl.load(POS + 2 * offs_q, mask=qmask, other=0)
    pc = tl.load(POS + 2 * offs_q + 1, mask=qmask, other=0)
    m, l, l2 = _empty_state(BLOCK_Q)
    o = tl.zeros([BLOCK_Q, C_PAD], tl.float32)
    offs_c = tl.arange(0, C_PAD)
    cmask = offs_c < C
    hw = H * W
    part = pid_s * n_rows + offs_q  # the slot index: S·rows stays far below 2^31
    o_rows = O + _wide(part, F if WHOLE else C)  # the slot's row pointers: slot offsets part·F pass 2^31 at scale
    if WHOLE:  # the slot starts at 0 (the first tile rescales it by alpha = 0, and 0 · a NaN poison is NaN)
        for f0 in range(0, F, BLOCK_F):
            offs_f = f0 + tl.arange(0, BLOCK_F)
            tl.store(
                o_rows[:, None] + offs_f[None, :],
                tl.zeros([BLOCK_Q, BLOCK_F], tl.float32),
                mask=qmask[:, None] & (offs_f < F)[None, :],
            )
    i_start = pid_s * imgs_per_split
    i_stop = tl.minimum(i_start + imgs_per_split, n_img)
    for n0 in range(i_start, i_stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < i_stop
        base = tl.load(IMGIDX + offs_n, mask=nmask, other=0).to(tl.int64) * (C * hw)
        dist = tl.zeros([BLOCK_Q, BLOCK_N], tl.float32)
        for f0 in range(0, F, BLOCK_F):
            offs_f, fmask, key = _same_position_keys(IMG, base, nmask, pr, pc, f0, H, W, scale, shift, K, C, BLOCK_F)
            q = tl.load(
                Q + _wide(offs_q, stride_q)[:, None] + offs_f[None, :], mask=qmask[:, None] & fmask[None, :], other=0.0
            )
            diff = tl.where(fmask[None, None, :], q[:, None, :] - key, 0.0)
            dist += tl.sum(diff * diff, axis=2)
        logit = tl.where(qmask[:, None] & nmask[None, :], -coef[:, None] * dist, float("-inf"))
        m, l, l2, alpha, p = _online_softmax_step(m, l, l2, logit)
        if WHOLE:
            for f0 in range(0, F, BLOCK_F):
                offs_f, fmask, key = _same_position_keys(
                    IMG, base, nmask, pr, pc, f0, H, W, scale, shift, K, C, BLOCK_F
                )
                slot = o_rows[:, None] + offs_f[None, :]
                smask = qmask[:, None] & fmask[None, :]
                prev = tl.load(slot, mask=smask, other=0.0)
                tl.store(slot, prev * alpha[:, None] + tl.sum(p[:, :, None] * key, axis=1), mask=smask)
        else:
            vmask = qmask[:, None, None] & nmask[None, :, None] & cmask[None, None, :]
            v = (
                tl.load(
                    IMG + base[None, :, None] + offs_c[None, None, :] * hw + (pr * W + pc)[:, None, None],
                    mask=vmask,
                    other=0,
                ).to(tl.float32)
                * scale
                + shift
            )
            o = o * alpha[:, None] + tl.sum(p[:, :, None] * v, axis=1)
    _store_state(M, L, L2, part, m, l, l2, qmask)
    if not WHOLE:
        tl.store(o_rows[:, None] + offs_c[None, :], o, mask=qmask[:, None] & cmask[None, :])


# (query rows, images, feature chunk) of the same-position kernel: its key tile is 3-D (row, image, feature).
SAME_POSITION_BLOCKS = (16, 16, 32) if INTERPRET else (16, 16, 16)


def same_position_warps(features: int, whole: bool) -> int:
    """Warps of the same-position kernel. Whole-patch values with a masked feature tail (C·k² not a multiple of
    BLOCK_F) spill at 4 warps on sm_90 (C=1, k=15); 8 warps halve the per-thread tile and compile spill-free for
    C ∈ {1, 3}, k ≤ 32 (bench/triton_aot.py); without a tail 4 warps are spill-free and 8 are not."""
    return 8 if whole and features % SAME_POSITION_BLOCKS[2] else 4


def same_position_partials(
    q: torch.Tensor,
    images: torch.Tensor,
    image_index: torch.Tensor,
    row_positions,
    coef2: torch.Tensor,
    *,
    k: int,
    scale: float,
    shift: float,
    splits: int,
    whole: bool = False,
):
    """Partials like :func:`patch_partials`, but row r's only candidate position is ``row_positions[r]``; with
    ``whole`` the value is the whole C·k² patch (o has C·k² columns) instead of the centre pixel."""
    Qn = q.shape[0]
    _, C, H, W = images.shape
    n_img = image_index.numel()
    bq, bn, bf = SAME_POSITION_BLOCKS
    per = triton.cdiv(triton.cdiv(n_img, max(1, splits)), bn) * bn
    S = triton.cdiv(n_img, per)
    dev = q.device
    m = _empty((S, Qn), torch.float32, dev)
    l = _empty((S, Qn), torch.float32, dev)
    l2 = _empty((S, Qn), torch.float32, dev)
    o = _empty((S, Qn, C * k * k if whole else C), torch.float32, dev)
    _same_position_kernel[(triton.cdiv(Qn, bq), S)](
        q,
        images,
        image_index,
        row_positions,
        coef2,
        m,
        l,
        l2,
        o,
        Qn,
        n_img,
        per,
        H,
        W,
        float(scale),
        float(shift),
        q.stride(0),
        K=k,
        C=C,
        C_PAD=max(2, triton.next_power_of_2(C)),
        WHOLE=whole,
        BLOCK_Q=bq,
        BLOCK_N=bn,
        BLOCK_F=bf,
        num_warps=same_position_warps(C * k * k, whole),
    )
    return m, l, l2, o
