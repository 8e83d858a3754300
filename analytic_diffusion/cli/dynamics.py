"""Track memorisation through training."""

from __future__ import annotations

import argparse

from .common import add_network_args, network_train_kwargs, parse_list, set_threads


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "dynamics",
        help="track memorisation through training for several training-set sizes",
        description="For each training-set size N (a seeded random subset), train the built-in network with "
        "checkpoints every --checkpoint-every steps; at every checkpoint draw --samples samples from "
        "fixed seeds and record the memorisation ratio (share with NN1/NN2 < 1/3) against the subset, "
        "the median nearest-image distance and the single-step r2 / MSE against the subset's optimal "
        "denoiser (held-out inputs when the dataset has room, at --sigmas). The memorisation onset of "
        "a size is the first checkpoint step with ratio >= 0.5. Writes --out/metrics.json, "
        "memorization_vs_step.png, agreement_vs_step.png, peak_ratio_vs_size.png, onset_vs_size.png "
        "(when some size memorised) and the checkpoints in --out/size_N/.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataset", default="mnist32", help="dataset name or path, as for `sample`")
    p.add_argument("--split", default=None, help="train or test (default: the source's own default)")
    p.add_argument("--resolution", type=int, default=None, help="resize images to R x R")
    p.add_argument("--sizes", default="64,256,1024", help="comma-separated training-set sizes")
    p.add_argument("--steps", type=int, default=2000, help="optimiser steps per size")
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        help="evaluate every K steps (and at the end); default steps // 10",
    )
    p.add_argument("--samples", type=int, default=16, help="samples per checkpoint (seeds --sample-seed, ...)")
    p.add_argument("--sample-steps", type=int, default=18, help="sampler steps (Karras grid)")
    p.add_argument("--sampler", default="heun", help="euler | heun | ddim | ddpm")
    p.add_argument("--sample-seed", type=int, default=0, help="first sample seed")
    p.add_argument("--sigmas", default="0.5,1,2", help="noise levels of the single-step comparison with optimal")
    p.add_argument("--n-probe", type=int, default=16, help="images for the single-step comparison")
    p.add_argument(
        "--probe",
        default="auto",
        choices=["auto", "heldout", "train"],
        help="inputs of the single-step comparison: held-out images, training images, or held-out "
        "when the dataset has images outside the largest subset",
    )
    add_network_args(p)
    p.add_argument("--seed", type=int, default=0, help="seeds the subsets, weights, batches and noise")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--delete-checkpoints", action="store_true", help="delete each .pt file once evaluated")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    from ..analysis.dynamics import training_dynamics
    from ..sampling.run import prepare_dataset

    set_threads(args.threads)
    sizes = parse_list(args.sizes, int, "--sizes")
    sigmas = parse_list(args.sigmas, float, "--sigmas")
    every = args.checkpoint_every if args.checkpoint_every is not None else max(1, args.steps // 10)
    ds = prepare_dataset(args.dataset, split=args.split, resolution=args.resolution, device=args.device)
    res = training_dynamics(
        ds,
        sizes,
        steps=args.steps,
        checkpoint_every=every,
        n_samples=args.samples,
        sample_steps=args.sample_steps,
        sampler=args.sampler,
        sample_seed=args.sample_seed,
        arch=args.arch,
        seed=args.seed,
        out_dir=args.out,
        train_kwargs=network_train_kwargs(args),
        sigmas=sigmas,
        n_probe=args.n_probe,
        probe=args.probe,
        device=args.device,
        keep_checkpoints=not args.delete_checkpoints,
        progress=not args.no_progress,
    )
    for key, entry in res["sizes"].items():
        last = entry["checkpoints"][-1]
        onset = entry["onset_step"]
        print(
            f"N = {key:>6}: onset {'never' if onset is None else f'step {onset}'}; peak ratio "
            f"{entry['peak_memorization_ratio']:.2f}; final ratio {last['memorization_ratio']:.2f}, "
            f"r2 vs optimal {last['r2_mean']:.3f} ({res['probe']['kind']} inputs)"
        )
    print(f"wrote {os.path.join(args.out, 'metrics.json')} and plots")
    return 0
