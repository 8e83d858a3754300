"""Training-set stability: networks trained on disjoint halves, sampled from the same seeds (Kadkhodaie et al.)."""

from __future__ import annotations

import argparse
import os

from .common import add_network_args, network_train_kwargs, parse_list, set_threads


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "stability",
        help="train networks on disjoint halves of a dataset and compare their samples",
        description="For each size N, train the built-in network on two disjoint N-image halves of the dataset "
        "(one seeded permutation: half A = its first N images, half B = the next N; same initial "
        "weights), sample both from the same seeds, and compare A with B by per-sample Pearson r and "
        "distance; the two halves' optimal denoisers are compared the same way (they copy different "
        "images). Writes --out/metrics.json, stability.png (median r against N) and samples_N.png "
        "(rows: network A, network B, optimal A, optimal B).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataset", default="mnist32", help="dataset name or path, as for `sample`")
    p.add_argument("--split", default=None, help="train or test (default: the source's own default)")
    p.add_argument("--sizes", default="8,64,512", help="comma-separated images per half")
    p.add_argument("--steps", type=int, default=2000, help="optimiser steps per network")
    p.add_argument("--samples", type=int, default=16, help="samples per model (seeds --sample-seed, ...)")
    p.add_argument("--sample-steps", type=int, default=18, help="sampler steps (Karras grid)")
    p.add_argument("--sampler", default="heun", help="euler | heun | ddim")
    p.add_argument("--sample-seed", type=int, default=0, help="first sample seed")
    add_network_args(p)
    p.add_argument("--seed", type=int, default=0, help="seeds the halves, the weights, batches and noise")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..analysis.stability import training_set_stability
    from ..sampling.run import prepare_dataset

    set_threads(args.threads)
    sizes = parse_list(args.sizes, int, "--sizes")
    ds = prepare_dataset(args.dataset, split=args.split, device=args.device)
    res = training_set_stability(
        ds,
        sizes,
        steps=args.steps,
        n_samples=args.samples,
        sample_steps=args.sample_steps,
        sampler=args.sampler,
        sample_seed=args.sample_seed,
        seed=args.seed,
        arch=args.arch,
        out_dir=args.out,
        device=args.device,
        train_kwargs=network_train_kwargs(args),
        progress=not args.no_progress,
    )
    for n, e in res["sizes"].items():
        print(
            f"N = {n:>6}: networks A vs B median r {e['network']['pearson_r_median']:.3f}, distance "
            f"{e['network']['distance_median']:.2f}; optimal A vs B r {e['optimal']['pearson_r_median']:.3f}; "
            f"memorisation A {e['memorization']['A']:.2f}, B {e['memorization']['B']:.2f}"
        )
    print(f"wrote {os.path.join(args.out, 'metrics.json')} and plots")
    return 0
