"""Entry points of the global retrieval primitive, with one signature each and a ``backend=`` switch.

    logit_bj = −‖x_b − y_j‖² / (2 σ_b² T)      over candidates y_j (± horizontal flips, ± class filter)
    out_b    = Σ_j softmax_j(logit_b) · y_j

Backends: ``torch`` (the reference oracle, any device and dtype), ``cpu`` (C++), ``triton`` (fused GPU kernels;
CPU tensors under TRITON_INTERPRET=1), ``cuda`` (torch-free CUDA kernels, built where nvcc and a GPU exist), and
``auto`` (the fastest correct one available; :func:`choose_backend` tells which and why).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal, cast, overload

import torch

from .. import env
from . import cpu_backend, streaming, torch_backend
from . import precision as precision_policy
from .keys import KeyBank
from .partial import PartialState, combine_partials, merge_knn_lists

BACKENDS = ("auto", "torch", "cpu", "triton", "cuda")
# AD_MEMORY_BUDGET, parsed by the rule of --memory-budget (64M, 2G, ...); read once, at import.
DEFAULT_MEMORY_BUDGET = env.read("AD_MEMORY_BUDGET")
# Below this batch the C++ kernel (direct distances, one pass over the data) beats the chunked GEMM on CPU.
CPU_KERNEL_MAX_BATCH = 64
# The CUDA kernel keeps a block of queries per CTA (single pass, CUDA cores): it serves small batches.
CUDA_KERNEL_MAX_BATCH = 16


def _cuda_backend() -> ModuleType:
    from . import cuda_backend

    return cuda_backend


def _gpu_choice(
    x: torch.Tensor, keys: KeyBank, dtype: torch.dtype, k: int | None, second_moment: bool
) -> tuple[str, str]:
    from . import triton_backend

    if dtype != torch.float32:
        return "torch", f"dtype {dtype}: the fused kernels compute in float32"
    if keys.values.dtype not in (torch.uint8, torch.float32):
        return "torch", f"dataset dtype {keys.values.dtype}: the fused kernels read uint8 or float32"
    if second_moment:
        return "torch", "second moment: only the torch backend accumulates it"
    if k is not None and k > triton_backend.MAX_FUSED_TOPK:
        return "torch", f"k = {k} > {triton_backend.MAX_FUSED_TOPK}: beyond the fused top-k"
    cuda = _cuda_backend()
    if x.shape[0] <= CUDA_KERNEL_MAX_BATCH and (k is None or k <= cuda.MAX_K) and cuda.available():
        return "cuda", f"CUDA, batch {x.shape[0]} <= {CUDA_KERNEL_MAX_BATCH}: single-pass split-N kernel"
    reason = triton_backend.unavailable_reason(x.device)
    if reason is None:
        return "triton", (
            f"CUDA, batch {x.shape[0]}: Triton "
            + (
                "split-N kernel"
                if x.shape[0] <= triton_backend.SPLIT_N_MAX_BATCH
                else "two-pass GEMMs where the precision bound allows, split-N elsewhere"
            )
        )
    return "torch", f"no fused GPU kernel available ({reason}; CUDA: {cuda.unavailable_reason()})"


@dataclass
class RetrievalResult:
    """Posterior mean and the summaries used to study memorisation."""

    mean: torch.Tensor  # (B, D)
    max_weight: torch.Tensor  # (B,) largest softmax weight
    effective_neighbours: torch.Tensor  # (B,) 1 / Σ w²
    variance: torch.Tensor | None = None  # (B, D) posterior variance per coordinate (second_moment=True)

    @staticmethod
    def from_partial(state: PartialState) -> RetrievalResult:
        return RetrievalResult(
            state.mean(),
            state.max_weight(),
            state.effective_neighbours(),
            None if state.o2 is None else state.variance(),
        )


def choose_backend(
    backend: str,
    x: torch.Tensor,
    keys: KeyBank,
    dtype: torch.dtype,
    *,
    k: int | None = None,
    second_moment: bool = False,
) -> tuple[str, str]:
    """(backend, reason) for a retrieval of queries ``x`` (``k`` for a k-NN search).

    ``auto``: on CPU the C++ kernel for batches up to 64, the torch GEMMs above; on CUDA in float32 the CUDA
    kernel for batches up to 16 when built, else Triton (which picks its kernel per row by the precision bound,
    see :func:`analytic_diffusion.ops.triton_backend.plan`); float64, other devices and the second moment go to
    the torch reference.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend != "auto":
        return backend, "requested"
    if x.device.type != keys.device.type:
        return "torch", f"queries on {x.device.type}, dataset on {keys.device.type}"
    if x.device.type == "cuda":
        return _gpu_choice(x, keys, dtype, k, second_moment)
    if x.device.type != "cpu":
        return "torch", f"device {x.device.type}: no fused kernel for it"
    if second_moment:
        return "torch", "second moment: only the torch backend accumulates it"
    if not cpu_backend.available():
        return "torch", "C++ extension not built"
    if dtype not in cpu_backend.SUPPORTED_DTYPES or keys.values.dtype not in (
        torch.uint8,
        torch.float32,
        torch.float64,
    ):
        return "torch", f"dtype {dtype} / dataset {keys.values.dtype} not supported by the C++ kernel"
    if x.shape[0] > CPU_KERNEL_MAX_BATCH:
        return "torch", f"batch {x.shape[0]} > {CPU_KERNEL_MAX_BATCH}: blocked GEMM wins on CPU"
    return "cpu", f"CPU, batch {x.shape[0]} <= {CPU_KERNEL_MAX_BATCH}"


def check_has_values(t: object, name: str) -> None:
    """Refuse a tensor without values (on the ``meta`` device: shape and dtype only), naming the argument."""
    if torch.is_tensor(t) and t.device.type == "meta":
        raise ValueError(
            f"{name}: a tensor on the 'meta' device has a shape but no values to compute with; pass it on cpu or cuda"
        )


def _validate(
    x: torch.Tensor, keys: KeyBank, query_labels: torch.Tensor | None, flips: bool, dtype: torch.dtype | None
) -> torch.dtype:
    if not isinstance(keys, KeyBank):
        raise TypeError(f"keys: expected a KeyBank, got {type(keys).__name__}")
    check_has_values(x, "x")
    check_has_values(query_labels, "query_labels")
    if not torch.is_tensor(x) or x.dim() != 2:
        raise ValueError(f"x: expected a (B, D) tensor, got {getattr(x, 'shape', type(x))}")
    if x.shape[1] != keys.dim:
        raise ValueError(f"x: expected D = {keys.dim} values per row (the dataset's), got {x.shape[1]}")
    if x.shape[0] == 0:
        raise ValueError("x: the query batch is empty")
    if not x.is_floating_point():
        raise TypeError(f"x: expected a floating tensor, got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x: contains NaN or Inf")
    if query_labels is not None:
        if keys.labels is None:
            raise ValueError("query_labels: class-conditional retrieval needs a dataset with labels")
        if query_labels.shape != (x.shape[0],):
            raise ValueError(f"query_labels: expected shape ({x.shape[0]},), got {tuple(query_labels.shape)}")
    if flips and keys.image_shape is None:
        raise ValueError("flips=True needs the dataset's image shape (C, H, W)")
    dtype = dtype or (x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32)
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"dtype: expected a float dtype, got {dtype}")
    return dtype


# The supported domain (docs: README "Determinism"). Every backend computes logits −‖x − y‖²/(2σ²T) in the working
# dtype; inside these bounds they stay finite in float32 (‖x − y‖/σ ≤ 1e18 keeps them below 5e35, |x| ≤ 1e15 keeps
# ‖x − y‖² below 1e30·D). Below SIGMA_MIN every method is at its nearest-neighbour limit to float64 distance
# resolution, above SIGMA_MAX at its large-noise limit; outside them a clear error names σ and the range.
SIGMA_MIN, SIGMA_MAX = 1e-10, 1e10
X_MAX = 1e15
DISTANCE_TO_SIGMA_MAX = 1e18


def check_query_scale(x: torch.Tensor, s: torch.Tensor) -> None:
    """Refuse queries outside the supported domain: max |x| ≤ X_MAX and √D (max|x| + 1) / σ ≤ 1e18 per row."""
    if x.shape[0] == 0:
        return
    amax = x.detach().reshape(x.shape[0], -1).abs().amax(1).double()
    if float(amax.max()) > X_MAX:
        raise ValueError(
            f"x: values up to {float(amax.max()):.3g} are outside the supported magnitude |x| <= {X_MAX:g}"
        )
    ratio = (amax.to(s.device) + 1.0) * (x[0].numel() ** 0.5) / s
    if float(ratio.max()) > DISTANCE_TO_SIGMA_MAX:
        b = int(ratio.argmax())
        raise ValueError(
            f"x, sigma: a query of magnitude {float(amax[b]):.3g} at sigma = {float(s[b]):.3g} is "
            f"too far from the data for its noise level (distance / sigma up to {float(ratio[b]):.3g}, "
            f"supported up to {DISTANCE_TO_SIGMA_MAX:g}); such a query is at the nearest-neighbour "
            "limit: call at a larger sigma"
        )


def sigma_rows(
    sigma: float | Sequence[float] | torch.Tensor,
    batch: int,
    device: torch.device | str | None,
    x: torch.Tensor | None = None,
) -> torch.Tensor:
    """σ as a (B,) float64 tensor; scalars broadcast. Rejects σ ≤ 0, NaN, Inf and σ outside
    [SIGMA_MIN, SIGMA_MAX] with a clear error; with ``x``, also queries outside the supported domain
    (:func:`check_query_scale`)."""
    if isinstance(sigma, (str, bytes)) or (
        torch.is_tensor(sigma) and (sigma.dtype == torch.bool or sigma.is_complex())
    ):
        raise TypeError(f"sigma: expected a number, a sequence of numbers or a real tensor, got {sigma!r:.60}")
    check_has_values(sigma, "sigma")
    try:
        s = torch.as_tensor(sigma, dtype=torch.float64).to(device).reshape(-1)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(
            f"sigma: expected a number, a sequence of numbers or a real tensor, got {type(sigma).__name__} ({e})"
        ) from None
    if s.numel() == 1:
        s = s.expand(batch)
    if s.numel() != batch:
        raise ValueError(f"sigma: expected a scalar or one value per sample ({batch}), got {s.numel()} values")
    if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
        raise ValueError(
            f"sigma: noise levels must be finite and > 0 (got min {float(s.min()):g}); "
            "samplers never call a denoiser at σ = 0"
        )
    if s.numel() and (float(s.min()) < SIGMA_MIN or float(s.max()) > SIGMA_MAX):
        bad = float(s.min()) if float(s.min()) < SIGMA_MIN else float(s.max())
        raise ValueError(
            f"sigma: {bad:g} is outside the supported range [{SIGMA_MIN:g}, {SIGMA_MAX:g}] (below it "
            f"every method is at its nearest-neighbour limit, above it at its large-noise limit, to "
            f"float precision: pass a σ inside the range)"
        )
    if x is not None:
        check_query_scale(x, s)
    return s


def hflip_rows(x: torch.Tensor, image_shape: tuple[int, int, int]) -> torch.Tensor:
    """Mirror flattened (B, C·H·W) rows left-right."""
    c, h, w = image_shape
    return x.reshape(-1, c, h, w).flip(-1).reshape(x.shape[0], -1)


@overload
def softmax_retrieval(
    x: torch.Tensor,
    keys: KeyBank,
    sigma: float | Sequence[float] | torch.Tensor,
    *,
    temperature: float = ...,
    query_labels: torch.Tensor | None = ...,
    flips: bool = ...,
    backend: str = ...,
    dtype: torch.dtype | None = ...,
    memory_budget: int = ...,
    return_partial: Literal[False] = ...,
    second_moment: bool = ...,
    precision: str = ...,
    max_logit_error: float | None = ...,
) -> RetrievalResult: ...


@overload
def softmax_retrieval(
    x: torch.Tensor,
    keys: KeyBank,
    sigma: float | Sequence[float] | torch.Tensor,
    *,
    temperature: float = ...,
    query_labels: torch.Tensor | None = ...,
    flips: bool = ...,
    backend: str = ...,
    dtype: torch.dtype | None = ...,
    memory_budget: int = ...,
    return_partial: Literal[True],
    second_moment: bool = ...,
    precision: str = ...,
    max_logit_error: float | None = ...,
) -> PartialState: ...


@overload
def softmax_retrieval(
    x: torch.Tensor,
    keys: KeyBank,
    sigma: float | Sequence[float] | torch.Tensor,
    *,
    temperature: float = ...,
    query_labels: torch.Tensor | None = ...,
    flips: bool = ...,
    backend: str = ...,
    dtype: torch.dtype | None = ...,
    memory_budget: int = ...,
    return_partial: bool = ...,
    second_moment: bool = ...,
    precision: str = ...,
    max_logit_error: float | None = ...,
) -> RetrievalResult | PartialState: ...


def softmax_retrieval(
    x: torch.Tensor,
    keys: KeyBank,
    sigma: float | Sequence[float] | torch.Tensor,
    *,
    temperature: float = 1.0,
    query_labels: torch.Tensor | None = None,
    flips: bool = False,
    backend: str = "auto",
    dtype: torch.dtype | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    return_partial: bool = False,
    second_moment: bool = False,
    precision: str = "exact",
    max_logit_error: float | None = None,
) -> RetrievalResult | PartialState:
    """Exact posterior mean over all candidates (``flips`` adds every row mirrored left-right, no copy).

    With ``return_partial=True`` the unnormalised state (m, l, l2, o) comes back instead, so that results over
    disjoint shards of a dataset combine exactly with :func:`combine_partials`.

    ``second_moment=True`` also accumulates the centred second moment in the same pass (state ``o2``, result
    ``variance`` = the posterior variance per coordinate). Only the torch backend has it: ``auto`` then uses it,
    an explicit fused backend raises.

    ``precision`` (``exact`` | ``tf32`` | ``bf16``, see :mod:`analytic_diffusion.ops.precision`) lets the Triton
    kernels use faster dots on the rows whose logit error bound stays within ``max_logit_error`` nats (default
    per mode); the other backends always compute exactly, which satisfies every mode.

    A sharded bank (``keys.shard``, see :mod:`analytic_diffusion.ops.distributed`) combines every rank's state
    in rank order (a collective); a memory-mapped one (``keys.pages``) is streamed in blocks within
    ``memory_budget`` (:mod:`analytic_diffusion.ops.streaming`). :func:`knn_search` and :func:`posterior_draw`
    do the same, with global indices.
    """
    dtype = _validate(x, keys, query_labels, flips, dtype)
    if not temperature > 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")
    precision_policy.tolerance(precision, max_logit_error)  # validates both
    s = sigma_rows(sigma, x.shape[0], x.device, x)
    coef = 1.0 / (2.0 * s * s * temperature)  # float64, cast by the backend
    name, _ = choose_backend(backend, x, keys, dtype, second_moment=second_moment)
    if second_moment and name != "torch":
        raise ValueError(
            f"second_moment=True: the {name} kernels have no second-moment accumulator; use backend='torch' or 'auto'"
        )

    def run_bank(q: torch.Tensor, keys: KeyBank, memory_budget: int) -> PartialState:
        if name == "cpu":
            return cpu_backend.softmax_partial(q, keys, coef, query_labels=query_labels, dtype=dtype)
        if name == "triton":
            from . import triton_backend

            return triton_backend.softmax_partial(
                q,
                keys,
                coef,
                query_labels=query_labels,
                dtype=dtype,
                precision=precision,
                max_logit_error=max_logit_error,
            )
        if name == "cuda":
            return _cuda_backend().softmax_partial(q, keys, coef, query_labels=query_labels, dtype=dtype)
        if second_moment:
            return torch_backend.softmax_partial(
                q, keys, coef, query_labels=query_labels, dtype=dtype, memory_budget=memory_budget, second_moment=True
            )
        return torch_backend.softmax_partial(
            q, keys, coef, query_labels=query_labels, dtype=dtype, memory_budget=memory_budget
        )

    def run(q: torch.Tensor) -> PartialState:
        if keys.pages is None:
            return run_bank(q, keys, memory_budget)
        # A memory-mapped set: blocks within half the budget, combined in order (the backend gets the rest).
        return combine_partials(
            run_bank(q, sub, memory_budget // 2) for _, sub in streaming.blocks(keys, memory_budget)
        )

    state = run(x)
    if flips:  # ‖x − flip(y)‖ = ‖flip(x) − y‖: retrieve with the mirrored query, mirror the values back
        shape = cast("tuple[int, int, int]", keys.image_shape)  # flips: _validate checked it is set
        mirrored = run(hflip_rows(x, shape)).map_values(lambda o: hflip_rows(o, shape))
        state = state.combine(mirrored)
    state = state.to(x.device)
    if keys.shard is not None:  # every rank's shard state, combined in rank order
        state = keys.shard.group.combine(state, "softmax retrieval")
    return state if return_partial else RetrievalResult.from_partial(state)


def knn_search(
    x: torch.Tensor,
    keys: KeyBank,
    k: int,
    *,
    query_labels: torch.Tensor | None = None,
    flips: bool = False,
    backend: str = "auto",
    dtype: torch.dtype | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    precision: str = "exact",
    max_logit_error: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest candidates by exact squared distance: (dist2 (B, k), index (B, k)), ascending.

    With ``flips`` the candidate set is 2N rows: index i ≥ N is row i − N mirrored (see :func:`gather_rows`).
    Every backend ranks by direct or rescored distances, so ``precision`` is validated and otherwise moot.
    """
    precision_policy.tolerance(precision, max_logit_error)
    dtype = _validate(x, keys, query_labels, flips, dtype)
    total = keys.total * (2 if flips else 1)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected a positive integer, got {k!r}")
    if k > total:
        raise ValueError(f"k: asked for {k} neighbours but the candidate set has only {total}")
    if keys.shard is not None:  # each shard's own k nearest, then an exact merge of the lists
        from .distributed import global_index, merge_topk

        k_local = min(k, keys.n * (2 if flips else 1))
        d, i = knn_search(
            x,
            _local_view(keys),
            k_local,
            query_labels=query_labels,
            flips=flips,
            backend=backend,
            dtype=dtype,
            memory_budget=memory_budget,
            precision=precision,
            max_logit_error=max_logit_error,
        )
        return merge_topk(keys.shard, d, global_index(i, keys.n, keys.shard), k)
    name, _ = choose_backend(backend, x, keys, dtype, k=min(k, keys.n))

    def run_bank(q: torch.Tensor, keys: KeyBank, memory_budget: int) -> tuple[torch.Tensor, torch.Tensor]:
        if name == "cpu":
            return cpu_backend.knn(q, keys, min(k, keys.n), query_labels=query_labels, dtype=dtype)
        if name == "triton":
            from . import triton_backend

            return triton_backend.knn(q, keys, min(k, keys.n), query_labels=query_labels, dtype=dtype)
        if name == "cuda":
            return _cuda_backend().knn(q, keys, min(k, keys.n), query_labels=query_labels, dtype=dtype)
        return torch_backend.knn(
            q, keys, min(k, keys.n), query_labels=query_labels, dtype=dtype, memory_budget=memory_budget
        )

    def run(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if keys.pages is None:
            return run_bank(q, keys, memory_budget)
        ds, is_ = [], []
        for start, sub in streaming.blocks(keys, memory_budget):
            d, i = run_bank(q, sub, memory_budget // 2)
            ds.append(d.to(x.device))
            is_.append(i.to(x.device) + start)
        return merge_knn_lists(torch.cat(ds, 1), torch.cat(is_, 1), min(k, keys.n))

    d, i = run(x)
    d, i = d.to(x.device), i.to(x.device)
    if flips:
        d2, i2 = run(hflip_rows(x, cast("tuple[int, int, int]", keys.image_shape)))
        d = torch.cat([d, d2.to(x.device)], 1)
        i = torch.cat([i, i2.to(x.device) + keys.n], 1)
        order = torch.argsort(i, dim=1, stable=True)
        d, i = torch.gather(d, 1, order), torch.gather(i, 1, order)
        order = torch.argsort(d, dim=1, stable=True)[:, :k]
        d, i = torch.gather(d, 1, order), torch.gather(i, 1, order)
    return d, i


def posterior_draw(
    x: torch.Tensor,
    keys: KeyBank,
    sigma: float | Sequence[float] | torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
    query_labels: torch.Tensor | None = None,
    flips: bool = False,
    dtype: torch.dtype | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    row_seeds: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One exact draw from the posterior over candidates per query (Gumbel-max in one streaming scan).

    Returns (index (B,), row (B, D) in ``dtype``); with ``flips`` the candidate set is 2N rows and index i ≥ N
    is row i − N mirrored (as in :func:`knn_search`), the returned row being the mirrored image. Deterministic
    given ``generator``'s state (CPU or on x's device); torch backend (the reference) only. Give ``row_seeds``
    ((B,) int64) instead of a generator for a draw per row that depends only on that row's seed (counter-based
    noise, :mod:`analytic_diffusion.ops.counter_rng`): then batch composition and chunking change nothing.
    """
    dtype = _validate(x, keys, query_labels, flips, dtype)
    if not temperature > 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")
    if row_seeds is None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
    if row_seeds is not None:
        if generator is not None:
            raise ValueError("give either generator or row_seeds, not both")
        row_seeds = torch.as_tensor(row_seeds)
        if row_seeds.dtype != torch.int64 or row_seeds.shape != (x.shape[0],):
            raise ValueError(
                f"row_seeds: expected a ({x.shape[0]},) int64 tensor, got {tuple(row_seeds.shape)} {row_seeds.dtype}"
            )
    s = sigma_rows(sigma, x.shape[0], x.device, x)
    coef = 1.0 / (2.0 * s * s * temperature)
    shard = keys.shard
    base = 0 if shard is None else shard.start

    def draw_local(
        q: torch.Tensor, offset: int, skip_before: int = 0, skip_after: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # offset: the global index of this bank's first candidate (row_seeds draw candidate j's noise from j)
        kw: dict[str, Any] = dict(query_labels=query_labels, dtype=dtype, row_seeds=row_seeds)
        if keys.pages is None:
            return torch_backend.gumbel_argmax(
                q,
                keys,
                coef,
                generator,
                memory_budget=memory_budget,
                index_offset=offset,
                skip_before=skip_before,
                skip_after=skip_after,
                **kw,
            )
        # Blocks of a memory-mapped set in order: the noise stream runs on across them, ties stay with the
        # earlier block, so the draw is the one of a single scan.
        best_s: torch.Tensor | None = None
        best_i: torch.Tensor | None = None
        for start, sub in streaming.blocks(keys, memory_budget):
            last = start + sub.n == keys.n
            sc, ix = torch_backend.gumbel_argmax(
                q,
                sub,
                coef,
                generator,
                memory_budget=memory_budget // 2,
                index_offset=offset + start,
                skip_before=skip_before if start == 0 else 0,
                skip_after=skip_after if last else 0,
                **kw,
            )
            ix = ix + start
            if best_s is None:
                best_s, best_i = sc, ix
            else:
                better = sc > best_s
                best_s, best_i = torch.where(better, sc, best_s), torch.where(better, ix, cast(torch.Tensor, best_i))
        return cast(torch.Tensor, best_s), cast(torch.Tensor, best_i)  # set by the first block (there is one)

    def draw(q: torch.Tensor, mirrored: bool) -> tuple[torch.Tensor, torch.Tensor]:
        offset = base + (keys.total if mirrored else 0)
        if shard is None:
            return draw_local(q, offset)
        # A generator's noise is one (N, B) stream over the whole set: this shard draws its own rows of it and
        # skips the others', so the draw is the single-process one whatever the number of ranks (O(N·B) RNG per
        # rank); row seeds need no skipping (the offset places the shard in the whole set).
        from .distributed import global_max

        sc, ix = draw_local(q, offset, shard.start, shard.total - shard.start - keys.n)
        return global_max(shard, sc, ix + shard.start)

    score, index = draw(x, False)
    if flips:  # the mirrored candidates get their own independent Gumbel noise (the next (N, B) draws)
        s2, i2 = draw(hflip_rows(x, cast("tuple[int, int, int]", keys.image_shape)), True)
        better = s2 > score
        index = torch.where(better, i2 + keys.total, index)
        score = torch.where(better, s2, score)
    if not bool(torch.isfinite(score).all()):
        raise ValueError(
            "posterior_draw: some query rows had no allowed candidate (no training image of the requested class)"
        )
    index = index.to(x.device)
    return index, gather_rows(keys, index, dtype)


def all_labels(keys: KeyBank) -> torch.Tensor | None:
    """Labels of every stored row, over every shard when sharded (gathered once, in rank order)."""
    if keys.labels is None or keys.shard is None:
        return keys.labels
    shard, labels = keys.shard, keys.labels  # narrowed to not None above (a lambda would not see that)
    return keys.cached("all_labels", lambda: shard.group.all_gather_rows(labels, "gathering labels"))


def _local_view(keys: KeyBank) -> KeyBank:
    """The same rows without the shard (what one rank computes on its own), centred like the whole set."""
    keys.get_center(torch.float64)
    view = KeyBank(
        keys.values, keys.scale, keys.shift, keys.labels, keys.image_shape, keys.center, keys.derived, pages=keys.pages
    )
    return view


def gather_rows(keys: KeyBank, index: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Candidate rows for indices from :func:`knn_search` (i ≥ N means row i − N mirrored).

    On a sharded bank the indices are global and the rows come from whichever rank holds them (a collective:
    every rank calls it with the same indices)."""
    if keys.shard is not None:
        from .distributed import gather_global_rows

        return gather_global_rows(
            keys.shard,
            lambda i: keys.gather(i, dtype),
            index,
            keys.n,
            keys.dim,
            dtype,
            lambda r: hflip_rows(r, cast("tuple[int, int, int]", keys.image_shape)),
        )
    flipped = index >= keys.n
    rows = keys.gather(torch.where(flipped, index - keys.n, index), dtype).to(index.device)
    if bool(flipped.any()):
        shape = cast("tuple[int, int, int]", keys.image_shape)  # mirrored indices exist only with an image shape
        mirrored = hflip_rows(rows.reshape(-1, keys.dim), shape).reshape(rows.shape)
        rows = torch.where(flipped[..., None], mirrored, rows)
    return rows
