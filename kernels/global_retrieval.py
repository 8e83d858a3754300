"""Triton kernels for the global softmax retrieval (docs/design.md §8.1, §8.2).

Two designs, both writing *partials* that the caller combines in a fixed order (no float atomics, so results
are bitwise repeatable):

* ``split_n`` (G1, small batches, memory bound): program (s, b) owns the contiguous key range s and a block of
  queries; every key row is read from HBM once, distances are computed in the *direct* form Σ (q − y)² on
  CUDA cores (no cancellation, exact at every σ), an online softmax (base 2) runs over the range, and
  O += p·y accumulates into the program's own slot of a partial buffer (the key tile is reloaded from L1/L2
  for that, not from HBM). A fused running top-k of (distance, index) keys comes out of the same scan, so
  ``nearest``, ``topk`` screening and the memorisation distances need no second pass.
* ``two_pass`` (G2, large batches, compute bound): pass A is a GEMM of centred queries against the raw keys
  (uint8 or float32) with an epilogue that turns dot products into base-2 logits and per-tile (max, Σ2^z,
  Σ2^2z); pass B is a GEMM P·X that forms P = 2^(z − M) while loading the logit tile. The dot precision is a
  constexpr: IEEE fp32, tf32, or bf16 with the query split into hi + lo halves (uint8 keys are exact in
  bf16, so only the query's rounding remains; ``ops.precision`` states the error bound per row).

The wrappers take and return torch tensors; the ops layer (``ops.triton_backend``) prepares the inputs,
combines the partials and decides which rows each kernel may serve.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

if not hasattr(tl, "topk"):  # public since Triton 3.3; the private sort_impl it wraps moved between releases
    raise ImportError(
        f"analytic_diffusion.kernels needs triton>=3.3 (tl.topk); found triton {triton.__version__}. "
        "Install triton>=3.6 or use backend='torch' / 'cpu' / 'cuda'."
    )

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
if INTERPRET:
    from . import _interpreter_compat

    _interpreter_compat.apply()
PRECISIONS = {"ieee": 0, "tf32": 1, "bf16x2": 2}
_INT64_MAX = tl.constexpr(2**63 - 1)
# Split-N tiles (keys, D chunk): small on the GPU (the 3-D difference tile lives in registers), larger in the
# interpreter, whose cost is per operation rather than per element.
SPLIT_N_BLOCKS = (32, 256) if INTERPRET else (16, 64)
# Two-pass tiles per dot kind: (BLOCK_B, BLOCK_N of pass A, BLOCK_K = pass B's key tile, BLOCK_D, num_warps).
# GPU values: the largest tiles for which ptxas (sm_90a) reports no spills (bench/triton_aot.py); not yet tuned
# on a GPU. The interpreter gets small tiles (every masked lane costs NumPy time there).
TWO_PASS_CONFIG_GPU = {"ieee": (32, 64, 32, 64, 8), "tf32": (64, 128, 32, 64, 8), "bf16x2": (64, 64, 32, 64, 8)}
_TWO_PASS_CONFIG_INTERP = (32, 32, 32, 32, 4)
# Tests set this to fill every output and scratch buffer with garbage (NaN / −1) before each launch, so a
# kernel that leaves any element unwritten, or reads a slot before writing it, fails loudly.
poison_outputs = False


@triton.jit
def _wide(offs, stride):
    """offs·stride in int64. Triton multiplies i32 by i32 in i32, and a row index times a row stride passes 2^31 at
    ImageNet-64 scale (1.28M rows × 12,288 values): every row or slot offset of a kernel goes through here."""
    return offs.to(tl.int64) * stride


def _empty(shape, dtype, device):
    if not poison_outputs:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.full(shape, float("nan") if dtype.is_floating_point else -1, dtype=dtype, device=device)


@triton.jit
def _split_n_kernel(
    Q,
    X,
    COEF,
    XLAB,
    QLAB,
    M,
    L,
    L2,
    O,
    TOPK,
    B,
    N,
    D,
    keys_per_split,
    scale,
    shift,
    stride_q,
    stride_x,
    stride_os,
    stride_ob,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    SOFTMAX: tl.constexpr,
    TOPK_K: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    bmask = offs_b < B
    start = pid_s * keys_per_split
    stop = tl.minimum(start + keys_per_split, N)
    coef = tl.load(COEF + offs_b, mask=bmask, other=0.0)  # base-2 coefficient: logit2 = −coef·dist
    if HAS_LABELS:
        qlab = tl.load(QLAB + offs_b, mask=bmask, other=-1)
    m, l, l2 = _empty_state(BLOCK_B)
    o_base = O + _wide(pid_s, stride_os) + _wide(offs_b, stride_ob)[:, None]
    if SOFTMAX:  # the slot may hold garbage (poisoned in tests): start from zeros
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            tl.store(
                o_base + offs_d[None, :],
                tl.zeros([BLOCK_B, BLOCK_D], tl.float32),
                mask=bmask[:, None] & (offs_d[None, :] < D),
            )
    if TOPK_K > 0:
        best = tl.full([BLOCK_B, TOPK_K], _INT64_MAX, tl.int64)
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < stop
        dist = tl.zeros([BLOCK_B, BLOCK_N], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            dmask = offs_d < D
            x = (
                tl.load(
                    X + _wide(offs_n, stride_x)[:, None] + offs_d[None, :],
                    mask=nmask[:, None] & dmask[None, :],
                    other=0,
                ).to(tl.float32)
                * scale
                + shift
            )
            q = tl.load(
                Q + _wide(offs_b, stride_q)[:, None] + offs_d[None, :], mask=bmask[:, None] & dmask[None, :], other=0.0
            )
            diff = tl.where(dmask[None, None, :], q[:, None, :] - x[None, :, :], 0.0)
            dist += tl.sum(diff * diff, axis=2)
        valid = bmask[:, None] & nmask[None, :]
        if HAS_LABELS:
            xlab = tl.load(XLAB + offs_n, mask=nmask, other=-2)
            valid = valid & (xlab[None, :] == qlab[:, None])
        if SOFTMAX:
            logit = tl.where(valid, -coef[:, None] * dist, float("-inf"))
            m, l, l2, alpha, p = _online_softmax_step(m, l, l2, logit)
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                dmask = offs_d < D
                x = (
                    tl.load(
                        X + _wide(offs_n, stride_x)[:, None] + offs_d[None, :],
                        mask=nmask[:, None] & dmask[None, :],
                        other=0,
                    ).to(tl.float32)
                    * scale
                    + shift
                )
                omask = bmask[:, None] & dmask[None, :]
                o = tl.load(o_base + offs_d[None, :], mask=omask, other=0.0)
                o = o * alpha[:, None] + tl.sum(p[:, :, None] * x[None, :, :], axis=1)
                tl.store(o_base + offs_d[None, :], o, mask=omask)
        if TOPK_K > 0:
            # (distance bits, index) packed in one int64: non-negative fp32 bits order like the floats.
            d = tl.where(valid, dist, float("inf"))
            packed = (d.to(tl.int32, bitcast=True).to(tl.int64) << 32) | offs_n.to(tl.int64)[None, :]
            # Out-of-range lanes sort last; label-excluded keys keep +inf distance and their index (as torch).
            packed = tl.where(bmask[:, None] & nmask[None, :], packed, _INT64_MAX)
            # k smallest = ~(k largest of ~packed): tl.topk keeps the largest, and ~ reverses int64 order exactly.
            tile_best = ~tl.topk(~packed, TOPK_K)
            both = tl.reshape(tl.join(best, tile_best), [BLOCK_B, 2 * TOPK_K])
            best = ~tl.topk(~both, TOPK_K)
    part = _wide(pid_s, B) + offs_b
    _store_state(M, L, L2, part, m, l, l2, bmask)
    if TOPK_K > 0:
        offs_k = tl.arange(0, TOPK_K)
        tl.store(TOPK + _wide(part, TOPK_K)[:, None] + offs_k[None, :], best, mask=bmask[:, None])


def split_n_warps(topk: int) -> int:
    """Warps of the split-N kernel: the sort network of a large top-k spills with 4 (ptxas, sm_90a)."""
    return 8 if topk >= 32 else 4


def split_n(
    q: torch.Tensor,
    x: torch.Tensor,
    coef2: torch.Tensor,
    *,
    scale: float,
    shift: float,
    xlab=None,
    qlab=None,
    splits: int,
    softmax: bool = True,
    topk: int = 0,
    block_b: int = 4,
    block_n: int | None = None,
    block_d: int | None = None,
):
    """Partials of the split-N kernel.

    q (B, D) float32, x (N, D) uint8/float32 (candidate = scale·x + shift), coef2 (B,) base-2 coefficients.
    Returns (m (S, B) base 2, l, l2 (S, B), o (S, B, D) or None, topk keys (S, B, K) int64 or None).
    """
    B, D = q.shape
    N = x.shape[0]
    block_n = block_n or SPLIT_N_BLOCKS[0]
    block_d = block_d or SPLIT_N_BLOCKS[1]
    kk = max(2, 1 << (topk - 1).bit_length()) if topk else 0  # the sort network wants a power of two ≥ 2
    block_n = max(block_n, kk)  # the tile's bottom-k needs at least k lanes
    keys_per_split = triton.cdiv(triton.cdiv(N, splits), block_n) * block_n
    S = triton.cdiv(N, keys_per_split)
    dev = q.device
    m = _empty((S, B), torch.float32, dev)
    l = _empty((S, B), torch.float32, dev)
    l2 = _empty((S, B), torch.float32, dev)
    o = _empty((S, B, D), torch.float32, dev) if softmax else m
    tk = _empty((S, B, max(kk, 1)), torch.int64, dev)
    labels = xlab is not None and qlab is not None  # class filter only when the queries carry labels
    grid = (S, triton.cdiv(B, block_b))
    _split_n_kernel[grid](
        q,
        x,
        coef2,
        xlab if labels else coef2,
        qlab if labels else coef2,
        m,
        l,
        l2,
        o,
        tk,
        B,
        N,
        D,
        keys_per_split,
        float(scale),
        float(shift),
        q.stride(0),
        x.stride(0),
        o.stride(0) if softmax else 0,
        o.stride(1) if softmax else 0,
        BLOCK_B=block_b,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        HAS_LABELS=labels,
        SOFTMAX=softmax,
        TOPK_K=kk,
        num_warps=split_n_warps(kk),
    )
    return m, l, l2, (o if softmax else None), (tk if kk else None)


@triton.jit
def _trunc_bf16(v):
    """v rounded toward zero to bf16, kept in fp32 (exactly representable, so a later bf16 cast is exact)."""
    return (v.to(tl.int32, bitcast=True) & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    if PRECISION == 0:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision="tf32")


@triton.jit
def _acc_dot(acc, a_hi, a_lo, b, PRECISION: tl.constexpr, INTERP: tl.constexpr):
    """acc + a·b. bf16x2: a = a_hi + a_lo, both bf16-exact fp32 tiles, b uint8 (exact in bf16), two MMAs with
    fp32 accumulation; other kinds use a_hi only."""
    if PRECISION == 2:
        if INTERP:  # the interpreter's bf16 dot multiplies bit patterns: run the same exact products in fp32
            bf = b.to(tl.float32)
            acc += tl.dot(a_hi, bf, input_precision="ieee")
            acc += tl.dot(a_lo, bf, input_precision="ieee")
        else:
            bb = b.to(tl.bfloat16)
            acc = tl.dot(a_hi.to(tl.bfloat16), bb, acc)
            acc = tl.dot(a_lo.to(tl.bfloat16), bb, acc)
    else:
        acc += _dot(a_hi, b.to(tl.float32), PRECISION)
    return acc


@triton.jit
def _empty_state(BLOCK: tl.constexpr):
    """(m, l, l2) of a softmax over no candidates yet: m = −inf, sums 0."""
    return tl.full([BLOCK], float("-inf"), tl.float32), tl.zeros([BLOCK], tl.float32), tl.zeros([BLOCK], tl.float32)


@triton.jit
def _online_softmax_step(m, l, l2, logit):
    """Fold a (rows, keys) tile of base-2 logits into the running (m, l, l2); returns (m, l, l2, alpha, p) with
    alpha the rescale of earlier sums and p the tile's weights relative to the new max."""
    m_new = tl.maximum(m, tl.max(logit, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no candidate yet: avoid −inf − −inf
    alpha = tl.exp2(m - m_safe)
    p = tl.exp2(logit - m_safe[:, None])
    l = l * alpha + tl.sum(p, axis=1)
    l2 = l2 * alpha * alpha + tl.sum(p * p, axis=1)
    return m_new, l, l2, alpha, p


@triton.jit
def _store_state(M, L, L2, part, m, l, l2, mask):
    tl.store(M + part, m, mask=mask)
    tl.store(L + part, l, mask=mask)
    tl.store(L2 + part, l2, mask=mask)


@triton.jit
def _logits_kernel(
    QHI,
    QLO,
    X,
    A2,
    KN,
    K2,
    XLAB,
    QLAB,
    LOGITS,
    TM,
    TL,
    TL2,
    B,
    N,
    D,
    stride_q,
    stride_x,
    stride_lb,
    stride_tb,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    HAS_LABELS: tl.constexpr,
    INTERP: tl.constexpr,
):
    """Pass A: z2_bj = a2_b·⟨q_b, x_j⟩ − k2_b·n_j (base 2, per-row constants added by the caller) and per-(row, key tile) max / Σ2^z / Σ2^2z."""
    pid_n = tl.program_id(0)
    pid_b = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    bmask = offs_b < B
    nmask = offs_n < N
    acc = tl.zeros([BLOCK_B, BLOCK_N], tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < D
        xt = tl.load(
            X + _wide(offs_n, stride_x)[None, :] + offs_k[:, None], mask=nmask[None, :] & kmask[:, None], other=0
        )  # (BLOCK_K, BLOCK_N): keys as the dot's second operand, no transpose copy
        qmask = bmask[:, None] & kmask[None, :]
        qh = tl.load(QHI + _wide(offs_b, stride_q)[:, None] + offs_k[None, :], mask=qmask, other=0.0)
        ql = qh
        if PRECISION == 2:
            ql = tl.load(QLO + _wide(offs_b, stride_q)[:, None] + offs_k[None, :], mask=qmask, other=0.0)
        acc = _acc_dot(acc, qh, ql, xt, PRECISION, INTERP)
    a2 = tl.load(A2 + offs_b, mask=bmask, other=0.0)
    k2 = tl.load(K2 + offs_b, mask=bmask, other=0.0)
    kn = tl.load(KN + offs_n, mask=nmask, other=0.0)
    z = a2[:, None] * acc - k2[:, None] * kn[None, :]
    valid = bmask[:, None] & nmask[None, :]
    if HAS_LABELS:
        xlab = tl.load(XLAB + offs_n, mask=nmask, other=-2)
        qlab = tl.load(QLAB + offs_b, mask=bmask, other=-1)
        valid = valid & (xlab[None, :] == qlab[:, None])
    z = tl.where(valid, z, float("-inf"))
    tl.store(LOGITS + _wide(offs_b, stride_lb)[:, None] + offs_n[None, :], z, mask=bmask[:, None] & nmask[None, :])
    tm = tl.max(z, axis=1)
    tm_safe = tl.where(tm == float("-inf"), 0.0, tm)
    p = tl.exp2(z - tm_safe[:, None])
    t = _wide(offs_b, stride_tb) + pid_n
    tl.store(TM + t, tm, mask=bmask)
    tl.store(TL + t, tl.sum(p, axis=1), mask=bmask)
    tl.store(TL2 + t, tl.sum(p * p, axis=1), mask=bmask)


@triton.jit
def _weighted_sum_kernel(
    LOGITS,
    MROW,
    X,
    O,
    B,
    N,
    D,
    keys_per_split,
    stride_lb,
    stride_x,
    stride_os,
    stride_ob,
    BLOCK_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    INTERP: tl.constexpr,
):
    """Pass B: partial O_s[b, d] = Σ_{j in split s} 2^(z_bj − M_b) · x_jd (raw key values; affine map later)."""
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    bmask = offs_b < B
    dmask = offs_d < D
    mrow = tl.load(MROW + offs_b, mask=bmask, other=0.0)  # finite (−inf rows replaced by 0 by the caller)
    start = pid_s * keys_per_split
    stop = tl.minimum(start + keys_per_split, N)
    acc = tl.zeros([BLOCK_B, BLOCK_D], tl.float32)
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < stop
        z = tl.load(
            LOGITS + _wide(offs_b, stride_lb)[:, None] + offs_n[None, :],
            mask=bmask[:, None] & nmask[None, :],
            other=float("-inf"),
        )
        p = tl.exp2(z - mrow[:, None])
        x = tl.load(
            X + _wide(offs_n, stride_x)[:, None] + offs_d[None, :], mask=nmask[:, None] & dmask[None, :], other=0
        )
        p_hi = p
        p_lo = p
        if PRECISION == 2:  # p = hi + lo + r with hi, lo truncated to bf16 (|r| ≤ 2^-14 p)
            p_hi = _trunc_bf16(p)
            p_lo = _trunc_bf16(p - p_hi)
        acc = _acc_dot(acc, p_hi, p_lo, x, PRECISION, INTERP)
    tl.store(
        O + _wide(pid_s, stride_os) + _wide(offs_b, stride_ob)[:, None] + offs_d[None, :],
        acc,
        mask=bmask[:, None] & dmask[None, :],
    )


def two_pass(
    q_hi: torch.Tensor,
    q_lo,
    x: torch.Tensor,
    a2,
    k2,
    key_norms,
    *,
    xlab=None,
    qlab=None,
    precision: str = "ieee",
    splits: int = 8,
    config=None,
):
    """Partials of the two-pass kernels: (m (B,) base 2, l (B,), l2 (B,), o (S, B, D) of raw key values).

    z2_bj = a2_b·⟨q_b, x_j⟩ − k2_b·n_j; per-tile statistics are reduced here in a fixed order.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    B, D = q_hi.shape
    N = x.shape[0]
    dev = q_hi.device
    code = PRECISIONS[precision]
    block_b, block_n, block_k, block_d, warps = config or (
        _TWO_PASS_CONFIG_INTERP if INTERPRET else TWO_PASS_CONFIG_GPU[precision]
    )
    T = triton.cdiv(N, block_n)
    logits = _empty((B, N), torch.float32, dev)
    tm = _empty((B, T), torch.float32, dev)
    tl_ = _empty((B, T), torch.float32, dev)
    tl2 = _empty((B, T), torch.float32, dev)
    labels = xlab is not None and qlab is not None  # class filter only when the queries carry labels
    _logits_kernel[(T, triton.cdiv(B, block_b))](
        q_hi,
        q_lo if q_lo is not None else q_hi,
        x,
        a2,
        key_norms,
        k2,
        xlab if labels else a2,
        qlab if labels else a2,
        logits,
        tm,
        tl_,
        tl2,
        B,
        N,
        D,
        q_hi.stride(0),
        x.stride(0),
        logits.stride(0),
        tm.stride(0),
        BLOCK_B=block_b,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        PRECISION=code,
        HAS_LABELS=labels,
        INTERP=INTERPRET,
        num_warps=warps,
    )
    # Log-sum-exp of the tile statistics (B × N/BLOCK_N numbers), fixed order.
    m = tm.max(1).values
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp2(tm - m_safe[:, None])
    l = (tl_ * w).sum(1)
    l2 = (tl2 * w * w).sum(1)
    keys_per_split = triton.cdiv(triton.cdiv(N, splits), block_k) * block_k
    S = triton.cdiv(N, keys_per_split)
    o = _empty((S, B, D), torch.float32, dev)
    _weighted_sum_kernel[(triton.cdiv(D, block_d), triton.cdiv(B, block_b), S)](
        logits,
        m_safe.contiguous(),
        x,
        o,
        B,
        N,
        D,
        keys_per_split,
        logits.stride(0),
        x.stride(0),
        o.stride(0),
        o.stride(1),
        BLOCK_B=block_b,
        BLOCK_N=block_k,
        BLOCK_D=block_d,
        PRECISION=code,
        INTERP=INTERPRET,
        num_warps=warps,
    )
    return m, l, l2, o
