"""pca_locality on the embedded MNIST (10 000 images, 32×32) with its real Wiener masks: the C++ sparse-stencil
kernel (``backend="cpu"``) against the dense-mask reference (``backend="torch"``), one image per call, per σ.
A script, not a test (bench/RESULTS.md records its output).

    python bench/pca_locality_mnist.py [--sigmas 0.1,1,10] [--repeats 3] [--threshold 0.005]

``bench local`` times pca_locality on smoothed random images, whose masks are denser than real data's; this
shows the gain on the masks the method actually uses (the mask's mean support is printed: the sparse kernel's
work is proportional to it, the reference's to D). Errors are against the float64 reference.
"""

from __future__ import annotations

import argparse
import time

import torch

from analytic_diffusion.data import load_dataset
from analytic_diffusion.denoisers import make_denoiser


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sigmas", default="0.1,1,10")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threshold", type=float, default=0.005)
    args = ap.parse_args()
    ds = load_dataset("mnist32")
    gen = torch.Generator().manual_seed(0)
    print(f"mnist32, N = {len(ds.images_float())}, θ = {args.threshold}, {torch.get_num_threads()} threads")
    print("| σ | mask support (of 1024) | torch ms | cpu ms | cpu × torch | torch rel. err | cpu rel. err |")
    print("|---|---|---|---|---|---|---|")
    for sigma in (float(s) for s in args.sigmas.split(",")):
        x = ds.images_float()[:1] + sigma * torch.randn(1, 1, 32, 32, generator=gen)
        oracle = make_denoiser("pca_locality", ds, backend="torch", dtype=torch.float64, threshold=args.threshold)
        ref = oracle(x.double(), sigma)
        cells = []
        for backend in ("torch", "cpu"):
            den = make_denoiser("pca_locality", ds, backend=backend, threshold=args.threshold)
            out = den(x, sigma)  # warm-up: the mask (and the stencil table) are built once per σ
            cells.append(
                (median_ms(lambda: den(x, sigma), args.repeats), float((out.double() - ref).norm() / ref.norm()))
            )
        support = float(oracle.mask_for(sigma).sum(0).double().mean())
        (t_ref, e_ref), (t_cpu, e_cpu) = cells
        print(
            f"| {sigma:g} | {support:.1f} | {t_ref:.1f} | {t_cpu:.1f} | {t_ref / t_cpu:.1f} | {e_ref:.1e} | "
            f"{e_cpu:.1e} |"
        )


if __name__ == "__main__":
    main()
