"""The Gaussian flow in closed form and analytic teleportation against numerical integration and the full run."""

import pytest
import torch

from analytic_diffusion.analysis import teleportation_study
from analytic_diffusion.data import Dataset
from analytic_diffusion.denoisers import make_denoiser
from analytic_diffusion.grids import karras, vp_linear
from analytic_diffusion.sampling import sample, sample_heun, sample_teleported, teleport_grid


def gaussian_data(rng, n=200, shape=(1, 4, 4)):
    """Correlated data so that the PCA spectrum spans decades."""
    d = int(torch.tensor(shape).prod())
    mix = torch.randn(d, d, generator=rng, dtype=torch.float64) * torch.logspace(0, -2, d, dtype=torch.float64)
    x = (torch.randn(n, d, generator=rng, dtype=torch.float64) @ mix.t()) * 0.3
    return Dataset.from_array(x.clamp(-1, 1).reshape(n, *shape).float())


@pytest.mark.parametrize("rank", [None, 5])
def test_flow_is_the_exact_ode_solution(rng, rank):
    """Many small Heun steps of dx/dσ = (x − D(x,σ))/σ with the Wiener denoiser converge to Wiener.flow."""
    ds = gaussian_data(rng)
    wiener = make_denoiser("wiener", ds, rank=rank, dtype=torch.float64)
    x = torch.randn(3, *ds.image_shape, generator=rng, dtype=torch.float64) * 5
    s0, s1 = 5.0, 0.05
    grid = torch.logspace(torch.log10(torch.tensor(s0)), torch.log10(torch.tensor(s1)), 4001, dtype=torch.float64)
    numeric = sample_heun(wiener, x.clone(), grid)
    exact = wiener.flow(x, s0, s1)
    err = (numeric - exact).norm() / exact.norm()
    assert err < 1e-6, err


def test_flow_composes_and_ends_at_the_posterior_mean_limit(rng):
    ds = gaussian_data(rng)
    wiener = make_denoiser("wiener", ds, dtype=torch.float64)
    x = torch.randn(2, *ds.image_shape, generator=rng, dtype=torch.float64) * 3
    two = wiener.flow(wiener.flow(x, 3.0, 0.7), 0.7, 0.1)
    assert torch.allclose(two, wiener.flow(x, 3.0, 0.1), rtol=0, atol=1e-12)
    assert torch.allclose(wiener.flow(x, 1.0, 1.0), x, rtol=0, atol=1e-12)  # no time, no motion
    # To σ = 0 the flow lands on μ + U diag(sqrt(λ/(λ+σ0²))) Uᵀ (x − μ), inside the data's span.
    end = wiener.flow(x, 3.0, 0.0)
    mu, lam, U = wiener.mean.double(), wiener.eigvals.double(), wiener.U.double()
    want = mu + ((x.reshape(2, -1) - mu) @ U * torch.sqrt(lam / (lam + 9.0))) @ U.t()
    assert torch.allclose(end.reshape(2, -1), want, atol=1e-12)


def test_flow_refuses_bad_sigmas(rng):
    wiener = make_denoiser("wiener", gaussian_data(rng))
    x = torch.zeros(1, 1, 4, 4)
    for a, b in ((0.0, 1.0), (-1.0, 0.5), (float("inf"), 1.0), (1.0, -0.1), (1.0, float("nan"))):
        with pytest.raises(ValueError, match="sigma"):
            wiener.flow(x, a, b)
    with pytest.raises(ValueError, match="x: expected shape"):
        wiener.flow(torch.zeros(1, 1, 3, 3), 1.0, 0.5)


def test_teleport_grid_counts_the_skipped_steps():
    sig = karras(10).sigmas
    grid, skipped = teleport_grid(sig, 5.0)
    assert skipped == int((sig[:-1] > 5.0).sum()) and grid[0] == 5.0 and torch.equal(grid[1:], sig[sig < 5.0])
    same, none = teleport_grid(sig, 100.0)
    assert none == 0 and torch.equal(same, sig)
    with pytest.raises(ValueError, match="sigma_skip"):
        teleport_grid(sig, 0.0)


def test_no_skip_is_the_plain_sampler_bitwise(rng):
    ds = gaussian_data(rng)
    den, wiener = make_denoiser("optimal", ds), make_denoiser("wiener", ds)
    full = sample(den, 3, steps=6, seed=4, progress=False)
    tele = sample_teleported(den, wiener, 3, sigma_skip=1e6, steps=6, seed=4)
    assert tele.config["steps_skipped"] == 0 and torch.equal(tele.samples, full.samples)


def test_teleporting_a_gaussian_is_free(rng):
    """With the Wiener denoiser itself continuing, a teleported run and the full run both follow the same exact
    flow, so they agree to the sampler's own discretisation error (which is what the skipped steps would add)."""
    ds = gaussian_data(rng)
    wiener = make_denoiser("wiener", ds, dtype=torch.float64)
    kw = dict(steps=40, seed=1, dtype=torch.float64)
    full = sample(wiener, 4, progress=False, **kw)
    tele = sample_teleported(wiener, wiener, 4, sigma_skip=2.0, **kw)
    sched = karras(40)
    exact = wiener.flow(
        torch.stack(
            [torch.randn(ds.image_shape, generator=torch.Generator().manual_seed(1 + i)) for i in range(4)]
        ).double()
        * float(sched.sigmas[0]),
        float(sched.sigmas[0]),
        0.0,
    )
    assert tele.config["steps_skipped"] > 10
    assert (tele.samples - exact).norm() <= (full.samples - exact).norm() * 1.01 + 1e-9


def test_teleported_runs_refuse_what_they_cannot_do(rng):
    ds = gaussian_data(rng)
    den, wiener = make_denoiser("optimal", ds), make_denoiser("wiener", ds)
    with pytest.raises(ValueError, match="deterministic"):
        sample_teleported(den, wiener, 2, sigma_skip=1.0, sampler="ddpm")
    with pytest.raises(ValueError, match="VE grid"):
        sample_teleported(den, wiener, 2, sigma_skip=1.0, schedule=vp_linear(10))
    with pytest.raises(TypeError, match="Wiener"):
        sample_teleported(den, den, 2, sigma_skip=1.0)
    with pytest.raises(ValueError, match="sigma_skip"):
        sample_teleported(den, wiener, 2, sigma_skip=-1.0)


def test_teleportation_study_on_the_optimal_denoiser(rng):
    ds = gaussian_data(rng, n=64)
    den, wiener = make_denoiser("optimal", ds), make_denoiser("wiener", ds)
    res = teleportation_study(den, wiener, 3, steps=10, sigma_skips=(40.0, 10.0, 0.5), r_min=0.9)
    rows = {r["sigma_skip"]: r for r in res["rows"]}
    assert set(rows) == {40.0, 10.0, 0.5} and res["samples"]["full"].shape == (3, 1, 4, 4)
    assert rows[40.0]["steps_skipped"] < rows[10.0]["steps_skipped"] < rows[0.5]["steps_skipped"]
    assert rows[40.0]["evaluations"] < rows[40.0]["full_evaluations"]
    for r in rows.values():
        assert -1 <= r["teleported"]["pearson_r"] <= 1 and r["teleported"]["rms"] >= 0
    assert res["steps_saved"] in [r["steps_skipped"] for r in rows.values()] + [0]
    assert res["steps_saved"] == max(
        [r["steps_skipped"] for r in rows.values() if r["teleported"]["pearson_r"] >= 0.9], default=0
    )
    with pytest.raises(ValueError, match="r_min"):
        teleportation_study(den, wiener, 2, steps=4, r_min=0)
