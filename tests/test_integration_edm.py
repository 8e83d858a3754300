"""EDM: analytic denoisers as EDM-style networks run by an EDM-style sampler loop, and EDM network pickles
({'ema': net}) loaded by load_network / compare --network only with an explicit allow-pickle.

NVlabs EDM is not a package (no PyPI release), so its deterministic sampler (Algorithm 2 with S_churn = 0, as
in its generate.py) is written here against the network protocol it uses: net.sigma_min / sigma_max /
round_sigma / img_* / label_dim and net(x, t, class_labels) with one-hot labels, all in float64."""

import pickle

import pytest
import torch

import analytic_diffusion as ad
from analytic_diffusion.cli import build_parser
from analytic_diffusion.denoisers import make_denoiser
from analytic_diffusion.integrations import to_edm
from analytic_diffusion.networks import load_network


@pytest.fixture(scope="module")
def den(module_seed):
    g = torch.Generator().manual_seed(module_seed)
    ds = ad.Dataset.from_array(torch.rand(30, 1, 5, 5, generator=g) * 2 - 1, labels=torch.arange(30) % 3)
    return make_denoiser("optimal", ds, dtype=torch.float64)


def edm_style_sampler(net, latents, class_labels=None, num_steps=8, sigma_min=0.002, sigma_max=80, rho=7):
    sigma_min = max(sigma_min, net.sigma_min)
    sigma_max = min(sigma_max, net.sigma_max)
    i = torch.arange(num_steps, dtype=torch.float64)
    t = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t = torch.cat([net.round_sigma(t), torch.zeros_like(t[:1])])
    x_next = latents.to(torch.float64) * t[0]
    for k in range(num_steps):
        t_cur, t_next, x_cur = t[k], t[k + 1], x_next
        d_cur = (x_cur - net(x_cur, t_cur, class_labels).to(torch.float64)) / t_cur
        x_next = x_cur + (t_next - t_cur) * d_cur
        if k < num_steps - 1:
            d_prime = (x_next - net(x_next, t_next, class_labels).to(torch.float64)) / t_next
            x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def test_edm_sampler_loop_matches_engine_heun(den):
    net = to_edm(den)
    assert (net.img_resolution, net.img_channels, net.label_dim) == (5, 1, 3)
    assert net.sigma_min == 0 and net.sigma_max == float("inf") and isinstance(net, torch.nn.Module)
    z = torch.randn(4, 1, 5, 5, dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, 2])
    onehot = torch.nn.functional.one_hot(labels, 3).to(torch.float64)
    got = edm_style_sampler(net, z, onehot)
    grid = ad.get_schedule("karras", 8)
    ref = ad.sampling.sample_heun(den, z * grid.init_sigma, grid.sigmas, extra_args={"class_labels": labels})
    assert (got - ref).abs().max() <= 1e-10
    x = torch.randn(4, 1, 5, 5, dtype=torch.float64)
    for s in (0.7, torch.full((4,), 0.7, dtype=torch.float64), torch.full((4, 1, 1, 1), 0.7, dtype=torch.float64)):
        assert torch.equal(net(x, s), den(x, 0.7))


def test_edm_pickle_needs_allow_pickle(den, tmp_path):
    path = tmp_path / "network-snapshot-000000.pkl"
    with open(path, "wb") as f:  # what NVlabs EDM writes: a plain pickle of a dict holding the EMA network
        pickle.dump({"ema": to_edm(den), "loss_fn": None, "augment_pipe": None}, f)
    with pytest.raises(ValueError, match="allow_pickle"):
        load_network(path)
    net = load_network(path, allow_pickle=True)
    assert net.image_shape == (1, 5, 5) and net.label_dim == 3
    # The adapter runs a loaded net in the dtype of its first tensor (here the float32 training images), so x, σ
    # and x̂0 pass through float32.
    assert net.dtype == torch.float32
    x = torch.randn(3, 1, 5, 5, dtype=torch.float64)
    labels = torch.tensor([2, 0, 1])
    assert torch.allclose(net(x, 1.3, labels), den(x, 1.3, labels), rtol=0, atol=1e-6)
    assert torch.allclose(net(x, 0.5), den(x, 0.5), rtol=0, atol=1e-6)
    assert not torch.allclose(net(x, 1.3, labels), den(x, 1.3, (labels + 1) % 3), rtol=0, atol=1e-3)


def test_compare_help_warns_that_pickles_run_code():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    text = " ".join(sub.choices["compare"].format_help().split())
    assert "--allow-pickle" in text and "arbitrary code" in text
    args = parser.parse_args(["compare", "--network", "x.pkl", "--allow-pickle"])
    assert args.allow_pickle is True
