"""pca_locality: what a step at a NEW σ costs (the mask is built, then the kernel runs) against a step at a cached
σ, side by side in one run, with the masks of the dense float64 rule (``locality_mask(wiener_filter_matrix(..))``,
the engine's old path) and of the bounded float32 route (ops/wiener_mask.WienerMasks, the denoiser's path now).
Both give the same booleans (checked here on every σ). A script, not a test (bench/RESULTS.md records it).

    OMP_NUM_THREADS=1 python bench/pca_locality_new_sigma.py [--data cifar|mnist] [--batches 1,64]
        [--sigmas 0.01,0.3,10] [--threshold 0.05]

``cifar``: N = 10 000 random uint8 images of 3×32×32 (white noise: the spectrum is flat, so no column of the
factor can be dropped — the worst case of the bounded route); ``mnist``: the embedded MNIST (28×28).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from analytic_diffusion.data import Dataset, load_dataset
from analytic_diffusion.denoisers import make_denoiser
from analytic_diffusion.ops.local_retrieval import coordinate_retrieval, locality_mask, wiener_filter_matrix


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="cifar", choices=["cifar", "mnist"])
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--sigmas", default="0.01,0.3,10")
    ap.add_argument("--threshold", type=float, default=0.05)
    args = ap.parse_args()
    os.environ.setdefault("AD_CACHE_DIR", tempfile.mkdtemp())  # the PCA is computed once per run, not per step
    if args.data == "cifar":
        g = torch.Generator().manual_seed(0)
        ds = Dataset.from_array(torch.randint(0, 256, (10000, 3, 32, 32), dtype=torch.uint8, generator=g))
    else:
        ds = load_dataset("mnist")
    _, lam, U = ds.pca()  # warm (cached in memory and on disk; the denoiser reuses it)
    load = os.getloadavg()
    print(
        f"{args.data}: N = {ds.n}, D = {ds.dim}, θ = {args.threshold}, {torch.get_num_threads()} thread(s), "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    print(
        "| B | σ | mask nnz | dense mask s | bounded mask s | old new-σ step s | new-σ step s | cached step s "
        "| old / cached | new / cached |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(1)
    for B in (int(b) for b in args.batches.split(",")):
        den = make_denoiser("pca_locality", ds, threshold=args.threshold, backend="cpu")
        for sigma in (float(s) for s in args.sigmas.split(",")):
            x = ds.images_float()[:B] + sigma * torch.randn(B, *ds.image_shape, generator=gen)
            dense, t_dense = timed(lambda: locality_mask(wiener_filter_matrix(lam, U, sigma), args.threshold))
            _, t_old_kernel = timed(lambda: coordinate_retrieval(x, ds.keys(), sigma, dense.clone(), backend="cpu"))
            mask, t_mask = timed(lambda: den.mask_for(sigma))  # the denoiser's mask at a σ it has not met
            _, t_first = timed(lambda: den(x, sigma))  # its stencil table, then the kernel
            t_new = t_mask + t_first
            if not torch.equal(mask, dense):
                raise SystemExit(f"mask mismatch at σ = {sigma}")
            _, t_cached = timed(lambda: den(x, sigma))
            t_old = t_dense + t_old_kernel
            print(
                f"| {B} | {sigma:g} | {int(dense.sum())} | {t_dense:.2f} | {t_mask:.2f} | {t_old:.2f} | "
                f"{t_new:.2f} | {t_cached:.2f} | {t_old / t_cached:.1f} | {t_new / t_cached:.1f} |"
            )


if __name__ == "__main__":
    main()
