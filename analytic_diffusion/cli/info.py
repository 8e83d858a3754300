"""``analytic-diffusion info``: what this installation is and what it can run here.

One screen for a bug report (versions, where the package was imported from, the C++ kernels and the instruction
sets they run on this CPU, CUDA and Triton, the embedded MNIST), and the smoke test of an installed package:
``--check`` exits 1 when something every installation must have is missing (the C++ extension, the embedded
dataset and its checksums) or when the C++ kernel disagrees with the float64 reference on real MNIST queries.
"""

from __future__ import annotations

import argparse
import os
import platform


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _kernel_agrees_on_mnist() -> str | None:
    """None when the C++ kernel's posterior mean matches the float64 reference on 4 noisy MNIST queries."""
    import torch

    from ..data import load_dataset
    from ..ops import softmax_retrieval

    keys = load_dataset("mnist").subset(512).keys()
    g = torch.Generator().manual_seed(0)
    x = keys.rows(0, 4, torch.float32, torch.device("cpu")) + 0.5 * torch.randn(4, keys.dim, generator=g)
    ref = softmax_retrieval(x, keys, 0.5, backend="torch", dtype=torch.float64).mean
    got = softmax_retrieval(x, keys, 0.5, backend="cpu", dtype=torch.float32).mean
    err = float((got.double() - ref).norm() / ref.norm())
    return None if err < 1e-4 else f"C++ kernel vs float64 reference on MNIST: relative error {err:.2e} > 1e-4"


def collect() -> tuple[list[tuple[str, str]], list[str]]:
    """(rows of (what, value), problems an installation must not have)."""
    import torch

    from .. import __version__
    from ..data.embedded import MNIST_DIR, verify_embedded
    from ..ops import cpu_backend, cuda_backend, triton_backend

    rows = [
        ("analytic-diffusion", f"{__version__} ({os.path.dirname(os.path.dirname(os.path.abspath(__file__)))})"),
        ("python", platform.python_version()),
        ("torch", f"{torch.__version__} ({torch.get_num_threads()} threads)"),
        ("cpu", _cpu_model()),
    ]
    problems: list[str] = []
    if cpu_backend.available():
        runnable = cpu_backend.runnable_isas()
        path, openmp = cpu_backend.build_info()
        rows.append(("C++ kernels", f"{path}, OpenMP {'on' if openmp else 'off'}"))
        rows.append(("instruction sets", f"{', '.join(runnable)}; in use: {cpu_backend.isa()} (AD_CPU_ISA caps it)"))
    else:
        rows.append(("C++ kernels", "missing"))
        problems.append("the C++ extension analytic_diffusion._cpu is not built: reinstall with a C++17 compiler")
    rows.append(("CUDA kernels", cuda_backend.unavailable_reason() or "available"))
    triton_reason = triton_backend.unavailable_reason(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    rows.append(("Triton kernels", triton_reason or "available"))
    try:
        verify_embedded()
        rows.append(("embedded MNIST", f"{MNIST_DIR} (checksums match)"))
    except (OSError, RuntimeError) as exc:
        rows.append(("embedded MNIST", "missing or corrupt"))
        problems.append(str(exc))
    return rows, problems


def run(args: argparse.Namespace) -> int:
    rows, problems = collect()
    width = max(len(what) for what, _ in rows)
    for what, value in rows:
        print(f"{what:<{width}}  {value}")
    if args.check and not problems:
        problem = _kernel_agrees_on_mnist()
        if problem is None:
            print("check: the C++ kernel matches the float64 reference on MNIST")
        else:
            problems.append(problem)
    for problem in problems:
        print(f"problem: {problem}")
    return 1 if args.check and problems else 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "info",
        help="this installation: versions, kernels, instruction sets, the embedded dataset",
        description="Print what this installation is and what it can run here (paste it into a bug report). "
        "With --check, exit 1 when the C++ kernels or the embedded MNIST are missing or wrong.",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="also run the C++ kernel against the float64 reference; exit 1 on a problem",
    )
    p.set_defaults(func=run)
