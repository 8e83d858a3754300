"""Peak extra memory (and time) of ONE ELS denoiser call at CIFAR-10 shapes. A script, not a test.

    python bench/els_memory.py                       # k in {3, 15} × {default budget, 64 GB requested}
    python bench/els_memory.py --ks 15 --shard-images 2000

Each case runs in a fresh subprocess: N random uint8 images 3×32×32 are built, the dataset's centre vector is
warmed (a cached D-vector, computed once per dataset), then the RSS is read (VmRSS), the high-water mark is
reset (``echo 5 > /proc/self/clear_refs``; if the kernel refuses, VmHWM since start is used, an upper bound),
one denoiser call runs on a B = 1 query at σ = 1, and peak extra = VmHWM − baseline RSS.

The patch reference caps its temporaries at PATCH_MEMORY_CAP (2 GiB) whatever budget is requested, so the
64 GB request shows that the < 4 GB bound holds whatever chunk sizes the budget would allow.
``--shard-images M`` runs the call over the shard of the first M stored images only (``partial(start=0,
stop=M)``, the way datasets are sharded): the chunk loop's steady state is the same, so the peak memory is the
full call's, in a fraction of the time; the output says so. Without it the call is complete.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(args) -> None:
    import gc

    import torch

    torch.set_num_threads(args.threads)
    from analytic_diffusion.data.dataset import Dataset
    from analytic_diffusion.denoisers.equivariant import EquivariantLocalScore
    from analytic_diffusion.ops.patch_retrieval import effective_budget

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.n, 3, 32, 32), generator=g, dtype=torch.uint8)
    ds = Dataset.from_array(images)
    kw = {} if args.budget is None else {"memory_budget": args.budget}
    den = EquivariantLocalScore(ds, patch=args.k, backend="torch", **kw)  # the reference (auto: the C++ kernel)
    den.keys.get_center(torch.float64)  # cached per dataset; not part of the per-call cost
    x = torch.randn(1, 3, 32, 32, generator=g)
    gc.collect()
    base = _status("VmRSS")
    reset = _reset_hwm()
    t0 = time.perf_counter()
    if args.shard_images:
        st = den.partial(x, 1.0, k=args.k, start=0, stop=args.shard_images)
        ok = bool(torch.isfinite(st.m).all())
    else:
        out = den(x, 1.0)
        ok = bool(torch.isfinite(out).all())
    dt = time.perf_counter() - t0
    peak = _status("VmHWM")
    print(
        json.dumps(
            {
                "k": args.k,
                "requested": den.memory_budget,
                "effective": effective_budget(den.memory_budget),
                "base_mb": base / 2**20,
                "extra_mb": (peak - base) / 2**20,
                "seconds": dt,
                "hwm_reset": reset,
                "finite": ok,
                "images": args.shard_images or "all",
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--ks", default="3,15")
    ap.add_argument("--budgets", default="default,64e9", help="comma list: 'default' or bytes")
    ap.add_argument(
        "--shard-images",
        type=int,
        default=0,
        help="run each call over the first M stored images only (same chunk sizes, less time)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--k", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--budget", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.budget = None if args.budget is None else int(args.budget)
        return child(args)
    rows = []
    for k in [int(v) for v in args.ks.split(",")]:
        for b in args.budgets.split(","):
            cmd = [
                sys.executable,
                __file__,
                "--child",
                "--k",
                str(k),
                "--n",
                str(args.n),
                "--threads",
                str(args.threads),
                "--shard-images",
                str(args.shard_images),
            ]
            if b != "default":
                cmd += ["--budget", b]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                print(r.stderr, file=sys.stderr)
                raise SystemExit(f"case k={k} budget={b} failed")
            res = json.loads(r.stdout.strip().splitlines()[-1])
            res["budget_label"] = b
            rows.append(res)
            print(json.dumps(res), file=sys.stderr, flush=True)
    partial = args.shard_images > 0
    print(
        f"\nELS, one call, B = 1, N = {args.n} random uint8 images 3×32×32, σ = 1, {args.threads} threads"
        + (
            f"; SHARD: each call covers the first {args.shard_images} images (same chunk sizes)"
            if partial
            else "; complete calls"
        )
    )
    print("\n| k | requested budget | effective budget | peak extra MB | seconds |")
    print("|---|---|---|---|---|")
    for r in rows:
        req = "default" if r["budget_label"] == "default" else f"{float(r['budget_label']) / 1e9:g} GB"
        print(
            f"| {r['k']} | {req} ({r['requested'] / 2**20:.0f} MiB) | {r['effective'] / 2**20:.0f} MiB | "
            f"{r['extra_mb']:.0f} | {r['seconds']:.1f} |"
        )
    if not all(r["hwm_reset"] for r in rows):
        print("\n(VmHWM could not be reset: peak is since process start, an upper bound)")


if __name__ == "__main__":
    main()
