"""Global retrieval with pytest-benchmark: PyTorch baselines vs the engine's backends on this machine's device.

    python -m pytest bench/test_bench_global.py --benchmark-only --benchmark-columns=min,median,rounds
    AD_BENCH_DIMS=3072 AD_BENCH_N=50000 python -m pytest bench/test_bench_global.py --benchmark-only   # CIFAR

Not part of the test suite (pytest's testpaths is tests/): timings belong here, correctness in tests/. The
`analytic-diffusion bench global` command runs the same paths and adds ratios and roofline floors.
Default shapes: N = 10,000 MNIST-shaped uint8 keys (D = 784), fp32, σ = 1; the device is CUDA when present.
"""

import os

import pytest
import torch

from analytic_diffusion.benchmark import baselines
from analytic_diffusion.benchmark.global_bench import PATHS, path_runner, path_unavailable
from analytic_diffusion.ops import KeyBank

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
D = int(os.environ.get("AD_BENCH_DIMS", 784))
N = int(os.environ.get("AD_BENCH_N", 10000))


@pytest.fixture(scope="module")
def data():
    u = torch.randint(0, 256, (N, D), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).to(DEVICE)
    keys = KeyBank(u, 2 / 255, -1.0)
    y = keys.rows(0, N, torch.float32, DEVICE)
    return keys, y, baselines.sdpa_inputs(y)


@pytest.mark.parametrize("batch", [1, 8, 64, 256])
@pytest.mark.parametrize("path", PATHS)
def test_global_retrieval(benchmark, data, path, batch):
    reason = path_unavailable(path, DEVICE, batch)
    if reason is not None:
        pytest.skip(reason)
    keys, y, kv = data
    q = torch.randn(batch, D, generator=torch.Generator().manual_seed(batch)).to(DEVICE)
    coef = torch.full((batch,), 0.5, device=DEVICE)
    run = path_runner(path, q, keys, y, kv, coef, 1.0, "exact")
    benchmark.group = f"global N={N} D={D} B={batch} {DEVICE.type}"

    def timed():
        out = run()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out

    out = benchmark(timed)
    assert out.shape == (batch, D) and torch.isfinite(out).all()
