"""Backend ``triton``: the fused global kernels of ``analytic_diffusion.kernels.global_retrieval``.

This layer prepares the kernels' inputs from a :class:`KeyBank` (centred queries, key norms and per-coordinate
maxima computed once per dataset), decides per query row which kernel serves it (:func:`plan`), combines the
kernels' partials in a fixed order, and returns the same :class:`PartialState` as every other backend.

Row plan (``ops.precision``): batches of at most ``SPLIT_N_MAX_BATCH`` rows go to the split-N kernel (direct
distances, exact at every σ, and memory bound there anyway). Larger batches try the mode's expanded-form dot
kinds, fastest first, on the rows whose logit error bound is within the tolerance; the rest fall back to the
split-N kernel. Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import math
import os
from types import ModuleType
from typing import Any, cast

import torch

from .. import env
from . import precision as prec
from .keys import KeyBank
from .partial import PartialState

SPLIT_N_MAX_BATCH = 8
SPLIT_N_ROWS_PER_LAUNCH = 64  # bounds the (splits, rows, D) partial buffer
TARGET_SPLITS = 264  # ~2 programs per H100 SM; a function of N only, so results never depend on the device
MIN_KEYS_PER_SPLIT = 64
MAX_FUSED_TOPK = 64
LOGIT_BUDGET = env.read("AD_MEMORY_BUDGET")  # bytes of (B, N-chunk) logits in pass A
LN2 = math.log(2.0)
LOG2E = 1.0 / LN2


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(device: torch.device) -> str | None:
    """None when the Triton kernels can run on ``device``, else why not."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device"
    if device.type == "cpu" and interpreting():
        return None
    return f"device {device.type}: Triton runs on CUDA (or on CPU under TRITON_INTERPRET=1)"


def _kernels() -> ModuleType:
    reason = unavailable_reason(torch.device("cpu") if interpreting() else torch.device("cuda"))
    if reason is not None and reason != "no CUDA device":
        raise RuntimeError(f"backend 'triton': {reason}")
    from ..kernels import global_retrieval

    return global_retrieval


def _check(q: torch.Tensor, keys: KeyBank, dtype: torch.dtype) -> None:
    reason = unavailable_reason(q.device)
    if reason is not None:
        raise ValueError(f"backend 'triton': {reason}")
    if keys.device != q.device:
        raise ValueError(
            f"backend 'triton' needs the queries and the dataset on one device "
            f"(queries on {q.device}, dataset on {keys.device})"
        )
    if dtype != torch.float32:
        raise ValueError(
            f"dtype: backend 'triton' computes in float32 (precision modes choose the dot), got {dtype}; "
            "use backend='torch' for float64"
        )
    if keys.values.dtype not in (torch.uint8, torch.float32):
        raise ValueError(f"backend 'triton' supports uint8 or float32 datasets, got {keys.values.dtype}")


def _splits(n: int) -> int:
    return max(1, min(TARGET_SPLITS, n // MIN_KEYS_PER_SPLIT))


def _dataset_constants(keys: KeyBank, device: torch.device | str) -> dict[str, Any]:
    """Raw key matrix, labels (int32), centre, key norms ‖y_j − c‖² and per-coordinate max |u|, once per device."""

    def make() -> dict[str, Any]:
        c = keys.get_center(torch.float64).to(device)
        norms = torch.empty(keys.n, dtype=torch.float64, device=device)
        step = max(1, (1 << 24) // max(1, keys.dim))
        absmax = torch.zeros(keys.dim, dtype=torch.float64, device=device)
        for s in range(0, keys.n, step):
            e = min(s + step, keys.n)
            y = keys.rows(s, e, torch.float64, device)
            norms[s:e] = ((y - c) ** 2).sum(1)
            absmax = torch.maximum(absmax, keys.values[s:e].to(device=device, dtype=torch.float64).abs().max(0).values)
        return {
            "x": keys.values.to(device).contiguous(),
            "labels": None if keys.labels is None else keys.labels.to(device=device, dtype=torch.int32),
            "center": c,
            "norms": norms.to(torch.float32),
            "norm_max": float(norms.max()),
            "absmax": absmax,
        }

    return keys.cached(f"triton:{device}", make)


def plan(
    q: torch.Tensor, keys: KeyBank, coef: torch.Tensor, precision: str = "exact", max_logit_error: float | None = None
) -> list[tuple[str, torch.Tensor]]:
    """Which kernel serves which query rows: [(kernel, row indices)], kernel ∈ split_n, two_pass:<dot kind>."""
    B = q.shape[0]
    rows = torch.arange(B, device=q.device)
    if B <= SPLIT_N_MAX_BATCH:
        return [("split_n", rows)]
    consts = _dataset_constants(keys, q.device)
    tol = prec.tolerance(precision, max_logit_error)
    qc = q.to(torch.float64) - consts["center"]
    left = torch.ones(B, dtype=torch.bool, device=q.device)
    out: list[tuple[str, torch.Tensor]] = []
    for kind in prec.dot_kinds(precision):
        if kind == "bf16x2" and keys.values.dtype != torch.uint8:
            continue  # float keys are not exact in bf16: the bound's key term would not hold
        bound = prec.logit_error_bound(coef, qc, consts["absmax"], keys.scale, consts["norm_max"], kind)
        sel = left & (bound <= tol)
        if bool(sel.any()):
            out.append((f"two_pass:{kind}", rows[sel]))
            left &= ~sel
    if bool(left.any()):
        out.append(("split_n", rows[left]))
    return out


def _split_n_state(
    q: torch.Tensor, consts: dict[str, Any], keys: KeyBank, coef: torch.Tensor, qlab: torch.Tensor | None
) -> PartialState:
    """Exact partial state by the split-N kernel, in row blocks; splits combined in a fixed order."""
    k = _kernels()
    parts = []
    for b in range(0, q.shape[0], SPLIT_N_ROWS_PER_LAUNCH):
        qb = q[b : b + SPLIT_N_ROWS_PER_LAUNCH].to(torch.float32).contiguous()
        cb = (coef[b : b + SPLIT_N_ROWS_PER_LAUNCH] * LOG2E).to(torch.float32).contiguous()
        lb = None if qlab is None else qlab[b : b + SPLIT_N_ROWS_PER_LAUNCH]
        m2, l, l2, o, _ = k.split_n(
            qb,
            consts["x"],
            cb,
            scale=keys.scale,
            shift=keys.shift,
            xlab=consts["labels"],
            qlab=lb,
            splits=_splits(keys.n),
            softmax=True,
        )
        m = m2.max(0).values
        m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        w = torch.exp2(m2 - m_safe)  # (S, B); a split with no candidate has m2 = −inf → weight 0
        parts.append(PartialState(m=m * LN2, l=(l * w).sum(0), l2=(l2 * w * w).sum(0), o=(o * w[:, :, None]).sum(0)))
    return _cat(parts)


def _two_pass_state(
    q: torch.Tensor, consts: dict[str, Any], keys: KeyBank, coef: torch.Tensor, qlab: torch.Tensor | None, kind: str
) -> PartialState:
    """Partial state by the two-pass kernels (expanded form on centred queries), key chunks combined in order."""
    k = _kernels()
    c = consts["center"]
    qc = q.to(torch.float64) - c
    # logit = 2·coef·scale·⟨qc, u⟩ − coef·n_j + const_b; the per-row constant is added back in float64.
    const = coef * (2.0 * keys.shift * qc.sum(1) - 2.0 * (qc @ c) - (qc * qc).sum(1))
    q32 = qc.to(torch.float32)
    if kind == "bf16x2":
        q_hi = q32.to(torch.bfloat16).to(torch.float32)
        q_lo = (q32 - q_hi).to(torch.bfloat16).to(torch.float32).contiguous()
    else:
        q_hi, q_lo = q32, None
    a2 = (2.0 * coef * keys.scale * LOG2E).to(torch.float32).contiguous()
    k2 = (coef * LOG2E).to(torch.float32).contiguous()
    x = consts["x"]
    B, N = q.shape[0], keys.n
    step = max(1, min(N, LOGIT_BUDGET // (4 * B)))
    state: PartialState | None = None
    for s in range(0, N, step):
        e = min(s + step, N)
        xl = None if consts["labels"] is None else consts["labels"][s:e]
        m2, l, l2, o = k.two_pass(
            q_hi.contiguous(),
            q_lo,
            x[s:e],
            a2,
            k2,
            consts["norms"][s:e],
            xlab=xl,
            qlab=qlab,
            precision=kind,
            splits=max(1, min(8, (e - s) // 1024)),
        )
        m = m2.to(torch.float64) * LN2 + const
        raw = o.sum(0).to(torch.float64)
        chunk = PartialState(
            m=m,
            l=l.to(torch.float64),
            l2=l2.to(torch.float64),
            o=keys.scale * raw + keys.shift * l.to(torch.float64)[:, None],
        )
        state = chunk if state is None else state.combine(chunk)
    return cast(PartialState, state).to(torch.float32)  # N >= 1: one chunk at least


def _cat(parts: list[PartialState]) -> PartialState:
    return PartialState(*(torch.cat([getattr(p, f) for p in parts]) for f in ("m", "l", "l2", "o")))


def softmax_partial(
    q: torch.Tensor,
    keys: KeyBank,
    coef: torch.Tensor,
    *,
    query_labels: torch.Tensor | None = None,
    dtype: torch.dtype,
    precision: str = "exact",
    max_logit_error: float | None = None,
) -> PartialState:
    """Partial state (nats) of logits −coef_b·‖q_b − y_j‖², rows served as :func:`plan` says."""
    _check(q, keys, dtype)
    consts = _dataset_constants(keys, q.device)
    coef = coef.to(device=q.device, dtype=torch.float64)
    qlab = None if query_labels is None else query_labels.to(device=q.device, dtype=torch.int32)
    B, D = q.shape
    out = PartialState.empty(B, D, dtype=torch.float32, device=q.device)
    for kernel, rows in plan(q, keys, coef, precision, max_logit_error):
        lab = None if qlab is None else qlab[rows].contiguous()
        if kernel == "split_n":
            st = _split_n_state(q[rows], consts, keys, coef[rows], lab)
        else:
            st = _two_pass_state(q[rows], consts, keys, coef[rows], lab, kernel.split(":", 1)[1])
        out.m[rows], out.l[rows], out.l2[rows], out.o[rows] = st.m, st.l, st.l2, st.o
    return out


def knn(
    q: torch.Tensor, keys: KeyBank, k: int, *, query_labels: torch.Tensor | None = None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """k nearest rows by direct fp32 distances from the split-N kernel's fused top-k: (dist2, index), ascending,
    ties by index; a row with fewer than k allowed candidates gets +inf distances (as the torch backend)."""
    _check(q, keys, dtype)
    if k > MAX_FUSED_TOPK:
        raise ValueError(
            f"k: the fused top-k keeps at most {MAX_FUSED_TOPK} neighbours per row, got {k}; "
            "use backend='torch' for larger k"
        )
    kern = _kernels()
    consts = _dataset_constants(keys, q.device)
    qlab = None if query_labels is None else query_labels.to(device=q.device, dtype=torch.int32)
    dists, index = [], []
    for b in range(0, q.shape[0], SPLIT_N_ROWS_PER_LAUNCH):
        qb = q[b : b + SPLIT_N_ROWS_PER_LAUNCH].to(torch.float32).contiguous()
        lb = None if qlab is None else qlab[b : b + SPLIT_N_ROWS_PER_LAUNCH].contiguous()
        zeros = torch.zeros(qb.shape[0], dtype=torch.float32, device=q.device)
        _, _, _, _, packed = kern.split_n(
            qb,
            consts["x"],
            zeros,
            scale=keys.scale,
            shift=keys.shift,
            xlab=consts["labels"],
            qlab=lb,
            splits=_splits(keys.n),
            softmax=False,
            topk=k,
        )
        packed = packed.permute(1, 0, 2).reshape(qb.shape[0], -1)
        packed = torch.sort(packed, dim=1).values[:, :k]  # (distance bits, index) order = (distance, index) order
        d = (packed >> 32).to(torch.int32).view(torch.float32)
        i = packed & 0xFFFFFFFF
        d = torch.where(packed == torch.iinfo(torch.int64).max, torch.full_like(d, float("inf")), d)
        dists.append(d)
        index.append(torch.where(packed == torch.iinfo(torch.int64).max, torch.zeros_like(i), i))
    return torch.cat(dists), torch.cat(index)
