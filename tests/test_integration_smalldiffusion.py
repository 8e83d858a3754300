"""smalldiffusion runs analytic denoisers: its own samples() loop over to_smalldiffusion(den) equals the engine's
Euler on the same σ grid, σ given as [] or [B, 1, …, 1]. The package is reached through load_smalldiffusion (the
package itself, or its diffusion.py and model.py run from the installed files where ``import smalldiffusion``
fails for want of a working torchvision, as on the CPU-only torch build here)."""

import pytest
import torch

import analytic_diffusion as ad
from analytic_diffusion.denoisers import make_denoiser
from analytic_diffusion.integrations import load_smalldiffusion, to_smalldiffusion

pytest.importorskip("accelerate", reason="smalldiffusion's diffusion.py imports accelerate (pip install --no-deps)")
pytest.importorskip("einops", reason="smalldiffusion's model.py imports einops")
try:
    sd = load_smalldiffusion()
except ImportError as exc:
    pytest.skip(f"smalldiffusion: {exc}", allow_module_level=True)


@pytest.fixture(scope="module")
def ds(module_seed):
    g = torch.Generator().manual_seed(module_seed)
    return ad.Dataset.from_array(torch.rand(40, 1, 4, 4, generator=g) * 2 - 1, labels=torch.arange(40) % 2)


@pytest.mark.parametrize("method,dtype", [("optimal", torch.float32), ("wiener", torch.float64)])
def test_samples_loop_matches_engine_euler(ds, method, dtype):
    den = make_denoiser(method, ds, dtype=torch.float64)
    model = to_smalldiffusion(den)
    assert model.input_dims == (1, 4, 4) and model.rand_input(3).shape == (3, 1, 4, 4)
    # samples() takes its step lengths in the grid's dtype, so the grid is given in the run's dtype.
    assert callable(sd.samples) and not hasattr(sd, "Accelerator")  # its own names, not its imports
    sigmas = sd.ScheduleLogLinear(200, sigma_min=0.01, sigma_max=20).sample_sigmas(10).to(dtype)
    z = torch.randn(5, 1, 4, 4, dtype=dtype)
    xt = z * sigmas[0]
    *_, got = sd.samples(model, sigmas, gam=1.0, mu=0.0, batchsize=5, xt=xt.clone())  # DDIM (= Euler)
    ref = ad.sampling.sample_euler(den, xt, sigmas.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert got.dtype == dtype and (got - ref).abs().max() <= tol


def test_sigma_shapes_and_labels(ds):
    den = make_denoiser("optimal", ds, dtype=torch.float64)
    model = to_smalldiffusion(den)
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    sig = torch.tensor([0.3, 0.8, 2.0], dtype=torch.float64)
    ref = (x - den(x, sig)) / sig.view(-1, 1, 1, 1)
    assert torch.equal(model(x, sig.view(-1, 1, 1, 1)), ref)
    assert torch.equal(model.predict_eps(x, torch.tensor(0.8, dtype=torch.float64)), (x - den(x, 0.8)) / 0.8)
    labels = torch.tensor([1, 0, 1])
    assert torch.equal(model(x, sig.view(-1, 1, 1, 1), cond=labels), (x - den(x, sig, labels)) / sig.view(-1, 1, 1, 1))
    with pytest.raises(ValueError, match="sigma"):
        model(x, torch.ones(2, 1, 1, 1))
    with pytest.raises(ValueError, match="cfg_scale"):
        model.predict_eps_cfg(x, torch.tensor(0.5), labels, 2.0)


def test_ideal_denoiser_agrees_near_the_origin(ds):
    """smalldiffusion's IdealDenoiser (expanded-form softmax in the input dtype) and the engine's optimal give the
    same ε̂ on well-conditioned inputs; bench/smalldiffusion_ideal.py measures where they part."""
    data = ds.images_float(dtype=torch.float64)
    ideal = sd.IdealDenoiser(data)
    model = to_smalldiffusion(make_denoiser("optimal", ds, dtype=torch.float64))
    x = data[:4] + 0.5 * torch.randn(4, 1, 4, 4, dtype=torch.float64)
    s = torch.tensor(0.5, dtype=torch.float64)
    assert torch.allclose(ideal(x, s), model(x, s), rtol=0, atol=1e-10)


def test_load_smalldiffusion_runs_the_installed_package():
    """The namespace holds smalldiffusion's own schedules, sampler and models, loaded once."""
    import importlib.util
    import inspect
    import os

    assert load_smalldiffusion() is sd
    folder = next(iter(importlib.util.find_spec("smalldiffusion").submodule_search_locations))
    assert os.path.samefile(inspect.getsourcefile(sd.ScheduleLogLinear), os.path.join(folder, "diffusion.py"))
    assert os.path.samefile(inspect.getsourcefile(sd.IdealDenoiser), os.path.join(folder, "model.py"))
    assert callable(sd.samples) and not hasattr(sd, "Accelerator")  # its own names, not its imports
    sigmas = sd.ScheduleLogLinear(100, sigma_min=0.01, sigma_max=10).sample_sigmas(5)
    assert sigmas.shape == (6,) and float(sigmas[0]) == pytest.approx(10.0)
