"""Build script: the package, the Triton kernels (kernels/ -> analytic_diffusion.kernels), the C++ CPU
kernels (csrc/cpu -> analytic_diffusion._cpu, pybind11, no torch headers, OpenMP where the compiler has it) and,
where nvcc and a GPU exist, the CUDA kernels (csrc/cuda -> analytic_diffusion._cuda, torch-free .cu compiled
by nvcc, bound through pybind11, linked against libcudart).

CUDA build switch (environment; the rules: csrc/cuda_build_plan.py): AD_BUILD_CUDA=1 builds _cuda (nvcc must
exist); AD_BUILD_CUDA=0 never builds it; unset builds it when nvcc exists and the machine has a GPU (found through
torch, nvidia-smi or /dev/nvidia0, so also in an isolated build). Whenever it is built, a failed nvcc fails the
install. AD_CUDA_ARCH (e.g. 90a, 8.6) picks the architecture; else the GPU's own, else a portable list."""

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import find_packages, setup

# The C++ sources compile in parallel, one per core (AD_BUILD_JOBS overrides): the AVX-512 and AVX2 files take most
# of the build, and an install on 2 cores compiles them side by side.
ParallelCompile("AD_BUILD_JOBS").install()


def _compiler_has_openmp() -> bool:
    """Try to compile and link a tiny OpenMP program with the default C++ compiler."""
    if os.environ.get("AD_NO_OPENMP") == "1":
        return False
    cxx = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "omp.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main(){return omp_get_max_threads() > 0 ? 0 : 1;}\n")
        try:
            r = subprocess.run([cxx, "-fopenmp", src, "-o", os.path.join(tmp, "omp")], capture_output=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return r.returncode == 0


omp = _compiler_has_openmp() and sys.platform != "win32"
cpu_ext = Pybind11Extension(
    "analytic_diffusion._cpu",
    sorted(os.path.join("csrc", "cpu", f) for f in os.listdir(os.path.join("csrc", "cpu")) if f.endswith(".cpp")),
    include_dirs=[os.path.join("csrc", "cpu")],
    cxx_std=17,
    extra_compile_args=["-O3", "-ffp-contract=fast"] + (["-fopenmp"] if omp else []),
    extra_link_args=(["-fopenmp"] if omp else []),
    define_macros=[("AD_WITH_OPENMP", "1" if omp else "0")],
)


# ------------------------------------------------------------------------------------------------- CUDA
# The decision (build or not, fail loudly or not, which architectures) lives in csrc/cuda_build_plan.py, pure
# Python so that tests can call it; here: find nvcc and the toolkit, and compile the .cu files in parallel.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc"))
import cuda_build_plan  # noqa: E402

NVCC_FLAGS = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC"]


def _find_nvcc():
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _cuda_dirs(nvcc):
    """(include dirs, library dirs) of the toolkit that ``nvcc`` belongs to.

    Asked from nvcc itself (``--dryrun`` prints its INCLUDES and LIBRARIES), because nvcc on PATH may be a
    wrapper script outside the toolkit; falls back to <nvcc>/../include and <nvcc>/../lib64.
    """
    inc, lib = [], []
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "ad_probe.cu"], capture_output=True, text=True, timeout=60)
        text = out.stdout + out.stderr
    except (OSError, subprocess.TimeoutExpired):
        text = ""
    for line in text.splitlines():
        m = re.match(r"#\$ (INCLUDES|LIBRARIES)=(.*)", line)
        if not m:
            continue
        for tok in shlex.split(m.group(2)):
            if m.group(1) == "INCLUDES" and tok.startswith("-I"):
                inc.append(os.path.normpath(tok[2:]))
            elif m.group(1) == "LIBRARIES" and tok.startswith("-L") and not tok.rstrip("/").endswith("stubs"):
                lib.append(os.path.normpath(tok[2:]))
    top = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    inc = [d for d in inc if os.path.isfile(os.path.join(d, "cuda_runtime_api.h"))] or [os.path.join(top, "include")]
    lib = [d for d in lib if os.path.isdir(d)] or [os.path.join(top, "lib64")]
    return inc, lib


class BuildExt(build_ext):
    """pybind11's build_ext, plus: the .cu sources of a CUDA extension are compiled by nvcc (in parallel) into
    objects that the extension links (the host compiler never sees them). A failed nvcc fails the build: the
    extension is only planned where it is required (see csrc/cuda_build_plan.py); AD_BUILD_CUDA=0 opts out."""

    def run(self):
        for ext in list(self.extensions):
            if getattr(ext, "cuda_sources", None):
                try:
                    ext.extra_objects = list(ext.extra_objects or []) + self._nvcc_compile(ext)
                except Exception as exc:
                    raise RuntimeError(
                        f"analytic_diffusion._cuda: the CUDA build failed on a machine that needs it "
                        f"({exc}); fix the toolkit, or install without it: AD_BUILD_CUDA=0"
                    ) from exc
        super().run()

    def _nvcc_compile(self, ext):
        out_dir = os.path.join(self.build_temp, "cuda")
        os.makedirs(out_dir, exist_ok=True)
        cmds = cuda_build_plan.nvcc_commands(
            ext.nvcc, NVCC_FLAGS, ext.cuda_arch_flags, ext.include_dirs, ext.cuda_sources, out_dir
        )
        stale = []
        for obj, cmd in cmds:
            src = cmd[cmd.index("-c") + 1]
            deps = [src] + [
                os.path.join(os.path.dirname(src), f)
                for f in os.listdir(os.path.dirname(src))
                if f.endswith((".cuh", ".h"))
            ]
            if self.force or not os.path.exists(obj) or any(os.path.getmtime(d) > os.path.getmtime(obj) for d in deps):
                stale.append(cmd)
        cuda_build_plan.run_parallel(stale)
        return [obj for obj, _ in cmds]


def _cuda_extension():
    nvcc = _find_nvcc()
    if os.environ.get("AD_BUILD_CUDA", "").strip() == "0":
        gpu, arch, how = False, None, ""
    else:
        gpu, arch, how = cuda_build_plan.detect_gpu()
    p = cuda_build_plan.plan(os.environ, nvcc, gpu, arch, how)
    print(f"analytic_diffusion._cuda: {p.message}", file=sys.stderr)
    if not p.build:
        return []
    inc, lib = _cuda_dirs(nvcc)
    cuda_dir = os.path.join("csrc", "cuda")
    ext = Pybind11Extension(
        "analytic_diffusion._cuda",
        [os.path.join(cuda_dir, "bindings.cpp")],
        include_dirs=[cuda_dir] + inc,
        library_dirs=lib,
        runtime_library_dirs=lib,  # the toolkit's libcudart, found at import without LD_LIBRARY_PATH
        libraries=["cudart"],
        cxx_std=17,
        extra_compile_args=["-O2"],
    )
    ext.cuda_sources = sorted(os.path.join(cuda_dir, f) for f in os.listdir(cuda_dir) if f.endswith(".cu"))
    ext.nvcc = nvcc
    ext.cuda_arch_flags = p.arch_flags
    return [ext]


# Metadata, dependencies and extras live in pyproject.toml ([project]); this file adds what only code can say:
# the packages (kernels/ installs as analytic_diffusion.kernels) and the compiled extensions.
setup(
    packages=find_packages(include=["analytic_diffusion", "analytic_diffusion.*"]) + ["analytic_diffusion.kernels"],
    package_dir={"analytic_diffusion.kernels": "kernels"},
    package_data={
        "analytic_diffusion": ["py.typed"],
        "analytic_diffusion.data": ["mnist/*.gz", "mnist/MD5SUMS", "mnist/NOTICE"],
    },
    ext_modules=[cpu_ext, *_cuda_extension()],
    cmdclass={"build_ext": BuildExt},
    zip_safe=False,
)
