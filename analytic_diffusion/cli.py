"""Command line: ``analytic-diffusion sample ...`` (see ``analytic-diffusion sample --help``)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from . import __version__

DTYPES = {"float32", "float64"}


DATASET_HELP = ("'mnist' (embedded 10k MNIST test set, 28x28), 'mnist32' (zero-padded to 32x32), or a path: "
                "idx(.gz) file or folder, CIFAR folder or batch file, image folder, EDM-style .zip, .npy/.npz")


def _add_data_args(p, *, default: str, subset_help: str) -> None:
    """The dataset flags shared by sample, calibrate and compare."""
    p.add_argument("--dataset", default=default, help=DATASET_HELP)
    p.add_argument("--split", default=None, help="train or test (default: the source's own default)")
    p.add_argument("--subset", type=int, default=None, help=subset_help)
    p.add_argument("--resolution", type=int, default=None, help="resize training images to R x R")
    p.add_argument("--pad-to", type=int, default=None, help="zero-pad training images to P x P")
    p.add_argument("--flips", action="store_true", help="add horizontally mirrored training images")


def _add_grid_args(p, *, default: str) -> None:
    """The σ-grid flags shared by sample, calibrate and compare."""
    p.add_argument("--schedule", default=default, help="karras | vp-linear | vp-cosine | kamb-cosine")
    p.add_argument("--sigma-min", type=float, default=None, help="karras: smallest σ (0.002)")
    p.add_argument("--sigma-max", type=float, default=None, help="karras: largest σ (80)")
    p.add_argument("--rho", type=float, default=None, help="karras: ρ (7)")
    p.add_argument("--spacing", default=None, help="vp-linear / vp-cosine: leading | trailing | linspace")


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
    _add_data_args(g, default="mnist", subset_help="use only N training images")
    g.add_argument("--subset-random", action="store_true", help="draw the subset at random (seeded by --seed)")
    g.add_argument("--class-label", type=int, default=None,
                   help="class-conditional: only training images of this class are candidates")
    g.add_argument("--random-classes", action="store_true",
                   help="class-conditional with a seeded random class per sample")
    s = p.add_argument_group("sampler")
    s.add_argument("--n", type=int, default=64, help="number of samples")
    s.add_argument("--steps", type=int, default=18, help="number of sampler steps")
    s.add_argument("--sampler", default="heun", choices=sorted(SAMPLERS))
    _add_grid_args(s, default="karras")
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
    m.add_argument("--method-seed", type=int, default=None,
                   help="smoothed / knn / optimal-draw: seed of the method's own draws")
    m.add_argument("--draw-mode", choices=["draw", "noise"], default=None,
                   help="optimal-draw: blend in one posterior draw, or add diagonal posterior noise (draw)")
    m.add_argument("--scale", type=float, default=None, help="optimal-draw: the knob λ (1)")
    m.add_argument("--patch", type=int, default=None, metavar="K",
                   help="local methods: one patch side K for every σ (excludes --patch-schedule)")
    m.add_argument("--patch-schedule", default=None, metavar="NAME_OR_FILE",
                   help="local methods: patch size per σ, a preset (see `analytic-diffusion schedules`) or a "
                        "JSON file from `analytic-diffusion calibrate`; checked against the sampler's σ grid")
    m.add_argument("--masks", default=None, metavar="wiener|FILE.npy",
                   help="pspc-flex (masks=) / pca_locality (mask=): 'wiener' = masks from the dataset's Wiener "
                        "filter (pca_locality also takes 'full'), or a saved .npy array (pspc-flex)")
    m.add_argument("--threshold", type=float, default=None, help="pca_locality: mask threshold τ")
    m.add_argument("--softmax", default=None, choices=["exact", "chunked"],
                   help="pca_locality: exact online softmax, or the studio's chunk-averaged one")
    m.add_argument("--chunk-size", type=int, default=None, help="pca_locality: chunk size of --softmax chunked")
    m.add_argument("--tau", default=None, metavar="T|SIGMA:T,...",
                   help="pspc-flex: heatmap mass fraction τ kept, one value or a table of SIGMA:T pairs "
                        "(nearest σ in log space)")
    e = p.add_argument_group("execution and outputs")
    e.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    e.add_argument("--backend", default="auto", help="auto | torch | cpu | triton | cuda")
    e.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="working precision")
    e.add_argument("--precision", default=None, choices=["exact", "tf32", "bf16"],
                   help="global methods on GPU: faster dots within a stated logit error bound (default exact)")
    e.add_argument("--out", default=None, help="output folder (default runs/METHOD-DATASET-seedS)")
    e.add_argument("--save-x0", action="store_true", help="also write x0_strips.png (x̂0 at every step)")
    e.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_cmd_sample)


# CLI flag -> denoiser keyword.
_METHOD_FLAGS = {"k": "k", "ref_size": "ref_size", "rank": "rank", "smoothing": "smoothing",
                 "perturbations": "num_perturbations", "temperature": "temperature", "method_seed": "seed",
                 "patch": "patch", "patch_schedule": "patch", "masks": ("masks", "mask"), "threshold": "threshold",
                 "softmax": "softmax", "chunk_size": "chunk_size", "tau": "tau", "draw_mode": "mode",
                 "scale": "scale", "precision": "precision"}


def _load_masks(value: str):
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


def _parse_tau(value: str):
    """'0.5' -> 0.5; '80:1,1.0:0.5,0.002:0.3' -> {σ: τ} (looked up at the nearest σ in log space)."""
    msg = f"--tau: expected a number T or comma-separated SIGMA:T pairs, got {value!r}"
    parts = [v.strip() for v in value.split(",") if v.strip()]
    try:
        if len(parts) == 1 and ":" not in parts[0]:
            return float(parts[0])
        table = {}
        for part in parts:
            sigma, tau = part.split(":")
            table[float(sigma)] = float(tau)
    except ValueError:
        raise ValueError(msg) from None
    if not table:
        raise ValueError(msg)
    return table


def _load_schedule(value: str):
    from .patch_presets import load_patch_schedule
    return load_patch_schedule(value)


_CONVERT = {"patch_schedule": _load_schedule, "masks": _load_masks, "tau": _parse_tau}


def _method_options(args) -> dict:
    from .denoisers import denoiser_options
    valid = set(denoiser_options(args.method))
    if getattr(args, "patch", None) is not None and getattr(args, "patch_schedule", None) is not None:
        raise ValueError("give either --patch or --patch-schedule, not both")
    opts, unused = {}, []
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


def _add_calibrate_parser(sub) -> None:
    p = sub.add_parser(
        "calibrate", help="calibrate a local method's patch size per noise level",
        description="Choose one patch size per σ of a grid so that a local method matches a reference "
                    "(Kamb & Ganguli's calibration). With a reference denoiser, every seed runs the reference's "
                    "own deterministic DDIM trajectory and each candidate size is scored on the reference's x_t; "
                    "with --reference clean, held-out training images noised with a fixed ε per seed are the "
                    "probes and their clean images the target. Per step and seed the best size wins; the table "
                    "holds the median over seeds. Writes the schedule JSON to --out (read it back with "
                    "`sample --patch-schedule FILE`; the full report, metric per size and step, is stored under "
                    "its 'calibration' key) and a PNG plot beside it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    from .denoisers import DENOISERS
    p.add_argument("--method", required=True, choices=sorted(DENOISERS),
                   help="the local method to calibrate (must take a patch option)")
    _add_data_args(p, default="mnist32",
                   subset_help="use the first N training images as candidates (default: all); with --reference "
                               "clean the next --n-probe images are the probes (default: the last --n-probe images)")
    p.add_argument("--reference", default="optimal", metavar="clean|METHOD|CKPT",
                   help="'clean' (held-out images), a method name, or a trained network's checkpoint file (as "
                        "`compare --network`) whose trajectories are the target")
    p.add_argument("--sizes", default=None,
                   help="comma-separated candidate patch sizes (default 3,5,... up to the image height)")
    p.add_argument("--steps", type=int, default=19, help="number of grid steps (19 = Kamb's t = 0.95 ... 0.05)")
    _add_grid_args(p, default="kamb-cosine")
    p.add_argument("--seeds", type=int, default=8, help="number of seeds (trajectories or ε draws)")
    p.add_argument("--seed", type=int, default=0, help="seed i uses seed + i")
    p.add_argument("--metric", default="cosine", choices=["cosine", "mse"],
                   help="cosine similarity of scores (higher is better) or MSE of x̂0 (lower is better)")
    p.add_argument("--n-probe", type=int, default=16, help="--reference clean: held-out probe images")
    p.add_argument("--random-classes", action="store_true",
                   help="class-conditional: a seeded random class per trajectory (clean: each probe's label)")
    p.add_argument("--temperature", type=float, default=None, help="the method's softmax temperature (1)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per denoiser call (default: all)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--backend", default="auto", help="auto | torch | cpu | triton | cuda")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="working precision")
    p.add_argument("--out", default="schedule.json", help="schedule file to write (plot: same name, .png)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_cmd_calibrate)


def _parse_sizes(text):
    if text is None:
        return None
    try:
        sizes = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--sizes: expected comma-separated integers, got {text!r}") from None
    if not sizes:
        raise ValueError(f"--sizes: expected comma-separated integers, got {text!r}")
    return sizes


def _cmd_calibrate(args) -> int:
    import os

    import torch

    from .calibration import calibrate_patch_sizes, plot_calibration
    from .compare import load_network_spec
    from .denoisers import DENOISERS, denoiser_options, make_denoiser
    from .run import prepare_dataset
    valid = set(denoiser_options(args.method))
    if "patch" not in valid:
        raise ValueError(f"--method {args.method} takes no patch size, so there is nothing to calibrate")
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    opts = {}
    for option, value in (("backend", args.backend), ("dtype", dtype), ("temperature", args.temperature)):
        if value is None:
            continue
        if option in valid:
            opts[option] = value
        elif option == "temperature":
            raise ValueError(f"--temperature does not apply to --method {args.method}")
    sizes = _parse_sizes(args.sizes)
    clean = args.reference == "clean"
    subset = args.subset
    if subset is not None and clean:
        subset += args.n_probe  # the probes come right after the candidates
    ds = prepare_dataset(args.dataset, split=args.split, subset=subset, resolution=args.resolution,
                         pad_to=args.pad_to, flips=args.flips, seed=args.seed, device=args.device)
    if clean:
        reference = "clean"
    elif args.reference in DENOISERS:
        ref_valid = set(denoiser_options(args.reference))
        ref_opts = {k: v for k, v in (("backend", args.backend), ("dtype", dtype)) if k in ref_valid}
        reference = make_denoiser(args.reference, ds, **ref_opts)
    else:  # a checkpoint (or method:NAME), checked and loaded as compare's --network
        reference, label, info = load_network_spec(args.reference, ds, device=args.device)
        reference.name = label
    table, report = calibrate_patch_sizes(
        args.method, reference, ds, candidate_sizes=sizes, schedule=args.schedule, steps=args.steps,
        schedule_kwargs=_schedule_kwargs(args), seeds=args.seeds, seed=args.seed, metric=args.metric,
        n_probe=args.n_probe, class_labels="auto" if args.random_classes else None, method_options=opts,
        batch_size=args.batch_size, device=args.device, dtype=dtype,
        name=os.path.splitext(os.path.basename(args.out))[0], progress=not args.no_progress)
    report["dataset"] = repr(ds)
    if not clean and args.reference not in DENOISERS:
        report["reference_spec"] = info
    folder = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(folder, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({**table.to_json(), "calibration": report}, f, indent=2)
    plot = None
    if not args.no_plot:
        plot = os.path.splitext(args.out)[0] + ".png"
        plot_calibration(report, plot)
    print(f"{args.method} vs {report['reference']} ({args.metric}, {len(report['seeds'])} seeds):")
    for s, k in zip(report["sigmas"], report["sizes"]):
        print(f"  σ = {s:9.4g}  k = {k}")
    print(f"wrote {args.out}" + (f" and {plot}" if plot else ""))
    return 0


def _cmd_schedules(args) -> int:
    from .patch_presets import ALIASES, PRESET_INFO, PRESETS
    for name, sch in PRESETS.items():
        span = f"σ in [{min(sch.sigmas):.4g}, {max(sch.sigmas):.4g}]"
        order = sorted(zip(sch.sigmas, sch.sizes))
        print(f"{name}\n    {PRESET_INFO.get(name, '')}\n    {span}, {len(sch.sizes)} points; "
              f"k (low → high σ): {' '.join(str(k) for _, k in order)}")
    print("aliases: " + ", ".join(f"{a} = {b}" for a, b in ALIASES.items()))
    return 0


def _add_compare_parser(sub) -> None:
    p = sub.add_parser(
        "compare", help="compare analytic denoisers with a trained network (r², MSE, Pearson r, memorisation)",
        description="Run the network (a checkpoint, or method:NAME for an analytic reference) and each analytic "
                    "method from the same seeds and write a report folder: metrics.json (per step trajectory "
                    "and single MSE / r² vs the network, single-step MSE / r² / score cosine per σ, Kamb's "
                    "final-sample Pearson r per seed and its median, memorisation and distance-to-train "
                    "novelty), r² and MSE vs σ plots, samples.png (one labelled row per model, same seed per "
                    "column) and summary.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--network", required=True, metavar="CKPT|method:NAME",
                   help="checkpoint file (analytic_diffusion.networks.load_network) or method:NAME")
    p.add_argument("--methods", default="optimal,wiener", help="comma-separated analytic methods")
    _add_data_args(p, default="mnist32",
                   subset_help="training set = the first N images; the next ones are held out (default: all but the "
                        "last max(--n-test, --n-single))")
    p.add_argument("--steps", type=int, default=19, help="number of sampler steps")
    p.add_argument("--sampler", default="ddim", help="euler | heun | ddim | ddpm")
    _add_grid_args(p, default="kamb-cosine")
    p.add_argument("--seeds", default="8", help="number of seeds (seed, seed+1, ...) or a comma-separated list")
    p.add_argument("--seed", type=int, default=0, help="first seed when --seeds is a count")
    p.add_argument("--n-single", type=int, default=16, help="held-out images for the single-step comparison")
    p.add_argument("--n-test", type=int, default=256, help="held-out images for the distance-to-train baseline")
    p.add_argument("--patch", type=int, default=None, metavar="K", help="local methods: one patch side K")
    p.add_argument("--patch-schedule", default=None, metavar="NAME_OR_FILE",
                   help="local methods: patch size per σ (preset or calibrate JSON)")
    p.add_argument("--k", type=int, default=None, help="topk / knn: neighbours")
    p.add_argument("--rank", type=int, default=None, help="wiener: leading PCA components kept")
    p.add_argument("--temperature", type=float, default=None, help="retrieval methods: softmax temperature")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--backend", default="auto", help="auto | torch | cpu | triton | cuda")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="working precision")
    p.add_argument("--batch-size", type=int, default=None, help="samples per denoiser call (default: all)")
    p.add_argument("--out", default=None, help="report folder (default runs/compare-NETWORK)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_cmd_compare)


def _parse_seeds(text: str, first: int):
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


def _cmd_compare(args) -> int:
    from .compare import run_compare
    if args.patch is not None and args.patch_schedule is not None:
        raise ValueError("give either --patch or --patch-schedule, not both")
    opts = {k: v for k, v in (("patch", args.patch), ("k", args.k), ("rank", args.rank),
                              ("temperature", args.temperature)) if v is not None}
    if args.patch_schedule is not None:
        opts["patch"] = _load_schedule(args.patch_schedule)
    run_compare(network=args.network, methods=args.methods, dataset=args.dataset, split=args.split,
                subset=args.subset, resolution=args.resolution, pad_to=args.pad_to, flips=args.flips,
                steps=args.steps, sampler=args.sampler, schedule=args.schedule,
                schedule_kwargs=_schedule_kwargs(args), seeds=_parse_seeds(args.seeds, args.seed), seed=args.seed,
                n_single=args.n_single, n_test=args.n_test, method_options=opts, backend=args.backend,
                device=args.device, dtype=args.dtype, batch_size=args.batch_size, out=args.out,
                progress=not args.no_progress)
    return 0


def _add_train_parser(sub) -> None:
    p = sub.add_parser(
        "train", help="train a small reference network (local ResNet or 2-level UNet) as an EDM denoiser",
        description="Train a LocalResNet (3x3 convolutions only, local receptive field) or a SmallUNet (2 levels, "
                    "no attention) with the EDM objective (preconditioning, log-normal sigma sampling, loss weight "
                    "(s^2+sd^2)/(s*sd)^2) and Adam. Writes --out/net.pt (final checkpoint; load it with "
                    "analytic_diffusion.networks.load_network), stepNNNNNNN.pt every --checkpoint-every steps, "
                    "losses.json and loss.png.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", default="resnet", choices=["resnet", "unet"], help="network architecture")
    p.add_argument("--padding", default="zeros", choices=["zeros", "circular"], help="convolution padding")
    p.add_argument("--channels", type=int, default=64, help="channels (UNet: at full resolution, doubled below)")
    p.add_argument("--blocks", type=int, default=None,
                   help="residual blocks (ResNet: total, default 8; UNet: per level, default 2)")
    p.add_argument("--dataset", default="mnist32", help="dataset name or path, as for `sample`")
    p.add_argument("--split", default=None, help="train or test (default: the source's own default)")
    p.add_argument("--subset", type=int, default=None, help="train on the first N images only")
    p.add_argument("--steps", type=int, default=2000, help="optimiser steps")
    p.add_argument("--batch-size", type=int, default=128, help="images per step")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (linear warm-up, cosine decay)")
    p.add_argument("--sigma-sampling", default="lognormal", choices=["lognormal", "loguniform"],
                   help="training noise levels: EDM log-normal or log-uniform on [0.002, 80]")
    p.add_argument("--no-ema", action="store_true", help="do not keep an EMA of the weights (default decay 0.999)")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights, batches and noise")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--out", required=True, help="output folder (e.g. runs/NAME)")
    p.add_argument("--checkpoint-every", type=int, default=None, help="also save a checkpoint every K steps")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's own; 1 is often fastest on a busy shared machine)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args) -> int:
    import os

    import torch

    from .networks.train import plot_losses, train_network
    from .run import prepare_dataset
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    ds = prepare_dataset(args.dataset, split=args.split, subset=args.subset, device=args.device)
    blocks = args.blocks if args.blocks is not None else (8 if args.arch == "resnet" else 2)
    res = train_network(ds, arch=args.arch, padding=args.padding, channels=args.channels, blocks=blocks,
                        steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device,
                        sigma_sampling=args.sigma_sampling, ema=None if args.no_ema else 0.999, out_dir=args.out,
                        checkpoint_every=args.checkpoint_every, progress=not args.no_progress)
    plot = plot_losses(res.losses, os.path.join(args.out, "loss.png"))
    k = min(50, len(res.losses))
    print(f"trained {args.arch} ({args.padding}) for {args.steps} steps in {res.elapsed_s:.1f} s; "
          f"final loss (mean of last {k}) {sum(res.losses[-k:]) / k:.4f}")
    print(f"wrote {res.checkpoints[-1]}" + (f" (+{len(res.checkpoints) - 1} intermediate)" if len(res.checkpoints) > 1
                                            else "") + f", {os.path.join(args.out, 'losses.json')} and {plot}")
    return 0


def _add_dynamics_parser(sub) -> None:
    p = sub.add_parser(
        "dynamics", help="track memorisation through training for several training-set sizes",
        description="For each training-set size N (a seeded random subset), train the built-in network with "
                    "checkpoints every --checkpoint-every steps; at every checkpoint draw --samples samples from "
                    "fixed seeds and record the memorisation ratio (share with NN1/NN2 < 1/3) against the subset, "
                    "the median nearest-image distance and the single-step r2 / MSE against the subset's optimal "
                    "denoiser (held-out inputs when the dataset has room, at --sigmas). The memorisation onset of "
                    "a size is the first checkpoint step with ratio >= 0.5. Writes --out/metrics.json, "
                    "memorization_vs_step.png, agreement_vs_step.png, peak_ratio_vs_size.png, onset_vs_size.png "
                    "(when some size memorised) and the checkpoints in --out/size_N/.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="mnist32", help="dataset name or path, as for `sample`")
    p.add_argument("--split", default=None, help="train or test (default: the source's own default)")
    p.add_argument("--resolution", type=int, default=None, help="resize images to R x R")
    p.add_argument("--sizes", default="64,256,1024", help="comma-separated training-set sizes")
    p.add_argument("--steps", type=int, default=2000, help="optimiser steps per size")
    p.add_argument("--checkpoint-every", type=int, default=None,
                   help="evaluate every K steps (and at the end); default steps // 10")
    p.add_argument("--samples", type=int, default=16, help="samples per checkpoint (seeds --sample-seed, ...)")
    p.add_argument("--sample-steps", type=int, default=18, help="sampler steps (Karras grid)")
    p.add_argument("--sampler", default="heun", help="euler | heun | ddim | ddpm")
    p.add_argument("--sample-seed", type=int, default=0, help="first sample seed")
    p.add_argument("--sigmas", default="0.5,1,2", help="noise levels of the single-step comparison with optimal")
    p.add_argument("--n-probe", type=int, default=16, help="images for the single-step comparison")
    p.add_argument("--probe", default="auto", choices=["auto", "heldout", "train"],
                   help="inputs of the single-step comparison: held-out images, training images, or held-out "
                        "when the dataset has images outside the largest subset")
    p.add_argument("--arch", default="resnet", choices=["resnet", "unet"], help="network architecture")
    p.add_argument("--channels", type=int, default=64, help="channels (UNet: at full resolution)")
    p.add_argument("--blocks", type=int, default=None,
                   help="residual blocks (ResNet: total, default 8; UNet: per level, default 2)")
    p.add_argument("--batch-size", type=int, default=128, help="images per training step")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0, help="seeds the subsets, weights, batches and noise")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--delete-checkpoints", action="store_true", help="delete each .pt file once evaluated")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_cmd_dynamics)


def _parse_list(text: str, kind, flag: str) -> list:
    parts = [v.strip() for v in str(text).split(",") if v.strip()]
    try:
        values = [kind(v) for v in parts]
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated {kind.__name__} values, got {text!r}") from None
    if not values:
        raise ValueError(f"{flag}: give at least one value, got {text!r}")
    return values


def _cmd_dynamics(args) -> int:
    import os

    import torch

    from .dynamics import training_dynamics
    from .run import prepare_dataset
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    sizes = _parse_list(args.sizes, int, "--sizes")
    sigmas = _parse_list(args.sigmas, float, "--sigmas")
    every = args.checkpoint_every if args.checkpoint_every is not None else max(1, args.steps // 10)
    ds = prepare_dataset(args.dataset, split=args.split, resolution=args.resolution, device=args.device)
    blocks = args.blocks if args.blocks is not None else (8 if args.arch == "resnet" else 2)
    res = training_dynamics(
        ds, sizes, steps=args.steps, checkpoint_every=every, n_samples=args.samples, sample_steps=args.sample_steps,
        sampler=args.sampler, sample_seed=args.sample_seed, arch=args.arch, seed=args.seed, out_dir=args.out,
        train_kwargs=dict(channels=args.channels, blocks=blocks, batch_size=args.batch_size, lr=args.lr),
        sigmas=sigmas, n_probe=args.n_probe, probe=args.probe, device=args.device,
        keep_checkpoints=not args.delete_checkpoints, progress=not args.no_progress)
    for key, entry in res["sizes"].items():
        last = entry["checkpoints"][-1]
        onset = entry["onset_step"]
        print(f"N = {key:>6}: onset {'never' if onset is None else f'step {onset}'}; peak ratio "
              f"{entry['peak_memorization_ratio']:.2f}; final ratio {last['memorization_ratio']:.2f}, "
              f"r2 vs optimal {last['r2_mean']:.3f} ({res['probe']['kind']} inputs)")
    print(f"wrote {os.path.join(args.out, 'metrics.json')} and plots")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="analytic-diffusion",
                                     description="Exact, fast training-free (analytic) diffusion.")
    parser.add_argument("--version", action="version", version=f"analytic-diffusion {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_sample_parser(sub)
    mp = sub.add_parser("methods", help="list the analytic denoisers and their options")
    mp.set_defaults(func=_cmd_methods)
    _add_calibrate_parser(sub)
    sp = sub.add_parser("schedules", help="list the patch-size schedule presets (σ span and sizes)")
    sp.set_defaults(func=_cmd_schedules)
    _add_train_parser(sub)
    _add_compare_parser(sub)
    _add_dynamics_parser(sub)
    _add_bench_parser(sub)
    return parser


def _csv_ints(text: str) -> List[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _add_bench_parser(sub) -> None:
    from .benchmark.global_bench import PATHS
    p = sub.add_parser("bench", help="time kernels against PyTorch baselines (global, local) or a sampling run (e2e)",
                       description="Benchmarks measured side by side in one process on one device.")
    bsub = p.add_subparsers(dest="bench", required=True)
    g = bsub.add_parser(
        "global", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="global retrieval: naive / chunked / SDPA PyTorch vs the engine's backends, with roofline floors",
        description="Time the global softmax retrieval (posterior mean over N random uint8 images of D values) "
                    "for every D, N, B and path; print a markdown table (time, × naive, × best PyTorch, roofline "
                    "floor and its fraction on known GPUs, error vs the float64 oracle on the first rows).")
    g.add_argument("--dims", type=_csv_ints, default=[784, 3072], help="D values (MNIST 784, CIFAR 3072, IN64 12288)")
    g.add_argument("--n", type=_csv_ints, default=[10000], help="N values (training-set sizes)")
    g.add_argument("--batches", type=_csv_ints, default=[1, 8, 64, 256], help="B values (queries per call)")
    g.add_argument("--paths", default=",".join(PATHS), help="comma-separated: " + ", ".join(PATHS))
    g.add_argument("--precisions", default="exact", help="comma-separated: exact, tf32, bf16 (engine paths only)")
    g.add_argument("--sigma", type=float, default=1.0, help="noise level of the queries")
    g.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda[:i]")
    g.add_argument("--repeats", type=int, default=5, help="timed calls per configuration (median reported)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", default=None, help="folder for results.json and table.md")
    g.set_defaults(func=_cmd_bench_global)
    e = bsub.add_parser(
        "e2e", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="end to end: n samples with a global method over a training set of a given shape",
        description="Time a whole sampling run (e.g. 1000 CIFAR-shaped samples with optimal, 18 Heun steps, "
                    "N = 50k) on random uint8 training images of the given shape.")
    e.add_argument("--method", default="optimal", help="a global method (optimal, topk, nearest, smoothed, knn)")
    e.add_argument("--n-train", type=int, default=50000)
    e.add_argument("--shape", type=_csv_ints, default=[3, 32, 32], help="C,H,W")
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
        "local", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="local family (ls, els, bbels, pspc, pca_locality): torch reference vs fused C++ / Triton / CUDA "
             "kernels vs naive and studio-style PyTorch, per image",
        description="Time one denoiser call per method and patch size on random uint8 training images and "
                    "report ms per image per step, the ratio to the torch reference, the error against the "
                    "float64 reference on the first image and, for ELS / bbELS on a known GPU, the exp / MMA "
                    "roofline floor. Baselines for ELS: naive (unfold + cdist, where it fits) and studio (the "
                    "Analytic Diffusion Studio's conv2d formulation with materialised logits per chunk of "
                    "training images). pca_locality ignores --patch (its locality is the Wiener mask); its torch "
                    "reference is the dense-mask formulation.")
    lo.add_argument("--methods", default="ls,els,bbels", help="comma-separated: ls, els, bbels, pspc, pca_locality")
    lo.add_argument("--patch", type=_csv_ints, default=[3, 5], help="patch sizes k")
    lo.add_argument("--n-train", type=int, default=1000)
    lo.add_argument("--shape", type=_csv_ints, default=[3, 32, 32], help="C,H,W")
    lo.add_argument("--batch", type=int, default=1, help="images per call")
    lo.add_argument("--paths", default="naive,studio,torch,cpu,triton,cuda",
                    help="comma-separated: naive, studio, torch, cpu, triton, cuda")
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


def _cmd_bench_global(args) -> int:
    from .benchmark import markdown_table, run_global_bench
    paths = [p for p in args.paths.split(",") if p]
    precisions = [p for p in args.precisions.split(",") if p]
    for p in precisions:
        from .ops.precision import check_mode
        check_mode(p)
    rows = run_global_bench(args.dims, args.n, args.batches, paths=paths, precisions=precisions, sigma=args.sigma,
                            device=_bench_device(args.device), repeats=args.repeats, seed=args.seed,
                            progress=lambda r: print(f"  D={r['D']} N={r['N']} B={r['B']} {r['path']:8s} "
                                                     f"{r['precision']:6s} " + (f"{1e3 * r['seconds']:.3f} ms"
                                                     if "seconds" in r else f"skipped: {r['skipped']}"),
                                                     file=sys.stderr, flush=True))
    table = markdown_table(rows)
    print(table)
    _write_bench(args.out, rows, table)
    return 0


def _write_bench(out: Optional[str], rows, table: str) -> None:
    import os
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(rows, f, indent=1)
        with open(os.path.join(out, "table.md"), "w") as f:
            f.write(table + "\n")


def _cmd_bench_local(args) -> int:
    from .benchmark.local_bench import markdown_table, run_local_bench
    if len(args.shape) != 3:
        raise ValueError(f"--shape: expected C,H,W, got {args.shape}")
    rows = run_local_bench([m for m in args.methods.split(",") if m], args.patch, n=args.n_train,
                           shape=tuple(args.shape), batch=args.batch, paths=[p for p in args.paths.split(",") if p],
                           sigma=args.sigma, device=_bench_device(args.device), repeats=args.repeats,
                           progress=lambda r: print(f"  {r['method']} k={r['k']} {r['path']}: "
                                                    f"{r['ms_per_image_step']:.1f} ms/image", file=sys.stderr,
                                                    flush=True))
    table = markdown_table(rows)
    print(table)
    _write_bench(args.out, rows, table)
    return 0


def _cmd_bench_e2e(args) -> int:
    from .benchmark.e2e import run_e2e
    if len(args.shape) != 3:
        raise ValueError(f"--shape: expected C,H,W, got {args.shape}")
    res = run_e2e(n_train=args.n_train, shape=tuple(args.shape), samples=args.samples, steps=args.steps,
                  sampler=args.sampler, method=args.method, batch_size=args.batch_size,
                  device=_bench_device(args.device), backend=args.backend, precision=args.precision)
    print(json.dumps(res, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as exc:  # bad input: a clear message, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
