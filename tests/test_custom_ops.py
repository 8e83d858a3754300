"""The optimal denoiser's retrieval as torch.library custom ops: opcheck (schema, fake impl, autograd
registration, AOT dispatch), and torch.compile(fullgraph=True) of a sampler step with no graph break.

The compile test uses the aot_eager backend (Dynamo's full-graph capture and AOT autograd over the fake
implementations); Inductor compiles the same graph, but its C++ code generation takes minutes on 2 cores."""

import pytest
import torch

import analytic_diffusion as ad
from analytic_diffusion.denoisers import make_denoiser
from analytic_diffusion.denoisers.custom_ops import handle_of, optimal_jvp, optimal_mean


@pytest.fixture(scope="module")
def ds(module_seed):
    g = torch.Generator().manual_seed(module_seed)
    return ad.Dataset.from_array(torch.rand(12, 1, 3, 3, generator=g) * 2 - 1, labels=torch.arange(12) % 2)


@pytest.mark.parametrize("labels", [False, True])
def test_opcheck(ds, labels):
    den = make_denoiser("optimal", ds, dtype=torch.float64, flips=True)
    x = torch.randn(3, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    s = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    lab = torch.tensor([0, 1, 1]) if labels else None
    h = handle_of(den)
    # the AOT-dispatch check (the slow one) once; schema, fake and autograd registration for both variants
    utils = ("test_schema", "test_autograd_registration", "test_faketensor") + (
        () if labels else ("test_aot_dispatch_dynamic",)
    )
    torch.library.opcheck(optimal_mean, (x, s, lab, h), test_utils=utils)
    torch.library.opcheck(optimal_jvp, (x.detach(), s, lab, torch.randn_like(x.detach()), h), test_utils=utils)
    assert torch.equal(optimal_mean(x, s, lab, h), den(x, s, lab))


def test_compiled_sampler_step_has_no_graph_break(ds):
    den = make_denoiser("optimal", ds)

    def euler_step(x, sigma, sigma_next):
        return x + (x - den(x, sigma)) / sigma * (sigma_next - sigma)

    compiled = torch.compile(euler_step, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 1, 3, 3)
    for s, sn in ((0.9, 0.6), (0.6, 0.3)):
        s, sn = torch.tensor(s), torch.tensor(sn)
        assert torch.equal(compiled(x, s, sn), euler_step(x, s, sn))


def test_handles_follow_copies(ds):
    import copy

    den = make_denoiser("optimal", ds)
    twin = copy.deepcopy(den)
    assert handle_of(den) != handle_of(twin) and handle_of(den) == handle_of(den)
    x = torch.randn(2, 1, 3, 3)
    assert torch.equal(twin(x, 0.5), den(x, 0.5))


@pytest.mark.parametrize("method", ["optimal", "smoothed"])
def test_eager_call_without_grad_equals_the_op(ds, method):
    # Eager calls without autograd skip the op's dispatch (its first use imports torch._dynamo): same bits.
    den = make_denoiser(method, ds)
    x = torch.randn(3, *ds.image_shape)
    plain = den(x, 0.7)
    with torch.enable_grad():
        xr = x.clone().requires_grad_(True)
        through_op = den(xr, 0.7)
    assert through_op.requires_grad and torch.equal(plain, through_op.detach())
