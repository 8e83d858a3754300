"""Compare analytic denoisers with a trained network."""

from __future__ import annotations

import argparse

from .common import DTYPES, add_data_args, add_grid_args, load_schedule, schedule_kwargs


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "compare",
        help="compare analytic denoisers with a trained network (r², MSE, Pearson r, memorisation)",
        description="Run the network (a checkpoint, or method:NAME for an analytic reference) and each analytic "
        "method from the same seeds and write a report folder: metrics.json (per step trajectory "
        "and single MSE / r² vs the network, single-step MSE / r² / score cosine per σ, Kamb's "
        "final-sample Pearson r per seed and its median, memorisation and distance-to-train "
        "novelty), r² and MSE vs σ plots, samples.png (one labelled row per model, same seed per "
        "column) and summary.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--network",
        required=True,
        metavar="CKPT|method:NAME",
        help="checkpoint file (analytic_diffusion.networks.load_network) or method:NAME; with "
        "--allow-pickle also a pickled nn.Module or an NVlabs EDM network pickle ({'ema': net})",
    )
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="let --network be a pickle (EDM network-snapshot-*.pkl, torch.save'd modules). Loading a "
        "pickle runs arbitrary code from the file: use it only for files you trust",
    )
    p.add_argument("--methods", default="optimal,wiener", help="comma-separated analytic methods")
    add_data_args(
        p,
        default="mnist32",
        subset_help="training set = the first N images; the next ones are held out (default: all but the "
        "last max(--n-test, --n-single))",
    )
    p.add_argument("--steps", type=int, default=19, help="number of sampler steps")
    p.add_argument("--sampler", default="ddim", help="euler | heun | ddim | ddpm")
    add_grid_args(p, default="kamb-cosine")
    p.add_argument("--seeds", default="8", help="number of seeds (seed, seed+1, ...) or a comma-separated list")
    p.add_argument("--seed", type=int, default=0, help="first seed when --seeds is a count")
    p.add_argument("--n-single", type=int, default=16, help="held-out images for the single-step comparison")
    p.add_argument("--n-test", type=int, default=256, help="held-out images for the distance-to-train baseline")
    p.add_argument("--patch", type=int, default=None, metavar="K", help="local methods: one patch side K")
    p.add_argument(
        "--patch-schedule",
        default=None,
        metavar="NAME_OR_FILE",
        help="local methods: patch size per σ (preset or calibrate JSON)",
    )
    p.add_argument("--k", type=int, default=None, help="topk / knn: neighbours")
    p.add_argument("--rank", type=int, default=None, help="wiener: leading PCA components kept")
    p.add_argument("--temperature", type=float, default=None, help="retrieval methods: softmax temperature")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--backend", default="auto", help="auto | torch | cpu | triton | cuda")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="working precision")
    p.add_argument("--batch-size", type=int, default=None, help="samples per denoiser call (default: all)")
    p.add_argument("--out", default=None, help="report folder (default runs/compare-NETWORK)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def _parse_seeds(text: str, first: int) -> int | list[int]:
    """'8' -> 8 seeds from --seed; '1,5,9' -> those seeds."""
    msg = f"--seeds: expected a count >= 1 or comma-separated non-negative integers, got {text!r}"
    parts = [v.strip() for v in str(text).split(",") if v.strip()]
    try:
        values = [int(v) for v in parts]
    except ValueError:
        raise ValueError(msg) from None
    if not values or any(v < 0 for v in values) or (len(values) == 1 and "," not in str(text) and values[0] < 1):
        raise ValueError(msg)
    if first < 0:
        raise ValueError(f"--seed: expected a non-negative integer, got {first}")
    return values[0] if len(values) == 1 and "," not in str(text) else values


def run(args: argparse.Namespace) -> int:
    from ..analysis.compare import run_compare

    if args.patch is not None and args.patch_schedule is not None:
        raise ValueError("give either --patch or --patch-schedule, not both")
    opts = {
        k: v
        for k, v in (("patch", args.patch), ("k", args.k), ("rank", args.rank), ("temperature", args.temperature))
        if v is not None
    }
    if args.patch_schedule is not None:
        opts["patch"] = load_schedule(args.patch_schedule)
    run_compare(
        network=args.network,
        methods=args.methods,
        dataset=args.dataset,
        split=args.split,
        subset=args.subset,
        resolution=args.resolution,
        pad_to=args.pad_to,
        flips=args.flips,
        steps=args.steps,
        sampler=args.sampler,
        schedule=args.schedule,
        schedule_kwargs=schedule_kwargs(args),
        seeds=_parse_seeds(args.seeds, args.seed),
        seed=args.seed,
        n_single=args.n_single,
        n_test=args.n_test,
        method_options=opts,
        backend=args.backend,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        out=args.out,
        progress=not args.no_progress,
        allow_pickle=args.allow_pickle,
    )
    return 0
