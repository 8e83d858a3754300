"""Global denoisers: identities between methods, limits, numerics at extreme σ, and clear errors."""

import pytest
import torch
from reference import float32_tolerance, posterior_bruteforce, rel, row_rel

from analytic_diffusion.data.dataset import Dataset
from analytic_diffusion.denoisers import DENOISERS, make_denoiser

SHAPE = (2, 4, 5)


def make_dataset(rng, n=97, labels=True, near_one=False):
    if near_one:  # every pixel near +1 (uint8 250..255): the expanded distance cancels badly
        u = torch.randint(250, 256, (n,) + SHAPE, generator=rng, dtype=torch.uint8)
    else:
        u = torch.randint(0, 256, (n,) + SHAPE, generator=rng, dtype=torch.uint8)
    lab = torch.randint(0, 3, (n,), generator=rng) if labels else None
    return Dataset.from_array(u, lab)


def queries(rng, ds, b=4, noise=0.3):
    idx = torch.randint(0, ds.num_stored, (b,), generator=rng)
    x = ds.images_float(idx, torch.float64)
    return (x + noise * torch.randn(x.shape, generator=rng, dtype=torch.float64)).float()


def candidates(ds):
    return ds.images_float(None, torch.float64).reshape(ds.num_stored, -1)


@pytest.mark.parametrize("sigma", [1e-3, 0.2, 1.0, 50.0])
def test_optimal_is_the_posterior_mean(rng, sigma):
    ds = make_dataset(rng)
    x = queries(rng, ds)
    ref, wmax, neff = posterior_bruteforce(x.reshape(4, -1), candidates(ds), torch.full((4,), sigma))
    den = make_denoiser("optimal", ds, dtype=torch.float64)
    p = den.posterior(x, sigma)
    assert rel(p.mean.reshape(4, -1), ref) < 1e-6  # output cast to x's float32
    assert torch.allclose(p.max_weight, wmax, rtol=1e-9) and torch.allclose(p.effective_neighbours, neff, rtol=1e-9)


def test_topk_with_k_equal_n_is_optimal(rng):
    ds = make_dataset(rng)
    x = queries(rng, ds)
    for sigma in (0.05, 0.5, 5.0):
        opt = make_denoiser("optimal", ds, dtype=torch.float64)(x.double(), sigma)
        top = make_denoiser("topk", ds, k=ds.n, dtype=torch.float64)(x.double(), sigma)
        assert rel(top, opt) < 1e-10


def test_topk_restricts_to_nearest(rng):
    ds = make_dataset(rng)
    x = queries(rng, ds)
    y = candidates(ds)
    d = ((x.reshape(4, 1, -1).double() - y[None]) ** 2).sum(-1)
    near = torch.argsort(d, 1)[:, :5]
    allowed = torch.zeros_like(d, dtype=torch.bool).scatter_(1, near, True)
    ref, _, _ = posterior_bruteforce(x.reshape(4, -1), y, torch.full((4,), 2.0), allowed=allowed)
    top = make_denoiser("topk", ds, k=5, dtype=torch.float64)(x.double(), 2.0)
    assert rel(top.reshape(4, -1), ref) < 1e-10


def test_knn_with_k_equal_n_is_optimal(rng):
    ds = make_dataset(rng)
    x = queries(rng, ds).double()
    opt = make_denoiser("optimal", ds, dtype=torch.float64)(x, 0.7)
    knn = make_denoiser("knn", ds, k=ds.n, ref_size=16, dtype=torch.float64)(x, 0.7)
    assert rel(knn, opt) < 1e-10


def test_knn_tail_estimate_is_close_and_seeded(rng):
    ds = make_dataset(rng, n=400)
    x = queries(rng, ds).double()
    opt = make_denoiser("optimal", ds, dtype=torch.float64)(x, 3.0)
    a = make_denoiser("knn", ds, k=50, ref_size=300, seed=1, dtype=torch.float64)(x, 3.0)
    b = make_denoiser("knn", ds, k=50, ref_size=300, seed=1, dtype=torch.float64)(x, 3.0)
    assert torch.equal(a, b)
    # 350 of 400 candidates seen, 50 estimated: far closer to the truth than dropping the tail.
    top = make_denoiser("topk", ds, k=50, dtype=torch.float64)(x, 3.0)
    assert (a - opt).norm() < 0.3 * (top - opt).norm()


def test_smoothed_with_zero_scale_is_optimal(rng):
    ds = make_dataset(rng)
    x = queries(rng, ds).double()
    opt = make_denoiser("optimal", ds, dtype=torch.float64)(x, 0.4)
    sm = make_denoiser("smoothed", ds, smoothing=0.0, num_perturbations=3, dtype=torch.float64)(x, 0.4)
    assert rel(sm, opt) < 1e-12


def test_smoothed_averages_optimal_over_its_own_draws(rng):
    ds = make_dataset(rng)
    x = queries(rng, ds).double()
    sm = make_denoiser("smoothed", ds, smoothing=0.3, num_perturbations=4, seed=5, dtype=torch.float64)
    from analytic_diffusion.denoisers.sample_seeds import row_generators

    gens = row_generators("smoothed", 5, torch.full((x.shape[0],), 0.2, dtype=torch.float64))
    xi = torch.stack([torch.randn((4,) + tuple(x.shape[1:]), generator=g, dtype=torch.float64) for g in gens], 1)
    opt = make_denoiser("optimal", ds, dtype=torch.float64)
    ref = torch.stack([opt(x + 0.3 * xi[m], 0.2) for m in range(4)]).mean(0)
    assert rel(sm(x, 0.2), ref) < 1e-12


def test_optimal_limits(rng):
    ds = make_dataset(rng)
    x = queries(rng, ds, noise=1.0)
    opt = make_denoiser("optimal", ds)
    near = make_denoiser("nearest", ds)
    assert torch.allclose(opt(x, 1e-4), near(x, 1.0), atol=1e-6)
    mean = candidates(ds).mean(0).reshape(SHAPE).float()
    assert torch.allclose(opt(x, 1e4), mean.expand_as(x), atol=1e-5)
    p = opt.posterior(x, 1e4)
    assert torch.allclose(p.effective_neighbours, torch.full((4,), float(ds.n)), rtol=1e-3)


def test_wiener_on_gaussian_data_is_the_true_posterior_mean(rng):
    d = 6
    A = torch.randn(d, d, generator=rng, dtype=torch.float64) * 0.1
    mu = 0.1 * torch.randn(d, generator=rng, dtype=torch.float64)
    data = mu + torch.randn(200000, d, generator=rng, dtype=torch.float64) @ A.t()
    c = float(data.abs().max())  # rescale into [-1, 1] exactly (clamping would change the covariance)
    data, A, mu = data / c, A / c, mu / c
    ds = Dataset.from_array(data.float().reshape(-1, 1, 2, 3))
    wien = make_denoiser("wiener", ds, dtype=torch.float64)
    x = mu + torch.randn(5, d, generator=rng, dtype=torch.float64) * 0.3
    for sigma in (0.01, 0.1, 1.0, 10.0):
        cov = A @ A.t()
        ref = mu + (cov @ torch.linalg.solve(cov + sigma**2 * torch.eye(d, dtype=torch.float64), (x - mu).t())).t()
        out = wien(x.reshape(5, 1, 2, 3), sigma).reshape(5, d)
        # Sampling error of 2e5 draws (μ̂ is ~1e-3 off), measured against the query's own scale.
        assert (out - ref).norm() < 0.01 * (x - mu).norm()


def test_wiener_equals_explicit_filter_with_sample_moments_and_rank(rng):
    ds = make_dataset(rng, n=300, labels=False)
    y = candidates(ds)
    mu = y.mean(0)
    cov = (y - mu).t() @ (y - mu) / y.shape[0]
    x = queries(rng, ds).double()
    full = make_denoiser("wiener", ds, dtype=torch.float64)(x, 0.5).reshape(4, -1)
    ref = (
        mu
        + (cov @ torch.linalg.solve(cov + 0.25 * torch.eye(40, dtype=torch.float64), (x.reshape(4, -1) - mu).t())).t()
    )
    assert rel(full, ref) < 1e-8
    lam, U = torch.linalg.eigh(cov)
    U3 = U[:, -3:]
    ref3 = mu + ((x.reshape(4, -1) - mu) @ U3 * (lam[-3:] / (lam[-3:] + 0.25))) @ U3.t()
    r3 = make_denoiser("wiener", ds, rank=3, dtype=torch.float64)(x, 0.5).reshape(4, -1)
    assert rel(r3, ref3) < 1e-8


def test_wiener_with_fewer_images_than_dimensions_zeroes_the_null_space(rng):
    """60 images in D = 192: the covariance has rank 59, and its null eigenvalues come back as ~1e-15 rounding
    noise, which λ/(λ + σ²) turned into a 1e-9 (σ = 1e-3) to 1e-7 (σ = 1e-4) leak of the null space into the
    output and the Jacobian. The exact filter: μ + V diag(s²/(s² + σ²)) Vᵀ(x − μ) over the data's own span."""
    imgs = torch.randint(0, 256, (60, 3, 8, 8), generator=rng, dtype=torch.uint8)
    ds = Dataset.from_array(imgs)
    den = make_denoiser("wiener", ds, dtype=torch.float64)
    assert den.effective_rank == 59
    y = ds.images_float(None, torch.float64).reshape(60, -1)
    mu = y.mean(0)
    _, sv, vh = torch.linalg.svd((y - mu) / 60**0.5, full_matrices=False)
    keep = sv > sv[0] * 1e-8
    V, lam = vh[keep].t(), sv[keep] ** 2
    assert V.shape[1] == 59
    x = torch.randn(4, 3, 8, 8, generator=rng, dtype=torch.float64)
    v = torch.randn(4, 3, 8, 8, generator=rng, dtype=torch.float64)
    for sigma in (1e-3, 1e-4):
        shrink = lam / (lam + sigma**2)
        ref = mu + ((x.reshape(4, -1) - mu) @ V * shrink) @ V.t()
        assert rel(den(x, sigma).reshape(4, -1), ref) < 1e-11
        ref_j = (v.reshape(4, -1) @ V * shrink) @ V.t()
        assert rel(den.jvp(x, sigma, v).reshape(4, -1), ref_j) < 1e-11


def test_class_conditional_equals_filtered_dataset(rng):
    ds = make_dataset(rng)
    x = queries(rng, ds).double()
    labels = torch.tensor([0, 2, 1, 2])
    out = make_denoiser("optimal", ds, dtype=torch.float64)(x, 0.6, class_labels=labels)
    for b in range(4):
        sub = ds.filter_classes([int(labels[b])])
        ref = make_denoiser("optimal", sub, dtype=torch.float64)(x[b : b + 1], 0.6)
        assert rel(out[b : b + 1], ref) < 1e-12
    top = make_denoiser("topk", ds, k=ds.n, dtype=torch.float64)(x, 0.6, class_labels=labels)
    assert rel(top, out) < 1e-10


def test_flips_equal_explicit_augmentation(rng):
    ds = make_dataset(rng, labels=False)
    aug = Dataset.from_array(torch.cat([ds.images, ds.images.flip(-1)]))
    x = queries(rng, ds).double()
    for name in ("optimal", "topk", "nearest", "wiener"):
        a = make_denoiser(name, ds.with_flips(True), dtype=torch.float64)(x, 0.3)
        b = make_denoiser(name, aug, dtype=torch.float64)(x, 0.3)
        assert rel(a, b) < 1e-8, name


def test_score_and_eps_forms(rng):
    ds = make_dataset(rng)
    x = queries(rng, ds).double()
    den = make_denoiser("optimal", ds, dtype=torch.float64)
    s = torch.tensor([0.1, 0.5, 1.0, 3.0], dtype=torch.float64)
    x0 = den(x, s)
    assert torch.allclose(den.score(x, s), (x0 - x) / s.view(-1, 1, 1, 1) ** 2)
    assert torch.allclose(den.eps(x, s), (x - x0) / s.view(-1, 1, 1, 1))


@pytest.mark.parametrize("name", sorted(DENOISERS))
@pytest.mark.parametrize("near_one", [False, True])
def test_no_nan_and_float32_matches_float64(rng, name, near_one):
    ds = make_dataset(rng, near_one=near_one)
    x = queries(rng, ds, noise=0.05)
    opts = {
        "topk": {"k": 20},
        "knn": {"k": 20},
        "ls": {"patch": 3},
        "els": {"patch": 3},
        "bbels": {"patch": 3},
        "pspc": {"patch": 3},
    }.get(name, {})

    # A fresh denoiser per call: the seeded ones (smoothed, optimal-draw) then see the same draws every time.
    def fresh(dtype):
        return make_denoiser(name, ds, dtype=dtype, **opts)

    for sigma in (1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 1e3, 1e4):
        a, b = fresh(torch.float32)(x, sigma), fresh(torch.float64)(x.double(), sigma)
        assert torch.isfinite(a).all() and torch.isfinite(b).all(), (name, sigma)
        err = row_rel(a, b)
        tol = float32_tolerance(lambda xi: fresh(torch.float64)(xi, sigma), x.double(), b)
        assert bool((err < tol).all()), (name, sigma, err.tolist(), tol.tolist())


def test_errors_are_clear(rng):
    ds = make_dataset(rng)
    den = make_denoiser("optimal", ds)
    x = queries(rng, ds)
    with pytest.raises(ValueError, match="unknown method"):
        make_denoiser("optimall", ds)
    with pytest.raises(TypeError, match="unknown option"):
        make_denoiser("optimal", ds, k=3)
    with pytest.raises(ValueError, match="expected shape"):
        den(x[:, :1], 1.0)
    with pytest.raises(ValueError, match="sigma"):
        den(x, 0.0)
    with pytest.raises(ValueError, match="label"):
        den(x, 1.0, class_labels=torch.tensor([7, 7, 7, 7]))
    with pytest.raises(ValueError, match="k:"):
        make_denoiser("topk", ds, k=ds.n + 1)
    with pytest.raises(ValueError, match="rank"):
        make_denoiser("wiener", ds, rank=0)
    with pytest.raises(ValueError, match="smoothing"):
        make_denoiser("smoothed", ds, smoothing=-1.0)
