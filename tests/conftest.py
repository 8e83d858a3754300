"""Shared fixtures: fresh random data every run (seeded per test for reproducible failures)."""
import os

# Triton kernels run under the CPU interpreter unless a GPU is there to compile them for (the flag is read when
# the kernel module is imported, so it is set before any test imports it). On a GPU machine export
# TRITON_INTERPRET=0 to test the compiled kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


# Fresh inputs on every run; set AD_TEST_SEED to replay a failing run (the header prints the seed).
SESSION_SEED = int(os.environ.get("AD_TEST_SEED", torch.seed() % (2**31)))


def pytest_report_header(config):
    return f"analytic-diffusion test seed: AD_TEST_SEED={SESSION_SEED}"


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
