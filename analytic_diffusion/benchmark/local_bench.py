"""Side-by-side timings of the local family (LS, ELS, bbELS, PSPC, pca_locality) per image per step: the torch
reference, the C++ CPU kernel, the fused Triton kernels, the CUDA-extension kernels (the last two on a GPU) and,
for ELS, two PyTorch baselines: ``naive`` (unfold every training patch, cdist, softmax; where it fits) and
``studio`` (the Analytic Diffusion Studio's els_machine formulation: per chunk of training images one conv2d with
every patch of the chunk as a filter, logits and weights materialised, online softmax across chunks).
pca_locality has no patch size (its rows carry k = None) and its torch reference IS the dense-mask formulation (a
(B·N, D) × (D, D) matmul per σ), so its "× reference" is the gain of the sparse stencils; the row records the
mask's mean support (inputs per output) that this gain depends on.

ELS / bbELS rows on a GPU with known peaks carry the exp / MMA roofline floor per image per step
(:func:`~analytic_diffusion.benchmark.roofline.patch_floor_seconds`, docs/design.md §9.3) and the floor of
the fused kernels' own math (direct distances on CUDA cores), from the method's exact pair count.

Data: random uint8 training images (N, C, H, W) resident on the device; queries are training images plus noise
of scale σ. Each timed path is checked against the float64 reference on the first image (``rel_err``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Callable, cast

import torch
import torch.nn.functional as F

from ..data import Dataset
from ..denoisers import make_denoiser
from .global_bench import available_memory, time_call
from .roofline import device_peaks, patch_floor_seconds

METHODS = ("ls", "els", "bbels", "pspc", "pca_locality")
PATHS = ("naive", "studio", "torch", "cpu", "triton", "cuda")
# The studio's default chunk of training images per conv2d (its logits: B·K·(H−k+1)(W−k+1)·H·W floats).
STUDIO_CHUNK = 512


def naive_els(x: torch.Tensor, images_float: torch.Tensor, k: int, sigma: float) -> torch.Tensor:
    """ELS as a PyTorch user would write it: every interior training patch materialised, cdist, softmax, matmul."""
    b, c, h, w = x.shape
    keys = F.unfold(images_float, k).transpose(1, 2).reshape(-1, c * k * k)  # (N·L, F)
    d = k // 2
    centres = images_float[:, :, d : h - d, d : w - d].permute(0, 2, 3, 1).reshape(-1, c)
    q = F.unfold(F.pad(x, (d, d, d, d), mode="circular"), k).transpose(1, 2).reshape(-1, c * k * k)
    wts = torch.softmax(-(torch.cdist(q, keys) ** 2) / (2 * sigma * sigma), dim=1)
    return (wts @ centres).reshape(b, h, w, c).permute(0, 3, 1, 2)


def studio_chunk(batch: int, shape: Sequence[int], k: int, memory: int) -> int:
    """Training images per studio chunk: its default 512, fewer when the materialised logits and weights
    (2 · B·K·L·H·W floats, L = interior positions) would take more than a quarter of ``memory``."""
    _c, h, w = shape
    per_image = 2 * 4 * batch * (h - k + 1) * (w - k + 1) * h * w
    return int(max(1, min(STUDIO_CHUNK, memory // 4 // per_image)))


def studio_els(x: torch.Tensor, images_float: torch.Tensor, k: int, sigma: float, chunk: int) -> torch.Tensor:
    """ELS in the style of the studio's els_machine (docs/design.md §10.2), fp32: for each
    chunk of training images, every interior k×k patch becomes a conv2d filter over the circularly padded
    queries; ‖q‖² − 2⟨q, y⟩ + ‖y‖² gives logits (B, K·L, H, W), materialised with their weights; a running max
    with rescaling carries the softmax across chunks; values are the patches' centre pixels."""
    b, c, h, w = x.shape
    d = k // 2
    xp = F.pad(x, (d, d, d, d), mode="circular")
    qn = F.conv2d(xp * xp, torch.ones(1, c, k, k, dtype=x.dtype, device=x.device))  # (B, 1, H, W)
    coef = 1.0 / (2.0 * sigma * sigma)
    m = torch.full((b, 1, h, w), float("-inf"), dtype=x.dtype, device=x.device)
    l = torch.zeros_like(m)
    o = torch.zeros_like(x)
    for s in range(0, images_float.shape[0], chunk):
        imgs = images_float[s : s + chunk]
        filters = F.unfold(imgs, k).transpose(1, 2).reshape(-1, c, k, k)  # (K·L, C, k, k), image-major
        yn = (filters * filters).sum((1, 2, 3))
        centres = imgs[:, :, d : h - d, d : w - d].permute(0, 2, 3, 1).reshape(-1, c)  # same (image, position) order
        z = -coef * (qn - 2.0 * F.conv2d(xp, filters) + yn.view(1, -1, 1, 1))  # (B, K·L, H, W)
        m_new = torch.maximum(m, z.amax(1, keepdim=True))
        a = torch.exp(m - m_new)
        p = torch.exp(z - m_new)
        l = l * a + p.sum(1, keepdim=True)
        o = o * a + torch.einsum("bjhw,jc->bchw", p, centres)
        m = m_new
    return o / l


def _random_images(n: int, shape: Sequence[int], seed: int, smooth: bool) -> torch.Tensor:
    """Uniform uint8 noise, or (``smooth``) Gaussian noise blurred over ~2 pixels and quantised: images with local
    pixel correlations, so that pca_locality's Wiener masks are local as on natural images (on i.i.d. pixels a
    few hundred samples give a noisy covariance and an almost full mask)."""
    gen = torch.Generator().manual_seed(seed)
    if not smooth:
        return torch.randint(0, 256, (n, *shape), generator=gen, dtype=torch.uint8)
    c = shape[0]
    t = torch.arange(-4, 5, dtype=torch.float32)
    g = torch.exp(-t * t / 8.0)
    kernel = (g[:, None] * g[None, :] / g.sum() ** 2).expand(c, 1, 9, 9)
    z = F.conv2d(F.pad(torch.randn(n, *shape, generator=gen), (4, 4, 4, 4), mode="circular"), kernel, groups=c)
    z = z / z.std()
    return (127.5 + 60.0 * z).round().clamp(0, 255).to(torch.uint8)


def _unavailable(path: str, method: str, device: torch.device) -> str | None:
    if path in ("naive", "studio"):
        return None if method == "els" else f"{path} baseline written for ELS only"
    if path == "cpu":
        from ..ops import cpu_backend

        if device.type != "cpu":
            return f"the C++ kernels need the CPU, got {device}"
        return None if cpu_backend.available() else "the C++ extension is not built"
    if path == "triton":
        from ..ops import triton_backend

        if device.type == "cpu" and triton_backend.interpreting():
            return "Triton under the CPU interpreter: not a timing"
        return triton_backend.unavailable_reason(device)
    if path == "cuda":
        from ..ops import cuda_backend

        if device.type != "cuda":
            return f"the CUDA kernels need a CUDA device, got {device}"
        return cuda_backend.unavailable_reason()
    return None


def run_local_bench(
    methods: Iterable[str],
    ks: Iterable[int],
    *,
    n: int,
    shape: Sequence[int] = (3, 32, 32),
    batch: int = 1,
    paths: Iterable[str] = PATHS,
    sigma: float = 1.0,
    device: torch.device | str = "cpu",
    repeats: int = 1,
    seed: int = 0,
    progress: Callable[[dict[str, Any]], object] | None = None,
) -> list[dict[str, Any]]:
    paths = list(paths)
    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        raise ValueError(f"paths: expected some of {', '.join(PATHS)}, got {', '.join(map(repr, unknown))}")
    dev = torch.device(device)
    peaks = device_peaks(dev)
    rows: list[dict[str, Any]] = []
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"methods: expected some of {', '.join(METHODS)}, got {method!r}")
        smooth = method == "pca_locality"
        ds = Dataset(
            _random_images(n, shape, seed, smooth),
            source=f"random {'smooth ' if smooth else ''}uint8 {n}x{'x'.join(map(str, shape))}",
            device=dev,
        )
        gen = torch.Generator().manual_seed(seed + 1)
        x = (ds.images_float()[:batch].cpu() + sigma * torch.randn(batch, *shape, generator=gen)).to(dev)
        for k in [None] if method == "pca_locality" else ks:
            # pca_locality: the authors' θ (0.05 for colour CIFAR-10, 0.005 for 1-channel MNIST-like data)
            opts = {"threshold": 0.05 if shape[0] == 3 else 0.005} if k is None else {"patch": k}
            ref_den: Any = make_denoiser(method, ds, backend="torch", dtype=torch.float64, **opts)
            ref = ref_den(x[:1].double(), sigma)
            extra: dict[str, Any] = {}
            if method == "pca_locality":
                extra["mean_support"] = float(ref_den.mask_for(sigma).sum(0).double().mean())
                extra["threshold"] = opts["threshold"]
            if method in ("els", "bbels"):
                extra["pairs_per_image"] = ref_den.pairs_per_image(k)
                floors = patch_floor_seconds(extra["pairs_per_image"], shape[0] * cast(int, k) ** 2, peaks)
                if floors is not None:
                    extra["floor_ms"] = 1e3 * floors["exp_mma"]
                    extra["floor_simt_ms"] = 1e3 * floors["simt"]
            for path in paths:
                row: dict[str, Any] = {
                    "method": method,
                    "k": k,
                    "N": n,
                    "shape": list(shape),
                    "B": batch,
                    "path": path,
                    "device": str(dev),
                    **extra,
                }
                reason = _unavailable(path, method, dev)
                if (
                    reason is None
                    and path == "naive"
                    and 4 * n * (shape[1] * shape[2]) * (batch * shape[1] * shape[2] + shape[0] * cast(int, k) ** 2) * 2
                    > 0.5 * available_memory(dev)
                ):
                    reason = "does not fit in memory"
                if reason is not None:
                    row["skipped"] = reason
                    rows.append(row)
                    continue
                if path == "naive":
                    yf = ds.images_float()

                    def run() -> torch.Tensor:
                        return naive_els(x, yf, cast(int, k), sigma)  # ELS rows have a patch size
                elif path == "studio":
                    yf = ds.images_float()
                    chunk = min(n, studio_chunk(batch, shape, cast(int, k), available_memory(dev)))
                    row["studio_chunk"] = chunk

                    def run() -> torch.Tensor:
                        return studio_els(x, yf, cast(int, k), sigma, chunk)
                else:
                    den = make_denoiser(method, ds, backend=path, **opts)

                    def run() -> torch.Tensor:
                        return den(x, sigma)

                out = run()
                row["rel_err"] = float((out[:1].double().cpu() - ref.cpu()).norm() / ref.norm())
                row["seconds"] = time_call(run, dev, repeats)
                row["ms_per_image_step"] = 1e3 * row["seconds"] / batch
                if "floor_ms" in row:
                    row["x_floor"] = row["ms_per_image_step"] / row["floor_ms"]
                rows.append(row)
                if progress is not None:
                    progress(row)
            ref_t = next(
                (
                    r["seconds"]
                    for r in rows
                    if r["method"] == method and r["k"] == k and r["path"] == "torch" and "seconds" in r
                ),
                None,
            )
            for r in rows:
                if r["method"] == method and r["k"] == k and "seconds" in r and ref_t is not None:
                    r["speedup_vs_reference"] = ref_t / r["seconds"]
    return rows


def _note(row: dict[str, Any]) -> str:
    if "skipped" in row:
        return row["skipped"]
    if "mean_support" in row:
        return f"θ = {row['threshold']}: mask support {row['mean_support']:.1f} of {math.prod(row['shape'])}"
    if "studio_chunk" in row:
        return f"{row['studio_chunk']} training images per conv2d chunk"
    return ""


def _fmt(v: float | None, spec: str) -> str:
    return "" if v is None else format(v, spec)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| method | k | N | B | path | ms per image per step | × reference | floor ms (exp/MMA) | × floor | "
        "SIMT floor ms | rel. err | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['k']} | {r['N']} | {r['B']} | {r['path']} | "
            f"{_fmt(r.get('ms_per_image_step'), '.4g')} | {_fmt(r.get('speedup_vs_reference'), '.2f')} | "
            f"{_fmt(r.get('floor_ms'), '.3g')} | {_fmt(r.get('x_floor'), '.2f')} | "
            f"{_fmt(r.get('floor_simt_ms'), '.3g')} | {_fmt(r.get('rel_err'), '.1e')} | {_note(r)} |"
        )
    return "\n".join(lines)
