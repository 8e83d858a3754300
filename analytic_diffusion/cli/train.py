"""Train a small reference network."""

from __future__ import annotations

import argparse

from .common import network_blocks, set_threads


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "train",
        help="train a small reference network (local ResNet or 2-level UNet) as an EDM denoiser",
        description="Train a LocalResNet (3x3 convolutions only, local receptive field) or a SmallUNet (2 levels, "
        "no attention) with the EDM objective (preconditioning, log-normal sigma sampling, loss weight "
        "(s^2+sd^2)/(s*sd)^2) and Adam. Writes --out/net.pt (final checkpoint; load it with "
        "analytic_diffusion.networks.load_network), stepNNNNNNN.pt every --checkpoint-every steps, "
        "losses.json and loss.png.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--arch", default="resnet", choices=["resnet", "unet"], help="network architecture")
    p.add_argument("--padding", default="zeros", choices=["zeros", "circular"], help="convolution padding")
    p.add_argument("--channels", type=int, default=64, help="channels (UNet: at full resolution, doubled below)")
    p.add_argument(
        "--blocks",
        type=int,
        default=None,
        help="residual blocks (ResNet: total, default 8; UNet: per level, default 2)",
    )
    p.add_argument("--dataset", default="mnist32", help="dataset name or path, as for `sample`")
    p.add_argument("--split", default=None, help="train or test (default: the source's own default)")
    p.add_argument("--subset", type=int, default=None, help="train on the first N images only")
    p.add_argument("--steps", type=int, default=2000, help="optimiser steps")
    p.add_argument("--batch-size", type=int, default=128, help="images per step")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (linear warm-up, cosine decay)")
    p.add_argument(
        "--sigma-sampling",
        default="lognormal",
        choices=["lognormal", "loguniform"],
        help="training noise levels: EDM log-normal or log-uniform on [0.002, 80]",
    )
    p.add_argument("--no-ema", action="store_true", help="do not keep an EMA of the weights (default decay 0.999)")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights, batches and noise")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--out", required=True, help="output folder (e.g. runs/NAME)")
    p.add_argument("--checkpoint-every", type=int, default=None, help="also save a checkpoint every K steps")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's own; 1 is often fastest on a busy shared machine)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    from ..networks.train import plot_losses, train_network
    from ..sampling.run import prepare_dataset

    set_threads(args.threads)
    ds = prepare_dataset(args.dataset, split=args.split, subset=args.subset, device=args.device)
    blocks = network_blocks(args)
    res = train_network(
        ds,
        arch=args.arch,
        padding=args.padding,
        channels=args.channels,
        blocks=blocks,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        device=args.device,
        sigma_sampling=args.sigma_sampling,
        ema=None if args.no_ema else 0.999,
        out_dir=args.out,
        checkpoint_every=args.checkpoint_every,
        progress=not args.no_progress,
    )
    plot = plot_losses(res.losses, os.path.join(args.out, "loss.png"))
    k = min(50, len(res.losses))
    print(
        f"trained {args.arch} ({args.padding}) for {args.steps} steps in {res.elapsed_s:.1f} s; "
        f"final loss (mean of last {k}) {sum(res.losses[-k:]) / k:.4f}"
    )
    print(
        f"wrote {res.checkpoints[-1]}"
        + (f" (+{len(res.checkpoints) - 1} intermediate)" if len(res.checkpoints) > 1 else "")
        + f", {os.path.join(args.out, 'losses.json')} and {plot}"
    )
    return 0
