"""Side-by-side timings of the local family (LS, ELS, bbELS, PSPC, pca_locality) per image per step: the torch
reference, the fused Triton kernels, the CUDA-extension kernels (all but pca_locality) and, for ELS where it fits,
a naive PyTorch version (unfold every training patch, cdist, softmax). pca_locality has no patch size (its rows
carry k = None) and its torch reference IS the dense-mask formulation (a (B·N, D) × (D, D) matmul per σ), so its
"× reference" is the gain of the sparse stencils; the row records the mask's mean support (inputs per output)
that this gain depends on.

Data: random uint8 training images (N, C, H, W) resident on the device; queries are training images plus noise
of scale σ. Each timed path is checked against the float64 reference on the first image (``rel_err``).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, List, Optional

import torch
import torch.nn.functional as F

from ..data import Dataset
from ..denoisers import make_denoiser
from .global_bench import available_memory, time_call

METHODS = ("ls", "els", "bbels", "pspc", "pca_locality")
PATHS = ("naive", "torch", "triton", "cuda")


def naive_els(x: torch.Tensor, images_float: torch.Tensor, k: int, sigma: float) -> torch.Tensor:
    """ELS as a PyTorch user would write it: every interior training patch materialised, cdist, softmax, matmul."""
    b, c, h, w = x.shape
    keys = F.unfold(images_float, k).transpose(1, 2).reshape(-1, c * k * k)  # (N·L, F)
    d = k // 2
    centres = images_float[:, :, d:h - d, d:w - d].permute(0, 2, 3, 1).reshape(-1, c)
    q = F.unfold(F.pad(x, (d, d, d, d), mode="circular"), k).transpose(1, 2).reshape(-1, c * k * k)
    wts = torch.softmax(-torch.cdist(q, keys) ** 2 / (2 * sigma * sigma), dim=1)
    return (wts @ centres).reshape(b, h, w, c).permute(0, 3, 1, 2)


def _random_images(n: int, shape, seed: int, smooth: bool) -> torch.Tensor:
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


def _unavailable(path: str, method: str, device: torch.device) -> Optional[str]:
    if path == "naive":
        return None if method == "els" else "naive baseline written for ELS only"
    if path == "triton":
        from ..ops import triton_backend
        if device.type == "cpu" and triton_backend.interpreting():
            return "Triton under the CPU interpreter: not a timing"
        return triton_backend.unavailable_reason(device)
    if path == "cuda":
        from ..ops import cuda_backend
        from ..ops.local_retrieval import COORDINATE_FUSED_KERNELS
        if method == "pca_locality" and path not in COORDINATE_FUSED_KERNELS:
            return "no CUDA-extension kernel for pca_locality (Triton only)"
        if device.type != "cuda":
            return f"the CUDA kernels need a CUDA device, got {device}"
        return cuda_backend.unavailable_reason()
    return None


def run_local_bench(methods: Iterable[str], ks: Iterable[int], *, n: int, shape=(3, 32, 32), batch: int = 1,
                    paths: Iterable[str] = PATHS, sigma: float = 1.0, device="cpu", repeats: int = 1, seed: int = 0,
                    progress: Optional[Callable] = None) -> List[Dict]:
    dev = torch.device(device)
    rows: List[Dict] = []
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"methods: expected some of {', '.join(METHODS)}, got {method!r}")
        smooth = method == "pca_locality"
        ds = Dataset(_random_images(n, shape, seed, smooth),
                     source=f"random {'smooth ' if smooth else ''}uint8 {n}x{'x'.join(map(str, shape))}", device=dev)
        gen = torch.Generator().manual_seed(seed + 1)
        x = (ds.images_float()[:batch].cpu() + sigma * torch.randn(batch, *shape, generator=gen)).to(dev)
        for k in ([None] if method == "pca_locality" else ks):
            # pca_locality: the authors' θ (0.05 for colour CIFAR-10, 0.005 for 1-channel MNIST-like data)
            opts = {"threshold": 0.05 if shape[0] == 3 else 0.005} if k is None else {"patch": k}
            ref_den = make_denoiser(method, ds, backend="torch", dtype=torch.float64, **opts)
            ref = ref_den(x[:1].double(), sigma)
            extra = {}
            if method == "pca_locality":
                extra["mean_support"] = float(ref_den.mask_for(sigma).sum(0).double().mean())
                extra["threshold"] = opts["threshold"]
            for path in paths:
                row = {"method": method, "k": k, "N": n, "shape": list(shape), "B": batch, "path": path,
                       "device": str(dev), **extra}
                reason = _unavailable(path, method, dev)
                if reason is None and path == "naive" and 4 * n * (shape[1] * shape[2]) * (batch * shape[1] * shape[2]
                                                                                          + shape[0] * k * k) * 2 \
                        > 0.5 * available_memory(dev):
                    reason = "does not fit in memory"
                if reason is not None:
                    row["skipped"] = reason
                    rows.append(row)
                    continue
                if path == "naive":
                    yf = ds.images_float()
                    run = (lambda: naive_els(x, yf, k, sigma))
                else:
                    den = make_denoiser(method, ds, backend=path, **opts)
                    run = (lambda: den(x, sigma))
                out = run()
                row["rel_err"] = float((out[:1].double().cpu() - ref.cpu()).norm() / ref.norm())
                row["seconds"] = time_call(run, dev, repeats)
                row["ms_per_image_step"] = 1e3 * row["seconds"] / batch
                rows.append(row)
                if progress is not None:
                    progress(row)
            ref_t = next((r["seconds"] for r in rows if r["method"] == method and r["k"] == k
                          and r["path"] == "torch" and "seconds" in r), None)
            for r in rows:
                if r["method"] == method and r["k"] == k and "seconds" in r and ref_t is not None:
                    r["speedup_vs_reference"] = ref_t / r["seconds"]
    return rows


def _note(row: Dict) -> str:
    if "skipped" in row:
        return row["skipped"]
    if "mean_support" not in row:
        return ""
    return f"θ = {row['threshold']}: mask support {row['mean_support']:.1f} of {math.prod(row['shape'])}"


def markdown_table(rows: List[Dict]) -> str:
    lines = ["| method | k | N | B | path | ms per image per step | × reference | rel. err | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = r.get("ms_per_image_step")
        sp = r.get("speedup_vs_reference")
        err = r.get("rel_err")
        lines.append(f"| {r['method']} | {r['k']} | {r['N']} | {r['B']} | {r['path']} | "
                     f"{'' if ms is None else format(ms, '.4g')} | {'' if sp is None else format(sp, '.2f')} | "
                     f"{'' if err is None else format(err, '.1e')} | {_note(r)} |")
    return "\n".join(lines)
