"""Second-order quantities in float32 and float64 against float64 brute forces (docs/design.md §13.4): Jacobian
products of optimal, topk and smoothed (``den.jvp`` and autograd's vector-Jacobian product) where the posterior has
collapsed (J = 0) and where it is spread, and the posterior variance (``posterior_moments``, optimal-draw's noise
mode) at gaps of 0 … 60 nats between the two best candidates. Errors stay within the working precision's own
conditioning: ``reference.float32_tolerance``, how far rounding the input moves the float64 answer."""

import pytest
import torch
from reference import float32_tolerance, moments_bruteforce, row_rel, uint8_bank

from analytic_diffusion.data import load_array
from analytic_diffusion.denoisers import make_denoiser
from analytic_diffusion.denoisers.posterior_sample import posterior_moments
from analytic_diffusion.denoisers.sample_seeds import row_generators, sample_identity

SHAPE = (1, 6, 8)
# topk and the smoothed/optimal denoisers reach the C++ kernels (k-NN screen, subset sums, auto retrieval)
pytestmark = pytest.mark.cpu_isa


@pytest.fixture
def data(rng):
    """Random uint8 rows (1, 6, 8); rows 5 and 9 (the two candidates of the gap queries) agree on 8 pixels, where
    their posterior variance is exactly 0 (a square root turns u·y² of rounding there into √u·|y|)."""
    bank = uint8_bank(rng, 300, *SHAPE)
    bank.values[9, :8] = bank.values[5, :8]
    return bank, load_array(bank.values.reshape(-1, *SHAPE))


def _jvp_and_vjp(den, x, sigma, v):
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(den(xr, sigma), xr, v)
    return den.jvp(x, sigma, v), g


@pytest.mark.parametrize(
    "method, options",
    [("optimal", {}), ("topk", {"k": 20}), ("smoothed", {"smoothing": 0.01, "num_perturbations": 2})],
)
@pytest.mark.parametrize("sigma", [1e-3, 1e-2, 1.0, 3.0])  # collapsed (J = 0 to float64) and spread posteriors
def test_float32_jacobian_products_track_float64(data, rng, method, options, sigma):
    bank, ds = data
    y = bank.rows(0, 4, torch.float64).reshape(4, *SHAPE)
    x = (y + sigma * torch.randn(y.shape, generator=rng, dtype=torch.float64)).float()
    v = torch.randn(x.shape, generator=rng)
    d32 = make_denoiser(method, ds, dtype=torch.float32, **options)
    d64 = make_denoiser(method, ds, dtype=torch.float64, **options)
    ref = d64.jvp(x.double(), sigma, v.double())
    # J·v in float64 at inputs moved by float32 rounding: where J = 0 it stays 0, and so must float32's
    tol = float32_tolerance(lambda xi: d64.jvp(xi, sigma, v.double()), x.double(), ref)
    scale = ref.flatten(1).norm(dim=1)
    for got in _jvp_and_vjp(d32, x, sigma, v):
        err = (got.double() - ref).flatten(1).norm(dim=1)
        assert bool((err <= tol * scale).all()), (method, sigma, (err / v.flatten(1).norm(dim=1)).tolist())
    if sigma <= 1e-2:  # collapsed: the exact Jacobian vanishes, and both float32 products are exactly 0
        assert float(scale.max()) == 0.0


def _two_candidate_queries(bank, sigma, gaps):
    """Queries on the segment between rows 5 and 9 whose logits differ by ``gap`` nats (the rest are far)."""
    y = bank.rows(0, bank.n, torch.float64)
    d = y[9] - y[5]
    coef = 1.0 / (2.0 * sigma**2)
    return torch.stack([y[5] + 0.5 * (1.0 - g / (coef * float(d @ d))) * d for g in gaps]).float()


GAPS = (0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0)


@pytest.mark.parametrize("sigma", [0.3, 0.05])
def test_variance_at_gaps_up_to_60_nats(data, sigma):
    """Var[x0 | x] = w₁w₂(y₁ − y₂)² at a gap g has size e^{−g}: the old centring on the dataset mean left
    u·‖y − c‖² of it, 100% wrong at 20 nats in float32 and 40 in float64."""
    bank, _ = data
    x = _two_candidate_queries(bank, sigma, GAPS)
    y = bank.rows(0, bank.n, torch.float64)
    s = torch.full((x.shape[0],), sigma, dtype=torch.float64)

    def var64(xi):
        return moments_bruteforce(xi, y, s)[1]

    ref = var64(x.double())
    for dtype, eps, base in ((torch.float32, 2.0**-20, 1e-4), (torch.float64, 2.0**-48, 1e-10)):
        got = posterior_moments(x, bank, sigma, dtype=dtype)[1].double()
        tol = float32_tolerance(var64, x.double(), ref, base=base, eps=eps)
        assert bool((row_rel(got, ref) <= tol).all()), (dtype, row_rel(got, ref).tolist(), tol.tolist())


def test_noise_mode_samples(data):
    """optimal-draw with mode 'noise': mean + λ·sqrt(Var)·ξ against the brute force with the same ξ."""
    bank, ds = data
    sigma = 0.3
    x = _two_candidate_queries(bank, sigma, GAPS).reshape(-1, *SHAPE)
    s = torch.full((x.shape[0],), sigma, dtype=torch.float64)
    y = bank.rows(0, bank.n, torch.float64)
    ids = list(range(x.shape[0]))  # each row its own sample, as a sampler keys them: distinct draws per row
    with sample_identity(ids):
        gens = row_generators("optimal-draw", 0, s, None)
    xi = torch.stack([torch.randn(bank.dim, generator=g, dtype=torch.float64) for g in gens])

    def sample64(q):
        m, v = moments_bruteforce(q.reshape(q.shape[0], -1), y, s)
        return m + v.sqrt() * xi

    ref = sample64(x.double())
    for dtype, eps, base in ((torch.float32, 2.0**-20, 2e-6), (torch.float64, 2.0**-48, 1e-12)):
        den = make_denoiser("optimal-draw", ds, mode="noise", scale=1.0, dtype=dtype)
        with sample_identity(ids):
            got = den(x.to(dtype), sigma).reshape(x.shape[0], -1)
        tol = float32_tolerance(sample64, x.double(), ref, base=base, eps=eps)
        assert bool((row_rel(got, ref) <= tol).all()), (dtype, row_rel(got, ref).tolist(), tol.tolist())
