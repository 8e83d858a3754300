"""One sampling step of the optimal denoiser against processes and N, in memory or out of core.

    python bench/dist_step.py --n-train 100000                      # one process, in memory
    torchrun --nproc-per-node 2 --master-addr 127.0.0.1 --master-port 29555 bench/dist_step.py --n-train 100000
    python bench/dist_step.py --n-train 1000000 --packed /tmp/p1m --cold   # out of core, page cache dropped

Training rows are random uint8 (D = 784, seeded: every rank builds the same set and keeps its shard). Prints one
JSON line from rank 0: median seconds per denoiser call (B queries, float32, backend auto), and the bytes each
rank sends per call (the all-gathered partial state: B·(3 + D) float32).
"""

import argparse
import json
import os
import statistics
import time

import torch

from analytic_diffusion.data import Dataset
from analytic_diffusion.data.packed import is_packed, load_packed, load_packed_shard, pack
from analytic_diffusion.denoisers import make_denoiser
from analytic_diffusion.ops import distributed


def _drop_page_cache(path: str) -> None:
    fd = os.open(os.path.join(path, "images.npy"), os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n-train", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=784)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--packed", default=None, help="pack the set here (once) and map it")
    p.add_argument("--cold", action="store_true", help="drop the file's page cache before each call")
    p.add_argument("--memory-budget", type=int, default=64 * 2**20)
    args = p.parse_args()
    group = distributed.init_from_env("cpu")[0] if distributed.launched() else None
    side = round(args.dim**0.5)
    if args.packed and not is_packed(args.packed) and (group is None or group.rank == 0):
        g = torch.Generator().manual_seed(0)
        pack(
            Dataset.from_array(torch.randint(0, 256, (args.n_train, 1, side, side), generator=g, dtype=torch.uint8)),
            args.packed,
        )
    if group is not None:
        group.all_gather_object(None, "waiting for the pack")
    if args.packed:
        ds = load_packed(args.packed) if group is None else load_packed_shard(args.packed, group)
    else:
        g = torch.Generator().manual_seed(0)
        ds = Dataset.from_array(torch.randint(0, 256, (args.n_train, 1, side, side), generator=g, dtype=torch.uint8))
        ds = ds if group is None else ds.shard(group)
    d = make_denoiser("optimal", ds, memory_budget=args.memory_budget)
    x = torch.randn(args.batch, 1, side, side, generator=torch.Generator().manual_seed(1)) * 0.8
    d(x, 1.0)  # warm-up (centre, caches)
    times = []
    for _ in range(args.repeats):
        if args.cold and args.packed:
            _drop_page_cache(args.packed)
        if group is not None:
            group.all_gather_object(None, "barrier")
        t0 = time.perf_counter()
        d(x, 1.0)
        times.append(time.perf_counter() - t0)
    if group is None or group.rank == 0:
        print(
            json.dumps(
                {
                    "n_train": args.n_train,
                    "dim": args.dim,
                    "batch": args.batch,
                    "processes": 1 if group is None else group.world,
                    "packed": bool(args.packed),
                    "cold": args.cold,
                    "seconds_per_call": statistics.median(times),
                    "bytes_sent_per_rank": 0 if group is None else args.batch * (3 + args.dim) * 4,
                }
            )
        )


if __name__ == "__main__":
    main()
