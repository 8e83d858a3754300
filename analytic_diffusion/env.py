"""The environment variables the engine reads, each parsed here by the rule of the flag it stands for.

One table (:data:`VARIABLES`) names every variable, its rule and its default; :func:`read` parses one, and
:func:`check` parses all that are set, so the command line refuses a bad value in one line before any work
(docs/design.md §14). A bad value raises ValueError naming the variable, the value and what was expected; the
defaults are never substituted for a value that does not parse.

``AD_CPU_ISA`` is also read by the C++ extension at every kernel call (so that tests can switch instruction sets
in one process) with the same three names; the rule here lets the command line refuse a typo up front.
Build-time switches (``AD_BUILD_CUDA``, ``AD_CUDA_ARCH``, ``AD_NO_OPENMP``, ...) belong to ``setup.py`` and
the test suite's (``AD_TEST_*``) to ``tests/conftest.py``; neither is read by the installed package.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["VARIABLES", "check", "parse_size", "read"]

_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str, name: str) -> int:
    """'64M' -> 67108864: a number of bytes with an optional suffix K, M, G or T (powers of 1024; 'MB', 'MiB'
    and lower case work too); at least 1 byte and finite. The rule of --memory-budget and AD_MEMORY_BUDGET."""
    t = str(text).strip().upper().removesuffix("B").removesuffix("I")
    try:
        value = float(t[:-1]) * _UNITS[t[-1]] if t and t[-1] in _UNITS else float(t)
    except ValueError:
        raise ValueError(f"{name}: expected a size such as 64M or 2G, got {text!r}") from None
    if not (math.isfinite(value) and value >= 1):
        raise ValueError(f"{name}: expected a finite size of at least 1 byte (e.g. 64M or 2G), got {text!r}")
    return int(value)


def parse_positive_seconds(text: str | float, name: str) -> float:
    """A finite number of seconds > 0 (a timeout of 0 would fail every collective at once)."""
    try:
        value = float(str(text).strip())
    except ValueError:
        raise ValueError(f"{name}: expected a number of seconds > 0, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}: expected a finite number of seconds > 0, got {text!r}")
    return value


def parse_positive_int(text: str | int, name: str) -> int:
    """An integer >= 1 (a thread count: the rule of --threads)."""
    try:
        value = int(str(text).strip())
    except ValueError:
        raise ValueError(f"{name}: expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise ValueError(f"{name}: expected an integer >= 1, got {text!r}")
    return value


def parse_rank(text: str, name: str) -> int:
    """A launcher's process index or count: an integer >= 0."""
    try:
        value = int(str(text).strip())
    except ValueError:
        raise ValueError(f"{name}: expected a non-negative integer (set by torchrun), got {text!r}") from None
    if value < 0:
        raise ValueError(f"{name}: expected a non-negative integer (set by torchrun), got {text!r}")
    return value


def _choice(*names: str) -> Callable[[str, str], str]:
    def parse(text: str, name: str) -> str:
        if text not in names:
            raise ValueError(f"{name}: expected one of {', '.join(names)} (or unset), got {text!r}")
        return text

    return parse


def _path(text: str, name: str) -> str:
    if os.path.exists(text) and not os.path.isdir(text):
        raise ValueError(f"{name}: {text!r} is a file; expected a folder (it is created when missing)")
    return text


@dataclass(frozen=True)
class Variable:
    parse: Callable[[str, str], Any]
    default: Any  # what an unset (or empty) variable means; None: the caller's own default
    help: str


VARIABLES: dict[str, Variable] = {
    "AD_MEMORY_BUDGET": Variable(
        parse_size, 256 * 2**20, "working memory of each retrieval (the --memory-budget default), e.g. 64M, 2G"
    ),
    "AD_CACHE_DIR": Variable(_path, None, "folder of the statistics cache (default ~/.cache/analytic_diffusion)"),
    "AD_NUM_THREADS": Variable(parse_positive_int, None, "threads of the C++ CPU kernels (default: torch's count)"),
    "AD_THREADS": Variable(parse_positive_int, None, "torch threads of the notebooks (default: min(2, cores))"),
    "AD_CPU_ISA": Variable(_choice("base", "avx2", "avx512"), None, "cap on the C++ kernels' instruction set"),
    "AD_DIST_TIMEOUT": Variable(parse_positive_seconds, 120.0, "seconds a collective waits for the other ranks"),
    "AD_NOTEBOOK_SIZE": Variable(_choice("ci", "full", "gpu"), "full", "problem size of the example notebooks"),
    "WORLD_SIZE": Variable(parse_rank, 1, "number of processes (set by torchrun)"),
    "RANK": Variable(parse_rank, 0, "this process's index (set by torchrun)"),
    "LOCAL_RANK": Variable(parse_rank, 0, "this process's index on its machine (set by torchrun)"),
}


def read(name: str, environ: Mapping[str, str] | None = None) -> Any:
    """The parsed value of the variable ``name`` (its default when unset or empty); ValueError when malformed."""
    var = VARIABLES[name]
    text = (os.environ if environ is None else environ).get(name, "")
    return var.default if text.strip() == "" else var.parse(text, name)


def check(environ: Mapping[str, str] | None = None) -> None:
    """Parse every variable of :data:`VARIABLES` that is set: the first malformed one raises ValueError."""
    for name in VARIABLES:
        read(name, environ)
