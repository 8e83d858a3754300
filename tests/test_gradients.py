"""Exact gradients of the optimal denoiser (∂E[x0|x]/∂x = Cov[x0|x]/σ²T through one more retrieval pass), checked
by gradcheck in float64 against finite differences; denoiser.jvp for optimal (exact) and wiener (autograd)."""
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


@pytest.mark.parametrize("flips,temperature,labels,uint8", [(False, 1.0, False, False), (True, 1.3, True, False),
                                                            (True, 1.0, False, True)])
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
    shrink = w.eigvals / (w.eigvals + 0.6 ** 2)
    expect = (((v.reshape(2, -1) @ w.U) * shrink) @ w.U.t()).reshape(x.shape)  # J = U diag(λ/(λ+σ²)) Uᵀ
    assert torch.allclose(w.jvp(x, 0.6, v), expect, rtol=0, atol=1e-12)


def test_no_gradient_is_a_clear_error():
    den = make_denoiser("smoothed", _ds(), num_perturbations=2, smoothing=0.1)
    x = torch.randn(2, 1, 2, 3)
    with pytest.raises(TypeError, match="no gradient"):
        den.jvp(x, 0.5, torch.randn_like(x))
    with pytest.raises(ValueError, match="v: expected"):
        make_denoiser("optimal", _ds()).jvp(x, 0.5, torch.randn(3, 1, 2, 3))
