"""Certified pruning over a whole sampling trajectory (CPU), side by side with the exact C++ scan and with
uncertified shortcuts at about equal time.

For each training set (the embedded MNIST, N = 10 000, and the 100 000-image shifted/mirrored set of
bench/shifted_mnist.py) one batch of samples follows an 18-step Heun trajectory (Karras σ grid, 35 denoiser
calls). Every method runs its own trajectory; at every call its output is compared (untimed) with the exact
float64 posterior mean at the same input. Columns: denoiser wall time summed over the trajectory, × the exact
scan, mean fraction of candidates scored, the largest actual error ‖x̂0 − exact‖₂ over all calls and samples,
and the largest certified bound (pruned runs only). Baselines:

* ``subset-n``: GoldDiff-style fixed random subset of n images (sized so its scan takes about the time of the
  tolerance-1e-4 run), the exact posterior over it — no certificate.
* ``faiss-flat-k200``: the studio's path, FAISS IndexFlatL2 top-200 + gather + softmax (faiss-cpu, optional).
* ``faiss-ivf-k200``: FAISS IndexIVFFlat (nlist 1024, nprobe 4) top-200: an approximate index near equal time.

Run: ``OMP_NUM_THREADS=1 python bench/pruning_trajectory.py`` (one thread per method; prints a Markdown table).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from analytic_diffusion.denoisers import make_denoiser
from analytic_diffusion.ops import softmax_retrieval
from analytic_diffusion.sampling import sample


class Probe:
    """Wraps a posterior-mean callable: times it, and compares each output with the exact float64 mean."""

    def __init__(self, fn, keys):
        self.fn, self.keys = fn, keys
        self.seconds, self.max_err, self.max_bound, self.calls = 0.0, 0.0, 0.0, 0
        self.bound_ok = True
        self.per_call = []  # (σ, seconds, scored fraction or None)

    def __call__(self, x, sigma, **_):
        t0 = time.perf_counter()
        out, bound, scored = self.fn(x, sigma)
        dt = time.perf_counter() - t0
        self.seconds += dt
        self.per_call.append(
            (float(torch.as_tensor(sigma).reshape(-1)[0]), dt, None if scored is None else float(scored.mean()))
        )
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        # The exact posterior mean in float64 (the C++ kernel in float64, tested against the torch oracle).
        ref = softmax_retrieval(
            x.reshape(x.shape[0], -1).double(), self.keys, s, backend="cpu", dtype=torch.float64
        ).mean
        err = (out.reshape(x.shape[0], -1).double() - ref).norm(dim=1)
        self.max_err = max(self.max_err, float(err.max()))
        if bound is not None:
            self.max_bound = max(self.max_bound, float(bound.max()))
            self.bound_ok &= bool((err <= bound.double()).all())
        self.calls += 1
        return out


def _posterior_fn(denoiser):
    def fn(x, sigma):
        p = denoiser.posterior(x, sigma)
        return p.mean, p.error_bound, p.scored_fraction

    return fn


def _faiss_fn(ds, index, k):
    import numpy as np

    keys = ds.keys()
    rows = keys.rows(0, keys.n, torch.float32)

    def fn(x, sigma):
        q = x.reshape(x.shape[0], -1).float().numpy()
        d, i = index.search(np.ascontiguousarray(q), k)
        d, i = torch.from_numpy(d).double(), torch.from_numpy(i)
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)
        w = torch.softmax(-d / (2 * s * s), 1)
        out = torch.einsum("bk,bkd->bd", w.float(), rows[i])
        return out.reshape(x.shape), None, None

    return fn


def run(name, ds, args, lines):
    keys = ds.keys()
    common = dict(n=args.n, steps=18, sampler="heun", seed=0, progress=False)
    results = []

    def trajectory(label, fn, scored=None):
        probe = Probe(fn, keys)
        sample(probe, shape=ds.image_shape, **common)
        results.append((label, probe, scored() if scored else None))
        print(f"  {label}: {probe.seconds:.2f} s", flush=True)
        return probe

    exact = trajectory("exact C++ scan", _posterior_fn(make_denoiser("optimal", ds)))
    pruned, index_seconds = {}, 0.0
    for tol in args.tolerances:
        d = make_denoiser("optimal", ds, tolerance=tol)
        t0 = time.perf_counter()
        from analytic_diffusion.ops.pruning import pruning_index

        pruning_index(keys)  # built once per dataset: reported apart
        build = time.perf_counter() - t0
        pruned[tol] = trajectory(f"tolerance {tol:g}", _posterior_fn(d), lambda d=d: d.pruning_summary())
        if build > 0.01:
            print(f"  prefilter index built in {build:.1f} s", flush=True)
            index_seconds = build
    ref_t = pruned.get(1e-4, next(iter(pruned.values()))).seconds
    n_sub = max(16, min(keys.n, int(keys.n * ref_t / max(exact.seconds, 1e-9))))
    sub = ds.subset(n_sub, random=True, seed=0)
    trajectory(f"subset-{n_sub} (GoldDiff-style)", _posterior_fn(make_denoiser("optimal", sub)))
    try:
        import faiss
        import numpy as np

        faiss.omp_set_num_threads(1)
        data = np.ascontiguousarray(keys.rows(0, keys.n, torch.float32).numpy())
        flat = faiss.IndexFlatL2(data.shape[1])
        flat.add(data)
        trajectory("faiss-flat-k200 (studio)", _faiss_fn(ds, flat, 200))
        quant = faiss.IndexFlatL2(data.shape[1])
        ivf = faiss.IndexIVFFlat(quant, data.shape[1], 1024 if keys.n >= 50_000 else 128)
        ivf.train(data[:: max(1, keys.n // 20_000)])
        ivf.add(data)
        ivf.nprobe = 4
        trajectory("faiss-ivf-k200 (nprobe 4)", _faiss_fn(ds, ivf, 200))
    except ImportError:
        print("  faiss-cpu not installed: FAISS rows left out", flush=True)

    lines.append(
        f"\n{name}: N = {keys.n}, D = {keys.dim}, {args.n} samples, 18 Heun steps (35 calls)"
        + (f"; prefilter index built once in {index_seconds:.1f} s (not in the times)" if pruned else "")
    )
    lines.append("\n| method | denoiser s | × exact | scored | max ‖err‖₂ | max certified bound | bound held |")
    lines.append("|---|---|---|---|---|---|---|")
    for label, probe, summary in results:
        scored = "" if summary is None else f"{summary['scored_fraction']:.4f}"
        if label.startswith("exact"):
            scored = "1"
        bound = f"{probe.max_bound:.1e}" if summary is not None else "—"
        held = ("yes" if probe.bound_ok else "**no**") if summary is not None else "—"
        lines.append(
            f"| {label} | {probe.seconds:.2f} | {exact.seconds / probe.seconds:.1f} | {scored} | "
            f"{probe.max_err:.1e} | {bound} | {held} |"
        )
    if args.per_sigma in pruned:  # where the time goes: per call along the trajectory
        p = pruned[args.per_sigma]
        lines.append(f"\nPer call, tolerance {args.per_sigma:g} vs the exact scan (first evaluation of each step):")
        lines.append("\n| σ | exact ms | pruned ms | scored |")
        lines.append("|---|---|---|---|")
        for (s, te, _), (_, tp, sc) in list(zip(exact.per_call, p.per_call))[::2]:
            lines.append(f"| {s:.3g} | {1e3 * te:.0f} | {1e3 * tp:.0f} | {sc:.4f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=8, help="samples per trajectory (one batch)")
    p.add_argument("--datasets", default="mnist,shifted", help="mnist and/or shifted (100k)")
    p.add_argument("--tolerances", default="1e-2,1e-3,1e-4,1e-5,1e-6")
    p.add_argument("--per-sigma", type=float, default=1e-4, help="tolerance whose per-call times are listed")
    args = p.parse_args()
    args.tolerances = [float(t) for t in args.tolerances.split(",")]
    torch.set_num_threads(1)
    os.environ.setdefault("AD_NUM_THREADS", "1")
    lines = [f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load before: {os.getloadavg()}"]
    from analytic_diffusion.data import load_dataset

    for name in args.datasets.split(","):
        print(name, flush=True)
        if name == "mnist":
            run("embedded MNIST", load_dataset("mnist"), args, lines)
        else:
            from shifted_mnist import shifted_mnist

            run("MNIST shifted ±1 px and mirrored", shifted_mnist(), args, lines)
    lines.append(f"\nload after: {os.getloadavg()}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
