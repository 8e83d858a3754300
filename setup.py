"""Build script: the package, the Triton kernels (kernels/ -> analytic_diffusion.kernels) and the C++ CPU
kernels (csrc/cpu -> analytic_diffusion._cpu, pybind11, no torch headers, OpenMP where the compiler has it)."""
import os
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
    ext_modules=[cpu_ext],
    cmdclass={"build_ext": build_ext},
    install_requires=["torch>=2.4", "numpy>=1.22", "pillow>=9", "tqdm>=4.60"],
    extras_require={"test": ["pytest>=7", "pytest-benchmark>=4"]},
    entry_points={"console_scripts": ["analytic-diffusion=analytic_diffusion.cli:main"]},
    zip_safe=False,
)
