"""Patch retrieval: a softmax over training *patches* generated on the fly (the ELS / bbELS primitive).

For query row r (one output pixel of one sample) with patch q_r (C·k² values, layout (C, k, k) as
``F.unfold``) and the candidate patches y_j cut from the training images at a set of centre positions:

    logit_rj = −‖q_r − y_j‖² / (2 σ_r² T)
    out_r    = Σ_j softmax_j(logit_r) · v_j,       v_j = the centre pixel of y_j (C values)

Keys are not values (the value is the centre pixel) and keys are never stored: each chunk of training images
is converted from uint8 through the KeyBank's affine map, zero-padded by d = k//2 *only inside the window the
chunk's positions need*, and cut into patches by an index gather (im2col). Mirrored images (``flips``) are
never built either: the patch of flip(x) centred at (r, c) is the mirror of the patch of x centred at
(r, W−1−c), with the same centre pixel, so the mirrored half is a second pass with mirrored positions and
patch-mirrored queries.

This is the *reference* (the oracle of fused kernels): exact online softmax (running max and rescale),
per-query-row partial state so that shards combine exactly, memory bounded by ``memory_budget`` whatever N
and k (chunks over training images, candidate positions and query rows), float64 or float32.

Numerics. Distances use the expanded form ‖q‖² − 2⟨q, y⟩ + ‖y‖² as one GEMM per chunk, after subtracting a
per-channel constant (the dataset's per-channel mean) from *both* query and key patches, padded entries
included: both sides have the same layout and the same zero padding, so distances are unchanged, and the
centring removes most of the cancellation of the expanded form. The float32 logit error is still about
2·eps32·(‖q − c‖² + ‖y − c‖²) / (2σ²T), which at low σ (≈ 0.6 nats at σ = 1e-3) resolves near-ties at the
top of the softmax wrongly (seen: 5e-3 relative output error on blended queries). So with dtype=float32, the
query rows whose bound exceeds FLOAT32_LOGIT_TOLERANCE (1e-5 nats; in practice σ below ~0.5 on [-1, 1] data)
are computed in float64, and the rest in float32: float32 output stays within 1e-4 of float64 at every σ.

Memory. ``memory_budget`` bounds the temporaries of one call (key patches, logits, image windows, query
copies). It is capped at :data:`PATCH_MEMORY_CAP` (2 GiB): a caller asking for 64 GB still gets ≤ 2 GiB of
temporaries, so that one denoiser call stays well under 4 GB of extra memory on top of the dataset.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, cast, overload

import torch

from .keys import KeyBank
from .partial import PartialState
from .retrieval import DEFAULT_MEMORY_BUDGET, RetrievalResult, sigma_rows

# Hard cap on the temporaries of one call, whatever budget is requested (documented guarantee: < 4 GB extra).
PATCH_MEMORY_CAP = 2 * 2**30
# Query rows per block are chosen so that logits for at least this many keys fit in half the budget.
_MIN_KEYS_PER_CHUNK = 1024


def effective_budget(memory_budget: int) -> int:
    """The budget actually used: the requested one, capped at :data:`PATCH_MEMORY_CAP`."""
    if not isinstance(memory_budget, (int, float)) or memory_budget <= 0:
        raise ValueError(f"memory_budget: expected a positive number of bytes, got {memory_budget!r}")
    return int(min(int(memory_budget), PATCH_MEMORY_CAP))


def patch_offsets(
    channels: int, height: int, width: int, k: int, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """(P, C·k²) flat offsets into a (C, height, width) array of the k×k windows with top-left (rows, cols).

    The layout of one row is (C, k, k), the same as ``F.unfold``.
    """
    dev = rows.device
    ch = torch.arange(channels, device=dev).view(channels, 1, 1) * (height * width)
    a = torch.arange(k, device=dev).view(1, k, 1) * width
    b = torch.arange(k, device=dev).view(1, 1, k)
    base = (ch + a + b).reshape(-1)  # (F,)
    return (rows * width + cols)[:, None] + base[None, :]


def channel_center(keys: KeyBank, k: int, dtype: torch.dtype) -> torch.Tensor:
    """(C·k²,) per-channel dataset mean, repeated over the patch: subtracted from queries and keys alike."""
    c, h, w = cast("tuple[int, int, int]", keys.image_shape)
    per_channel = keys.get_center(torch.float64).reshape(c, h * w).mean(1)
    return per_channel.repeat_interleave(k * k).to(dtype)


def check_positions(
    positions: torch.Tensor, image_shape: tuple[int, int, int], name: str = "positions"
) -> torch.Tensor:
    _c, h, w = image_shape
    if (
        not torch.is_tensor(positions)
        or positions.dim() != 2
        or positions.shape[1] != 2
        or positions.shape[0] == 0
        or positions.is_floating_point()
    ):
        raise ValueError(
            f"{name}: expected a non-empty (P, 2) integer tensor of (row, col) centres, got "
            f"{getattr(positions, 'shape', type(positions))}"
        )
    positions = positions.long()
    if bool(
        (positions[:, 0] < 0).any()
        or (positions[:, 0] >= h).any()
        or (positions[:, 1] < 0).any()
        or (positions[:, 1] >= w).any()
    ):
        raise ValueError(f"{name}: centres must lie inside the {h}×{w} image")
    return positions


def _chunk_plan(
    n_images: int, n_pos: int, feat: int, channels: int, hp: int, wp: int, rows: int, item: int, budget: int
) -> tuple[int, int]:
    """(images per chunk, positions per chunk) so that one chunk's temporaries fit in ``budget`` bytes.

    Per key: the gathered patch and its square (2F), value (C), norm, and one logit row entry per query row.
    Per image: the float window plus the uint8->float conversion copy. Per position: the int64 gather offsets.
    """
    per_key = item * (2 * feat + channels + 2 + rows)
    per_image_window = 2 * item * channels * hp * wp
    per_pos = 8 * (feat + channels)
    full = n_pos * per_key + per_image_window
    n_img = (budget - n_pos * per_pos) // max(1, full)
    if n_img >= 1:
        return int(min(n_images, n_img)), n_pos
    n_p = (budget - per_image_window) // max(1, per_key + per_pos)
    return 1, int(max(1, min(n_pos, n_p)))


class _Window:
    """Float windows of the zero-padded training images covering one chunk of candidate positions."""

    def __init__(
        self,
        keys: KeyBank,
        image_idx: torch.Tensor,
        pos: torch.Tensor,
        k: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        c, h, w = cast("tuple[int, int, int]", keys.image_shape)
        d = k // 2
        # Window in padded coordinates: rows [a0, a1), cols [b0, b1); the image occupies [d, d + H) × [d, d + W).
        a0, a1 = int(pos[:, 0].min()), int(pos[:, 0].max()) + k
        b0, b1 = int(pos[:, 1].min()), int(pos[:, 1].max()) + k
        wh, ww = a1 - a0, b1 - b0
        ir0, ir1 = max(a0 - d, 0), min(a1 - d, h)
        ic0, ic1 = max(b0 - d, 0), min(b1 - d, w)
        imgs = keys.values.reshape(-1, c, h, w)[image_idx.to(keys.device)][:, :, ir0:ir1, ic0:ic1]
        win = torch.zeros(image_idx.numel(), c, wh, ww, dtype=dtype, device=device)
        part = imgs.to(device=device, dtype=dtype)
        if keys.scale != 1.0 or keys.shift != 0.0:
            part = part * keys.scale + keys.shift
        ro, co = ir0 + d - a0, ic0 + d - b0
        win[:, :, ro : ro + (ir1 - ir0), co : co + (ic1 - ic0)] = part
        del part, imgs
        self.flat = win.reshape(image_idx.numel(), -1)
        # Top-left of the patch centred at (r, c) is (r, c) in padded coordinates.
        self.offsets = patch_offsets(c, wh, ww, k, pos[:, 0] - a0, pos[:, 1] - b0)  # (P, F)
        ch = torch.arange(c, device=device) * (wh * ww)
        self.centre = ((pos[:, 0] - a0 + d) * ww + (pos[:, 1] - b0 + d))[:, None] + ch[None, :]  # (P, C)


def _partial_rows(
    qc: torch.Tensor,
    q2: torch.Tensor,
    coef: torch.Tensor,
    keys: KeyBank,
    image_idx: torch.Tensor,
    pos: torch.Tensor,
    k: int,
    cvec: torch.Tensor,
    dtype: torch.dtype,
    budget: int,
    state: PartialState,
) -> PartialState:
    """Fold every candidate (images ``image_idx`` × centres ``pos``) into ``state`` for centred queries qc."""
    dev = qc.device
    item = torch.empty((), dtype=dtype).element_size()
    c, h, w = cast("tuple[int, int, int]", keys.image_shape)
    d = k // 2
    feat = c * k * k
    n_img, n_pos = _chunk_plan(
        image_idx.numel(), pos.shape[0], feat, c, h + 2 * d, w + 2 * d, qc.shape[0], item, budget
    )
    for p0 in range(0, pos.shape[0], n_pos):
        pc = pos[p0 : p0 + n_pos]
        for i0 in range(0, image_idx.numel(), n_img):
            win = _Window(keys, image_idx[i0 : i0 + n_img], pc, k, dtype, dev)
            # im2col by a 1-D index_select (an (n, P, F) advanced index would expand int64 indices per image)
            y = torch.index_select(win.flat, 1, win.offsets.reshape(-1)).reshape(-1, feat)  # (n·P, F) keys
            v = torch.index_select(win.flat, 1, win.centre.reshape(-1)).reshape(-1, c)  # (n·P, C) centres
            del win
            y.sub_(cvec)
            y2 = (y * y).sum(1)
            logits = torch.addmm(y2[None, :], qc, y.t(), beta=1.0, alpha=-2.0)
            del y, y2
            logits.add_(q2[:, None]).clamp_min_(0.0).mul_(-coef[:, None])
            m = logits.max(1).values
            p = logits.sub_(m[:, None]).exp_()
            l = p.sum(1)
            o = p @ v
            l2 = torch.einsum("ij,ij->i", p, p)  # not p.square_(): autograd (the torch reference's gradient) keeps p
            del p, logits
            state = state.combine(PartialState(m=m, l=l, l2=l2, o=o))
    return state


def patch_softmax_partial(
    queries: torch.Tensor,
    keys: KeyBank,
    sigma: float | Sequence[float] | torch.Tensor,
    positions: torch.Tensor,
    k: int,
    *,
    temperature: float = 1.0,
    query_labels: torch.Tensor | None = None,
    flips: bool = False,
    dtype: torch.dtype | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    start: int = 0,
    stop: int | None = None,
    backend: str = "auto",
) -> PartialState:
    """Partial state (rows = query rows, o = (Q, C)) of the patch softmax over stored images start:stop.

    ``backend``: ``torch`` (this reference), ``triton``, ``cuda`` or ``cpu`` (the fused implicit-im2col kernels:
    direct distances in float32, no cancellation; at very low σ their logits carry float32 rounding of the order
    of the input's own, see tests/reference.float32_tolerance) or ``auto`` (see :func:`choose_patch_backend`).

    ``queries`` (Q, C·k²) float patches; ``sigma`` a scalar or (Q,) per row; ``positions`` (P, 2) candidate
    centres (row, col) in image coordinates, patches of the training images zero-padded by k//2 (interior
    centres never touch the padding); ``query_labels`` (Q,) restricts row r to images of label[r];
    ``flips`` adds every image mirrored left-right. States of disjoint [start, stop) shards combine exactly.
    """
    if not isinstance(keys, KeyBank):
        raise TypeError(f"keys: expected a KeyBank, got {type(keys).__name__}")
    if keys.shard is not None:  # start:stop of this rank's shard, then every rank's state combined in rank order
        from .retrieval import _local_view

        state = patch_softmax_partial(
            queries,
            _local_view(keys),
            sigma,
            positions,
            k,
            temperature=temperature,
            query_labels=query_labels,
            flips=flips,
            dtype=dtype,
            memory_budget=memory_budget,
            start=start,
            stop=stop,
            backend=backend,
        )
        return keys.shard.group.combine(state, "patch retrieval")
    if keys.image_shape is None:
        raise ValueError("keys: patch retrieval needs the dataset's image shape (C, H, W)")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
        raise ValueError(f"patch: patch sizes must be odd positive integers, got {k!r}")
    c, _h, w = keys.image_shape
    feat = c * k * k
    if not torch.is_tensor(queries) or queries.dim() != 2 or queries.shape[1] != feat or queries.shape[0] == 0:
        raise ValueError(
            f"queries: expected a non-empty (Q, C·k² = {feat}) tensor, got {tuple(getattr(queries, 'shape', ()))}"
        )
    if not queries.is_floating_point():
        raise TypeError(f"queries: expected a floating tensor, got {queries.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")
    positions = check_positions(positions, keys.image_shape)
    dtype = dtype or (queries.dtype if queries.dtype in (torch.float32, torch.float64) else torch.float32)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype: expected torch.float32 or torch.float64, got {dtype}")
    stop = keys.n if stop is None else int(stop)
    if not 0 <= int(start) <= stop <= keys.n:
        raise ValueError(f"start/stop: expected 0 <= start <= stop <= N = {keys.n}, got {start}, {stop}")
    Q = queries.shape[0]
    dev = queries.device
    s = sigma_rows(sigma, Q, dev)
    coef64 = 1.0 / (2.0 * s * s * temperature)
    if query_labels is not None:
        if keys.labels is None:
            raise ValueError("query_labels: class-conditional retrieval needs a dataset with labels")
        query_labels = torch.as_tensor(query_labels, device=dev).long().reshape(-1)
        if query_labels.shape != (Q,):
            raise ValueError(f"query_labels: expected shape ({Q},), got {tuple(query_labels.shape)}")
    budget = effective_budget(memory_budget)  # validated whichever backend runs
    name, _ = choose_patch_backend(backend, queries, keys, dtype)
    if name != "torch":
        from . import fused_patch

        fused_patch.require_fused_inputs(queries, keys, dtype, "patch", name)
        return fused_patch.patch_partial(
            queries,
            keys,
            coef64,
            positions,
            k,
            query_labels=query_labels,
            flips=flips,
            start=int(start),
            stop=stop,
            backend=name,
        )
    cvec = channel_center(keys, k, torch.float64).to(dev)
    positions = positions.to(dev)
    mirrored_pos = torch.stack([positions[:, 0], w - 1 - positions[:, 1]], 1)

    state = PartialState.empty(Q, c, dtype=dtype, device=dev)
    all_idx = torch.arange(start, stop, device=keys.device)
    if query_labels is None:
        groups: list[tuple[int | None, torch.Tensor]] = [(None, all_idx)]
    else:
        img_labels = cast(torch.Tensor, keys.labels)[start:stop].to(keys.device)  # checked above
        groups = [(lab, all_idx[img_labels == lab]) for lab in torch.unique(query_labels).tolist()]
    # Query rows per block: the logits of ≥ _MIN_KEYS_PER_CHUNK keys and 3 copies of the block in half the budget.
    # (8 bytes per value: float32 rows may run in float64, see _precision_split)
    rows_per_block = max(1, (budget // 2) // (8 * (_MIN_KEYS_PER_CHUNK + 3 * feat)))
    for lab, image_idx in groups:
        rows = (
            torch.arange(Q, device=dev)
            if lab is None
            else (cast(torch.Tensor, query_labels) == lab).nonzero().flatten()
        )
        if image_idx.numel() == 0:
            continue  # rows stay empty (m = -inf, l = 0): another shard may hold this class
        for r0 in range(0, rows.numel(), rows_per_block):
            r = rows[r0 : r0 + rows_per_block]
            for rr, work in _precision_split(queries[r], coef64[r], cvec, dtype, r):
                sub = PartialState.empty(rr.numel(), c, dtype=work, device=dev)
                q = queries[rr].to(work)
                coef = coef64[rr].to(work)
                cv = cvec.to(work)
                key_budget = max(1, budget - 3 * q.element_size() * q.numel())
                for mirror in (False, True) if flips else (False,):
                    qm = q.reshape(-1, c, k, k).flip(-1).reshape(-1, feat) if mirror else q
                    qc = qm - cv
                    q2 = (qc * qc).sum(1)
                    sub = _partial_rows(
                        qc,
                        q2,
                        coef,
                        keys,
                        image_idx,
                        mirrored_pos if mirror else positions,
                        k,
                        cv,
                        work,
                        key_budget,
                        sub,
                    )
                    del qc, qm
                sub = sub.to(dtype)
                state.m[rr], state.l[rr], state.l2[rr], state.o[rr] = sub.m, sub.l, sub.l2, sub.o
    return state


FUSED_PATCH_KERNELS = ("triton", "cuda", "cpu")  # LS, ELS / bbELS, PSPC (pca_locality: COORDINATE_FUSED_KERNELS)
PATCH_BACKENDS = ("auto", "torch") + FUSED_PATCH_KERNELS


def choose_patch_backend(
    backend: str,
    queries: torch.Tensor,
    keys: KeyBank,
    dtype: torch.dtype,
    fused: tuple[str, ...] = FUSED_PATCH_KERNELS,
) -> tuple[str, str]:
    """(backend, reason) among ``auto``, ``torch`` and the ``fused`` kernels the caller has. ``auto`` takes a fused
    kernel for float32 work on uint8 / float32 data: on a CUDA device Triton where it can run, else the CUDA
    extension where it is built and offered; on the CPU the C++ kernel where it is offered (faster than the
    reference at every shape measured, bench/RESULTS.md); else the reference. The GPU order is a default: neither
    GPU kernel has timings yet."""
    backends = ("auto", "torch") + tuple(fused)
    if backend not in backends:
        raise ValueError(f"backend: this retrieval has backends {', '.join(backends)}, got {backend!r}")
    if backend != "auto":
        return backend, "requested"
    if dtype != torch.float32 or keys.values.dtype not in (torch.uint8, torch.float32):
        return "torch", f"dtype {dtype} / dataset {keys.values.dtype}: the fused kernels are float32 on uint8/float32"
    if queries.device.type == "cpu" and keys.device.type == "cpu" and "cpu" in fused:
        from . import cpu_backend

        if cpu_backend.available():
            return "cpu", "CPU, float32: the C++ patch kernel"
        return "torch", "CPU: the C++ extension is not built"
    if queries.device.type != "cuda":
        return "torch", f"device {queries.device.type}: no fused patch kernel for it here"
    from . import cuda_backend
    from .triton_backend import unavailable_reason

    reason = unavailable_reason(queries.device)
    if "triton" in fused and reason is None:
        return "triton", "CUDA, float32"
    if "cuda" in fused and cuda_backend.available():
        return "cuda", f"CUDA, float32 (Triton unavailable: {reason})" if "triton" in fused else "CUDA, float32"
    missing = [reason] if "triton" in fused else []
    if "cuda" in fused:
        missing.append(cuda_backend.unavailable_reason())
    why = "; ".join(r for r in missing if r)
    return "torch", why or f"CUDA: no fused kernel among {', '.join(fused)} for this retrieval"


# float32 rows whose expanded-form logit error bound exceeds this (nats) are computed in float64 instead.
FLOAT32_LOGIT_TOLERANCE = 1e-5


def _precision_split(
    q: torch.Tensor, coef64: torch.Tensor, cvec: torch.Tensor, dtype: torch.dtype, rows: torch.Tensor
) -> list[tuple[torch.Tensor, torch.dtype]]:
    """[(rows, working dtype)]: float32 rows whose expanded-form error bound is too loose go to float64.

    Bound on the float32 logit error of ‖q − y‖² = ‖q‖² − 2⟨q, y⟩ + ‖y‖² (centred): about
    2·eps32·coef·(‖q − c‖² + max ‖y − c‖²), with max ‖y − c‖² ≤ Σ max(|1 − c|, |1 + c|)² for data in [-1, 1].
    Low σ (large coef) makes it loose: near-ties at the top of the softmax would then be resolved wrongly.
    """
    if dtype == torch.float64:
        return [(rows, dtype)]
    c64 = cvec.double()
    qc = q.double() - c64
    ybound = float(torch.maximum((1 - c64).abs(), (1 + c64).abs()).square().sum())
    err = 2 * torch.finfo(torch.float32).eps * coef64 * (qc.square().sum(1) + ybound)
    precise = err > FLOAT32_LOGIT_TOLERANCE
    return [(rows[m], t) for m, t in ((~precise, dtype), (precise, torch.float64)) if bool(m.any())]


@overload
def patch_softmax_retrieval(
    queries: torch.Tensor,
    keys: KeyBank,
    sigma: float | Sequence[float] | torch.Tensor,
    positions: torch.Tensor,
    k: int,
    *,
    temperature: float = ...,
    query_labels: torch.Tensor | None = ...,
    flips: bool = ...,
    dtype: torch.dtype | None = ...,
    memory_budget: int = ...,
    start: int = ...,
    stop: int | None = ...,
    return_partial: Literal[False] = ...,
    backend: str = ...,
) -> RetrievalResult: ...


@overload
def patch_softmax_retrieval(
    queries: torch.Tensor,
    keys: KeyBank,
    sigma: float | Sequence[float] | torch.Tensor,
    positions: torch.Tensor,
    k: int,
    *,
    temperature: float = ...,
    query_labels: torch.Tensor | None = ...,
    flips: bool = ...,
    dtype: torch.dtype | None = ...,
    memory_budget: int = ...,
    start: int = ...,
    stop: int | None = ...,
    return_partial: Literal[True],
    backend: str = ...,
) -> PartialState: ...


@overload
def patch_softmax_retrieval(
    queries: torch.Tensor,
    keys: KeyBank,
    sigma: float | Sequence[float] | torch.Tensor,
    positions: torch.Tensor,
    k: int,
    *,
    temperature: float = ...,
    query_labels: torch.Tensor | None = ...,
    flips: bool = ...,
    dtype: torch.dtype | None = ...,
    memory_budget: int = ...,
    start: int = ...,
    stop: int | None = ...,
    return_partial: bool = ...,
    backend: str = ...,
) -> RetrievalResult | PartialState: ...


def patch_softmax_retrieval(
    queries: torch.Tensor,
    keys: KeyBank,
    sigma: float | Sequence[float] | torch.Tensor,
    positions: torch.Tensor,
    k: int,
    *,
    temperature: float = 1.0,
    query_labels: torch.Tensor | None = None,
    flips: bool = False,
    dtype: torch.dtype | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    start: int = 0,
    stop: int | None = None,
    return_partial: bool = False,
    backend: str = "auto",
) -> RetrievalResult | PartialState:
    """Posterior mean of the centre pixel per query row: mean (Q, C), max weight and 1/Σw² per row.

    See :func:`patch_softmax_partial` for the arguments; ``return_partial=True`` returns the unnormalised
    state instead, to combine with other shards by :func:`combine_partials`.
    """
    state = patch_softmax_partial(
        queries,
        keys,
        sigma,
        positions,
        k,
        temperature=temperature,
        query_labels=query_labels,
        flips=flips,
        dtype=dtype,
        memory_budget=memory_budget,
        start=start,
        stop=stop,
        backend=backend,
    )
    return state if return_partial else RetrievalResult.from_partial(state)


def interior_positions(height: int, width: int, k: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Centres of every fully interior k×k patch of an H×W image: (H−k+1)(W−k+1) rows (row-major)."""
    d = k // 2
    r = torch.arange(d, height - d, device=device)
    cc = torch.arange(d, width - d, device=device)
    return torch.cartesian_prod(r, cc).reshape(-1, 2)
