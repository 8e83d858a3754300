"""Denoiser Jacobians: exact posterior-covariance Jacobians against finite differences, Lanczos against eigh."""

import pytest
import torch

from analytic_diffusion.analysis import (
    effective_dimensionality,
    jacobian_matrix,
    jacobian_rows,
    jacobian_spectrum,
    lanczos,
)
from analytic_diffusion.data import Dataset
from analytic_diffusion.denoisers import make_denoiser
from analytic_diffusion.networks import EDMAdapter


def small_data(rng, n=40, shape=(1, 3, 4), labels=True):
    x = torch.rand(n, *shape, generator=rng) * 2 - 1
    lab = torch.randint(0, 3, (n,), generator=rng) if labels else None
    return Dataset.from_array(x, lab)


def finite_difference_jacobian(f, x, h=1e-5):
    flat = x.reshape(-1)
    cols = []
    for i in range(flat.numel()):
        e = torch.zeros_like(flat)
        e[i] = h
        cols.append(((f((flat + e).reshape(x.shape)) - f((flat - e).reshape(x.shape))) / (2 * h)).reshape(-1))
    return torch.stack(cols, 1)


@pytest.mark.parametrize(
    "sigma,flips,temperature,label",
    [(0.4, False, 1.0, None), (0.8, True, 1.0, None), (0.3, False, 2.0, None), (0.6, False, 1.0, 1)],
)
def test_optimal_jacobian_is_the_posterior_covariance(rng, sigma, flips, temperature, label):
    ds = small_data(rng)
    den = make_denoiser("optimal", ds, dtype=torch.float64, backend="torch", flips=flips, temperature=temperature)
    x = torch.randn(1, *ds.image_shape, generator=rng, dtype=torch.float64) * 0.5
    kw = {} if label is None else {"class_labels": torch.tensor([label])}
    fd = finite_difference_jacobian(lambda v: den(v, sigma, **kw), x)
    J = jacobian_matrix(den, x, sigma, class_label=label)
    assert torch.allclose(J, J.t(), atol=1e-14)  # a covariance: symmetric
    assert (J - fd).norm() / fd.norm() < 1e-6
    assert float(torch.linalg.eigvalsh(J).min()) > -1e-12  # and positive semi-definite


def test_wiener_jacobian_matches_autograd(rng):
    ds = small_data(rng, labels=False)
    den = make_denoiser("wiener", ds, dtype=torch.float64)
    x = torch.randn(1, *ds.image_shape, generator=rng, dtype=torch.float64)
    auto = torch.autograd.functional.jacobian(lambda v: den(v.reshape(x.shape), 0.7).reshape(-1), x.reshape(-1))
    assert torch.allclose(jacobian_matrix(den, x, 0.7), auto, atol=1e-12)


def test_lanczos_finds_the_top_of_a_symmetric_spectrum(rng):
    A = torch.randn(60, 60, generator=rng, dtype=torch.float64)
    A = A @ A.t() / 60
    vals, vecs = lanczos(lambda v: A @ v, 60, 5, iters=60)
    ref = torch.linalg.eigvalsh(A).flip(0)[:5]
    assert torch.allclose(vals, ref, rtol=1e-9, atol=1e-12)
    assert torch.allclose(A @ vecs, vecs * vals, atol=1e-8)
    with pytest.raises(ValueError, match="k"):
        lanczos(lambda v: A @ v, 60, 0)


def tiny_network(rng, shape=(1, 4, 4)):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(4, 1, 3, padding=1))
    net = net.double()
    return EDMAdapter(
        lambda x, c_noise: net(x) * (1 + c_noise.view(-1, 1, 1, 1)), shape, precondition=True, dtype=torch.float64
    )


def test_network_jacobian_by_autograd_and_lanczos(rng):
    den = tiny_network(rng)
    x = torch.randn(1, 1, 4, 4, generator=rng, dtype=torch.float64)
    J = jacobian_matrix(den, x, 0.9)
    fd = finite_difference_jacobian(lambda v: den(v, 0.9), x)
    assert (J - fd).norm() / fd.norm() < 1e-6
    sym = (J + J.t()) / 2
    ref = torch.linalg.eigvalsh(sym).flip(0)[:4]
    sp = jacobian_spectrum(den, x, 0.9, k=4, method="lanczos", iters=16)  # 16 = D: exact in exact arithmetic
    assert sp.method == "lanczos" and torch.allclose(sp.eigenvalues, ref, atol=1e-8)
    assert jacobian_spectrum(den, x, 0.9, k=4, method="exact").method == "autograd"
    rows = jacobian_rows(den, x, 0.9, [0, 5, 15])
    assert torch.allclose(rows.reshape(3, -1), J[[0, 5, 15]], atol=1e-12)


def test_wiener_spectrum_and_effective_dimensionality(rng):
    ds = small_data(rng, labels=False)
    den = make_denoiser("wiener", ds, dtype=torch.float64)
    x = torch.zeros(1, *ds.image_shape, dtype=torch.float64)
    lam = den.eigvals.double()
    for s in (0.1, 1.0):
        sp = jacobian_spectrum(den, x, s, k=3)
        want = (lam / (lam + s * s)).sort(descending=True).values
        assert sp.method == "exact" and torch.allclose(sp.eigenvalues, want[:3], atol=1e-12)
        assert abs(sp.trace - float(want.sum())) < 1e-10
        lz = jacobian_spectrum(den, x, s, k=3, method="lanczos", iters=12)  # through autograd on D(x, σ)
        assert torch.allclose(lz.eigenvalues, want[:3], atol=1e-8)
    curve = effective_dimensionality(den, x, [0.05, 0.5, 5.0])
    traces = [r["trace"] for r in curve["rows"]]
    assert traces[0] > traces[1] > traces[2] > 0


def test_jacobian_inputs_are_checked(rng):
    den = make_denoiser("wiener", small_data(rng, labels=False))
    x = torch.zeros(1, 1, 3, 4)
    with pytest.raises(ValueError, match="sigma"):
        jacobian_spectrum(den, x, 0.0)
    with pytest.raises(ValueError, match="k"):
        jacobian_spectrum(den, x, 1.0, k=13)
    with pytest.raises(ValueError, match="method"):
        jacobian_spectrum(den, x, 1.0, method="power")
    with pytest.raises(ValueError, match="x: expected one image"):
        jacobian_spectrum(den, torch.zeros(2, 1, 3, 4), 1.0)
    with pytest.raises(ValueError, match="pixels"):
        jacobian_rows(den, x, 1.0, [12])
