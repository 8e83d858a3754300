"""Exact gradients (∂E[x0|x]/∂x = Cov[x0|x]/σ²T through one more retrieval pass for optimal, topk, smoothed; the
torch reference differentiated by autograd for the local family, per pixel), checked by gradcheck in float64
against finite differences; denoiser.jvp against autograd and finite differences."""

import pytest
import torch

import analytic_diffusion as ad
from analytic_diffusion.denoisers import make_denoiser


def _ds(uint8=False):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    if uint8:
        imgs = torch.randint(0, 256, (9, 1, 2, 3), generator=g, dtype=torch.uint8)
    else:
        imgs = torch.rand(9, 1, 2, 3, generator=g) * 2 - 1
    return ad.Dataset.from_array(imgs, labels=torch.arange(9) % 3)


@pytest.mark.parametrize(
    "flips,temperature,labels,uint8", [(False, 1.0, False, False), (True, 1.3, True, False), (True, 1.0, False, True)]
)
def test_gradcheck_optimal(flips, temperature, labels, uint8):
    den = make_denoiser("optimal", _ds(uint8), dtype=torch.float64, temperature=temperature, flips=flips)
    x = torch.randn(3, 1, 2, 3, dtype=torch.float64, requires_grad=True)
    sig = torch.tensor([0.4, 0.9, 2.0], dtype=torch.float64)
    lab = torch.tensor([0, 2, 1]) if labels else None
    # fast mode (a random projection of the Jacobian) for the option variants; the full check for the first
    fast = flips or labels or uint8
    assert torch.autograd.gradcheck(lambda xx: den(xx, sig, lab), (x,), eps=1e-6, atol=1e-6, fast_mode=fast)


def test_jvp_is_vjp_and_matches_finite_differences():
    den = make_denoiser("optimal", _ds(), dtype=torch.float64, flips=True)
    x = torch.randn(4, 1, 2, 3, dtype=torch.float64)
    v = torch.randn_like(x)
    jv = den.jvp(x, 0.7, v)
    xr = x.clone().requires_grad_(True)
    (vj,) = torch.autograd.grad(den(xr, 0.7), xr, v)
    assert torch.allclose(jv, vj, rtol=0, atol=1e-13)  # symmetric Jacobian: one pass serves both
    h = 1e-6
    fd = (den(x + h * v, 0.7) - den(x - h * v, 0.7)) / (2 * h)
    assert torch.allclose(jv, fd, rtol=0, atol=1e-8)
    one = den.jvp(x[2:3], 0.7, v[2:3])  # per sample: the batch changes nothing
    assert torch.allclose(one, jv[2:3], rtol=0, atol=1e-14)


def test_float32_gradient_tracks_float64():
    ds = _ds()
    x = torch.randn(3, 1, 2, 3)
    v = torch.randn_like(x)
    j32 = make_denoiser("optimal", ds, dtype=torch.float32).jvp(x, 0.8, v)
    j64 = make_denoiser("optimal", ds, dtype=torch.float64).jvp(x.double(), 0.8, v.double())
    assert j32.dtype == torch.float32 and torch.allclose(j32.double(), j64, rtol=0, atol=1e-4)


def test_wiener_jvp_through_autograd():
    ds = _ds()
    w = make_denoiser("wiener", ds, dtype=torch.float64)
    x = torch.randn(2, 1, 2, 3, dtype=torch.float64)
    v = torch.randn_like(x)
    shrink = w.eigvals / (w.eigvals + 0.6**2)
    expect = (((v.reshape(2, -1) @ w.U) * shrink) @ w.U.t()).reshape(x.shape)  # J = U diag(λ/(λ+σ²)) Uᵀ
    assert torch.allclose(w.jvp(x, 0.6, v), expect, rtol=0, atol=1e-12)


def test_no_gradient_is_a_clear_error():
    den = make_denoiser("optimal-draw", _ds(), mode="draw", scale=1.0)  # one random posterior draw
    x = torch.randn(2, 1, 2, 3)
    with pytest.raises(TypeError, match="no gradient"):
        den.jvp(x, 0.5, torch.randn_like(x))
    with pytest.raises(ValueError, match="v: expected"):
        make_denoiser("optimal", _ds()).jvp(x, 0.5, torch.randn(3, 1, 2, 3))


def _fd(f, x, v, h=1e-6):
    return (f(x + h * v) - f(x - h * v)) / (2 * h)


@pytest.mark.parametrize("flips,labels", [(False, False), (True, True)])
def test_topk_gradient_exact(flips, labels):
    den = make_denoiser("topk", _ds(), dtype=torch.float64, k=4, flips=flips)
    x = torch.randn(3, 1, 2, 3, dtype=torch.float64, requires_grad=True)
    sig = torch.tensor([0.3, 0.8, 1.7], dtype=torch.float64)
    lab = torch.tensor([0, 2, 1]) if labels else None
    assert torch.autograd.gradcheck(lambda xx: den(xx, sig, lab), (x,), eps=1e-6, atol=1e-6)
    v = torch.randn_like(x)
    jv = den.jvp(x, sig, v, lab)  # closed form over the k retained images
    (vj,) = torch.autograd.grad(den(x, sig, lab), x, v)  # autograd through the float64 formula
    assert torch.allclose(jv, vj, rtol=0, atol=1e-12)
    assert torch.allclose(jv, _fd(lambda z: den(z, sig, lab), x.detach(), v), rtol=0, atol=1e-7)


def test_smoothed_gradient_at_fixed_perturbations():
    ds = _ds()
    den = make_denoiser("smoothed", ds, dtype=torch.float64, num_perturbations=3, smoothing=0.4)
    opt = make_denoiser("optimal", ds, dtype=torch.float64)
    x = torch.randn(2, 1, 2, 3, dtype=torch.float64)
    v = torch.randn_like(x)
    s = torch.full((2,), 0.6, dtype=torch.float64)
    xs, _, _ = den._perturbed(x, s, None)
    offsets = xs.reshape(3, *x.shape) - x[None]  # s·ξ_m, a constant of x's neighbourhood

    def frozen(z):  # the smoothed denoiser with its perturbations held fixed
        return opt((z[None] + offsets).reshape(-1, 1, 2, 3), 0.6).reshape(3, *x.shape).mean(0)

    assert torch.equal(den(x, 0.6), frozen(x))
    jv = den.jvp(x, 0.6, v)
    assert torch.allclose(jv, _fd(frozen, x, v), rtol=0, atol=1e-8)
    xr = x.clone().requires_grad_(True)
    (vj,) = torch.autograd.grad(den(xr, 0.6), xr, v)  # a mean of symmetric Jacobians is symmetric
    assert torch.allclose(vj, jv, rtol=0, atol=1e-13)


def test_nearest_gradient_is_zero():
    den = make_denoiser("nearest", _ds(), dtype=torch.float64)
    x = torch.randn(2, 1, 2, 3, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(den(x, 0.5).sum(), x)
    assert torch.equal(g, torch.zeros_like(g))
    assert torch.equal(den.jvp(x, 0.5, torch.randn_like(x)), torch.zeros_like(x))


_LOCAL = [
    ("ls", dict(patch=3)),
    ("els", dict(patch=3)),
    ("bbels", dict(patch=3)),
    ("pspc", dict(patch=3)),
    ("pspc-flex", {}),
    ("pca_locality", {}),
]


def _local_ds():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    return ad.Dataset.from_array(torch.rand(6, 1, 5, 5, generator=g) * 2 - 1, labels=torch.arange(6) % 2)


@pytest.mark.parametrize("method,options", _LOCAL, ids=[m for m, _ in _LOCAL])
def test_local_family_gradient_exact(method, options):
    den = make_denoiser(method, _local_ds(), dtype=torch.float64, **options)
    x = torch.randn(2, 1, 5, 5, dtype=torch.float64, requires_grad=True)
    sig = torch.tensor([0.5, 1.3], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda xx: den(xx, sig), (x,), eps=1e-6, atol=1e-6, fast_mode=True)
    v = torch.randn_like(x)
    jv = den.jvp(x, sig, v)
    assert torch.allclose(jv, _fd(lambda z: den(z, sig), x.detach(), v), rtol=0, atol=1e-7)
    one = den.jvp(x[1:], sig[1:], v[1:])  # per sample
    assert torch.allclose(one, jv[1:], rtol=0, atol=1e-12)


@pytest.mark.parametrize("method,options", _LOCAL, ids=[m for m, _ in _LOCAL])
def test_local_family_float32_gradient(method, options):
    # float32 work on the fused kernels forward; with x requiring grad the call runs the torch reference,
    # which must give the same x̂0 and a gradient that tracks the float64 one.
    ds = _local_ds()
    d32 = make_denoiser(method, ds, dtype=torch.float32, **options)
    d64 = make_denoiser(method, ds, dtype=torch.float64, **options)
    x = torch.randn(2, 1, 5, 5)
    xr = x.clone().requires_grad_(True)
    out = d32(xr, 0.8)
    assert out.requires_grad and torch.allclose(out.detach(), d32(x, 0.8), rtol=0, atol=1e-5)
    u = torch.randn_like(x)
    (g32,) = torch.autograd.grad(out, xr, u)
    x64 = x.double().requires_grad_(True)
    (g64,) = torch.autograd.grad(d64(x64, 0.8), x64, u.double())
    assert torch.allclose(g32.double(), g64, rtol=0, atol=1e-3 * max(1.0, float(g64.abs().max())))
