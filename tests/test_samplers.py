"""Samplers against closed forms: Gaussian data has an exact denoiser and an exact probability-flow ODE."""

import json
import math

import pytest
import torch

from analytic_diffusion.grids import karras, vp_linear
from analytic_diffusion.sampling.generate import SampleResult, sample
from analytic_diffusion.sampling.samplers import (
    SAMPLERS,
    get_sampler,
    sample_ddim,
    sample_ddpm,
    sample_euler,
    sample_heun,
)

SHAPE = (2, 2, 2)  # D = 8


class GaussianDenoiser:
    """Exact posterior mean for data N(μ, Σ): x̂0 = μ + Σ(Σ + σ²I)⁻¹(x - μ), per-sample σ."""

    image_shape = SHAPE

    def __init__(self, D=8, seed=0, dtype=torch.float64):
        g = torch.Generator().manual_seed(seed)
        self.mu = 0.5 * torch.randn(D, generator=g, dtype=dtype)
        A = torch.randn(D, D, generator=g, dtype=dtype)
        self.cov = A @ A.T / D + 0.1 * torch.eye(D, dtype=dtype)
        self.lam, self.U = torch.linalg.eigh(self.cov)
        self.calls = 0

    def __call__(self, x, sigma):
        self.calls += 1
        B = x.shape[0]
        z = (x.reshape(B, -1).to(self.mu.dtype) - self.mu) @ self.U
        shrink = self.lam / (self.lam + sigma.to(self.mu.dtype)[:, None] ** 2)
        return (self.mu + (shrink * z) @ self.U.T).reshape(x.shape).to(x.dtype)


def _moments_match(x, den, se_tol=4.0, cov_tol=0.05):
    x = x.reshape(x.shape[0], -1).double()
    N = x.shape[0]
    se = (den.cov.diagonal() / N).sqrt()
    assert ((x.mean(0) - den.mu).abs() / se).max() < se_tol
    cov = torch.cov(x.T)
    assert torch.linalg.norm(cov - den.cov) / torch.linalg.norm(den.cov) < cov_tol


def _noise(n, std, seed=1):
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * std


def test_heun_matches_gaussian_moments():
    den = GaussianDenoiser()
    s = karras(100, sigma_max=1000.0)
    x = sample_heun(den, _noise(20000, s.init_sigma), s.sigmas)
    assert den.calls == 2 * 100 - 1
    _moments_match(x, den)


def test_euler_matches_gaussian_moments():
    den = GaussianDenoiser(seed=1)
    s = karras(1000, sigma_max=1000.0)
    _moments_match(sample_euler(den, _noise(20000, s.init_sigma), s.sigmas), den)


def test_ddpm_matches_gaussian_moments_on_vp_grid():
    den = GaussianDenoiser(seed=2)
    s = vp_linear(1000, spacing="trailing")  # DDPM itself: every train timestep, starting from x_vp ~ N(0, I)
    with torch.random.fork_rng():  # the global RNG: 20000 per-sample generators x 1000 steps is slow
        torch.manual_seed(0)
        x = sample_ddpm(den, _noise(20000, s.init_sigma), s.sigmas)
    _moments_match(x, den)


def test_ddim_eta0_equals_euler_step_by_step():
    den = GaussianDenoiser(seed=3)
    s = karras(12)
    xs = {}
    for name, fn in (("ddim", sample_ddim), ("euler", sample_euler)):
        xs[name] = []
        fn(den, _noise(16, 80.0), s.sigmas, callback=lambda i, x, sig, x0, L=xs[name]: L.append(x.clone()))
    for a, b in zip(xs["ddim"], xs["euler"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("eta, clip", [(0.0, False), (0.0, True), (0.6, True), (1.0, False)])
def test_ddim_equals_diffusers_ddim_step_in_vp_space(eta, clip):
    """diffusers' DDIMScheduler.step (ε-prediction, leading spacing, set_alpha_to_one, clip_sample), re-written
    here in VP space, gives the same trajectory as sample_ddim in σ-space (x_vp = x/sqrt(1+σ²))."""
    den = GaussianDenoiser(seed=5)
    T, steps, B = 1000, 10, 4
    ac = torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0)
    x_vp = torch.randn(B, *SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gens = [torch.Generator().manual_seed(100 + i) for i in range(B)]
    ref = [x_vp]
    for t in range(900, -1, -100):
        a_t, a_prev = ac[t], (ac[t - 100] if t - 100 >= 0 else torch.tensor(1.0, dtype=torch.float64))
        sig = torch.full((B,), float(((1 - a_t) / a_t).sqrt()), dtype=torch.float64)
        eps = (x_vp - a_t.sqrt() * den(x_vp / a_t.sqrt(), sig)) / (1 - a_t).sqrt()  # the "model output"
        x0 = (x_vp - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        x0 = x0.clamp(-1, 1) if clip else x0
        std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        x_vp = a_prev.sqrt() * x0 + (1 - a_prev - std**2).sqrt() * eps
        if eta > 0:
            x_vp = x_vp + std * torch.stack([torch.randn(SHAPE, generator=g, dtype=torch.float64) for g in gens])
        ref.append(x_vp)
    sch = vp_linear(steps)
    gens = [torch.Generator().manual_seed(100 + i) for i in range(B)]
    ours = []
    out = sample_ddim(
        den,
        ref[0] * sch.init_sigma,
        sch.sigmas,
        eta=eta,
        clip_x0=clip,
        generators=gens,
        callback=lambda i, x, sig, x0: ours.append(x / (1 + sig[0] ** 2).sqrt()),
    )
    for a, b in zip(ours + [out], ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_heun_matches_exact_pf_ode_1d():
    """1-D N(μ, s²): x(σ) = μ + sqrt((s²+σ²)/(s²+σ0²))·(x0 - μ) along the whole trajectory."""
    mu, s2 = 0.3, 0.7**2

    def den(x, sigma):
        return mu + s2 / (s2 + sigma[:, None, None, None] ** 2) * (x - mu)

    x_start = torch.linspace(-100, 100, 9, dtype=torch.float64).reshape(9, 1, 1, 1)
    errs = []
    for steps in (500, 1000):
        sch = karras(steps)
        traj = []
        sample_heun(den, x_start, sch.sigmas, callback=lambda i, x, sig, x0: traj.append((x, sig)))
        err = 0.0
        for x, sig in traj:
            exact = mu + ((s2 + sig**2) / (s2 + 80.0**2)).sqrt().reshape(-1, 1, 1, 1) * (x_start - mu)
            err = max(err, float(((x - exact) / (exact - mu)).abs().max()))
        errs.append(err)
    assert errs[0] < 1e-4
    assert 3.5 < errs[0] / errs[1] < 4.5  # second order


def test_per_sample_grids_equal_running_alone():
    den = GaussianDenoiser(seed=4)
    # Sample 2 ends at σ(ᾱ_0) > 0 after a zero-length step: Heun corrects its last step, not the others'.
    grids = torch.stack(
        [karras(10, sigma_max=80.0).sigmas, karras(10, sigma_max=5.0).sigmas, vp_linear(10, final="alpha0").sigmas], 1
    )  # (11, 3)
    x = _noise(3, 1.0) * grids[0].reshape(3, 1, 1, 1)
    for name, fn in SAMPLERS.items():
        gens = [torch.Generator().manual_seed(i) for i in range(3)]
        batch = fn(den, x, grids, generators=gens) if name == "ddpm" else fn(den, x, grids)
        for i in range(3):
            g = [torch.Generator().manual_seed(i)]
            sig = grids[:, i]
            alone = fn(den, x[i : i + 1], sig, generators=g) if name == "ddpm" else fn(den, x[i : i + 1], sig)
            torch.testing.assert_close(batch[i : i + 1], alone, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_callback_counts_and_shapes(name):
    den = GaussianDenoiser()
    s = karras(7)
    seen = []
    get_sampler(name)(
        den,
        _noise(5, 80.0),
        s.sigmas,
        callback=lambda i, x, sig, x0: seen.append((i, x.shape, sig.shape, x0.shape, sig[0].item())),
    )
    assert [r[0] for r in seen] == list(range(7))
    assert all(r[1] == r[3] == (5, *SHAPE) and r[2] == (5,) for r in seen)
    assert [r[4] for r in seen] == pytest.approx(s.sigmas[:-1].tolist())
    assert den.calls == (13 if name == "heun" else 7)


def test_clip_x0():
    x = torch.full((2, 1, 2, 2), 10.0, dtype=torch.float64)

    def den(x, sigma):
        return torch.full_like(x, 5.0)  # far outside [-1, 1]

    sig = torch.tensor([10.0, 4.0, 0.0], dtype=torch.float64)
    # one step 10 -> 4 by hand
    eps = (10.0 - 5.0) / 10.0
    ddim = sample_ddim(den, x, sig[:2], clip_x0=True)
    torch.testing.assert_close(ddim, torch.full_like(x, 1.0 + 4.0 * eps))  # ε̂ from the unclipped x̂0
    euler = sample_euler(den, x, sig[:2], clip_x0=True)
    torch.testing.assert_close(euler, torch.full_like(x, 10.0 + (4.0 - 10.0) * (10.0 - 1.0) / 10.0))
    for fn in (sample_ddim, sample_euler, sample_heun, sample_ddpm):
        assert fn(den, x, sig, clip_x0=True).eq(1.0).all()  # last step to σ = 0 returns the clipped x̂0
        assert fn(den, x, sig).eq(5.0).all()
    raw = []
    sample_ddim(den, x, sig, clip_x0=True, callback=lambda i, x, s, x0: raw.append(x0.max().item()))
    assert raw == [5.0, 5.0]  # the callback sees the denoiser's own output


def test_ddpm_step_noise_scale():
    """One η = 1 step with a constant denoiser: x' = x̂0 + sqrt(σ'² - s_up²)·ε̂ + s_up·z, s_up² = σ'²(1 - σ'²/σ²)."""

    def den(x, sigma):
        return torch.zeros_like(x)

    x = torch.zeros(40000, 1, 1, 1, dtype=torch.float64)
    out = sample_ddpm(den, x, torch.tensor([2.0, 1.0], dtype=torch.float64))
    assert out.std().item() == pytest.approx(math.sqrt(1.0 * (1 - 1 / 4)), rel=0.02)


def test_sample_seeds_independent_of_batch_size():
    den = GaussianDenoiser(dtype=torch.float64)
    for sampler, eta in (("heun", 0.0), ("ddpm", 0.0), ("ddim", 0.5)):
        a = sample(den, 6, steps=8, sampler=sampler, eta=eta, seed=3, progress=False)
        b = sample(den, 6, steps=8, sampler=sampler, eta=eta, seed=3, batch_size=1, progress=False)
        c = sample(den, 6, steps=8, sampler=sampler, eta=eta, seed=3, batch_size=4, progress=False)
        torch.testing.assert_close(a.samples, b.samples, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.samples, c.samples, rtol=1e-5, atol=1e-5)
        assert a.seeds == list(range(3, 9))
    # sample i's initial noise is N(0, I) from seed + i scaled by σ_0
    first = []
    sample(den, 2, steps=4, seed=7, progress=False, callback=lambda i, x, s, x0: first.append(x) if i == 0 else 0)
    torch.testing.assert_close(first[0][1], torch.randn(SHAPE, generator=torch.Generator().manual_seed(8)) * 80.0)


def test_sample_result_and_vp_init():
    den = GaussianDenoiser()
    seen = []
    r = sample(
        den,
        3,
        steps=10,
        sampler="ddim",
        schedule="vp-linear",
        schedule_kwargs={"spacing": "trailing"},
        dtype=torch.float64,
        progress=False,
        callback=lambda i, x, s, x0: seen.append(x) if i == 0 else 0,
    )
    assert isinstance(r, SampleResult) and r.samples.shape == (3, *SHAPE) and r.samples.dtype == torch.float64
    assert r.sigmas.tolist() == vp_linear(10, spacing="trailing").sigmas.tolist()
    s0 = float(r.sigmas[0])
    ref = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).double() * math.sqrt(1 + s0**2)
    torch.testing.assert_close(seen[0][0], ref)
    cfg = json.loads(json.dumps(r.config))
    assert cfg["sampler"] == "ddim" and cfg["schedule"] == "vp-linear" and cfg["steps"] == 10
    assert r.elapsed_s >= 0


def test_sample_class_labels_passed_through():
    got = []

    def den(x, sigma, class_labels=None):
        got.append(class_labels.tolist())
        return torch.zeros_like(x)

    sample(
        den,
        4,
        steps=2,
        shape=(1, 2, 2),
        class_labels=torch.tensor([0, 1, 2, 3]),
        batch_size=3,
        sampler="euler",
        progress=False,
    )
    assert got == [[0, 1, 2], [0, 1, 2], [3], [3]]
    sample(lambda x, sigma: torch.zeros_like(x), 2, steps=2, shape=(1, 2, 2), progress=False)  # no kwarg


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: get_sampler("dpm"), "valid names: euler, heun, ddim, ddpm"),
        (
            lambda: sample_euler(lambda x, s: x, torch.zeros(2, 1, 1, 1), torch.tensor([1.0, 2.0, 0.0])),
            "non-increasing",
        ),
        (lambda: sample_euler(lambda x, s: x, torch.zeros(2, 1, 1, 1), torch.tensor([1.0, 0.0, 0.0])), "> 0"),
        (lambda: sample_euler(lambda x, s: x, torch.zeros(2, 1, 1, 1), torch.ones(3, 3)), "sigmas must have shape"),
        (lambda: sample_ddim(lambda x, s: x, torch.zeros(2, 1, 1, 1), torch.tensor([1.0, 0.0]), eta=1.5), "eta"),
        (
            lambda: sample_ddpm(
                lambda x, s: x, torch.zeros(2, 1, 1, 1), torch.tensor([1.0, 0.0]), generators=[torch.Generator()]
            ),
            "generators",
        ),
        (lambda: sample(GaussianDenoiser(), 0), "n must"),
        (lambda: sample(GaussianDenoiser(), 2, batch_size=0), "batch_size"),
        (lambda: sample(GaussianDenoiser(), 2, sampler="lms"), "sampler"),
        (lambda: sample(GaussianDenoiser(), 2, schedule="cos"), "valid names"),
        (lambda: sample(GaussianDenoiser(), 2, steps=0), "steps"),
        (lambda: sample(GaussianDenoiser(), 2, eta=0.5), "eta applies only"),
        (lambda: sample(lambda x, s: x, 2), "shape"),
        (lambda: sample(GaussianDenoiser(), 2, class_labels=[1, 2, 3]), "class_labels"),
        (lambda: sample(GaussianDenoiser(), 2, schedule=karras(4), schedule_kwargs={"rho": 3}), "schedule_kwargs"),
        (lambda: sample(GaussianDenoiser(), 2, seed=-1), "seed"),
    ],
)
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()
