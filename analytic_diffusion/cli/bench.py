"""Benchmarks: kernels against PyTorch baselines and whole sampling runs."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .common import csv_ints


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from ..benchmark.global_bench import PATHS

    p = sub.add_parser(
        "bench",
        help="time kernels against PyTorch baselines (global, local) or a sampling run (e2e)",
        description="Benchmarks measured side by side in one process on one device.",
    )
    bsub = p.add_subparsers(dest="bench", required=True)
    g = bsub.add_parser(
        "global",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="global retrieval: naive / chunked / SDPA PyTorch vs the engine's backends, with roofline floors",
        description="Time the global softmax retrieval (posterior mean over N random uint8 images of D values) "
        "for every D, N, B and path; print a markdown table (time, × naive, × best PyTorch, roofline "
        "floor and its fraction on known GPUs, error vs the float64 oracle on the first rows).",
    )
    g.add_argument("--dims", type=csv_ints, default=[784, 3072], help="D values (MNIST 784, CIFAR 3072, IN64 12288)")
    g.add_argument("--n", type=csv_ints, default=[10000], help="N values (training-set sizes)")
    g.add_argument("--batches", type=csv_ints, default=[1, 8, 64, 256], help="B values (queries per call)")
    g.add_argument("--paths", default=",".join(PATHS), help="comma-separated: " + ", ".join(PATHS))
    g.add_argument("--precisions", default="exact", help="comma-separated: exact, tf32, bf16 (engine paths only)")
    g.add_argument("--sigma", type=float, default=1.0, help="noise level of the queries")
    g.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda[:i]")
    g.add_argument("--repeats", type=int, default=5, help="timed calls per configuration (median reported)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", default=None, help="folder for results.json and table.md")
    g.set_defaults(func=_cmd_bench_global)
    e = bsub.add_parser(
        "e2e",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="end to end: n samples with a global method over a training set of a given shape",
        description="Time a whole sampling run (e.g. 1000 CIFAR-shaped samples with optimal, 18 Heun steps, "
        "N = 50k) on random uint8 training images of the given shape.",
    )
    e.add_argument("--method", default="optimal", help="a global method (optimal, topk, nearest, smoothed, knn)")
    e.add_argument("--n-train", type=int, default=50000)
    e.add_argument("--shape", type=csv_ints, default=[3, 32, 32], help="C,H,W")
    e.add_argument("--samples", type=int, default=1000)
    e.add_argument("--steps", type=int, default=18)
    e.add_argument("--sampler", default="heun")
    e.add_argument("--batch-size", type=int, default=None)
    e.add_argument("--device", default="auto")
    e.add_argument("--backend", default="auto")
    e.add_argument("--precision", default="exact")
    e.add_argument("--out", default=None, help="write the result as JSON to this file")
    e.set_defaults(func=_cmd_bench_e2e)
    lo = bsub.add_parser(
        "local",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="local family (ls, els, bbels, pspc, pca_locality): torch reference vs fused C++ / Triton / CUDA "
        "kernels vs naive and studio-style PyTorch, per image",
        description="Time one denoiser call per method and patch size on random uint8 training images and "
        "report ms per image per step, the ratio to the torch reference, the error against the "
        "float64 reference on the first image and, for ELS / bbELS on a known GPU, the exp / MMA "
        "roofline floor. Baselines for ELS: naive (unfold + cdist, where it fits) and studio (the "
        "Analytic Diffusion Studio's conv2d formulation with materialised logits per chunk of "
        "training images). pca_locality ignores --patch (its locality is the Wiener mask); its torch "
        "reference is the dense-mask formulation.",
    )
    lo.add_argument("--methods", default="ls,els,bbels", help="comma-separated: ls, els, bbels, pspc, pca_locality")
    lo.add_argument("--patch", type=csv_ints, default=[3, 5], help="patch sizes k")
    lo.add_argument("--n-train", type=int, default=1000)
    lo.add_argument("--shape", type=csv_ints, default=[3, 32, 32], help="C,H,W")
    lo.add_argument("--batch", type=int, default=1, help="images per call")
    lo.add_argument(
        "--paths",
        default="naive,studio,torch,cpu,triton,cuda",
        help="comma-separated: naive, studio, torch, cpu, triton, cuda",
    )
    lo.add_argument("--sigma", type=float, default=1.0)
    lo.add_argument("--device", default="auto")
    lo.add_argument("--repeats", type=int, default=1)
    lo.add_argument("--out", default=None, help="folder for results.json and table.md")
    lo.set_defaults(func=_cmd_bench_local)


def _bench_device(name: str) -> str:
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _cmd_bench_global(args: argparse.Namespace) -> int:
    from ..benchmark import markdown_table, run_global_bench

    paths = [p for p in args.paths.split(",") if p]
    precisions = [p for p in args.precisions.split(",") if p]
    for p in precisions:
        from ..ops.precision import check_mode

        check_mode(p)
    rows = run_global_bench(
        args.dims,
        args.n,
        args.batches,
        paths=paths,
        precisions=precisions,
        sigma=args.sigma,
        device=_bench_device(args.device),
        repeats=args.repeats,
        seed=args.seed,
        progress=lambda r: print(
            f"  D={r['D']} N={r['N']} B={r['B']} {r['path']:8s} "
            f"{r['precision']:6s} "
            + (f"{1e3 * r['seconds']:.3f} ms" if "seconds" in r else f"skipped: {r['skipped']}"),
            file=sys.stderr,
            flush=True,
        ),
    )
    table = markdown_table(rows)
    print(table)
    _write_bench(args.out, rows, table)
    return 0


def _write_bench(out: str | None, rows: list[dict[str, Any]], table: str) -> None:
    import os

    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(rows, f, indent=1)
        with open(os.path.join(out, "table.md"), "w") as f:
            f.write(table + "\n")


def _cmd_bench_local(args: argparse.Namespace) -> int:
    from ..benchmark.local_bench import markdown_table, run_local_bench

    if len(args.shape) != 3:
        raise ValueError(f"--shape: expected C,H,W, got {args.shape}")
    rows = run_local_bench(
        [m for m in args.methods.split(",") if m],
        args.patch,
        n=args.n_train,
        shape=tuple(args.shape),
        batch=args.batch,
        paths=[p for p in args.paths.split(",") if p],
        sigma=args.sigma,
        device=_bench_device(args.device),
        repeats=args.repeats,
        progress=lambda r: print(
            f"  {r['method']} k={r['k']} {r['path']}: {r['ms_per_image_step']:.1f} ms/image",
            file=sys.stderr,
            flush=True,
        ),
    )
    table = markdown_table(rows)
    print(table)
    _write_bench(args.out, rows, table)
    return 0


def _cmd_bench_e2e(args: argparse.Namespace) -> int:
    from ..benchmark.e2e import run_e2e

    if len(args.shape) != 3:
        raise ValueError(f"--shape: expected C,H,W, got {args.shape}")
    res = run_e2e(
        n_train=args.n_train,
        shape=tuple(args.shape),
        samples=args.samples,
        steps=args.steps,
        sampler=args.sampler,
        method=args.method,
        batch_size=args.batch_size,
        device=_bench_device(args.device),
        backend=args.backend,
        precision=args.precision,
    )
    print(json.dumps(res, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0
