"""Flags and parsers shared by several subcommands."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from ..denoisers.patch_schedule import PatchSchedule

DTYPES = {"float32", "float64"}


DATASET_HELP = (
    "'mnist' (embedded 10k MNIST test set, 28x28), 'mnist32' (zero-padded to 32x32), or a path: "
    "idx(.gz) file or folder, CIFAR folder or batch file, image folder, EDM-style .zip, .npy/.npz, or a "
    "folder written by `analytic-diffusion pack` (memory-mapped)"
)


def add_data_args(p: argparse._ActionsContainer, *, default: str, subset_help: str) -> None:
    """The dataset flags shared by sample, calibrate and compare."""
    p.add_argument("--dataset", default=default, help=DATASET_HELP)
    p.add_argument("--split", default=None, help="train or test (default: the source's own default)")
    p.add_argument("--subset", type=int, default=None, help=subset_help)
    p.add_argument("--resolution", type=int, default=None, help="resize training images to R x R")
    p.add_argument("--pad-to", type=int, default=None, help="zero-pad training images to P x P")
    p.add_argument("--flips", action="store_true", help="add horizontally mirrored training images")


def add_grid_args(p: argparse._ActionsContainer, *, default: str) -> None:
    """The σ-grid flags shared by sample, calibrate and compare."""
    p.add_argument("--schedule", default=default, help="karras | vp-linear | vp-cosine | kamb-cosine")
    p.add_argument("--sigma-min", type=float, default=None, help="karras: smallest σ (0.002)")
    p.add_argument("--sigma-max", type=float, default=None, help="karras: largest σ (80)")
    p.add_argument("--rho", type=float, default=None, help="karras: ρ (7)")
    p.add_argument("--spacing", default=None, help="vp-linear / vp-cosine: leading | trailing | linspace")


def schedule_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The grid flags given, as get_schedule's options; a flag the chosen --schedule does not take is refused by
    its own name (it would otherwise be a keyword error inside the grid)."""
    from ..grids import SCHEDULES, schedule_options

    kw = {"sigma_min": args.sigma_min, "sigma_max": args.sigma_max, "rho": args.rho, "spacing": args.spacing}
    kw = {k: v for k, v in kw.items() if v is not None}
    if args.schedule in SCHEDULES:
        for name in kw:
            if name not in schedule_options(args.schedule):
                takers = sorted(s for s in SCHEDULES if name in schedule_options(s))
                raise ValueError(
                    f"--{name.replace('_', '-')}: applies to --schedule {' / '.join(takers)}, not to "
                    f"--schedule {args.schedule}"
                )
    return kw


def load_schedule(value: str) -> PatchSchedule:
    from ..denoisers.patch_presets import load_patch_schedule

    return load_patch_schedule(value)


def csv_ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parse_bytes(text: str) -> int:
    """--memory-budget: '64M' -> 67108864, by the rule of AD_MEMORY_BUDGET (:func:`analytic_diffusion.env.parse_size`)."""
    from ..env import parse_size

    try:
        return parse_size(text, "--memory-budget")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--memory-budget: ")) from None


def parse_list(text: str, kind: Callable[[str], Any], flag: str) -> list[Any]:
    """'1,2,4' -> [1, 2, 4] (``kind`` converts each item); a clear error naming ``flag`` otherwise."""
    parts = [v.strip() for v in str(text).split(",") if v.strip()]
    try:
        values = [kind(v) for v in parts]
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated {kind.__name__} values, got {text!r}") from None
    if not values:
        raise ValueError(f"{flag}: give at least one value, got {text!r}")
    return values


def add_network_args(p: argparse._ActionsContainer) -> None:
    """The built-in network's flags shared by the subcommands that train one (dynamics, stability)."""
    p.add_argument("--arch", default="resnet", choices=["resnet", "unet"], help="network architecture")
    p.add_argument("--channels", type=int, default=64, help="channels (UNet: at full resolution)")
    p.add_argument(
        "--blocks",
        type=int,
        default=None,
        help="residual blocks (ResNet: total, default 8; UNet: per level, default 2)",
    )
    p.add_argument("--batch-size", type=int, default=128, help="images per training step")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate")


def network_blocks(args: argparse.Namespace) -> int:
    """--blocks, or the architecture's default (ResNet 8 in all, UNet 2 per level)."""
    return args.blocks if args.blocks is not None else (8 if args.arch == "resnet" else 2)


def network_train_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(channels=args.channels, blocks=network_blocks(args), batch_size=args.batch_size, lr=args.lr)


def set_threads(threads: int | None) -> None:
    """--threads: torch's CPU thread count (None leaves torch's own choice)."""
    if threads is None:
        return
    from ..env import parse_positive_int

    parse_positive_int(threads, "--threads")  # the rule of AD_NUM_THREADS and AD_THREADS
    import torch

    torch.set_num_threads(threads)
