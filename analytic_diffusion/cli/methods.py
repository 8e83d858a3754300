"""List the analytic denoisers and their options."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse


def run(args: argparse.Namespace) -> int:
    from ..denoisers import DENOISERS, denoiser_options

    for name, cls in DENOISERS.items():
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        print(f"{name:10s} {doc}\n{'':10s} options: {', '.join(denoiser_options(name))}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sub.add_parser("methods", help="list the analytic denoisers and their options").set_defaults(func=run)
