"""σ grids against hand computations and diffusers' timestep formulas (re-derived here with numpy)."""

import math

import numpy as np
import pytest
import torch

from analytic_diffusion.grids import Schedule, get_schedule, kamb_sigma, karras, vp_cosine, vp_linear


def _check_grid(s: Schedule, steps: int, last_zero: bool = True):
    assert s.sigmas.dtype == torch.float64 and s.sigmas.shape == (steps + 1,)
    assert s.steps == steps
    assert (s.sigmas[1:] < s.sigmas[:-1]).all()
    if last_zero:
        assert s.sigmas[-1] == 0


def test_karras_endpoints_and_rho_formula():
    s = karras(18, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    _check_grid(s, 18)
    assert s.kind == "ve" and s.timesteps is None
    assert s.sigmas[0] == pytest.approx(80.0, rel=1e-12)
    assert s.sigmas[17] == pytest.approx(0.002, rel=1e-12)
    for i in (1, 5, 11):
        ref = (80.0 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
        assert float(s.sigmas[i]) == pytest.approx(ref, rel=1e-12)
    assert s.init_sigma == pytest.approx(80.0)
    one = karras(1)
    assert one.sigmas.tolist() == [80.0, 0.0]


def _alphas_cumprod_linear(T=1000, b0=1e-4, b1=0.02):
    return np.cumprod(1 - np.linspace(b0, b1, T))


def test_vp_linear_leading_matches_studio_note():
    s = vp_linear(10)
    _check_grid(s, 10)
    assert s.kind == "vp"
    assert s.timesteps.tolist() == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    studio = [61, 25.7, 12.0, 6.2, 3.4, 2.0, 1.24, 0.72, 0.34, 0.01]  # docs/design.md §10.3
    for got, ref in zip(s.sigmas[:-1].tolist(), studio):
        assert got == pytest.approx(ref, rel=0.03)  # the note rounds to 2-3 digits
    ac = _alphas_cumprod_linear()
    assert float(s.sigmas[0]) == pytest.approx(math.sqrt((1 - ac[900]) / ac[900]), rel=1e-12)
    assert s.init_sigma == pytest.approx(math.sqrt(1 + float(s.sigmas[0]) ** 2))


@pytest.mark.parametrize("steps", [1, 7, 10, 50, 333, 1000])
def test_vp_linear_spacings_equal_diffusers_formulas(steps):
    T = 1000
    ref = {
        "leading": (np.arange(0, steps) * (T // steps)).round()[::-1].astype(np.int64),
        "trailing": np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1,
        "linspace": np.linspace(0, T - 1, steps).round()[::-1].astype(np.int64),
    }
    ac = _alphas_cumprod_linear()
    for spacing, t in ref.items():
        s = vp_linear(steps, spacing=spacing)
        assert s.timesteps.tolist() == t.tolist(), spacing
        np.testing.assert_allclose(s.sigmas[:-1].numpy(), np.sqrt((1 - ac[t]) / ac[t]), rtol=1e-12)
        _check_grid(s, steps)


def test_vp_linear_offset_and_final_alpha0():
    s = vp_linear(10, steps_offset=1, final="alpha0")
    assert s.timesteps.tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    ac = _alphas_cumprod_linear()
    _check_grid(s, 10, last_zero=False)
    assert float(s.sigmas[-1]) == pytest.approx(math.sqrt((1 - ac[0]) / ac[0]), rel=1e-12)
    # Leading spacing already ends at t = 0: diffusers' final step to ᾱ_0 has zero length, and is kept.
    s = vp_linear(10, final="alpha0")
    assert s.sigmas.shape == (11,) and s.sigmas[-1] == s.sigmas[-2] > 0


def test_vp_cosine_iddpm():
    T, s_ = 1000, 0.008

    def f(u):
        return math.cos((u + s_) / (1 + s_) * math.pi / 2) ** 2

    betas = np.minimum([1 - f((i + 1) / T) / f(i / T) for i in range(T)], 0.999)
    ac = np.cumprod(1 - betas)
    for spacing in ("leading", "trailing", "linspace"):
        sch = vp_cosine(10, spacing=spacing)
        _check_grid(sch, 10)
        t = sch.timesteps.numpy()
        np.testing.assert_allclose(sch.sigmas[:-1].numpy(), np.sqrt((1 - ac[t]) / ac[t]), rtol=1e-10)
    # ᾱ_t = f((t+1)/T)/f(0) away from the clipped end
    assert ac[500] == pytest.approx(f(501 / T) / f(0), rel=1e-10)


def test_kamb_cosine():
    def beta(t):
        return 1 - math.cos(t / 1.008 * math.pi / 2) ** 2

    assert beta(0.95) == pytest.approx(0.99185, abs=1e-4)
    assert beta(0.05) == pytest.approx(0.0061, abs=1e-4)
    assert beta(1.0) == pytest.approx(0.99984, abs=1e-5)
    for t in (0.05, 0.5, 0.95):
        assert kamb_sigma(t) == pytest.approx(math.sqrt(beta(t) / (1 - beta(t))), rel=1e-12)
    s = vp_cosine(19, "kamb")
    _check_grid(s, 19)
    assert s.kind == "vp" and s.name == "kamb-cosine"
    np.testing.assert_allclose(s.timesteps.numpy(), [i / 20 for i in range(19, 0, -1)] + [0.0], atol=1e-15)
    assert float(s.sigmas[0]) == pytest.approx(kamb_sigma(0.95), rel=1e-12)
    s1 = get_schedule("kamb-cosine", 20, include_t1=True)
    _check_grid(s1, 20)
    assert float(s1.timesteps[0]) == 1.0 and float(s1.timesteps[1]) == pytest.approx(0.95)
    torch.testing.assert_close(kamb_sigma(torch.tensor([0.5])), torch.tensor([kamb_sigma(0.5)], dtype=torch.float64))


def test_get_schedule_names():
    assert get_schedule("edm", 5).sigmas.tolist() == karras(5).sigmas.tolist()
    assert get_schedule("vp-linear", 10, spacing="trailing").timesteps[0] == 999
    assert get_schedule("vp-cosine", 4).name == "vp-cosine"


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: get_schedule("cosine", 10), "valid names: karras, edm, vp-linear"),
        (lambda: get_schedule("karras", 0), "steps"),
        (lambda: karras(2.5), "steps"),
        (lambda: karras(10, sigma_min=1.0, sigma_max=1.0), "sigma_max"),
        (lambda: karras(10, sigma_min=0.0), "sigma_min"),
        (lambda: karras(10, rho=0), "rho"),
        (lambda: vp_linear(10, spacing="uniform"), "spacing"),
        (lambda: vp_linear(10, final="one"), "final"),
        (lambda: vp_linear(1001), "num_train_timesteps"),
        (lambda: vp_linear(10, beta_start=0.1, beta_end=0.01), "beta_start"),
        (lambda: vp_linear(10, steps_offset=-1), "steps_offset"),
        (lambda: vp_cosine(10, kind="edm"), "kind"),
        (lambda: vp_cosine(10, include_t1=True), "include_t1"),
        (lambda: get_schedule("karras", 10, spacing="leading"), "spacing"),
        (lambda: Schedule(torch.tensor([1.0, 0.0]), "edm", "custom"), "kind"),
        (lambda: Schedule(torch.tensor([1.0]), "ve", "custom"), "sigmas"),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()
