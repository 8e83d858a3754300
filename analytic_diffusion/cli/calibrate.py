"""Calibrate a local method's patch size per noise level."""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable

from .common import DTYPES, add_data_args, add_grid_args, schedule_kwargs


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "calibrate",
        help="calibrate a local method's patch size per noise level",
        description="Choose one patch size per σ of a grid so that a local method matches a reference "
        "(Kamb & Ganguli's calibration). With a reference denoiser, every seed runs the reference's "
        "own deterministic DDIM trajectory and each candidate size is scored on the reference's x_t; "
        "with --reference clean, held-out training images noised with a fixed ε per seed are the "
        "probes and their clean images the target. Per step and seed the best size wins; the table "
        "holds the median over seeds. Writes the schedule JSON to --out (read it back with "
        "`sample --patch-schedule FILE`; the full report, metric per size and step, is stored under "
        "its 'calibration' key) and a PNG plot beside it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    from ..denoisers import DENOISERS

    p.add_argument(
        "--method",
        required=True,
        choices=sorted(DENOISERS),
        help="the local method to calibrate (must take a patch option)",
    )
    add_data_args(
        p,
        default="mnist32",
        subset_help="use the first N training images as candidates (default: all); with --reference "
        "clean the next --n-probe images are the probes (default: the last --n-probe images)",
    )
    p.add_argument(
        "--reference",
        default="optimal",
        metavar="clean|METHOD|CKPT",
        help="'clean' (held-out images), a method name, or a trained network's checkpoint file (as "
        "`compare --network`) whose trajectories are the target",
    )
    p.add_argument(
        "--sizes", default=None, help="comma-separated candidate patch sizes (default 3,5,... up to the image height)"
    )
    p.add_argument("--steps", type=int, default=19, help="number of grid steps (19 = Kamb's t = 0.95 ... 0.05)")
    add_grid_args(p, default="kamb-cosine")
    p.add_argument("--seeds", type=int, default=8, help="number of seeds (trajectories or ε draws)")
    p.add_argument("--seed", type=int, default=0, help="seed i uses seed + i")
    p.add_argument(
        "--metric",
        default="cosine",
        choices=["cosine", "mse"],
        help="cosine similarity of scores (higher is better) or MSE of x̂0 (lower is better)",
    )
    p.add_argument("--n-probe", type=int, default=16, help="--reference clean: held-out probe images")
    p.add_argument(
        "--random-classes",
        action="store_true",
        help="class-conditional: a seeded random class per trajectory (clean: each probe's label)",
    )
    p.add_argument("--temperature", type=float, default=None, help="the method's softmax temperature (1)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per denoiser call (default: all)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--backend", default="auto", help="auto | torch | cpu | triton | cuda")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="working precision")
    p.add_argument("--out", default="schedule.json", help="schedule file to write (plot: same name, .png)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def _parse_sizes(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        sizes = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--sizes: expected comma-separated integers, got {text!r}") from None
    if not sizes:
        raise ValueError(f"--sizes: expected comma-separated integers, got {text!r}")
    return sizes


def run(args: argparse.Namespace) -> int:
    import os

    import torch

    from ..analysis.calibration import calibrate_patch_sizes, plot_calibration
    from ..analysis.compare import load_network_spec
    from ..denoisers import DENOISERS, denoiser_options, make_denoiser
    from ..sampling.run import prepare_dataset

    valid = set(denoiser_options(args.method))
    if "patch" not in valid:
        raise ValueError(f"--method {args.method} takes no patch size, so there is nothing to calibrate")
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    opts: dict[str, Any] = {}
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
    ds = prepare_dataset(
        args.dataset,
        split=args.split,
        subset=subset,
        resolution=args.resolution,
        pad_to=args.pad_to,
        flips=args.flips,
        seed=args.seed,
        device=args.device,
    )
    reference: str | Callable[..., torch.Tensor]
    if clean:
        reference = "clean"
    elif args.reference in DENOISERS:
        ref_valid = set(denoiser_options(args.reference))
        ref_opts = {k: v for k, v in (("backend", args.backend), ("dtype", dtype)) if k in ref_valid}
        reference = make_denoiser(args.reference, ds, **ref_opts)
    else:  # a checkpoint (or method:NAME), checked and loaded as compare's --network
        reference, label, info = load_network_spec(args.reference, ds, device=args.device)
        reference.name = label  # type: ignore[attr-defined]  # a Denoiser module or a function: both take it
    table, report = calibrate_patch_sizes(
        args.method,
        reference,
        ds,
        candidate_sizes=sizes,
        schedule=args.schedule,
        steps=args.steps,
        schedule_kwargs=schedule_kwargs(args),
        seeds=args.seeds,
        seed=args.seed,
        metric=args.metric,
        n_probe=args.n_probe,
        class_labels="auto" if args.random_classes else None,
        method_options=opts,
        batch_size=args.batch_size,
        device=args.device,
        dtype=dtype,
        name=os.path.splitext(os.path.basename(args.out))[0],
        progress=not args.no_progress,
    )
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
