"""Command line: ``analytic-diffusion SUBCOMMAND ...`` (``analytic-diffusion --help``).

One module per subcommand, each with ``register(subparsers)`` (its flags) and the function it runs; this module
only assembles the parser and turns bad input into one clear line instead of a traceback.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys

from .. import __version__, env
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
    try:
        env.check()  # every environment variable the engine reads, before any module reads one
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
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
    except OSError as exc:  # the machine refused (full disk, read-only folder, no permission): what to fix
        print(f"error{rank_prefix()}: {describe_os_error(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: one line and the shell's convention for SIGINT (128 + 2)
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        _leave_process_group()


def entry_point() -> None:
    """The ``analytic-diffusion`` command and ``python -m analytic_diffusion``: :func:`main`, then exit with its
    code; a Ctrl-C while the interpreter shuts down ends the process quietly (:func:`_quiet_second_interrupt`)."""
    code = main()
    _quiet_second_interrupt()
    sys.exit(code)


# What to do about the operating system errors a run meets when it writes, by errno.
_OS_ERROR_ADVICE = {
    errno.ENOSPC: "the disk is full: free some space or write somewhere else",
    errno.EDQUOT: "the disk quota is used up: free some space or write somewhere else",
    errno.EROFS: "the file system is read-only: choose a folder you can write to",
    errno.EACCES: "permission denied: choose a folder you can write to",
    errno.EPERM: "operation not permitted: choose a folder you can write to",
}


def describe_os_error(exc: OSError) -> str:
    """One line: what failed (the message already names the file), then what to do about it."""
    what = str(exc) if exc.filename is None or str(exc.filename) in str(exc) else f"{exc.filename}: {exc}"
    advice = None if exc.errno is None else _OS_ERROR_ADVICE.get(exc.errno)
    return f"{what} ({advice})" if advice else what


def _quiet_second_interrupt() -> None:
    """From here on a Ctrl-C ends the process at once with 130: pressed while the interpreter shuts down (torch's
    exit handlers, gloo's threads), it would otherwise print a traceback from inside an exit handler. Only for
    the command itself: a program that calls :func:`main` keeps its own Ctrl-C handling."""
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(130))


def _leave_process_group() -> None:
    """Leave torchrun's process group before the interpreter exits: torn down at exit instead, gloo's threads can
    abort the process ("terminate called without an active exception") while another rank is still writing."""
    dist = sys.modules.get("torch.distributed")  # only where a run joined one
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
