"""Command line: ``analytic-diffusion SUBCOMMAND ...`` (``analytic-diffusion --help``).

One module per subcommand, each with ``register(subparsers)`` (its flags) and the function it runs; this module
only assembles the parser and turns bad input into one clear line instead of a traceback.
"""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from . import bench, calibrate, compare, dynamics, info, methods, pack, sample, schedules, stability, train

# In the order `--help` lists them.
SUBCOMMANDS = (sample, methods, calibrate, schedules, train, compare, dynamics, stability, bench, pack, info)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="analytic-diffusion", description="Exact, fast training-free (analytic) diffusion."
    )
    parser.add_argument("--version", action="version", version=f"analytic-diffusion {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ..ops.distributed import ShardError, rank_prefix

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as exc:  # bad input: a clear message, not a traceback
        print(f"error{rank_prefix()}: {exc}", file=sys.stderr)
        return 2
    except ShardError as exc:  # another rank failed or the ranks disagree: say so on every rank
        print(f"error{rank_prefix()}: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:  # Ctrl-C: one line and the shell's convention for SIGINT (128 + 2)
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Leave torchrun's process group before the interpreter exits: torn down at exit instead, gloo's threads can
    abort the process ("terminate called without an active exception") while another rank is still writing."""
    dist = sys.modules.get("torch.distributed")  # only where a run joined one
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
