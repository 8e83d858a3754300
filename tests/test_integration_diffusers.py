"""diffusers runs analytic denoisers unchanged: DDIMPipeline / DDPMPipeline / an EulerDiscreteScheduler loop with
to_diffusers(...) as the UNet, against the engine's own samplers on the matching σ grids (real diffusers)."""

import pytest
import torch

import analytic_diffusion as ad
from analytic_diffusion.denoisers import make_denoiser
from analytic_diffusion.integrations import float64_alphas_cumprod, to_diffusers

diffusers = pytest.importorskip("diffusers", reason="diffusers is in the test extra (pip install -e .[test])")


@pytest.fixture(scope="module")
def ds(module_seed):
    g = torch.Generator().manual_seed(module_seed)
    return ad.Dataset.from_array(torch.rand(32, 1, 6, 6, generator=g) * 2 - 1, labels=torch.arange(32) % 2)


def _run(pipe, n, steps):
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(i) for i in range(n)]  # ad.sample's seeds 0..n-1
    return pipe(batch_size=n, generator=gens, num_inference_steps=steps, output_type="pt").images


@pytest.mark.parametrize(
    "pipeline,sampler,method,pred",
    [
        ("DDIMPipeline", "ddim", "wiener", "epsilon"),
        ("DDIMPipeline", "ddim", "wiener", "v_prediction"),
        ("DDIMPipeline", "ddim", "optimal", "epsilon"),
        ("DDPMPipeline", "ddpm", "wiener", "epsilon"),
        ("DDPMPipeline", "ddpm", "optimal", "v_prediction"),
    ],
)
def test_pipelines_match_engine(ds, pipeline, sampler, method, pred):
    den = make_denoiser(method, ds, dtype=torch.float64)
    Sched = diffusers.DDIMScheduler if pipeline == "DDIMPipeline" else diffusers.DDPMScheduler
    # clip_sample off: DDPM's clipped update (posterior mean from clip(x̂0) and x_t) differs from the σ-space one.
    sched = Sched(num_train_timesteps=1000, prediction_type=pred, clip_sample=False)
    model = to_diffusers(den, sched, pred)
    assert model.config.in_channels == 1 and model.config.sample_size == 6 and model.config.out_channels == 1
    pipe = getattr(diffusers, pipeline)(unet=model, scheduler=sched)
    n, steps = 3, 8
    got = _run(pipe, n, steps)
    ref = ad.sample(den, n, sampler=sampler, schedule="vp-linear", steps=steps, seed=0, progress=False).samples
    ref = (ref / 2 + 0.5).clamp(0, 1)
    assert got.shape == ref.shape and got.dtype == torch.float32
    assert (got - ref).abs().max() <= 1e-5
    assert bool(((ref > 0) & (ref < 1)).any())  # not all saturated by the [0, 1] clamp


def test_float64_table_loop_matches_engine_to_rounding(ds):
    den = make_denoiser("wiener", ds, dtype=torch.float64)
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    table = float64_alphas_cumprod(sched)
    assert (table - sched.alphas_cumprod.double()).abs().max() < 1e-6
    sched.alphas_cumprod = table  # the scheduler's own update in float64 too
    model = to_diffusers(den, sched, float64=True, dtype=torch.float64)
    steps, n = 6, 3
    grid = ad.get_schedule("vp-linear", steps)
    z = torch.randn(n, 1, 6, 6, dtype=torch.float64)
    sched.set_timesteps(steps)
    assert sched.timesteps.tolist() == grid.timesteps.tolist()
    x = z.clone()
    for t in sched.timesteps:
        x = sched.step(model(x, t).sample, t, x).prev_sample
    ref = ad.sampling.sample_ddim(den, z * grid.init_sigma, grid.sigmas)
    assert (x - ref).abs().max() <= 1e-12


def test_euler_discrete_fractional_timesteps(ds):
    """EulerDiscreteScheduler passes fractional timesteps; their σ (linear interpolation, as the scheduler places
    them) makes its loop the engine's Euler on the scheduler's own σ grid."""
    den = make_denoiser("wiener", ds, dtype=torch.float64)
    sched = diffusers.EulerDiscreteScheduler(num_train_timesteps=1000)
    model = to_diffusers(den, sched, dtype=torch.float64)
    steps = 7
    sched.set_timesteps(steps)
    assert any(float(t) != round(float(t)) for t in sched.timesteps)
    z = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    x = z * sched.init_noise_sigma
    for t in sched.timesteps:
        eps = model(sched.scale_model_input(x, t), t).sample
        x = sched.step(eps, t, x).prev_sample
    sig = sched.sigmas.double()
    ref = ad.sampling.sample_euler(den, z * sig[0], sig)
    assert (x - ref).abs().max() <= 1e-5


def test_model_mapping_and_errors(ds):
    den = make_denoiser("optimal", ds, dtype=torch.float64)
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000)
    model = to_diffusers(den, sched)
    assert isinstance(model, torch.nn.Module) and model.dtype == torch.float32 and model.device.type == "cpu"
    x = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    t = torch.tensor([500, 20])
    abar = sched.alphas_cumprod[t].double().view(-1, 1, 1, 1)
    sigma = ((1 - abar) / abar).sqrt()
    eps = model(x, t).sample
    x0 = den(x / abar.sqrt(), sigma.reshape(-1))
    assert torch.allclose(eps, (x - abar.sqrt() * x0) / (1 - abar).sqrt(), rtol=0, atol=1e-10)
    (tup,) = model(x, 500, return_dict=False)
    assert torch.allclose(tup, model(x, torch.tensor(500)).sample, rtol=0, atol=0)
    labels = torch.tensor([1, 0])
    assert torch.allclose(
        model(x, t, class_labels=labels).sample,
        (x - abar.sqrt() * den(x / abar.sqrt(), sigma.reshape(-1), labels)) / (1 - abar).sqrt(),
        rtol=0,
        atol=1e-10,
    )
    with pytest.raises(ValueError, match="timestep"):
        model(x, 1000)
    with pytest.raises(ValueError, match="prediction_type"):
        to_diffusers(den, sched, "v_prediction")
    with pytest.raises(ValueError, match="prediction_type"):
        to_diffusers(den, diffusers.DDIMScheduler(prediction_type="v_prediction"), "flow")
    with pytest.raises(TypeError, match="scheduler"):
        to_diffusers(den, object())
