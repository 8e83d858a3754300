"""Backend ``cuda``: the CUDA kernels in csrc/cuda, bound through pybind11 as ``analytic_diffusion._cuda``.

Same entry points and semantics as :mod:`.cpu_backend`. The kernels are torch-free: tensors cross as device
addresses, every buffer (outputs and the per-split scratch) is allocated here with torch on the queries'
device, and the launches go to torch's current stream of that device, so they order with the surrounding
torch work without any synchronisation.

What the kernels compute (csrc/cuda/global_retrieval.cu): fp32 direct distances Σ (q − y)² (no expanded-form
cancellation), an online softmax in base 2, the candidates split into a number of ranges that depends on N
only, and the per-split partials combined in a fixed order: results are bitwise reproducible. fp32 only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, cast

import torch

from .keys import KeyBank
from .partial import PartialState, output_buffers

try:  # built by setup.py only where nvcc and a GPU exist (or AD_BUILD_CUDA=1)
    from .. import _cuda

    _IMPORT_ERROR: BaseException | None = None
except (ImportError, OSError) as exc:  # not built, or libcudart missing on this machine
    _cuda = None
    _IMPORT_ERROR = exc

SUPPORTED_DTYPES = (torch.float32,)
SUPPORTED_KEY_DTYPES = (torch.uint8, torch.float32)
MAX_K = 32 if _cuda is None else int(_cuda.MAX_K)

_REASON: str | None = None


def unavailable_reason() -> str | None:
    """None when the backend can run here, else one line saying why not (cached after the first call)."""
    global _REASON
    if _REASON is not None:
        return _REASON or None
    if _cuda is None:
        reason = (
            f"the CUDA extension analytic_diffusion._cuda is not built or cannot load ({_IMPORT_ERROR}); "
            "build it with nvcc on a GPU machine: AD_BUILD_CUDA=1 pip install --no-build-isolation -e ."
        )
    elif _emulated():
        reason = ""
    elif not torch.cuda.is_available():
        reason = "torch reports no CUDA device (or this torch build has no CUDA support)"
    else:
        count, err = _cuda.device_count()
        reason = "" if count > 0 else f"the CUDA runtime of analytic_diffusion._cuda sees no device ({err or 'none'})"
    _REASON = reason
    return reason or None


def available() -> bool:
    return unavailable_reason() is None


def _require() -> Any:
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"backend 'cuda' is unavailable: {reason}")
    return _cuda


def _emulated() -> bool:
    """True when ``_cuda`` is the host SIMT emulation build of csrc/cuda (tests/cuda_emu): pointers are host
    addresses of CPU tensors and there is no stream."""
    return bool(getattr(_cuda, "HOST_EMULATION", False))


@contextlib.contextmanager
def _launch_context(dev: torch.device) -> Iterator[int]:
    """Make ``dev`` current and yield the integer handle of its current torch stream (0 under host emulation)."""
    if _emulated():
        yield 0
        return
    with torch.cuda.device(dev):
        yield torch.cuda.current_stream(dev).cuda_stream


def _check(q: torch.Tensor, keys: KeyBank, dtype: torch.dtype, query_labels: torch.Tensor | None) -> None:
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"dtype: backend 'cuda' computes in float32 only, got {dtype} (use backend='torch' or 'cpu' for float64)"
        )
    if (q.device.type != "cuda" or keys.device.type != "cuda") and not _emulated():
        raise ValueError(
            "backend 'cuda' needs the queries and the dataset on a CUDA device "
            f"(got queries on {q.device}, dataset on {keys.device}); move them with .to('cuda')"
        )
    if q.device != keys.device:
        raise ValueError(f"backend 'cuda': queries on {q.device} but the dataset on {keys.device}")
    if keys.values.dtype not in SUPPORTED_KEY_DTYPES:
        raise ValueError(f"keys: backend 'cuda' supports uint8 or float32 datasets, got {keys.values.dtype}")
    if q.dim() != 2 or q.shape[1] != keys.dim:
        raise ValueError(f"q: expected a (B, {keys.dim}) tensor, got shape {tuple(q.shape)}")
    if query_labels is not None:
        if keys.labels is None:
            raise ValueError("query_labels: class-conditional retrieval needs a dataset with labels")
        if query_labels.shape != (q.shape[0],):
            raise ValueError(f"query_labels: expected shape ({q.shape[0]},), got {tuple(query_labels.shape)}")


def _common(
    q: torch.Tensor, keys: KeyBank, query_labels: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, Any, torch.Tensor | None, torch.Tensor | None]:
    """Contiguous device operands (kept alive by the caller until the launch is enqueued)."""
    dev = q.device
    qf = q.detach().to(dtype=torch.float32).contiguous()
    values = keys.values.detach().contiguous()
    ext = cast(Any, _cuda)  # loaded: every caller ran _require() first
    key_type = ext.KEYS_U8 if values.dtype == torch.uint8 else ext.KEYS_F32
    kl = ql = None
    if query_labels is not None:
        kl = cast(torch.Tensor, keys.labels).to(device=dev, dtype=torch.int64).contiguous()  # _check: labels exist
        ql = query_labels.to(device=dev, dtype=torch.int64).contiguous()
    return qf, values, key_type, kl, ql


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else int(t.data_ptr())


def softmax_partial(
    q: torch.Tensor,
    keys: KeyBank,
    coef: torch.Tensor,
    *,
    query_labels: torch.Tensor | None = None,
    dtype: torch.dtype,
    poison: bool = False,
) -> PartialState:
    """Partial state of logits −coef_b·‖q_b − y_j‖² over all candidates (fp32, on q's device).

    ``poison=True`` (tests) fills the outputs and the scratch with NaN before the launch: the kernels must
    write every value they hand back.
    """
    _check(q, keys, dtype, query_labels)
    ext = _require()
    dev = q.device
    B, D, N = q.shape[0], keys.dim, keys.n
    with _launch_context(dev) as stream:
        qf, values, key_type, kl, ql = _common(q, keys, query_labels)
        c = torch.as_tensor(coef).to(device=dev, dtype=torch.float32).reshape(-1).expand(B).contiguous()
        m, l, l2, o = output_buffers(poison, dev, (B,), (B,), (B,), (B, D))
        nbytes = int(ext.softmax_scratch_bytes(N, D))
        scratch = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        if poison:
            scratch.view(torch.float32).fill_(float("nan"))
        ext.softmax_retrieval(
            _ptr(qf),
            _ptr(values),
            key_type,
            B,
            N,
            D,
            float(keys.scale),
            float(keys.shift),
            _ptr(c),
            _ptr(kl),
            _ptr(ql),
            _ptr(m),
            _ptr(l),
            _ptr(l2),
            _ptr(o),
            _ptr(scratch),
            nbytes,
            int(stream),
        )
        # The caching allocator may hand the scratch to the next allocation on this stream only after the kernels
        # that use it (stream order); other streams would need record_stream, but we launch on the current one.
    return PartialState(m, l, l2, o)


def knn(
    q: torch.Tensor,
    keys: KeyBank,
    k: int,
    *,
    query_labels: torch.Tensor | None = None,
    dtype: torch.dtype,
    poison: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k ≤ 32 nearest rows by exact fp32 distance: (dist2 (B, k) float32, index (B, k) int64), ascending,
    ties by index; rows with fewer than k allowed candidates are padded with (inf, −1)."""
    _check(q, keys, dtype, query_labels)
    if not isinstance(k, int) or k < 1 or k > MAX_K:
        raise ValueError(
            f"k: backend 'cuda' keeps 1 <= k <= {MAX_K} neighbours, got {k!r} (use backend='torch' for larger k)"
        )
    ext = _require()
    dev = q.device
    B, D, N = q.shape[0], keys.dim, keys.n
    with _launch_context(dev) as stream:
        qf, values, key_type, kl, ql = _common(q, keys, query_labels)
        dist = torch.full((B, k), float("nan") if poison else 0.0, dtype=torch.float32, device=dev)
        index = torch.full((B, k), -7 if poison else 0, dtype=torch.int64, device=dev)
        nbytes = int(ext.knn_scratch_bytes(N, D, k))
        scratch = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        if poison:
            scratch.fill_(0xFF)  # NaN distances and index -1 in every split list
        ext.knn_search(
            _ptr(qf),
            _ptr(values),
            key_type,
            B,
            N,
            D,
            float(keys.scale),
            float(keys.shift),
            int(k),
            _ptr(kl),
            _ptr(ql),
            _ptr(dist),
            _ptr(index),
            _ptr(scratch),
            nbytes,
            int(stream),
        )
    return dist, index


PATCH_RULES = {"shared": 0, "same_centre": 1, "same_whole": 2}  # = ad_cuda::PatchRule (csrc/cuda/patch_retrieval.cuh)
poison_outputs = False  # tests: patch_partials and coordinate_partials fill their outputs with NaN before a launch


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
    skip_bits: float = 64.0,
    poison: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-split partials (m base 2, l, l2 (S, R); o (S, R, V)) of the patch softmax on the CUDA kernel: the same
    contract as :func:`analytic_diffusion.kernels.patch_retrieval.patch_partials` (rule ``shared``) and
    ``same_position_partials`` (``same_centre``; ``same_whole`` = ``whole=True``), so one driver combines both.

    q (R, C·k²) float32; images (N, C, H, W) uint8/float32; image_index (n,) int32; positions (P, 2) or (R, 2) int32;
    coef2 (R,) float32 base 2. ``poison=True`` (tests; None: the module's ``poison_outputs``) fills the outputs with
    NaN first: the kernel must write all of them.
    """
    ext = _require()
    if rule not in PATCH_RULES:
        raise ValueError(f"rule: expected one of {', '.join(PATCH_RULES)}, got {rule!r}")
    tensors = (q, images, image_index, positions, coef2)
    if not _emulated() and any(t.device.type != "cuda" for t in tensors):
        raise ValueError(
            "backend 'cuda': the patch kernel needs every operand on a CUDA device, got "
            + ", ".join(str(t.device) for t in tensors)
        )
    for name, t, dtypes in (
        ("q", q, (torch.float32,)),
        ("images", images, SUPPORTED_KEY_DTYPES),
        ("image_index", image_index, (torch.int32,)),
        ("positions", positions, (torch.int32,)),
        ("coef2", coef2, (torch.float32,)),
    ):
        if t.dtype not in dtypes or not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor of {dtypes}, got {t.dtype}")
    _, C, H, W = images.shape
    R, n_img = q.shape[0], image_index.numel()
    code = PATCH_RULES[rule]
    S = int(ext.patch_num_splits(n_img, splits))
    V = C * k * k if rule == "same_whole" else C
    m, l, l2, o = output_buffers(
        poison_outputs if poison is None else poison, q.device, (S, R), (S, R), (S, R), (S, R, V)
    )
    key_type = ext.KEYS_U8 if images.dtype == torch.uint8 else ext.KEYS_F32
    with _launch_context(q.device) as stream:
        ext.patch_partials(
            _ptr(q),
            _ptr(images),
            key_type,
            _ptr(image_index),
            n_img,
            _ptr(positions),
            positions.shape[0],
            code,
            R,
            C,
            H,
            W,
            int(k),
            float(scale),
            float(shift),
            _ptr(coef2),
            float(skip_bits),
            int(splits),
            _ptr(m),
            _ptr(l),
            _ptr(l2),
            _ptr(o),
            int(stream),
        )
    return m, l, l2, o


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
    """(m base 2, l, o), each (S, B, D) float32, of pca_locality's coordinate softmax on the CUDA kernel: the
    contract of :func:`analytic_diffusion.kernels.coordinate_retrieval.coordinate_partials`.

    x (B, D) float32; images (N, D) uint8/float32; stencil (NNZ, D) int32 (−1 padded); value_index (D,) int32;
    coef2 (B,) float32 base 2; splits (S + 1,) int32; labels (N,) and (B,) int64 or both None; all on the device.
    ``poison=True`` (tests; None: the module's ``poison_outputs``) fills the outputs with NaN first.
    """
    ext = _require()
    named = (
        ("x", x, (torch.float32,)),
        ("images", images, SUPPORTED_KEY_DTYPES),
        ("stencil", stencil, (torch.int32,)),
        ("value_index", value_index, (torch.int32,)),
        ("coef2", coef2, (torch.float32,)),
        ("splits", splits, (torch.int32,)),
        ("image_labels", image_labels, (torch.int64,)),
        ("query_labels", query_labels, (torch.int64,)),
    )
    present = [(name, t, dtypes) for name, t, dtypes in named if t is not None]
    if not _emulated() and any(t.device.type != "cuda" for _, t, _ in present):
        raise ValueError(
            "backend 'cuda': the coordinate kernel needs every operand on a CUDA device, got "
            + ", ".join(f"{name} on {t.device}" for name, t, _ in present)
        )
    for name, t, dtypes in present:
        if t.dtype not in dtypes or not t.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor of {dtypes}, got {t.dtype}")
    (B, D), N, S = x.shape, images.shape[0], splits.numel() - 1
    if tuple(images.shape) != (N, D) or stencil.dim() != 2 or stencil.shape[1] != D or value_index.numel() != D:
        raise ValueError(
            f"images, stencil, value_index: expected (N, {D}), (nnz, {D}) and ({D},), got "
            f"{tuple(images.shape)}, {tuple(stencil.shape)} and {tuple(value_index.shape)}"
        )
    m, l, o = output_buffers(poison_outputs if poison is None else poison, x.device, *[(max(S, 0), B, D)] * 3)
    key_type = ext.KEYS_U8 if images.dtype == torch.uint8 else ext.KEYS_F32
    with _launch_context(x.device) as stream:
        ext.coordinate_partials(
            _ptr(x),
            _ptr(images),
            key_type,
            _ptr(stencil),
            stencil.shape[0],
            _ptr(value_index),
            _ptr(coef2),
            _ptr(splits),
            S,
            _ptr(image_labels),
            _ptr(query_labels),
            B,
            D,
            N,
            float(scale),
            float(shift),
            _ptr(m),
            _ptr(l),
            _ptr(o),
            int(stream),
        )
    return m, l, o
