"""Backends against the float64 reference on the real (embedded) MNIST, σ from 1e-3 to 1e3."""

import pytest
import torch
from reference import noisy_images, rel

from analytic_diffusion.denoisers import make_denoiser
from analytic_diffusion.ops import knn_search, softmax_retrieval

pytestmark = pytest.mark.cpu_isa  # CI reruns these under every lower AD_CPU_ISA

SIGMAS = [1e-3, 1e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 1e2, 1e3]


@pytest.mark.parametrize("sigma", SIGMAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_cpu_kernel_matches_reference_on_mnist(mnist2000, rng, sigma, dtype):
    keys = mnist2000.keys()
    x = noisy_images(mnist2000, rng, 5, sigma).reshape(5, -1)
    ref = softmax_retrieval(x, keys, sigma, backend="torch", dtype=torch.float64)
    got = softmax_retrieval(x, keys, sigma, backend="cpu", dtype=dtype)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert torch.isfinite(got.mean).all()
    assert rel(got.mean, ref.mean) < tol
    assert torch.allclose(got.effective_neighbours.double(), ref.effective_neighbours, rtol=10 * tol)


def test_cpu_kernel_with_flips_and_labels_on_mnist(mnist2000, rng):
    keys = mnist2000.keys()
    x = noisy_images(mnist2000, rng, 4, 0.5).reshape(4, -1)
    labels = torch.tensor([0, 3, 7, 9])
    ref = softmax_retrieval(x, keys, 0.5, flips=True, query_labels=labels, backend="torch", dtype=torch.float64)
    got = softmax_retrieval(x, keys, 0.5, flips=True, query_labels=labels, backend="cpu", dtype=torch.float32)
    assert rel(got.mean, ref.mean) < 1e-4
    d_ref, i_ref = knn_search(x, keys, 3, flips=True, backend="torch", dtype=torch.float64)
    d, i = knn_search(x, keys, 3, flips=True, backend="cpu", dtype=torch.float64)
    assert torch.equal(i, i_ref) and torch.allclose(d, d_ref, rtol=1e-10)


@pytest.mark.parametrize("method", ["optimal", "topk", "nearest", "smoothed", "knn"])
def test_denoisers_agree_across_backends_on_mnist(mnist2000, rng, method):
    x = noisy_images(mnist2000, rng, 3, 0.5)
    opts = {"k": 50} if method in ("topk", "knn") else {}
    ref = make_denoiser(method, mnist2000, backend="torch", dtype=torch.float64, **opts)(x.double(), 0.5)
    got = make_denoiser(method, mnist2000, backend="cpu", dtype=torch.float32, **opts)(x, 0.5)
    assert rel(got, ref) < 1e-4
