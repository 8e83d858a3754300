"""k-diffusion's calling convention: the engine's samplers take extra_args= / disable= / a dict callback,
``ad.sample(sampler=fn)`` runs any k-diffusion-style sampler, and a Schedule stands in for its σ tensor.

The k-diffusion package itself cannot be imported here: ``import k_diffusion`` (0.1.1.post1, installed with
--no-deps) imports torchvision at package import (k_diffusion/utils.py), and the torchvision wheel matching torch
2.13 (0.28.0) fails to import against the CPU torch build ("operator torchvision::nms does not exist"). So the
protocol is tested with samplers written here in k-diffusion's calling convention (same signature, same
dict-callback keys, same noise_sampler(sigma, sigma_next) hook, same model(x, sigma * s_in, **extra_args) call).
"""

import math

import numpy as np
import pytest
import torch

import analytic_diffusion as ad
from analytic_diffusion.denoisers import make_denoiser
from analytic_diffusion.sampling import sample_ddim, sample_euler, sample_heun


@pytest.fixture(scope="module")
def den(module_seed):
    g = torch.Generator().manual_seed(module_seed)
    images = torch.rand(24, 1, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    ds = ad.Dataset.from_array(images.float(), labels=torch.arange(24) % 3)
    return make_denoiser("optimal", ds, dtype=torch.float64, backend="torch")


def kd_sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """k-diffusion's sample_euler with churn 0, in its calling convention."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        d = (x - denoised) / sigmas[i]
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


def kd_sample_euler_ancestral(
    model, x, sigmas, extra_args=None, callback=None, disable=None, eta=1.0, noise_sampler=None
):
    """k-diffusion's sample_euler_ancestral, in its calling convention (noise from noise_sampler)."""
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = (lambda s, sn: torch.randn_like(x)) if noise_sampler is None else noise_sampler
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        s, sn = sigmas[i], sigmas[i + 1]
        sigma_up = torch.minimum(sn, eta * (sn**2 * (s**2 - sn**2) / s**2) ** 0.5)
        sigma_down = (sn**2 - sigma_up**2) ** 0.5
        x = x + (x - denoised) / s * (sigma_down - s)
        if sn > 0:
            x = x + noise_sampler(s, sn) * sigma_up
    return x


@pytest.mark.parametrize("name", ["euler", "heun", "ddim"])
def test_engine_samplers_take_kdiffusion_keywords(den, name):
    fn = {"euler": sample_euler, "heun": sample_heun, "ddim": sample_ddim}[name]
    sched = ad.get_schedule("karras", 5, sigma_max=10.0)
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64) * sched.init_sigma
    labels = torch.tensor([0, 1, 2, 0])
    seen, positional = [], []
    ref = fn(
        den,
        x,
        sched.sigmas,
        denoiser_kwargs={"class_labels": labels},
        callback=lambda i, xi, s, x0: positional.append((i, s.clone(), x0.clone())),
    )
    out = fn(den, x, sched, extra_args={"class_labels": labels}, disable=True, callback=seen.append)
    assert torch.equal(out, ref)
    assert [d["i"] for d in seen] == list(range(sched.steps))
    for d, (_i, s, x0) in zip(seen, positional):
        assert set(d) == {"x", "i", "sigma", "sigma_hat", "denoised"}
        assert d["sigma"].dim() == 0 and float(d["sigma"]) == pytest.approx(float(s[0]), rel=0, abs=0)
        assert torch.equal(d["denoised"], x0)
    with pytest.raises(ValueError, match="not both"):
        fn(den, x, sched.sigmas, extra_args={"class_labels": labels}, denoiser_kwargs={"class_labels": labels})


def test_sample_runs_a_kdiffusion_style_sampler(den):
    kw = dict(
        n=5,
        steps=6,
        schedule="karras",
        schedule_kwargs={"sigma_max": 10.0},
        seed=3,
        dtype=torch.float64,
        progress=False,
        class_labels=[0, 1, 2, 1, 0],
        batch_size=2,
    )
    ref = ad.sample(den, sampler="euler", **kw)
    steps = []
    got = ad.sample(den, sampler=kd_sample_euler, callback=lambda i, x, s, x0: steps.append(i), **kw)
    assert (got.samples - ref.samples).abs().max() <= 1e-12
    assert steps == list(range(6)) * 3  # three batches, the engine's positional callback adapted to a dict
    assert got.config["sampler"].endswith("kd_sample_euler")


def test_kdiffusion_noise_sampler_gets_per_sample_generators(den):
    """An ancestral k-diffusion sampler with the engine's noise_sampler equals the engine's DDPM, whatever the
    batch size (each sample's noise comes from its own seeded generator)."""
    kw = dict(
        n=4,
        steps=5,
        schedule="karras",
        schedule_kwargs={"sigma_max": 10.0},
        seed=11,
        dtype=torch.float64,
        progress=False,
    )
    ref = ad.sample(den, sampler="ddpm", **kw)
    one = ad.sample(den, sampler=kd_sample_euler_ancestral, batch_size=1, **kw)
    all_ = ad.sample(den, sampler=kd_sample_euler_ancestral, batch_size=4, **kw)
    assert (one.samples - ref.samples).abs().max() <= 1e-10
    assert (all_.samples - ref.samples).abs().max() <= 1e-10
    with pytest.raises(ValueError, match="clip_x0"):
        ad.sample(den, sampler=kd_sample_euler, clip_x0=True, **kw)


def test_schedule_stands_in_for_its_sigmas():
    sched = ad.get_schedule("vp-linear", 7)
    assert len(sched) == 8 and torch.equal(sched[2], sched.sigmas[2])
    assert np.array_equal(np.asarray(sched), sched.sigmas.numpy())
    assert torch.equal(torch.as_tensor(sched), sched.sigmas)
    t = sched.tensor(dtype=torch.float32)
    assert t.dtype == torch.float32 and torch.equal(t, sched.sigmas.float())
    assert math.isclose(float(sched[0]), float(sched.sigmas[0]))
