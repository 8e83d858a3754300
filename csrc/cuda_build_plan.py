"""Whether and how setup.py builds the CUDA extension (analytic_diffusion._cuda): pure Python, no torch needed.

Kept out of setup.py so that tests/test_gpu_kit.py can call :func:`plan` with fake inputs. The rules:

* ``AD_BUILD_CUDA=0``: never build.
* ``AD_BUILD_CUDA=1``: build (nvcc must exist), and a failed compile fails the install.
* unset: build when nvcc exists and this machine has a GPU, and then a failed compile *fails the install* too
  (a GPU machine without its CUDA kernels would only show up later as failing GPU tests). A GPU without nvcc
  installs without the extension and says so loudly; no GPU: no build.

The GPU is found without torch where needed (an isolated ``pip install`` has no torch in its build environment):
torch if importable, else ``nvidia-smi``, else the ``/dev/nvidia0`` device node. The kernels are compiled only for
the GPU's architecture when it is known (``AD_CUDA_ARCH``, e.g. ``90a`` or ``8.0``, overrides it), else for the
portable fallback list; the .cu files compile in parallel.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field

# Hopper SASS with the sm_90a features, Ampere SASS, and Ampere PTX for anything newer (JIT by the driver).
FALLBACK_ARCH_FLAGS = [
    "-gencode=arch=compute_90a,code=sm_90a",
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_80,code=compute_80",
]


@dataclass
class Plan:
    build: bool
    required: bool = False  # a failed nvcc fails the install
    arch_flags: list[str] = field(default_factory=list)
    message: str = ""  # printed (stderr) when not building, or to say what is built for


def arch_flags(arch: str | None) -> list[str]:
    """nvcc -gencode flags for one architecture ("90a", "9.0", "sm_86", "8.6"), or the fallback list for None.
    Compute capability 9.0 gets sm_90a (the Hopper-specific features); others SASS + PTX of their own number."""
    if not arch:
        return list(FALLBACK_ARCH_FLAGS)
    m = re.fullmatch(r"(?:sm_|compute_)?(\d+)\.?(\d)([af]?)", arch.strip())
    if m is None:
        raise ValueError(f"AD_CUDA_ARCH: expected a compute capability such as 90a, 9.0 or 8.6, got {arch!r}")
    num, suffix = m.group(1) + m.group(2), m.group(3)
    if num == "90" and not suffix:
        suffix = "a"
    a = num + suffix
    return [f"-gencode=arch=compute_{a},code=sm_{a}", f"-gencode=arch=compute_{a},code=compute_{a}"]


def plan(env: Mapping[str, str], nvcc: str | None, gpu: bool, arch: str | None, how: str = "") -> Plan:
    """The build decision from the environment, the nvcc path (or None), whether a GPU was seen (and how) and its
    architecture (None when unknown)."""
    flag = env.get("AD_BUILD_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        raise ValueError(f"AD_BUILD_CUDA: expected 0, 1 or unset, got {flag!r}")
    if flag == "0":
        return Plan(False, message="not built (AD_BUILD_CUDA=0)")
    chosen = env.get("AD_CUDA_ARCH", "").strip() or arch
    if nvcc is None:
        if flag == "1":
            raise RuntimeError("AD_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
        if gpu:
            return Plan(
                False,
                message=f"NOT BUILT although this machine has a GPU ({how}): nvcc not found (set "
                "CUDA_HOME or put nvcc on PATH); backend 'cuda' and its GPU tests will fail",
            )
        return Plan(False, message="not built (nvcc not found)")
    if flag != "1" and not gpu:
        return Plan(False, message="not built (no GPU seen on this machine; set AD_BUILD_CUDA=1 to build anyway)")
    target = f"sm_{chosen}" if chosen else "the fallback architectures (GPU architecture unknown)"
    return Plan(
        True,
        required=True,
        arch_flags=arch_flags(chosen),
        message=f"building for {target}" + (f" ({how})" if how else ""),
    )


def detect_gpu() -> tuple[bool, str | None, str]:
    """(GPU present, compute capability like "90" or None, how it was found), without requiring torch."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return True, f"{major}{minor}", "torch"
    except Exception:  # torch absent (isolated build) or broken: ask the driver instead
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            r = subprocess.run(
                [smi, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
            )
            caps = [c.strip() for c in r.stdout.splitlines() if re.fullmatch(r"\d+\.\d", c.strip())]
            if r.returncode == 0 and caps:
                return True, caps[0].replace(".", ""), "nvidia-smi"
        except (OSError, subprocess.TimeoutExpired):
            pass
    if os.path.exists("/dev/nvidia0"):
        return True, None, "/dev/nvidia0"
    return False, None, ""


def nvcc_commands(
    nvcc: str, flags: list[str], arch: list[str], includes: list[str], sources: list[str], out_dir: str
) -> list[tuple[str, list[str]]]:
    """(object path, command) per .cu source."""
    out = []
    for src in sources:
        obj = os.path.join(out_dir, os.path.splitext(os.path.basename(src))[0] + ".o")
        out.append((obj, [nvcc] + flags + arch + [f"-I{d}" for d in includes] + ["-c", src, "-o", obj]))
    return out


def run_parallel(commands: list[list[str]], jobs: int | None = None) -> None:
    """Run the nvcc commands concurrently; raise with every failing command's output."""
    from concurrent.futures import ThreadPoolExecutor

    if not commands:
        return
    jobs = jobs or max(1, min(len(commands), os.cpu_count() or 1))

    def one(cmd):
        print(" ".join(cmd), flush=True)
        return cmd, subprocess.run(cmd, capture_output=True, text=True)

    with ThreadPoolExecutor(jobs) as pool:
        results = list(pool.map(one, commands))
    failed = [(cmd, r) for cmd, r in results if r.returncode != 0]
    if failed:
        raise RuntimeError("nvcc failed:\n" + "\n".join(f"$ {' '.join(c)}\n{r.stdout}{r.stderr}" for c, r in failed))
