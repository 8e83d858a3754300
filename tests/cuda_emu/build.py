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
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sysconfig
from typing import Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>;]*>)?)<<<(.*?)>>>\((.*?)\);", re.S)


def cuda_include_dir() -> Optional[str]:
    """A folder holding cuda_runtime_api.h: $CUDA_HOME/include, /usr/local/cuda/include or next to nvcc."""
    candidates = [os.path.join(os.environ[v], "include") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    candidates.append("/usr/local/cuda/include")
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "include"))
    return next((d for d in candidates if os.path.isfile(os.path.join(d, "cuda_runtime_api.h"))), None)


def unavailable_reason() -> Optional[str]:
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
    src = src.replace("extern __shared__ float dyn_smem[];",
                      "float* dyn_smem = static_cast<float*>(emu::dyn_smem());")
    return LAUNCH.sub(lambda m: f"emu::launch(&{m.group(1)}, {m.group(2)}, {m.group(3)});", src)


def build(out_dir: str):
    """Compile the emulated extension into ``out_dir`` and import it (``HOST_EMULATION = True`` is set on it)."""
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
    target = os.path.join(out_dir, "_cuda" + sysconfig.get_config_var("EXT_SUFFIX"))
    cmd = [os.environ.get("CXX", "g++"), "-std=c++17", "-O2", "-fPIC", "-shared", "-Wno-unknown-pragmas",
           f"-I{cuda_include_dir()}", f"-I{CUDA_DIR}", f"-I{HERE}", f"-I{pybind11.get_include()}",
           f"-I{sysconfig.get_paths()['include']}", *sources, "-o", target]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError("building the emulated CUDA extension failed:\n" + r.stderr[-4000:])
    spec = importlib.util.spec_from_file_location("_cuda", target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.HOST_EMULATION = True
    return module
