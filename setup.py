"""Build script: the package, the Triton kernels (kernels/ -> analytic_diffusion.kernels), the C++ CPU
kernels (csrc/cpu -> analytic_diffusion._cpu, pybind11, no torch headers, OpenMP where the compiler has it) and,
where nvcc and a GPU exist, the CUDA kernels (csrc/cuda -> analytic_diffusion._cuda, torch-free .cu compiled
by nvcc, bound through pybind11, linked against libcudart).

CUDA build switch (environment): AD_BUILD_CUDA=1 builds _cuda whenever nvcc is found (and fails loudly if it
cannot); AD_BUILD_CUDA=0 never builds it; unset builds it when nvcc is found and torch sees a CUDA device
(a failed CUDA build then only prints a warning: the package and its CPU kernels still install)."""
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

from setuptools import find_packages, setup
from pybind11.setup_helpers import Pybind11Extension, build_ext


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
            r = subprocess.run([cxx, "-fopenmp", src, "-o", os.path.join(tmp, "omp")],
                               capture_output=True, timeout=60)
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
CUDA_ARCH_FLAGS = [  # Hopper with wgmma/setmaxnreg features (sm_90a), Ampere SASS, and Ampere PTX for newer GPUs
    "-gencode=arch=compute_90a,code=sm_90a",
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_80,code=compute_80",
]
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
        out = subprocess.run([nvcc, "--dryrun", "-c", "ad_probe.cu"], capture_output=True, text=True,
                             timeout=60)
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


def _torch_sees_gpu():
    """True when torch is importable here and reports a CUDA device (setup.py must import without torch)."""
    try:
        import torch  # noqa: F401  (absent in an isolated build environment: fine, then no auto CUDA build)
    except Exception as exc:  # pragma: no cover - depends on the build environment
        return False, f"torch is not importable in the build environment ({type(exc).__name__})"
    try:
        if torch.cuda.is_available():
            return True, ""
        return False, "torch reports no CUDA device"
    except Exception as exc:  # pragma: no cover
        return False, f"torch.cuda failed ({exc})"


def _cuda_build_plan():
    """(nvcc path or None, forced, reason printed when the CUDA module is skipped)."""
    flag = os.environ.get("AD_BUILD_CUDA", "").strip()
    if flag == "0":
        return None, False, "AD_BUILD_CUDA=0"
    nvcc = _find_nvcc()
    if nvcc is None:
        return None, False, "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    if flag == "1":
        return nvcc, True, ""
    gpu, why = _torch_sees_gpu()
    if not gpu:
        return None, False, f"{why}; set AD_BUILD_CUDA=1 to build it anyway"
    return nvcc, False, ""


class BuildExt(build_ext):
    """pybind11's build_ext, plus: the .cu sources of a CUDA extension are compiled by nvcc into objects that
    the extension links (the host compiler never sees them). nvcc runs before any extension is built, so that a
    failed CUDA compile can drop the CUDA extension cleanly (unless it was forced with AD_BUILD_CUDA=1)."""

    def run(self):
        for ext in list(self.extensions):
            if not getattr(ext, "cuda_sources", None):
                continue
            try:
                ext.extra_objects = list(ext.extra_objects or []) + self._nvcc_compile(ext)
            except Exception as exc:
                if getattr(ext, "cuda_forced", False):
                    raise
                print(f"analytic_diffusion._cuda: not built (nvcc failed: {exc}); the CPU kernels are unaffected",
                      file=sys.stderr)
                self.extensions.remove(ext)
        super().run()

    def _nvcc_compile(self, ext):
        objs = []
        out_dir = os.path.join(self.build_temp, "cuda")
        os.makedirs(out_dir, exist_ok=True)
        inc = [f"-I{d}" for d in ext.include_dirs]
        for src in ext.cuda_sources:
            obj = os.path.join(out_dir, os.path.splitext(os.path.basename(src))[0] + ".o")
            deps = [src] + [os.path.join(os.path.dirname(src), f) for f in os.listdir(os.path.dirname(src))
                            if f.endswith((".cuh", ".h"))]
            if self.force or not os.path.exists(obj) or any(os.path.getmtime(d) > os.path.getmtime(obj)
                                                            for d in deps):
                cmd = [ext.nvcc] + NVCC_FLAGS + CUDA_ARCH_FLAGS + inc + ["-c", src, "-o", obj]
                print(" ".join(cmd))
                subprocess.check_call(cmd)
            objs.append(obj)
        return objs


def _cuda_extension():
    nvcc, forced, reason = _cuda_build_plan()
    if nvcc is None:
        print(f"analytic_diffusion._cuda: not built ({reason})", file=sys.stderr)
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
    ext.cuda_forced = forced
    return [ext]


packages = find_packages(include=["analytic_diffusion", "analytic_diffusion.*"]) + ["analytic_diffusion.kernels"]

setup(
    name="analytic-diffusion",
    version="0.1.0",
    description="Exact, fast training-free (analytic) diffusion denoisers, samplers and kernels",
    long_description=open("README.md", encoding="utf-8").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=packages,
    package_dir={"analytic_diffusion.kernels": "kernels"},
    package_data={"analytic_diffusion.data": ["mnist/*.gz", "mnist/MD5SUMS"]},
    include_package_data=True,
    ext_modules=[cpu_ext] + _cuda_extension(),
    cmdclass={"build_ext": BuildExt},
    install_requires=["torch>=2.4", "numpy>=1.22", "pillow>=9", "tqdm>=4.60"],
    # Triton: the GPU kernels, and on CPU their interpreter tests (3.6 = the GPU machines' version, see docs/design.md §7).
    # pybind11 in "test": tests/cuda_emu builds csrc/cuda for the host SIMT emulator (where CUDA headers exist).
    extras_require={"test": ["pytest>=7", "pytest-benchmark>=4", "pybind11>=2.10", "hypothesis>=6.100",
                             "triton==3.6.0; platform_system == 'Linux' and platform_machine == 'x86_64'"],
                    "triton": ["triton>=3.6"]},
    entry_points={"console_scripts": ["analytic-diffusion=analytic_diffusion.cli:main"]},
    zip_safe=False,
)
