"""The k-NN family against the studio's FAISS path, plain PyTorch and KeOps on CPU, one thread each, same inputs.

Engine rows: ``optimal`` (exact softmax over all N), ``topk`` (k = 200), ``nearest``, ``knn`` (k = 2048, ref 256).
Baselines, all float32 over a float32 copy of the data made once:

* ``faiss-flat-k200``: the studio's shortcut, FAISS IndexFlatL2 search + gather of the k = 200 rows + softmax
  (needs faiss-cpu).
* ``torch-*``: what a user would write in plain PyTorch: ``torch.cdist(x, Y) ** 2`` then a softmax over all N
  (``torch-optimal``), ``torch.topk`` of 200 + softmax (``torch-topk``), ``argmin`` (``torch-nearest``), and
  topk 2048 + 256 uniform tail draws reweighted by N_tail / 256 (``torch-knn``).
* ``keops-*``: pykeops LazyTensors (needs pykeops and a C++ compiler; formulas compile once, before timing):
  the softmax-weighted sum over all N (``keops-optimal``, ``sumsoftmaxweight``) and ``Kmin_argKmin`` k = 200 +
  gather + softmax (``keops-topk``).

Shapes: the embedded MNIST (N = 10 000, 1×28×28) and CIFAR-shaped random uint8 images (N = 10 000, 3×32×32).
Queries: training images plus noise σ = 1. Median of --repeats calls after one warm-up, the rows timed
round-robin (each repeat calls every row once); times include the whole call. ``X × faiss`` > 1: X is faster
than the FAISS path. The engine's rows are exact (tests/test_denoisers.py); the baselines are float32 and,
except ``*-optimal``, approximate.

    OMP_NUM_THREADS=1 python bench/peer_global.py [--batches 1,16,64] [--repeats 5] [--no-keops]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from analytic_diffusion.data import load_array, load_dataset
from analytic_diffusion.denoisers import make_denoiser

ENGINE = (("optimal", {}), ("topk", {"k": 200}), ("nearest", {}), ("knn", {"k": 2048, "ref_size": 256}))


def _time_interleaved(fns: dict, repeats: int) -> dict:
    """Median seconds per function; one warm-up call each, then the repeats taken round-robin, so that every
    row sees the same background load (on a shared machine, timing the rows one after the other skewed ratios by
    up to 2x between runs)."""
    for fn in fns.values():
        fn()
    ts = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            ts[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in ts.items()}


def faiss_topk(rows, k=200):
    import faiss

    faiss.omp_set_num_threads(1)
    index = faiss.IndexFlatL2(rows.shape[1])
    index.add(np.ascontiguousarray(rows.numpy()))

    def fn(x, sigma):
        q = np.ascontiguousarray(x.reshape(x.shape[0], -1).numpy())
        d, i = index.search(q, k)
        w = torch.softmax(-torch.from_numpy(d) / (2 * sigma * sigma), 1)
        return torch.einsum("bk,bkd->bd", w, rows[torch.from_numpy(i)]).reshape(x.shape)

    return fn


def torch_baselines(rows, k=200, knn_k=2048, ref=256):
    """Plain PyTorch float32, the straightforward way (cdist, topk, softmax)."""
    gen = torch.Generator().manual_seed(0)

    def d2(x):
        return torch.cdist(x.reshape(x.shape[0], -1), rows) ** 2

    def optimal(x, sigma):
        return (torch.softmax(-d2(x) / (2 * sigma * sigma), 1) @ rows).reshape(x.shape)

    def topk(x, sigma):
        d, i = torch.topk(d2(x), k, dim=1, largest=False)
        return torch.einsum("bk,bkd->bd", torch.softmax(-d / (2 * sigma * sigma), 1), rows[i]).reshape(x.shape)

    def nearest(x, sigma):
        return rows[d2(x).argmin(1)].reshape(x.shape)

    def knn(x, sigma):
        d = d2(x)
        n = d.shape[1]
        order = torch.argsort(d, 1)
        tail = order[:, knn_k:]
        pick = torch.argsort(torch.rand(tail.shape, generator=gen), 1)[:, :ref]
        idx = torch.cat([order[:, :knn_k], torch.gather(tail, 1, pick)], 1)
        logits = -torch.gather(d, 1, idx) / (2 * sigma * sigma)
        logits[:, knn_k:] += float(np.log((n - knn_k) / ref))
        return torch.einsum("bk,bkd->bd", torch.softmax(logits, 1), rows[idx]).reshape(x.shape)

    return {"torch-optimal": optimal, "torch-topk": topk, "torch-nearest": nearest, "torch-knn": knn}


def keops_baselines(rows, k=200):
    from pykeops.torch import LazyTensor

    y_j = LazyTensor(rows[None, :, :])

    def optimal(x, sigma):
        x_i = LazyTensor(x.reshape(x.shape[0], 1, -1))
        logits = -((x_i - y_j) ** 2).sum(-1) / (2 * sigma * sigma)
        return logits.sumsoftmaxweight(y_j, dim=1).reshape(x.shape)

    def topk(x, sigma):
        x_i = LazyTensor(x.reshape(x.shape[0], 1, -1))
        d, i = ((x_i - y_j) ** 2).sum(-1).Kmin_argKmin(k, dim=1)
        return torch.einsum("bk,bkd->bd", torch.softmax(-d / (2 * sigma * sigma), 1), rows[i]).reshape(x.shape)

    return {"keops-optimal": optimal, "keops-topk": topk}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-keops", action="store_true", help="skip the KeOps rows")
    args = p.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("AD_NUM_THREADS", "1")
    g = torch.Generator().manual_seed(0)
    sets = {
        "MNIST 1×28×28": load_dataset("mnist"),
        "CIFAR-shaped 3×32×32": load_array(torch.randint(0, 256, (10_000, 3, 32, 32), generator=g, dtype=torch.uint8)),
    }
    print(f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load before {os.getloadavg()}")
    cols = None
    for name, ds in sets.items():
        methods = {m: make_denoiser(m, ds, **o) for m, o in ENGINE}
        rows = ds.keys().rows(0, ds.keys().n, torch.float32)
        peers = {}
        try:
            peers["faiss-flat-k200"] = faiss_topk(rows)
        except ImportError:
            print("faiss-cpu not installed: no FAISS row")
        peers.update(torch_baselines(rows))
        if not args.no_keops:
            try:
                peers.update(keops_baselines(rows))
            except ImportError:
                print("pykeops not installed: no KeOps rows")
        if cols is None:
            cols = list(methods) + list(peers)
            print(
                "\n| shape | B | "
                + " | ".join(f"{c} ms" for c in cols)
                + " | topk × faiss | nearest × faiss | knn × faiss | topk / optimal | nearest / optimal | "
                "knn / optimal |"
            )
            print("|---|---|" + "---|" * (len(cols) + 6))
        for b in [int(v) for v in args.batches.split(",")]:
            idx = torch.randint(0, ds.num_stored, (b,), generator=g)
            x = (ds.images_float(idx, torch.float32) + torch.randn(b, *ds.image_shape, generator=g)).float()
            t = _time_interleaved({m: (lambda d=d: d(x, 1.0)) for m, d in {**methods, **peers}.items()}, args.repeats)
            tf = t.get("faiss-flat-k200", float("nan"))
            print(
                f"| {name} | {b} | "
                + " | ".join(f"{1e3 * t[c]:.1f}" if c in t else "–" for c in cols)
                + f" | {tf / t['topk']:.2f} | {tf / t['nearest']:.2f} | {tf / t['knn']:.2f} | "
                f"{t['topk'] / t['optimal']:.2f} | {t['nearest'] / t['optimal']:.2f} | {t['knn'] / t['optimal']:.2f} |",
                flush=True,
            )
    print(f"\nload after {os.getloadavg()}")


if __name__ == "__main__":
    main()
