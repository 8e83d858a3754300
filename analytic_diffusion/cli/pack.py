"""Write a packed dataset: uint8 images in a memory-mappable .npy, labels, and a JSON header with a checksum."""

from __future__ import annotations

import argparse
import sys

from .common import DATASET_HELP


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "pack",
        help="pack a dataset for out-of-core use (--dataset OUT maps it)",
        description="Read SRC with the dataset loaders and write the folder OUT: images.npy (uint8, N x C x H x W, "
        "memory-mappable), labels.npy, header.json (shape, source, checksums). `--dataset OUT` then "
        "maps the file instead of reading it, each rank of a --parallel dataset run maps only its "
        "shard, and retrievals stream it within --memory-budget.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("src", metavar="SRC", help=DATASET_HELP)
    p.add_argument(
        "out",
        metavar="OUT",
        help="output folder: new or empty (written under a hidden staging name and renamed when complete); "
        "never the source itself",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing packed folder OUT (only a packed set's files)"
    )
    p.add_argument("--split", default=None, help="train or test (default: the source's own default)")
    p.add_argument("--resolution", type=int, default=None, help="resize to R x R before packing")
    p.add_argument("--pad-to", type=int, default=None, help="zero-pad to P x P before packing")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    from ..data import load_dataset
    from ..data.packed import claim, source_paths, write_packed

    kw = {
        k: v for k, v in dict(split=args.split, resolution=args.resolution, pad_to=args.pad_to).items() if v is not None
    }
    # OUT is claimed before anything is read: a taken, foreign or unwritable folder is refused at once.
    with claim(args.out, overwrite=args.overwrite, protect=[args.src] if os.path.exists(args.src) else []) as c:
        ds = load_dataset(args.src, **kw)
        for path in source_paths(ds):  # e.g. a packed source named through a link
            c.protect.append(os.path.realpath(path))
        c.check_target()
        header = write_packed(ds, c)
    n, c, h, w = header["shape"]
    print(
        f"packed {n} images {c}x{h}x{w} ({n * c * h * w / 2**20:.1f} MiB) from {ds.source} to {args.out}/ "
        f"(checksum {header['checksum']})",
        file=sys.stdout,
    )
    return 0
