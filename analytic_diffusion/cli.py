"""Command line: ``analytic-diffusion sample ...`` (see ``analytic-diffusion sample --help``)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from . import __version__

DTYPES = {"float32", "float64"}


def _add_sample_parser(sub) -> None:
    p = sub.add_parser(
        "sample", help="generate samples with an analytic denoiser",
        description="Generate samples with an analytic denoiser and write grid.png, nearest.png (each sample "
                    "beside its nearest training image, copies framed in red), samples.npz, config.json and "
                    "metrics.json (memorisation ratio: share of samples whose nearest / second-nearest "
                    "training distance ratio is below 1/3) to --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    from .denoisers import DENOISERS
    from .samplers import SAMPLERS
    g = p.add_argument_group("what to run")
    g.add_argument("--method", default="optimal", choices=sorted(DENOISERS), help="analytic denoiser")
    g.add_argument("--dataset", default="mnist",
                   help="'mnist' (embedded 10k MNIST test set, 28x28), 'mnist32' (zero-padded to 32x32), or a "
                        "path: idx(.gz) file or folder, CIFAR folder or batch file, image folder, EDM-style "
                        ".zip, .npy/.npz")
    g.add_argument("--split", default=None, help="train or test (default: the source's own default)")
    g.add_argument("--subset", type=int, default=None, help="use only N training images")
    g.add_argument("--subset-random", action="store_true", help="draw the subset at random (seeded by --seed)")
    g.add_argument("--resolution", type=int, default=None, help="resize training images to R x R")
    g.add_argument("--pad-to", type=int, default=None, help="zero-pad training images to P x P")
    g.add_argument("--flips", action="store_true", help="add horizontally mirrored training images")
    g.add_argument("--class-label", type=int, default=None,
                   help="class-conditional: only training images of this class are candidates")
    g.add_argument("--random-classes", action="store_true",
                   help="class-conditional with a seeded random class per sample")
    s = p.add_argument_group("sampler")
    s.add_argument("--n", type=int, default=64, help="number of samples")
    s.add_argument("--steps", type=int, default=18, help="number of sampler steps")
    s.add_argument("--sampler", default="heun", choices=sorted(SAMPLERS))
    s.add_argument("--schedule", default="karras", help="karras | vp-linear | vp-cosine | kamb-cosine")
    s.add_argument("--sigma-min", type=float, default=None, help="karras: smallest σ (default 0.002)")
    s.add_argument("--sigma-max", type=float, default=None, help="karras: largest σ (default 80)")
    s.add_argument("--rho", type=float, default=None, help="karras: ρ (default 7)")
    s.add_argument("--spacing", default=None, help="vp-linear / vp-cosine: leading | trailing | linspace")
    s.add_argument("--eta", type=float, default=0.0, help="ddim: 0 = deterministic, 1 = DDPM ancestral")
    s.add_argument("--clip-x0", action="store_true", help="clip x̂0 to [-1, 1] inside each step")
    s.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    s.add_argument("--batch-size", type=int, default=None, help="samples per batch (default: all)")
    m = p.add_argument_group("method options (used by the methods that take them)")
    m.add_argument("--k", type=int, default=None, help="topk: neighbours kept (200); knn: exact neighbours (2048)")
    m.add_argument("--ref-size", type=int, default=None, help="knn: uniform tail draws (256)")
    m.add_argument("--rank", type=int, default=None, help="wiener: leading PCA components kept (all)")
    m.add_argument("--smoothing", type=float, default=None, help="smoothed: per-pixel perturbation scale s (2.5)")
    m.add_argument("--perturbations", type=int, default=None, help="smoothed: perturbations M per call (4)")
    m.add_argument("--temperature", type=float, default=None, help="retrieval methods: softmax temperature (1)")
    m.add_argument("--method-seed", type=int, default=None, help="smoothed / knn: seed of the method's own draws")
    e = p.add_argument_group("execution and outputs")
    e.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    e.add_argument("--backend", default="auto", help="auto | torch | cpu")
    e.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="working precision")
    e.add_argument("--out", default=None, help="output folder (default runs/METHOD-DATASET-seedS)")
    e.add_argument("--save-x0", action="store_true", help="also write x0_strips.png (x̂0 at every step)")
    e.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_cmd_sample)


# CLI flag -> denoiser keyword.
_METHOD_FLAGS = {"k": "k", "ref_size": "ref_size", "rank": "rank", "smoothing": "smoothing",
                 "perturbations": "num_perturbations", "temperature": "temperature", "method_seed": "seed"}


def _method_options(args) -> dict:
    from .denoisers import denoiser_options
    valid = set(denoiser_options(args.method))
    opts, unused = {}, []
    for flag, option in _METHOD_FLAGS.items():
        value = getattr(args, flag)
        if value is None:
            continue
        if option not in valid:
            unused.append("--" + flag.replace("_", "-"))
        opts[option] = value
    if unused:
        raise ValueError(f"{', '.join(unused)} does not apply to --method {args.method}")
    if "backend" in valid:
        opts["backend"] = args.backend
    return opts


def _schedule_kwargs(args) -> dict:
    kw = {"sigma_min": args.sigma_min, "sigma_max": args.sigma_max, "rho": args.rho, "spacing": args.spacing}
    return {k: v for k, v in kw.items() if v is not None}


def _cmd_sample(args) -> int:
    from .run import run_sample
    run_sample(
        method=args.method, dataset=args.dataset, split=args.split, subset=args.subset,
        subset_random=args.subset_random, resolution=args.resolution, pad_to=args.pad_to, flips=args.flips,
        class_label=args.class_label, random_classes=args.random_classes, n=args.n, steps=args.steps,
        sampler=args.sampler, schedule=args.schedule, schedule_kwargs=_schedule_kwargs(args), eta=args.eta,
        clip_x0=args.clip_x0, seed=args.seed, batch_size=args.batch_size, method_options=_method_options(args),
        device=args.device, dtype=args.dtype, out=args.out, save_x0=args.save_x0, progress=not args.no_progress)
    return 0


def _cmd_methods(args) -> int:
    from .denoisers import DENOISERS, denoiser_options
    for name, cls in DENOISERS.items():
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        print(f"{name:10s} {doc}\n{'':10s} options: {', '.join(denoiser_options(name))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="analytic-diffusion",
                                     description="Exact, fast training-free (analytic) diffusion.")
    parser.add_argument("--version", action="version", version=f"analytic-diffusion {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_sample_parser(sub)
    mp = sub.add_parser("methods", help="list the analytic denoisers and their options")
    mp.set_defaults(func=_cmd_methods)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as exc:  # bad input: a clear message, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
