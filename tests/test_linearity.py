"""Linear distillation and the linearity score (Li, Dai & Qu) on known affine and non-linear denoisers."""

import math

import pytest
import torch

from analytic_diffusion.data import Dataset
from analytic_diffusion.denoisers import make_denoiser
from analytic_diffusion.metrics import fit_linear_denoiser, linearity_score, wiener_distance, wiener_matrix


@pytest.fixture
def tiny(rng):
    return Dataset.from_array(torch.rand(40, 1, 4, 4, generator=rng) * 2 - 1)


def test_fit_recovers_a_known_affine_map(rng):
    d = 12
    W = torch.randn(d, d, generator=rng, dtype=torch.float64)
    b = torch.randn(d, generator=rng, dtype=torch.float64)

    def affine(x, sigma, **kw):
        return (x.reshape(x.shape[0], -1).double() @ W.T + b).reshape(x.shape)

    probes = torch.rand(20, 1, 3, 4, generator=rng) * 2 - 1
    fit = fit_linear_denoiser(affine, 0.7, probes, n_noise=3, dtype=torch.float64)
    assert fit.num_samples == 60 and fit.ridge == 0.0
    torch.testing.assert_close(fit.W, W, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(fit.b, b, rtol=1e-9, atol=1e-9)
    assert fit.r2 == pytest.approx(1.0, abs=1e-12)
    x = torch.randn(4, 1, 3, 4, generator=rng, dtype=torch.float64)
    torch.testing.assert_close(fit(x), affine(x, None))


def test_fit_underdetermined_uses_a_small_ridge(rng):
    d = 16
    W = torch.randn(d, d, generator=rng, dtype=torch.float64)

    def linear(x, sigma, **kw):
        return (x.reshape(x.shape[0], -1).double() @ W.T).reshape(x.shape)

    probes = torch.rand(6, 1, 4, 4, generator=rng) * 2 - 1  # 6 samples in 16 dimensions
    fit = fit_linear_denoiser(linear, 0.5, probes, dtype=torch.float64)
    assert fit.ridge > 0
    assert fit.r2 > 0.999  # it still reproduces the outputs on the probes


def test_wiener_fit_is_the_wiener_matrix(tiny):
    wiener = make_denoiser("wiener", tiny, dtype=torch.float64)
    probes = tiny.images_float()
    for sigma in (0.1, 0.8, 5.0):
        fit = fit_linear_denoiser(wiener, sigma, probes, n_noise=2, seed=3, dtype=torch.float64)
        dist = wiener_distance(fit.W, fit.b, tiny, sigma)
        assert dist["matrix"] < 1e-8 and dist["bias"] < 1e-8 and dist["outputs"] < 1e-8, dist
        assert fit.r2 == pytest.approx(1.0, abs=1e-10)
    # the closed-form Wiener matrix itself reproduces the denoiser
    Ww, bw = wiener_matrix(tiny, 0.8)
    x = tiny.images_float(dtype=torch.float64)[:5] + 0.8
    torch.testing.assert_close(
        (x.reshape(5, -1) @ Ww.T + bw).reshape(x.shape), wiener(x, torch.full((5,), 0.8, dtype=torch.float64))
    )


def test_optimal_at_small_sigma_is_far_from_linear(tiny):
    optimal = make_denoiser("optimal", tiny, dtype=torch.float64)
    probes = tiny.images_float()
    fit = fit_linear_denoiser(optimal, 0.3, probes, n_noise=2, dtype=torch.float64)
    dist = wiener_distance(fit.W, fit.b, tiny, 0.3)
    assert dist["outputs"] > 1e-3


def test_linearity_score_orders_linear_and_non_linear(tiny, rng):
    x = tiny.images_float()
    x1, x2 = x[:20], x[20:]
    wiener = make_denoiser("wiener", tiny, dtype=torch.float64)
    optimal = make_denoiser("optimal", tiny, dtype=torch.float64)
    center = tiny.mean().reshape(tiny.image_shape)
    sigma = 0.05
    # relative to the data mean the (affine) Wiener denoiser is exactly linear
    assert linearity_score(wiener, x1, x2, sigma, center=center, dtype=torch.float64) == pytest.approx(1, abs=1e-9)
    lin_w = linearity_score(wiener, x1, x2, sigma, dtype=torch.float64)
    lin_o, per = linearity_score(optimal, x1, x2, sigma, dtype=torch.float64, per_pair=True)
    assert per.shape == (20,) and lin_o == pytest.approx(float(per.mean()))
    assert lin_o < lin_w - 0.2, (lin_o, lin_w)
    # a purely linear map scores exactly 1 in the uncentred form
    assert linearity_score(lambda y, s, **kw: 3 * y, x1, x2, sigma) == pytest.approx(1.0, abs=1e-6)


def test_bad_inputs():
    with pytest.raises(ValueError, match="sigma"):
        fit_linear_denoiser(lambda x, s: x, 0.0, torch.zeros(2, 1, 2, 2))
    with pytest.raises(ValueError, match="n_noise"):
        fit_linear_denoiser(lambda x, s: x, 1.0, torch.zeros(2, 1, 2, 2), n_noise=0)
    with pytest.raises(ValueError, match="shapes differ"):
        linearity_score(lambda x, s: x, torch.zeros(2, 1, 2, 2), torch.zeros(3, 1, 2, 2), 1.0)
    assert math.isfinite(linearity_score(lambda x, s: x, torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2), 1.0))
