"""Backend ``cpu``: the C++ kernels in csrc/cpu, bound through pybind11 as ``analytic_diffusion._cpu``.

Tensors cross as NumPy views (zero copy for contiguous CPU tensors). The kernels compute direct distances
Σ (q − y)² (no cancellation), stream the candidates with an online softmax in the query's precision, split
the candidates into a fixed number of segments independent of the thread count and combine them in order,
so the result does not depend on how many threads ran it.

Global retrieval: :func:`softmax_partial`, :func:`knn`. The local family's patch softmax (ELS / bbELS, LS, PSPC):
:func:`patch_partials`, the same per-split contract as the Triton and CUDA patch kernels, driven by
:mod:`analytic_diffusion.ops.fused_patch`. pca_locality's coordinate softmax: :func:`coordinate_partials`, the
Triton coordinate kernel's contract, driven by :mod:`analytic_diffusion.ops.fused_coordinate`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .. import env
from .keys import KeyBank
from .partial import PartialState, output_buffers

if TYPE_CHECKING:
    import numpy as np

try:  # built by setup.py; absent only in a source tree that was never installed
    from .. import _cpu

    _IMPORT_ERROR: BaseException | None = None
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    _cpu = None
    _IMPORT_ERROR = exc

SUPPORTED_DTYPES = (torch.float32, torch.float64)


def available() -> bool:
    return _cpu is not None


def _require() -> Any:
    if _cpu is None:
        raise RuntimeError(
            "backend 'cpu': the C++ extension analytic_diffusion._cpu is not built "
            f"({_IMPORT_ERROR}); reinstall with `pip install -e .` and a C++17 compiler"
        )
    return _cpu


def isa() -> str:
    """The instruction set of the kernels a call would use now: ``"avx512"``, ``"avx2"`` or ``"base"``.

    The widest one this CPU runs, unless the environment variable ``AD_CPU_ISA`` caps it (read at every call, so
    tests and benchmarks can switch paths in one process; an unknown value raises ValueError)."""
    return _require().isa()


def build_info() -> tuple[str, bool]:
    """(the extension's file, whether it was built with OpenMP): what ``analytic-diffusion info`` reports."""
    ext = _require()
    return str(ext.__file__), bool(ext.openmp)


def runnable_isas() -> tuple[str, ...]:
    """The instruction sets this build runs on this CPU, narrowest first (every value of ``AD_CPU_ISA`` that
    selects kernels of its own here; CI runs the kernel tests under each)."""
    return tuple(_require().runnable_isas())


def num_threads() -> int:
    """Threads of the kernels: ``AD_NUM_THREADS`` (an integer >= 1), else torch's thread count."""
    return env.read("AD_NUM_THREADS") or torch.get_num_threads()


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().contiguous().numpy()


def _check(q: torch.Tensor, keys: KeyBank, dtype: torch.dtype) -> None:
    if q.device.type != "cpu" or keys.device.type != "cpu":
        raise ValueError(
            "backend 'cpu' needs the queries and the dataset on the CPU "
            f"(got queries on {q.device}, dataset on {keys.device})"
        )
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"backend 'cpu' supports dtype float32 or float64, got {dtype}")
    if keys.values.dtype not in (torch.uint8, torch.float32, torch.float64):
        raise ValueError(f"backend 'cpu' supports uint8, float32 or float64 datasets, got {keys.values.dtype}")


def softmax_partial(
    q: torch.Tensor, keys: KeyBank, coef: torch.Tensor, *, query_labels: torch.Tensor | None = None, dtype: torch.dtype
) -> PartialState:
    ext = _require()
    _check(q, keys, dtype)
    m, l, l2, o = ext.softmax_retrieval(
        _np(q.to(dtype)),
        _np(keys.values),
        float(keys.scale),
        float(keys.shift),
        _np(coef.to(dtype)),
        _np(keys.labels),
        _np(query_labels),
        num_threads(),
    )
    return PartialState(torch.from_numpy(m), torch.from_numpy(l), torch.from_numpy(l2), torch.from_numpy(o))


def accumulation_chain(n: int) -> int:
    """Roundings a weight can go through in l and o (and rescaling factors it can meet) in :func:`softmax_partial`
    over ``n`` candidates (docs/design.md §13.1): a segment of ⌈n / S⌉ rows summed in order (S = the kernel's
    segment count), rescaled at most once per 16-row tile, then S segments combined in order (a product and a sum
    each), plus the product p·y, the 4-term groups and the final division."""
    n = max(1, int(n))
    segs = int(_require().num_segments(n))
    seg = -(-n // segs)
    return seg + -(-seg // 16) + 2 * segs + 8


def knn(
    q: torch.Tensor, keys: KeyBank, k: int, *, query_labels: torch.Tensor | None = None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    ext = _require()
    _check(q, keys, dtype)
    d, i = ext.knn_search(
        _np(q.to(dtype)),
        _np(keys.values),
        float(keys.scale),
        float(keys.shift),
        int(k),
        _np(keys.labels),
        _np(query_labels),
        num_threads(),
    )
    return torch.from_numpy(d), torch.from_numpy(i)


PATCH_RULES = {"shared": 0, "same_centre": 1, "same_whole": 2}
poison_outputs = False  # tests: patch_partials and coordinate_partials fill their outputs with NaN before every call


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
    rule: str,
    poison: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-split partials (m base 2, l, l2 (S, R); o (S, R, V)) of the patch softmax on the C++ CPU kernel: the same
    contract as :func:`analytic_diffusion.kernels.patch_retrieval.patch_partials` (rule ``shared``) and
    ``same_position_partials`` (``same_centre``; ``same_whole`` = ``whole=True``), so one driver combines all three.

    q (R, C·k²) float32; images (N, C, H, W) uint8/float32; image_index (n,) int32; positions (P, 2) or (R, 2)
    int32; coef2 (R,) float32 base 2; all on the CPU. ``poison=True`` (tests; None: the module's ``poison_outputs``)
    fills the outputs with NaN first: the kernel must write all of them.
    """
    ext = _require()
    if rule not in PATCH_RULES:
        raise ValueError(f"rule: expected one of {', '.join(PATCH_RULES)}, got {rule!r}")
    tensors = {"q": q, "images": images, "image_index": image_index, "positions": positions, "coef2": coef2}
    off_cpu = [f"{name} on {t.device}" for name, t in tensors.items() if t.device.type != "cpu"]
    if off_cpu:
        raise ValueError("backend 'cpu': the patch kernel needs every operand on the CPU, got " + ", ".join(off_cpu))
    _, C, _H, _W = images.shape
    R = q.shape[0]
    S = int(ext.patch_num_splits(image_index.numel(), int(splits)))
    V = C * k * k if rule == "same_whole" else C
    m, l, l2, o = output_buffers(poison_outputs if poison is None else poison, "cpu", (S, R), (S, R), (S, R), (S, R, V))
    ext.patch_partials(
        _np(q),
        _np(images),
        _np(image_index),
        _np(positions),
        _np(coef2),
        int(k),
        float(scale),
        float(shift),
        int(splits),
        PATCH_RULES[rule],
        num_threads(),
        m.numpy(),
        l.numpy(),
        l2.numpy(),
        o.numpy(),
    )
    return m, l, l2, o


def coordinate_queries_per_task() -> int:
    """Queries one task of the C++ coordinate kernel takes (the driver sizes its candidate splits by it)."""
    return int(_require().coordinate_queries_per_task)


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
    image_labels: torch.Tensor | None = None,
    query_labels: torch.Tensor | None = None,
    poison: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(m base 2, l, o), each (S, B, D) float32, of pca_locality's coordinate softmax on the C++ CPU kernel: the
    contract of :func:`analytic_diffusion.kernels.coordinate_retrieval.coordinate_partials`.

    x (B, D) float32; images (N, D) uint8/float32; stencil (NNZ, D) int32 (−1 padded); value_index (D,) int32;
    coef2 (B,) float32 base 2; splits (S + 1,) int32; labels (N,) and (B,) int64 or both None; all on the CPU.
    ``poison=True`` (tests; None: the module's ``poison_outputs``) fills the outputs with NaN first.
    """
    ext = _require()
    tensors = {
        "x": x,
        "images": images,
        "stencil": stencil,
        "value_index": value_index,
        "coef2": coef2,
        "splits": splits,
        "image_labels": image_labels,
        "query_labels": query_labels,
    }
    off_cpu = [f"{name} on {t.device}" for name, t in tensors.items() if t is not None and t.device.type != "cpu"]
    if off_cpu:
        raise ValueError(
            "backend 'cpu': the coordinate kernel needs every operand on the CPU, got " + ", ".join(off_cpu)
        )
    S, B, D = splits.numel() - 1, x.shape[0], x.shape[-1]
    m, l, o = output_buffers(poison_outputs if poison is None else poison, "cpu", *[(max(S, 0), B, D)] * 3)
    ext.coordinate_partials(
        _np(x),
        _np(images),
        _np(stencil),
        _np(value_index),
        _np(coef2),
        _np(splits),
        float(scale),
        float(shift),
        _np(image_labels),
        _np(query_labels),
        num_threads(),
        m.numpy(),
        l.numpy(),
        o.numpy(),
    )
    return m, l, o


def subset_relative_d2(
    q: torch.Tensor, keys: KeyBank, index: torch.Tensor, ref: torch.Tensor, width: int
) -> torch.Tensor:
    """(B, K) float64 relative squared distances to listed candidates (:func:`analytic_diffusion.ops.subset.
    relative_d2`); ``width`` > 0 allows mirrored indices i ≥ N (rows of that many values reversed)."""
    ext = _require()
    out = ext.subset_relative_d2(
        _np(q.to(torch.float64)),
        _np(keys.values),
        float(keys.scale),
        float(keys.shift),
        _np(index.to(torch.int64)),
        _np(ref.to(torch.int64)),
        int(width),
        num_threads(),
    )
    return torch.from_numpy(out)


def subset_weighted_sum(keys: KeyBank, index: torch.Tensor, weight: torch.Tensor, width: int) -> torch.Tensor:
    """(B, D) float64 Σ_j weight[b, j] y_index[b, j] (:func:`analytic_diffusion.ops.subset.weighted_sum`)."""
    ext = _require()
    out = ext.subset_weighted_sum(
        _np(keys.values),
        float(keys.scale),
        float(keys.shift),
        _np(index.to(torch.int64)),
        _np(weight.to(torch.float64)),
        int(width),
        num_threads(),
    )
    return torch.from_numpy(out)
