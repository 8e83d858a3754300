"""Shared fixtures, and the suite's randomness: every test's inputs come from one base seed and the test's id.

The base seed is ``AD_TEST_SEED``: unset, the fixed ``CI_SEED`` (CI and a plain ``pytest`` draw the same inputs
every run); an integer, that seed; ``random``, a fresh one, printed in the header and after a failure, the search
for inputs that only some draws hit (docs/contributing: run it over many seeds before a numerics change lands).
Before each test, torch's, NumPy's and Python's global generators are seeded from (base seed, test id), and the
``rng`` fixture is a torch.Generator from the same pair, so ``AD_TEST_SEED=S pytest tests/x.py::test_y`` replays
that test's inputs exactly, whatever ran before it and on whichever xdist worker; module-scoped data comes from
``module_seed`` (base seed, module). Torch runs one thread per test process (as under ``-n auto`` on 2 cores), so
a replay also sums in the same order; ``AD_TEST_THREADS`` changes that.
"""

import hashlib
import os
import random
import re
import secrets

# Triton kernels run under the CPU interpreter unless a GPU is there to compile them for (the flag is read when
# the kernel module is imported, so it is set before any test imports it). On a GPU machine export
# TRITON_INTERPRET=0 to test the compiled kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from hypothesis import HealthCheck, settings

# Property tests (tests/test_properties.py): CI runs a derandomised, bounded profile (same examples every run);
# HYPOTHESIS_PROFILE=long explores far more, with fresh examples and the example database, for local runs.
settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "long",
    max_examples=1500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# One torch thread per test process whether or not xdist runs the suite, so that a replay of one test sums in the
# same order as the CI run that failed (tests of thread-count independence set their own counts).
torch.set_num_threads(int(os.environ.get("AD_TEST_THREADS", "1")))

MAX_AUTO_WORKERS = 4  # `-n auto` (the README's test command): one worker per core, at most this many


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """Workers for ``-n auto``: $PYTEST_XDIST_AUTO_NUM_WORKERS if set, else the usable cores, capped (the suite's
    longest tests take ~30 s each, so more workers than this mostly wait; every worker loads torch and Triton)."""
    env = os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS")
    if env:
        return int(env)
    return max(1, min(MAX_AUTO_WORKERS, _cores()))


CI_SEED = 20261208  # the base seed of CI and of a plain run: same inputs every time


def _base_seed() -> int:
    env = os.environ.get("AD_TEST_SEED", "").strip()
    if not env:
        return CI_SEED
    if env == "random":
        return secrets.randbelow(2**31)
    try:
        return int(env)
    except ValueError:
        raise pytest.UsageError(f"AD_TEST_SEED: expected an integer or 'random', got {env!r}") from None


BASE_SEED = _base_seed()


def seed_for(key: str) -> int:
    """A 63-bit seed from the base seed and ``key`` (a test's or module's id): the same pair, the same seed."""
    digest = hashlib.blake2b(f"{BASE_SEED}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """pytest-xdist: every worker uses the controller's base seed (a ``random`` one is drawn once)."""
    node.workerinput["ad_test_seed"] = BASE_SEED


def pytest_configure(config):
    global BASE_SEED
    worker_input = getattr(config, "workerinput", None)
    if worker_input is not None and "ad_test_seed" in worker_input:
        BASE_SEED = int(worker_input["ad_test_seed"])
    isa = os.environ.get("AD_CPU_ISA")
    if isa:  # a path this CPU cannot run would be replaced by a narrower one: refuse, so no run tests the wrong path
        from analytic_diffusion.ops import cpu_backend

        runnable = cpu_backend.runnable_isas() if cpu_backend.available() else ("base",)
        if isa not in runnable:
            raise pytest.UsageError(f"AD_CPU_ISA={isa}: this CPU and build run {', '.join(runnable)}")


def pytest_report_header(config):
    return f"analytic-diffusion test seed: AD_TEST_SEED={BASE_SEED}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    # `pytest -q` (CI) prints no header: repeat the seed at the end, where a failure's reader looks (and after a
    # passing fresh-seed run, so that the seeds a search covered are on record).
    if exitstatus != 0 or os.environ.get("AD_TEST_SEED", "").strip() == "random":
        terminalreporter.write_line(
            f"replay this run's random inputs with AD_TEST_SEED={BASE_SEED} (and AD_CPU_ISA as this run had it, if set)"
        )


# A skip in CI must have a reason CI accepts (no GPU here, an instruction set this CPU lacks): AD_TEST_ALLOWED_SKIPS
# is a regular expression (.ci/run sets it); any other skip, such as a missing test dependency, fails the run.
_UNEXPECTED_SKIPS = []


def _note_skip(report):
    allowed = os.environ.get("AD_TEST_ALLOWED_SKIPS")
    if not allowed or not report.skipped or getattr(report, "wasxfail", None) is not None:
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if not re.search(allowed, reason):
        _UNEXPECTED_SKIPS.append(f"{report.nodeid}: {reason}")


def pytest_runtest_logreport(report):
    _note_skip(report)
    _record_outcome(report)


def _record_outcome(report):
    """AD_TEST_OUTCOMES=FILE appends one line per test: instruction-set cap, test id, outcome (how two CI runs are
    compared for identical outcomes). Written once, by the process that reports (the xdist controller)."""
    path = os.environ.get("AD_TEST_OUTCOMES")
    if not path or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    if report.when == "call" or (report.when != "call" and report.outcome != "passed"):
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(f"{os.environ.get('AD_CPU_ISA', '-')} {report.nodeid} {report.outcome}\n")


def pytest_collectreport(report):
    _note_skip(report)


def pytest_sessionfinish(session, exitstatus):
    if _UNEXPECTED_SKIPS and not hasattr(session.config, "workerinput"):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        lines = [f"skips outside AD_TEST_ALLOWED_SKIPS={os.environ['AD_TEST_ALLOWED_SKIPS']!r}:"]
        lines += sorted(set(_UNEXPECTED_SKIPS))
        if reporter is not None:
            for line in lines:
                reporter.write_line(line, red=True)


@pytest.fixture(autouse=True)
def _seeded_globals(request):
    """torch's, NumPy's and Python's global generators, seeded from (base seed, test id) before every test."""
    import numpy as np

    seed = seed_for(request.node.nodeid)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 (the legacy global generator is what tests draw from)
    random.seed(seed)


@pytest.fixture
def rng(request):
    """A torch.Generator per test, from (base seed, test id); independent of the global one."""
    return torch.Generator().manual_seed(seed_for("rng:" + request.node.nodeid))


@pytest.fixture(scope="module")
def module_seed(request):
    """A seed for module-scoped data, from (base seed, module): the same whichever test of it runs first."""
    return seed_for("module:" + request.node.nodeid)


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


# The C++ backend's parameter carries the ``cpu_isa`` mark: CI reruns it under every lower instruction set.
FUSED_BACKENDS = ["triton", "cuda", pytest.param("cpu", marks=pytest.mark.cpu_isa)]


@pytest.fixture(params=FUSED_BACKENDS)
def fused(request):
    """(backend name, device) of each fused local-family backend: Triton (the interpreter on CPU), CUDA (the real
    extension on a GPU, else the host emulation of the same sources on CPU tensors), and the C++ CPU kernel."""
    return _fused_backend(request)


@pytest.fixture(params=FUSED_BACKENDS)
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
        pytest.fail(
            f"this machine has a GPU but backend 'cuda' is unavailable: {cuda_backend.unavailable_reason()}",
            pytrace=False,
        )
    monkeypatch.setattr(cuda_backend, "_cuda", request.getfixturevalue("emulated_cuda"))
    monkeypatch.setattr(cuda_backend, "_REASON", None)
    return SimpleNamespace(name="cuda", device=torch.device("cpu"))
