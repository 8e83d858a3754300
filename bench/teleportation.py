"""How many steps does analytic teleportation save on a trained network? (Wang & Vastola report 15–30%.)

    python bench/teleportation.py CHECKPOINT [--dataset mnist32] [--subset 5000] [--n 32] [--steps 18]

The network's full Heun run on the Karras grid is the reference; for each σ_skip the teleported run (exact
Gaussian flow of the training set's Gaussian down to σ_skip, then the rest of the same grid) and a plain run with as
many steps are compared with it by per-sample Pearson r and RMS of the final samples. Prints a markdown table.
"""

import argparse
import time

import analytic_diffusion as ad


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--dataset", default="mnist32")
    p.add_argument("--subset", type=int, default=None, help="Gaussian fitted to the first N images (default all)")
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--steps", type=int, default=18)
    p.add_argument("--skips", default="40,20,10,5,2.5,1.2,0.6,0.3")
    p.add_argument("--r-min", type=float, default=0.99)
    a = p.parse_args()
    ds = ad.load_dataset(a.dataset)
    if a.subset:
        ds = ds.subset(a.subset)
    net = ad.load_network(a.checkpoint)
    wiener = ad.make_denoiser("wiener", ds)
    t = time.perf_counter()
    res = ad.teleportation_study(
        net, wiener, a.n, steps=a.steps, sigma_skips=[float(v) for v in a.skips.split(",")], r_min=a.r_min
    )
    print(
        f"{a.checkpoint}: {a.n} samples, {a.steps}-step Heun on karras, Gaussian of {ds!r} "
        f"({time.perf_counter() - t:.0f} s)\n"
    )
    print("| σ_skip | steps skipped | evaluations (full) | teleported r (min) | teleported RMS | plain r | plain RMS |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in res["rows"]:
        t, pl = r["teleported"], r["plain"]
        print(
            f"| {r['sigma_skip']:g} | {r['steps_skipped']} of {a.steps} ({r['fraction_skipped']:.0%}) | "
            f"{r['evaluations']} ({r['full_evaluations']}) | {t['pearson_r']:.4f} ({t['pearson_r_min']:.4f}) | "
            f"{t['rms']:.4f} | {pl['pearson_r']:.4f} | {pl['rms']:.4f} |"
        )
    print(f"\nsteps saved at mean r >= {a.r_min}: {res['steps_saved']} of {a.steps} ({res['fraction_saved']:.0%})")


if __name__ == "__main__":
    main()
