"""Build csrc/cuda as a host program: the real kernel sources, run by a small SIMT emulator (emu.h), bound by the
real bindings.cpp into a ``_cuda`` module whose "device pointers" are host addresses of CPU tensors.

What it checks: the kernels' index arithmetic, masking, barriers, warp shuffles and reductions, the host-side
launch logic and the bindings, against the float64 oracle on a machine without a GPU. What it cannot check: timing,
the GPU memory model (it runs the threads of a block one at a time between barriers, so a missing __syncthreads
shows up only where it changes a value read after the barrier), occupancy or register limits (ptxas covers those).

Each .cu is rewritten textually: ``<<<grid, block, smem, stream>>>(args)`` becomes ``emu::launch(...)``, the
dynamic shared-memory array becomes the emulator's per-block buffer (filled with 0x7f bytes: a kernel that
reads shared memory it never wrote sees 3.4e38, not 0). Needs a C++17 compiler, the CUDA runtime headers (only
the headers: the runtime library is stubbed) and pybind11.

The build (about 15 s of compiler time) is cached: ``cached_build()`` keys it by a hash of every file in csrc/cuda
and tests/cuda_emu, the compiler's identity and the Python/pybind11/CUDA-header versions, and keeps it in
$AD_CUDA_EMU_CACHE (default: ~/.cache/analytic_diffusion/cuda_emu), so that repeated runs and pytest-xdist
workers build it once; a changed source gives a new key and a rebuild. Builds run under a file lock and are moved
into place whole, so concurrent processes never load a half-written module.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>;]*>)?)<<<(.*?)>>>\((.*?)\);", re.S)


def cuda_include_dir() -> str | None:
    """A folder holding cuda_runtime_api.h: $CUDA_HOME/include, /usr/local/cuda/include or next to nvcc."""
    candidates = [os.path.join(os.environ[v], "include") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    candidates.append("/usr/local/cuda/include")
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "include"))
    return next((d for d in candidates if os.path.isfile(os.path.join(d, "cuda_runtime_api.h"))), None)


def unavailable_reason() -> str | None:
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        return "no C++ compiler (g++ or $CXX)"
    if cuda_include_dir() is None:
        return "no CUDA runtime headers (cuda_runtime_api.h) under $CUDA_HOME, /usr/local/cuda or next to nvcc"
    try:
        import pybind11  # noqa: F401
    except ImportError:
        return "pybind11 is not installed"
    return None


def translate(source: str, name: str) -> str:
    """The host C++ of one .cu: emulator header, launches as calls, dynamic shared memory from the emulator."""
    src = source.replace("#include <cuda_runtime.h>\n", "")
    src = src.replace(f'#include "{name}.cuh"\n', f'#include "{name}.cuh"\n#include "emu.h"\n', 1)
    src = src.replace("extern __shared__ float dyn_smem[];", "float* dyn_smem = static_cast<float*>(emu::dyn_smem());")
    return LAUNCH.sub(lambda m: f"emu::launch(&{m.group(1)}, {m.group(2)}, {m.group(3)});", src)


def _compiler() -> str:
    return os.environ.get("CXX", "g++")


def source_key(cuda_dir: str = CUDA_DIR, emu_dir: str = HERE) -> str:
    """A hash of everything the build reads: every file in csrc/cuda and tests/cuda_emu (names and bytes), the
    compiler (path and ``--version``), the extension suffix, pybind11's version and the CUDA runtime header."""
    h = hashlib.sha256()
    for folder in (cuda_dir, emu_dir):
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if os.path.isfile(path) and not name.endswith(".pyc"):
                h.update(f"{os.path.basename(folder)}/{name}\0".encode())
                with open(path, "rb") as fh:
                    h.update(fh.read())
                h.update(b"\0")
    cxx = shutil.which(_compiler()) or _compiler()
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        version = ""
    import pybind11

    header = os.path.join(cuda_include_dir() or "", "cuda_runtime_api.h")
    with open(header, "rb") as fh:
        header_hash = hashlib.sha256(fh.read()).hexdigest()
    for part in (
        os.path.realpath(cxx),
        version,
        sysconfig.get_config_var("EXT_SUFFIX"),
        pybind11.__version__,
        header,
        header_hash,
    ):
        h.update(f"{part}\0".encode())
    return h.hexdigest()[:24]


def cache_root() -> str:
    env = os.environ.get("AD_CUDA_EMU_CACHE")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "analytic_diffusion", "cuda_emu")


def cached(root: str, key: str, build_into: Callable[[str], str], max_age_days: float = 14.0) -> str:
    """The path of the module built for ``key`` under ``root``: built by ``build_into(folder) -> path`` only when
    no finished build of that key exists. One process builds (file lock), the others wait and reuse its result.
    A finished build is a folder renamed into place whole; builds of other keys unused for ``max_age_days`` are
    removed."""
    from filelock import FileLock  # a torch dependency, so present wherever the tests run

    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, key)
    with FileLock(os.path.join(root, key + ".lock")):
        target = _finished(final)
        if target is None:
            work = tempfile.mkdtemp(prefix=key + ".tmp-", dir=root)
            os.chmod(work, 0o755)
            try:
                name = os.path.basename(build_into(work))
                with open(os.path.join(work, "MODULE"), "w") as fh:
                    fh.write(name)
                if os.path.isdir(final):  # a folder without a finished build (left by hand): replace it
                    shutil.rmtree(final)
                os.rename(work, final)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            target = _finished(final)
        os.utime(final)
    _prune(root, keep=key, max_age_s=max_age_days * 86400)
    return target


def _finished(folder: str) -> str | None:
    marker = os.path.join(folder, "MODULE")
    if not os.path.isfile(marker):
        return None
    with open(marker) as fh:
        path = os.path.join(folder, fh.read().strip())
    return path if os.path.isfile(path) else None


def _prune(root: str, keep: str, max_age_s: float) -> None:
    now = time.time()
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if name.startswith(keep) or not os.path.isdir(path):
            continue
        try:
            if now - os.path.getmtime(path) > max_age_s:
                shutil.rmtree(path, ignore_errors=True)
                if os.path.exists(path + ".lock"):
                    os.remove(path + ".lock")
        except OSError:
            pass


def cached_build():
    """The emulated extension, from the cache when these sources were built before (see the module docstring)."""
    return load(cached(cache_root(), source_key(), compile_into))


def load(target: str):
    spec = importlib.util.spec_from_file_location("_cuda", target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.HOST_EMULATION = True
    return module


def compile_into(out_dir: str) -> str:
    """Translate and compile csrc/cuda into ``out_dir``; returns the path of the built module. Each source is
    compiled on its own (in parallel, up to the CPU count), then linked."""
    import pybind11

    sources = [os.path.join(HERE, "stubs.cpp"), os.path.join(CUDA_DIR, "bindings.cpp")]
    for f in sorted(os.listdir(CUDA_DIR)):
        if f.endswith(".cu"):
            name = f[:-3]
            with open(os.path.join(CUDA_DIR, f)) as fh:
                text = translate(fh.read(), name)
            if "emu::launch" not in text:
                raise RuntimeError(f"{f}: found no kernel launch to emulate")
            path = os.path.join(out_dir, f"{name}_emu.cpp")
            with open(path, "w") as fh:
                fh.write(text)
            sources.append(path)
    cxx = _compiler()
    flags = [
        "-std=c++17",
        "-O2",
        "-fPIC",
        "-Wno-unknown-pragmas",
        f"-I{cuda_include_dir()}",
        f"-I{CUDA_DIR}",
        f"-I{HERE}",
        f"-I{pybind11.get_include()}",
        f"-I{sysconfig.get_paths()['include']}",
    ]

    def compile_one(i_src):
        i, src = i_src
        obj = os.path.join(out_dir, f"{i}_{os.path.splitext(os.path.basename(src))[0]}.o")
        r = subprocess.run([cxx, *flags, "-c", src, "-o", obj], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(
                f"building the emulated CUDA extension failed ({os.path.basename(src)}):\n" + r.stderr[-4000:]
            )
        return obj

    with ThreadPoolExecutor(max_workers=max(1, min(len(sources), os.cpu_count() or 1))) as pool:
        objects = list(pool.map(compile_one, enumerate(sources)))
    target = os.path.join(out_dir, "_cuda" + sysconfig.get_config_var("EXT_SUFFIX"))
    r = subprocess.run([cxx, "-shared", *objects, "-o", target], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError("linking the emulated CUDA extension failed:\n" + r.stderr[-4000:])
    return target
