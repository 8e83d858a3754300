"""The k-NN family against the studio's FAISS path on CPU, one thread each, same inputs (issue: peer speed).

Rows: the engine's ``optimal`` (exact softmax over all N), ``topk`` (k = 200), ``nearest``, ``knn``
(k = 2048, ref 256), and the studio's shortcut: FAISS IndexFlatL2 search (float32 copy of the data) + gather
of the k = 200 rows + softmax (``faiss-flat-k200``, needs faiss-cpu). Shapes: the embedded MNIST (N = 10 000,
1×28×28) and CIFAR-shaped random uint8 images (N = 10 000, 3×32×32). Queries: training images plus noise σ = 1.
Median of --repeats calls after one warm-up.

    OMP_NUM_THREADS=1 python bench/peer_global.py [--batches 1,16,64] [--repeats 5]
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


def _time(fn, repeats):
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def faiss_topk(ds, k=200):
    import faiss
    faiss.omp_set_num_threads(1)
    rows = ds.keys().rows(0, ds.keys().n, torch.float32)
    index = faiss.IndexFlatL2(rows.shape[1])
    index.add(np.ascontiguousarray(rows.numpy()))

    def fn(x, sigma):
        q = np.ascontiguousarray(x.reshape(x.shape[0], -1).numpy())
        d, i = index.search(q, k)
        w = torch.softmax(-torch.from_numpy(d) / (2 * sigma * sigma), 1)
        return torch.einsum("bk,bkd->bd", w, rows[torch.from_numpy(i)]).reshape(x.shape)
    return fn


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("AD_NUM_THREADS", "1")
    g = torch.Generator().manual_seed(0)
    sets = {"MNIST 1×28×28": load_dataset("mnist"),
            "CIFAR-shaped 3×32×32": load_array(torch.randint(0, 256, (10_000, 3, 32, 32), generator=g,
                                                             dtype=torch.uint8))}
    print(f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load before {os.getloadavg()}")
    print("\n| shape | B | optimal ms | topk ms | nearest ms | knn ms | faiss-flat-k200 ms | topk × faiss | "
          "topk / optimal |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, ds in sets.items():
        methods = {m: make_denoiser(m, ds, **o) for m, o in
                   (("optimal", {}), ("topk", {"k": 200}), ("nearest", {}), ("knn", {"k": 2048, "ref_size": 256}))}
        try:
            studio = faiss_topk(ds)
        except ImportError:
            studio = None
        for b in [int(v) for v in args.batches.split(",")]:
            idx = torch.randint(0, ds.num_stored, (b,), generator=g)
            x = (ds.images_float(idx, torch.float32) + torch.randn(b, *ds.image_shape, generator=g)).float()
            t = {m: _time(lambda d=d: d(x, 1.0), args.repeats) for m, d in methods.items()}
            tf = _time(lambda: studio(x, 1.0), args.repeats) if studio else float("nan")
            print(f"| {name} | {b} | {1e3 * t['optimal']:.1f} | {1e3 * t['topk']:.1f} | {1e3 * t['nearest']:.1f} | "
                  f"{1e3 * t['knn']:.1f} | {1e3 * tf:.1f} | {tf / t['topk']:.2f} | {t['topk'] / t['optimal']:.2f} |",
                  flush=True)
    print(f"\nload after {os.getloadavg()}")


if __name__ == "__main__":
    main()
