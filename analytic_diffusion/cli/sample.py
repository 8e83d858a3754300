"""Generate samples with an analytic denoiser and write a run folder."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import torch

from .common import DTYPES, add_data_args, add_grid_args, load_schedule, parse_bytes, schedule_kwargs


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "sample",
        help="generate samples with an analytic denoiser",
        description="Generate samples with an analytic denoiser and write grid.png, nearest.png (each sample "
        "beside its nearest training image, copies framed in red), samples.npz, config.json and "
        "metrics.json (memorisation ratio: share of samples whose nearest / second-nearest "
        "training distance ratio is below 1/3) to --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    from ..denoisers import DENOISERS
    from ..sampling.samplers import SAMPLERS

    g = p.add_argument_group("what to run")
    g.add_argument("--method", default="optimal", choices=sorted(DENOISERS), help="analytic denoiser")
    add_data_args(g, default="mnist", subset_help="use only N training images")
    g.add_argument("--subset-random", action="store_true", help="draw the subset at random (seeded by --seed)")
    g.add_argument(
        "--class-label",
        type=int,
        default=None,
        help="class-conditional: only training images of this class are candidates",
    )
    g.add_argument(
        "--random-classes", action="store_true", help="class-conditional with a seeded random class per sample"
    )
    s = p.add_argument_group("sampler")
    # -n / --num-samples: under torchrun, whose own parser rejects `--n` as an ambiguous abbreviation of its
    # --nnodes / --nproc-per-node / ... before the command line reaches this one.
    s.add_argument(
        "--n",
        "-n",
        "--num-samples",
        dest="n",
        type=int,
        default=64,
        help="number of samples (under torchrun write -n N or --num-samples N)",
    )
    s.add_argument("--steps", type=int, default=18, help="number of sampler steps")
    s.add_argument("--sampler", default="heun", choices=sorted(SAMPLERS))
    add_grid_args(s, default="karras")
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
    m.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="optimal, smoothed, optimal-draw: skip training images whose total posterior weight is "
        "provably below this, per sample, with a certificate in metrics.json (0 = exact scan)",
    )
    m.add_argument(
        "--method-seed", type=int, default=None, help="smoothed / knn / optimal-draw: seed of the method's own draws"
    )
    m.add_argument(
        "--draw-mode",
        choices=["draw", "noise"],
        default=None,
        help="optimal-draw: blend in one posterior draw, or add diagonal posterior noise (draw)",
    )
    m.add_argument("--scale", type=float, default=None, help="optimal-draw: the knob λ (1)")
    m.add_argument(
        "--patch",
        type=int,
        default=None,
        metavar="K",
        help="local methods: one patch side K for every σ (excludes --patch-schedule)",
    )
    m.add_argument(
        "--patch-schedule",
        default=None,
        metavar="NAME_OR_FILE",
        help="local methods: patch size per σ, a preset (see `analytic-diffusion schedules`) or a "
        "JSON file from `analytic-diffusion calibrate`; checked against the sampler's σ grid",
    )
    m.add_argument(
        "--masks",
        default=None,
        metavar="wiener|FILE.npy",
        help="pspc-flex (masks=) / pca_locality (mask=): 'wiener' = masks from the dataset's Wiener "
        "filter (pca_locality also takes 'full'), or a saved .npy array (pspc-flex)",
    )
    m.add_argument("--threshold", type=float, default=None, help="pca_locality: mask threshold τ")
    m.add_argument(
        "--softmax",
        default=None,
        choices=["exact", "chunked"],
        help="pca_locality: exact online softmax, or the studio's chunk-averaged one",
    )
    m.add_argument("--chunk-size", type=int, default=None, help="pca_locality: chunk size of --softmax chunked")
    m.add_argument(
        "--mask-rule",
        default=None,
        choices=["engine", "studio"],
        help="pca_locality: the engine's float64 mask rule, or the studio's float32 pipeline (parity)",
    )
    m.add_argument(
        "--tau",
        default=None,
        metavar="T|SIGMA:T,...",
        help="pspc-flex: heatmap mass fraction τ kept, one value or a table of SIGMA:T pairs (nearest σ in log space)",
    )
    e = p.add_argument_group("execution and outputs")
    e.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    e.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "torch", "cpu", "triton", "cuda"],
        help="retrieval kernels of the methods that have them (not wiener)",
    )
    e.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="working precision")
    e.add_argument(
        "--precision",
        default=None,
        choices=["exact", "tf32", "bf16"],
        help="global methods on GPU: faster dots within a stated logit error bound (default exact)",
    )
    e.add_argument(
        "--out",
        default=None,
        help="output folder (default runs/METHOD-DATASET-seedS); must be new or empty unless "
        "--overwrite. Files are written to a hidden sibling folder that is renamed to --out when "
        "the run has finished, so an interrupted run leaves no --out folder",
    )
    e.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty --out folder as a whole (no files of the old run are kept)",
    )
    e.add_argument("--save-x0", action="store_true", help="also write x0_strips.png (x̂0 at every step)")
    e.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    e.add_argument(
        "--memory-budget",
        type=parse_bytes,
        default=None,
        metavar="BYTES",
        help="working memory of each retrieval, e.g. 64M or 2G (None: 256M or $AD_MEMORY_BUDGET); "
        "a packed --dataset is streamed in blocks within it",
    )
    e.add_argument(
        "--parallel",
        default="none",
        choices=["none", "dataset", "samples", "dataset,samples"],
        help="under torchrun: shard the training set over the ranks (dataset), split the n samples "
        "(samples), or both (with --dataset-ranks); only rank 0 writes files and prints",
    )
    e.add_argument(
        "--dataset-ranks",
        type=int,
        default=None,
        metavar="G",
        help="--parallel dataset,samples: ranks that share one training set (world = S x G)",
    )
    p.set_defaults(func=run)


# CLI flag -> denoiser keyword.
_METHOD_FLAGS: dict[str, str | tuple[str, ...]] = {
    "k": "k",
    "ref_size": "ref_size",
    "rank": "rank",
    "smoothing": "smoothing",
    "perturbations": "num_perturbations",
    "temperature": "temperature",
    "tolerance": "tolerance",
    "method_seed": "seed",
    "patch": "patch",
    "patch_schedule": "patch",
    "masks": ("masks", "mask"),
    "threshold": "threshold",
    "softmax": "softmax",
    "chunk_size": "chunk_size",
    "mask_rule": "mask_rule",
    "tau": "tau",
    "draw_mode": "mode",
    "scale": "scale",
    "precision": "precision",
}


def _load_masks(value: str) -> str | torch.Tensor:
    """A .npy path is loaded as a tensor; any other value is a mask name for the method ('wiener', ...)."""
    if not value.lower().endswith(".npy"):
        return value
    import os

    import numpy as np
    import torch

    if not os.path.isfile(value):
        raise FileNotFoundError(f"--masks: the mask file {value!r} does not exist")
    try:
        return torch.from_numpy(np.load(value, allow_pickle=False))
    except (ValueError, OSError) as e:
        raise ValueError(f"--masks: cannot read {value!r} as a .npy array ({e})") from None


def _parse_tau(value: str) -> float | dict[float, float]:
    """'0.5' -> 0.5; '80:1,1.0:0.5,0.002:0.3' -> {σ: τ} (looked up at the nearest σ in log space)."""
    msg = f"--tau: expected a number T or comma-separated SIGMA:T pairs, got {value!r}"
    parts = [v.strip() for v in value.split(",") if v.strip()]
    try:
        if len(parts) == 1 and ":" not in parts[0]:
            return float(parts[0])
        table: dict[float, float] = {}
        for part in parts:
            sigma, tau = part.split(":")
            table[float(sigma)] = float(tau)
    except ValueError:
        raise ValueError(msg) from None
    if not table:
        raise ValueError(msg)
    return table


_CONVERT: dict[str, Callable[[str], Any]] = {"patch_schedule": load_schedule, "masks": _load_masks, "tau": _parse_tau}


def _method_options(args: argparse.Namespace) -> dict[str, Any]:
    from ..denoisers import denoiser_options

    valid = set(denoiser_options(args.method))
    if getattr(args, "patch", None) is not None and getattr(args, "patch_schedule", None) is not None:
        raise ValueError("give either --patch or --patch-schedule, not both")
    opts: dict[str, Any] = {}
    unused: list[str] = []
    option: str | tuple[str, ...] | None
    for flag, option in _METHOD_FLAGS.items():
        value = getattr(args, flag, None)
        if value is None:
            continue
        # A flag may feed one of several option names (--masks: pspc-flex's masks=, pca_locality's mask=).
        option = next((o for o in (option if isinstance(option, tuple) else (option,)) if o in valid), None)
        if option is None:
            unused.append("--" + flag.replace("_", "-"))
            continue
        opts[option] = _CONVERT[flag](value) if flag in _CONVERT else value
    if unused:
        raise ValueError(f"{', '.join(unused)} does not apply to --method {args.method}")
    if "backend" in valid:
        opts["backend"] = args.backend
    elif args.backend != "auto":
        raise ValueError(
            f"--backend {args.backend} does not apply to --method {args.method} "
            "(it has no retrieval kernels); leave --backend at auto"
        )
    return opts


def run(args: argparse.Namespace) -> int:
    from ..sampling.run import run_sample

    run_sample(
        method=args.method,
        dataset=args.dataset,
        split=args.split,
        subset=args.subset,
        subset_random=args.subset_random,
        resolution=args.resolution,
        pad_to=args.pad_to,
        flips=args.flips,
        class_label=args.class_label,
        random_classes=args.random_classes,
        n=args.n,
        steps=args.steps,
        sampler=args.sampler,
        schedule=args.schedule,
        schedule_kwargs=schedule_kwargs(args),
        eta=args.eta,
        clip_x0=args.clip_x0,
        seed=args.seed,
        batch_size=args.batch_size,
        method_options=_method_options(args),
        device=args.device,
        dtype=args.dtype,
        out=args.out,
        save_x0=args.save_x0,
        progress=not args.no_progress,
        overwrite=args.overwrite,
        parallel=args.parallel,
        dataset_ranks=args.dataset_ranks,
        memory_budget=args.memory_budget,
    )
    return 0
