"""Global retrieval on CPU: the reference torch backend vs the C++ kernel (pytest-benchmark).

    python -m pytest bench/test_bench_global.py --benchmark-only --benchmark-columns=min,median,rounds

Not part of the test suite (pytest's testpaths is tests/): timings belong here, correctness in tests/.
Shapes: the embedded MNIST test set as uint8 keys (N = 10,000, D = 784), fp32, σ = 1.
"""
import pytest
import torch

from analytic_diffusion.data import load_dataset
from analytic_diffusion.ops import softmax_retrieval


@pytest.fixture(scope="module")
def keys():
    return load_dataset("mnist").keys()


@pytest.mark.parametrize("batch", [1, 8, 64, 256])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_softmax_retrieval(benchmark, keys, backend, batch, dtype):
    x = torch.randn(batch, keys.dim, generator=torch.Generator().manual_seed(batch))
    benchmark.group = f"global N={keys.n} D={keys.dim} B={batch} {str(dtype)[6:]}"
    benchmark(softmax_retrieval, x, keys, 1.0, backend=backend, dtype=dtype)
