"""Time per sampling step of every method on the reference backends, on CPU, at CIFAR-10 shapes.

    python bench/reference_step_times.py                  # N = 5000 random uint8 images 3×32×32, σ = 1
    python bench/reference_step_times.py --n 5000 --methods els,bbels --ks 3,7,15

One "step" is one denoiser call (what an Euler/DDIM step costs; Heun makes about two). Each configuration is
warmed once (PCA, masks, dataset centre: one-off costs cached per dataset or per σ), then timed as the median
of --repeats calls. This is the baseline the fused kernels are measured against (bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from analytic_diffusion.data import Dataset
from analytic_diffusion.denoisers import make_denoiser

# (method, options, batches); {k} is filled from --ks for the methods that take a patch size. The local family
# names backend=torch: auto would take the C++ patch kernel on CPU (timed by `analytic-diffusion bench local`).
PLAN = [
    ("optimal", {"backend": "torch"}, (1, 64)),
    ("optimal", {"backend": "cpu"}, (1, 64)),
    ("topk", {"k": 200}, (1, 64)),
    ("nearest", {}, (1, 64)),
    ("wiener", {}, (1, 64)),
    ("smoothed", {"num_perturbations": 4}, (1, 64)),
    ("knn", {"k": 2048, "ref_size": 256}, (1, 64)),
    ("ls", {"patch": "{k}", "backend": "torch"}, (1, 64)),
    ("pspc", {"patch": "{k}", "backend": "torch"}, (1, 64)),
    ("pspc-flex", {"tau": 0.5}, (1,)),
    ("pca_locality", {"threshold": 0.05}, (1,)),
    ("els", {"patch": "{k}", "backend": "torch"}, (1,)),
    ("bbels", {"patch": "{k}", "backend": "torch"}, (1,)),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--sigma", type=float, default=1.0)
    ap.add_argument("--ks", default="3,7,15")
    ap.add_argument("--methods", default=None, help="comma list (default: all)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    ds = Dataset.from_array(torch.randint(0, 256, (args.n, 3, 32, 32), generator=g, dtype=torch.uint8))
    wanted = None if args.methods is None else set(args.methods.split(","))
    ks = [int(v) for v in args.ks.split(",")]
    print(
        f"CPU reference, N = {args.n} random uint8 images 3×32×32, σ = {args.sigma}, fp32, "
        f"{args.threads} threads, median of {args.repeats} calls after one warm-up\n"
    )
    print("| method | options | B | s per step | ms per image per step |")
    print("|---|---|---|---|---|", flush=True)
    for method, opts, batches in PLAN:
        if wanted is not None and method not in wanted:
            continue
        variants = (
            [{k: (kk if v == "{k}" else v) for k, v in opts.items()} for kk in ks] if "{k}" in opts.values() else [opts]
        )
        for o in variants:
            den = make_denoiser(method, ds, **o)
            for b in batches:
                x = torch.randn(b, 3, 32, 32, generator=g)
                den(x, args.sigma)  # warm-up: one-off statistics, masks, centre
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    out = den(x, args.sigma)
                    times.append(time.perf_counter() - t0)
                assert torch.isfinite(out).all()
                t = statistics.median(times)
                shown = ", ".join(f"{k}={v}" for k, v in o.items())
                print(f"| {method} | {shown} | {b} | {t:.3g} | {1e3 * t / b:.3g} |", flush=True)


if __name__ == "__main__":
    main()
