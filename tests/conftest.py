"""Shared fixtures: fresh random data every run (seeded per test for reproducible failures)."""
import os

# Triton kernels run under the CPU interpreter unless a GPU is there to compile them for (the flag is read when
# the kernel module is imported, so it is set before any test imports it). On a GPU machine export
# TRITON_INTERPRET=0 to test the compiled kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Property tests (tests/test_properties.py): CI runs a derandomised, bounded profile (same examples every run);
# HYPOTHESIS_PROFILE=long explores far more, with fresh examples and the example database, for local runs.
settings.register_profile("ci", derandomize=True, database=None, max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                          print_blob=True)
settings.register_profile("long", max_examples=1500, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                          print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# Two threads per process at most; under pytest-xdist the workers share the cores (2 workers on 2 cores: 1 each).
torch.set_num_threads(max(1, min(2, _cores() // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))))

MAX_AUTO_WORKERS = 4  # `-n auto` (the README's test command): one worker per core, at most this many


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """Workers for ``-n auto``: $PYTEST_XDIST_AUTO_NUM_WORKERS if set, else the usable cores, capped (the suite's
    longest tests take ~30 s each, so more workers than this mostly wait; every worker loads torch and Triton)."""
    env = os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS")
    if env:
        return int(env)
    return max(1, min(MAX_AUTO_WORKERS, _cores()))


# Fresh inputs on every run; set AD_TEST_SEED to replay a failing run (the header prints the seed).
SESSION_SEED = int(os.environ.get("AD_TEST_SEED", torch.seed() % (2**31)))


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """pytest-xdist: every worker draws from the controller's seed (the one the summary prints)."""
    node.workerinput["ad_test_seed"] = SESSION_SEED


def pytest_configure(config):
    global SESSION_SEED
    worker_input = getattr(config, "workerinput", None)
    if worker_input is not None and "ad_test_seed" in worker_input:
        SESSION_SEED = int(worker_input["ad_test_seed"])


def pytest_report_header(config):
    return f"analytic-diffusion test seed: AD_TEST_SEED={SESSION_SEED}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    # `pytest -q` (CI) prints no header: repeat the seed at the end, where a failure's reader looks.
    if exitstatus != 0:
        terminalreporter.write_line(f"replay this run's random inputs with AD_TEST_SEED={SESSION_SEED}")


@pytest.fixture
def rng(request):
    """A generator per test, from the session seed and the test's name."""
    import zlib
    return torch.Generator().manual_seed(SESSION_SEED ^ zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Statistics caches go to a per-test folder, never to the user's home."""
    monkeypatch.setenv("AD_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def mnist2000():
    """2000 random images of the embedded MNIST test set (fixed subset: the backends are compared on it)."""
    from analytic_diffusion.data import load_dataset
    return load_dataset("mnist").subset(2000, random=True, seed=7)


@pytest.fixture(scope="session")
def emulated_cuda():
    """csrc/cuda built for the host SIMT emulator (tests/cuda_emu): the real kernels on CPU tensors, for logic
    checks on machines without a GPU. Skips (with the reason) where it cannot be built. The build is cached by a
    hash of its sources (tests/cuda_emu/build.py: ~/.cache/analytic_diffusion/cuda_emu, or $AD_CUDA_EMU_CACHE),
    built once under a file lock however many xdist workers ask for it."""
    from cuda_emu import build
    reason = build.unavailable_reason()
    if reason is not None:
        pytest.skip(f"CUDA host emulation unavailable: {reason}")
    return build.cached_build()


@pytest.fixture
def cpu_kernels(monkeypatch):
    """The C++ extension (a failure, not a skip, where it is not built: the package builds it everywhere), with the
    local-family kernels' outputs filled with NaN before every call, so that a slot left unwritten shows."""
    from analytic_diffusion.ops import cpu_backend
    if not cpu_backend.available():
        pytest.fail("the C++ extension analytic_diffusion._cpu is not built (pip install -e .)", pytrace=False)
    monkeypatch.setattr(cpu_backend, "poison_outputs", True)
    return cpu_backend._cpu


@pytest.fixture(params=["triton", "cuda", "cpu"])
def fused(request):
    """(backend name, device) of each fused local-family backend: Triton (the interpreter on CPU), CUDA (the real
    extension on a GPU, else the host emulation of the same sources on CPU tensors), and the C++ CPU kernel."""
    return _fused_backend(request)


@pytest.fixture(params=["triton", "cuda", "cpu"])
def coordinate_fused(request):
    """(backend name, device) of pca_locality's fused backends, as ``fused``."""
    return _fused_backend(request)


def _fused_backend(request):
    from types import SimpleNamespace
    from analytic_diffusion.ops import cpu_backend, triton_backend
    if request.param == "cpu":
        if not cpu_backend.available():
            pytest.fail("the C++ extension analytic_diffusion._cpu is not built (pip install -e .)")
        return SimpleNamespace(name="cpu", device=torch.device("cpu"))
    if request.param == "triton":
        if triton_backend.interpreting():
            return SimpleNamespace(name="triton", device=torch.device("cpu"))
        if not torch.cuda.is_available():
            pytest.skip("Triton kernels need a CUDA device or TRITON_INTERPRET=1")
        return SimpleNamespace(name="triton", device=torch.device("cuda"))
    return request.getfixturevalue("cuda_fused")


@pytest.fixture
def cuda_fused(request, monkeypatch):
    """(``"cuda"``, device): the built CUDA extension on a GPU, else csrc/cuda under the host emulator on CPU."""
    from types import SimpleNamespace
    from analytic_diffusion.ops import cuda_backend
    if cuda_backend.available() and not cuda_backend._emulated():
        return SimpleNamespace(name="cuda", device=torch.device("cuda"))
    if torch.cuda.is_available():  # a GPU machine without its CUDA kernels: fail, never fall back to the emulator
        pytest.fail(f"this machine has a GPU but backend 'cuda' is unavailable: {cuda_backend.unavailable_reason()}",
                    pytrace=False)
    monkeypatch.setattr(cuda_backend, "_cuda", request.getfixturevalue("emulated_cuda"))
    monkeypatch.setattr(cuda_backend, "_REASON", None)
    return SimpleNamespace(name="cuda", device=torch.device("cpu"))
