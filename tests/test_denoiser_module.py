"""Denoisers as torch.nn.Module: resident tensors are non-persistent buffers that .to(device) moves, .dtype /
.device / repr, .to(dtype) refused, and integer σ (a diffusers-style timestep) refused with a pointer."""

import numpy as np
import pytest
import torch

import analytic_diffusion as ad
from analytic_diffusion.denoisers import make_denoiser
from analytic_diffusion.networks.adapters import CallableAdapter, EDMAdapter


@pytest.fixture(scope="module")
def ds(module_seed):
    g = torch.Generator().manual_seed(module_seed)
    return ad.Dataset.from_array(torch.rand(20, 1, 4, 4, generator=g) * 2 - 1, labels=torch.arange(20) % 2)


@pytest.mark.parametrize("method,opts", [("optimal", {}), ("topk", {"k": 5}), ("wiener", {}), ("ls", {"patch": 3})])
def test_module_basics(ds, method, opts):
    den = make_denoiser(method, ds, dtype=torch.float64, **opts)
    assert isinstance(den, torch.nn.Module)
    assert den.dtype == torch.float64 and den.device == torch.device("cpu")
    assert den.state_dict() == {} and len(list(den.buffers())) > 0
    r = repr(den)
    assert r.startswith(type(den).__name__ + "(") and "device='cpu'" in r and "dtype=" in r
    assert den.config()["method"] == method  # config stays a method (diffusers' .config lives on the wrappers)
    x = torch.randn(3, 1, 4, 4)
    ref = den(x, 0.7)
    assert den.to("cpu") is den and torch.equal(den(x, 0.7), ref)
    with pytest.raises(TypeError, match="working precision is the dtype= option"):
        den.double()
    with pytest.raises(TypeError, match="working precision"):
        den.to(torch.float32)
    assert torch.equal(den(x, 0.7), ref)  # a refused cast changed nothing


def test_to_moves_the_dataset_buffers(ds):
    den = make_denoiser("optimal", ds)
    den.to("meta")  # a device every machine has; the same path as .cuda()
    assert den.device == torch.device("meta")
    assert den.train_images.device.type == "meta" and den.train_labels.device.type == "meta"
    assert den.keys.device.type == "meta" and den.dataset.device.type == "meta"
    assert ds.device.type == "cpu"  # the caller's dataset is not moved
    w = make_denoiser("wiener", ds).to("meta")
    assert w.U.device.type == "meta" and w.device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_to_cuda_matches_cpu(ds):
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    for method in ("optimal", "wiener"):
        den = make_denoiser(method, ds, dtype=torch.float64)
        ref = den(x, 0.5)
        den.cuda()
        assert den.device.type == "cuda"
        assert torch.allclose(den(x.cuda(), 0.5).cpu(), ref, rtol=0, atol=1e-10)
        den.cpu()
        assert torch.allclose(den(x, 0.5), ref, rtol=0, atol=1e-12)


def test_adapters_follow_module_casts():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 1, 1)

        def forward(self, x, sigma):
            return self.conv(x)

    a = EDMAdapter(Net(), (1, 4, 4), precondition=False)
    assert a.dtype == torch.float32 and a.device == torch.device("cpu")
    a.double()
    assert a.dtype == torch.float64 and a.net.conv.weight.dtype == torch.float64
    assert a(torch.randn(2, 1, 4, 4), 1.0).dtype == torch.float32  # output in the caller's dtype
    c = CallableAdapter(lambda x, s: x, (1, 4, 4))
    assert c.device is None and c.dtype is None  # the caller's


@pytest.mark.parametrize("sigma", [500, np.int64(500), torch.tensor(500), torch.tensor([500, 400, 3]), [1, 2, 3], True])
def test_integer_sigma_is_refused(ds, sigma):
    den = make_denoiser("optimal", ds)
    x = torch.randn(3, 1, 4, 4)
    with pytest.raises(TypeError, match="to_diffusers"):
        den(x, sigma)
    with pytest.raises(TypeError, match="not an integer diffusion timestep"):
        den.eps(x, sigma)


def test_float_sigma_forms_agree(ds):
    den = make_denoiser("optimal", ds, dtype=torch.float64)
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    ref = den(x, 2.0)
    for s in (np.float64(2.0), torch.tensor(2.0), torch.full((3,), 2.0), [2.0, 2.0, 2.0], np.full(3, 2.0)):
        assert torch.equal(den(x, s), ref)
