"""smalldiffusion's IdealDenoiser vs the engine's optimal denoiser: speed, and accuracy at small σ and on data far
from the origin, against the float64 torch-backend oracle. A script, not a test.

    python bench/smalldiffusion_ideal.py                      # N = 4096 random images 3×16×16, B = 64
    python bench/smalldiffusion_ideal.py --n 2000 --shape 1,28,28 --batch 16

IdealDenoiser (smalldiffusion 0.5.0, model.py) is the naive expanded-form posterior mean: ‖x‖² + ‖y‖² − 2 y·x in
the input dtype, a softmax over all N, then Σ w y; it returns ε̂ and takes one σ per call. ``import
smalldiffusion`` fails on this machine (its __init__ imports torchvision, whose wheel for torch 2.13 does not
import against the CPU torch build), so it is reached through ``load_smalldiffusion``, which then runs the
installed package's model.py and diffusion.py by file path (they need einops and accelerate). Both sides get the same float32 queries; errors are of x̂0 = x − σ·ε̂, max |·| over the batch.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import analytic_diffusion as ad
from analytic_diffusion.denoisers import make_denoiser
from analytic_diffusion.integrations import load_smalldiffusion


def _ideal_class():
    try:
        return load_smalldiffusion().IdealDenoiser
    except ImportError as exc:
        raise SystemExit(str(exc)) from exc


def _median_ms(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--shape", default="3,16,16")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--center", type=float, default=0.9, help="centre of the far-from-origin data set")
    p.add_argument("--half-width", type=float, default=0.02, help="its half-width (values centre ± half-width)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    shape = tuple(int(v) for v in a.shape.split(","))
    g = torch.Generator().manual_seed(a.seed)
    IdealDenoiser = _ideal_class()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; N = {a.n}, shape {shape}, B = {a.batch}")
    print("| data | queries | σ | path | ms per call | max abs err of x̂0 | err / data range |")
    print("|---|---|---|---|---|---|---|")
    spread = torch.rand((a.n,) + shape, generator=g, dtype=torch.float64) * 2 - 1
    D = spread[0].numel()
    for label, hw in (("uniform in [-1, 1]", 1.0), (f"{a.center:g} ± {a.half_width:g}", a.half_width)):
        imgs = spread if hw == 1.0 else a.center + hw * spread
        ds = ad.Dataset.from_array(imgs.float())
        oracle = make_denoiser("optimal", ds, dtype=torch.float64, backend="torch")
        fast = make_denoiser("optimal", ds, dtype=torch.float32)
        data32 = ds.images_float(dtype=torch.float32)
        ideal = IdealDenoiser(data32)
        i, j = torch.randint(0, a.n, (2, a.batch), generator=g)
        half_gap = hw * (2 * D / 3) ** 0.5 / 2  # half the typical distance between two training images
        noise = torch.randn((a.batch,) + shape, generator=g, dtype=torch.float64)
        cases = [("near one image", r * half_gap, data32[i].double() + r * half_gap * noise) for r in (0.01, 0.1)]
        # midway between two images, where the posterior mixes them and logit errors move x̂0
        mid = (data32[i].double() + data32[j].double()) / 2 + 0.01 * half_gap * noise / D**0.5
        cases += [("midway between two", r * half_gap, mid) for r in (1.0, 0.5, 0.3)]
        for kind, sigma, xq in cases:
            x = xq.float()
            ref = oracle(x.double(), sigma)
            s = torch.tensor(sigma, dtype=torch.float32)
            out_ideal = x.double() - sigma * ideal(x, s).double()
            out_fast = fast(x, sigma).double()
            t_ideal = _median_ms(lambda: ideal(x, s), a.repeats)
            t_fast = _median_ms(lambda: fast(x, sigma), a.repeats)
            for name, out, t in (
                ("smalldiffusion IdealDenoiser (fp32)", out_ideal, t_ideal),
                ("engine optimal (fp32, backend auto)", out_fast, t_fast),
            ):
                err = (out - ref).abs().max().item()
                e = "nan" if err != err else f"{err:.1e}"
                r = "nan" if err != err else f"{err / (2 * hw):.1e}"
                print(f"| {label} | {kind} | {sigma:.3g} | {name} | {t:.1f} | {e} | {r} |")


if __name__ == "__main__":
    main()
