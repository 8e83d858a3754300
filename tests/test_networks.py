"""analytic_diffusion.networks: adapters on toy networks with known answers, the reference models, the trainer."""

import json
import math

import pytest
import torch

from analytic_diffusion.cli import main
from analytic_diffusion.networks import (
    CallableAdapter,
    EDMAdapter,
    LocalResNet,
    SmallUNet,
    VPAdapter,
    load_network,
    train_network,
    vp_alphas_cumprod,
)

SHAPE = (2, 4, 4)
MU, S = 0.3, 0.7  # data ~ N(MU, S² I)


def gauss_x0(x, sigma):
    """Exact posterior mean for N(MU, S² I) data at noise level σ (per row)."""
    s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1)
    return MU + S**2 / (S**2 + s**2) * (x - MU)


def rows(n=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn((n, *SHAPE), generator=g) * 2).to(dtype)


SIGMAS = torch.tensor([0.05, 0.3, 1.0, 2.5, 7.0], dtype=torch.float64)


# ------------------------------------------------------------------------------------------------- EDMAdapter
class EDMDirect(torch.nn.Module):
    """EDMPrecond style: returns D(x; σ) itself."""

    def forward(self, x, sigma, class_labels=None):
        return gauss_x0(x, sigma)


class EDMRaw(torch.nn.Module):
    """Raw F such that c_skip·x + c_out·F(c_in·x, c_noise) is the exact posterior mean."""

    def __init__(self, sd=0.5):
        super().__init__()
        self.sd = sd
        self.dummy = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, y, c_noise):
        s = torch.exp(4 * c_noise).reshape(-1, 1, 1, 1)
        sd2 = self.sd**2
        x = y * (s**2 + sd2).sqrt()
        c_skip, c_out = sd2 / (s**2 + sd2), s * self.sd / (s**2 + sd2).sqrt()
        return (gauss_x0(x, s.reshape(-1)) - c_skip * x) / c_out


@pytest.mark.parametrize("precondition", [False, True])
def test_edm_adapter_exact_gaussian(precondition):
    net = EDMRaw() if precondition else EDMDirect()
    d = EDMAdapter(net, SHAPE, precondition=precondition, dtype=torch.float64)
    x = rows()
    torch.testing.assert_close(d(x, SIGMAS), gauss_x0(x, SIGMAS), rtol=1e-10, atol=1e-10)
    # score / eps forms come from the base class
    torch.testing.assert_close(d.eps(x, SIGMAS), (x - gauss_x0(x, SIGMAS)) / SIGMAS.view(-1, 1, 1, 1))
    assert d.config()["precondition"] is precondition and d.config()["network"] in ("EDMRaw", "EDMDirect")


# ------------------------------------------------------------------------------------------------- VPAdapter
def lam_interp(ac, t):
    """ᾱ at fractional t, linear in log-SNR between integer steps (the adapter's 'interp' rule)."""
    lam = (ac / (1 - ac)).log()
    i = t.floor().long().clamp(0, len(ac) - 2)
    f = t - i
    return torch.sigmoid(lam[i] + f * (lam[i + 1] - lam[i]))


class VPToy(torch.nn.Module):
    """ε or v prediction that is exact for the Gaussian data at its (integer or fractional/continuous) t."""

    def __init__(self, ac=None, prediction="epsilon", kamb=False):
        super().__init__()
        self.ac, self.prediction, self.kamb = ac, prediction, kamb
        self.register_buffer("dummy", torch.zeros((), dtype=torch.float64))

    def forward(self, x_vp, t):
        t_int = None if torch.is_floating_point(t) else t
        t = t.to(torch.float64)
        if self.kamb:
            abar = torch.cos(t / 1.008 * math.pi / 2) ** 2
        elif t_int is not None:  # "nearest" passes int64 timesteps
            abar = self.ac[t_int]
        else:
            abar = lam_interp(self.ac, t)
        a, b = abar.sqrt().view(-1, 1, 1, 1), (1 - abar).sqrt().view(-1, 1, 1, 1)
        sig = (b / a).reshape(-1)
        x0 = gauss_x0(x_vp / a, sig)
        eps = (x_vp - a * x0) / b
        return type("Out", (), {"sample": eps if self.prediction == "epsilon" else a * eps - b * x0})()


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_vp_adapter_nearest_quantises_sigma(prediction):
    ac = vp_alphas_cumprod("linear")
    d = VPAdapter(
        VPToy(ac, prediction),
        image_shape=SHAPE,
        alphas_cumprod="linear",
        prediction=prediction,
        t_mapping="nearest",
        dtype=torch.float64,
    )
    x = rows()
    t = (ac[None] - (1 / (1 + SIGMAS**2))[:, None]).abs().argmin(1)
    sig_t = ((1 - ac[t]) / ac[t]).sqrt()
    torch.testing.assert_close(d(x, SIGMAS), gauss_x0(x, sig_t), rtol=1e-9, atol=1e-9)
    assert not torch.allclose(sig_t, SIGMAS)  # the grid really is coarser than the request
    assert d.clamped == 0


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_vp_adapter_interp_is_exact_at_sigma(prediction):
    ac = vp_alphas_cumprod("cosine")
    d = VPAdapter(
        VPToy(ac, prediction),
        image_shape=SHAPE,
        alphas_cumprod=ac,
        prediction=prediction,
        t_mapping="interp",
        dtype=torch.float64,
    )
    x = rows()
    torch.testing.assert_close(d(x, SIGMAS), gauss_x0(x, SIGMAS), rtol=1e-9, atol=1e-9)


def test_vp_adapter_kamb_continuous_and_clamp():
    d = VPAdapter(VPToy(kamb=True), image_shape=SHAPE, alphas_cumprod="kamb", dtype=torch.float64)
    x = rows()
    torch.testing.assert_close(d(x, SIGMAS), gauss_x0(x, SIGMAS), rtol=1e-9, atol=1e-9)
    with pytest.warns(RuntimeWarning, match="clamped"):
        out = d(x[:1], 500.0)
    torch.testing.assert_close(out, gauss_x0(x[:1], d.sigma_max))
    assert d.clamped == 1 and d.config()["t_mapping"] == "exact"


@pytest.mark.parametrize("t_mapping", ["nearest", "interp"])
def test_vp_adapter_float32_engine_grid_is_not_clamped(t_mapping):
    """The engine's own VP grid run in float32 rounds σ(t_0) just below its float64 value: not a clamp; a σ
    really below the range still is."""
    import warnings

    import analytic_diffusion as ad

    ac = vp_alphas_cumprod("linear")
    d = VPAdapter(VPToy(ac), image_shape=SHAPE, alphas_cumprod="linear", t_mapping=t_mapping, dtype=torch.float32)
    grid = ad.get_schedule("vp-linear", 10)
    assert int(grid.timesteps[-1]) == 0 and float(grid.sigmas[-2]) == pytest.approx(d.sigma_min, rel=1e-12)
    x = torch.randn(3, *SHAPE) * grid.init_sigma
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ad.sample_ddim(d, x, grid.sigmas)
    assert d.clamped == 0
    with pytest.warns(RuntimeWarning, match="clamped"):
        d(x, d.sigma_min * (1 - 1e-5))
    assert d.clamped == 3


def test_vp_adapter_tuple_output_and_learned_variance():
    ac = vp_alphas_cumprod("linear")
    toy = VPToy(ac)

    def model(x_vp, t):  # diffusers-style tuple with 2·C channels (ε, variance)
        eps = toy(x_vp, t).sample
        return (torch.cat([eps, torch.full_like(eps, 99.0)], 1),)

    d = VPAdapter(model, image_shape=SHAPE, dtype=torch.float64)
    ref = VPAdapter(toy, image_shape=SHAPE, dtype=torch.float64)
    x = rows()
    torch.testing.assert_close(d(x, SIGMAS), ref(x, SIGMAS))


# ------------------------------------------------------------------------------------------------- CallableAdapter
def test_callable_adapter_kinds_agree():
    x = rows()
    x0 = CallableAdapter(lambda x, s: gauss_x0(x, s), SHAPE, kind="x0", dtype=torch.float64)
    eps = CallableAdapter(
        lambda x, s: (x - gauss_x0(x, s)) / s.view(-1, 1, 1, 1), SHAPE, kind="eps", dtype=torch.float64
    )
    score = CallableAdapter(
        lambda x, s: (gauss_x0(x, s) - x) / s.view(-1, 1, 1, 1) ** 2, SHAPE, kind="score", dtype=torch.float64
    )
    ref = gauss_x0(x, SIGMAS)
    for d in (x0, eps, score):
        torch.testing.assert_close(d(x, SIGMAS), ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(score.score(x, SIGMAS), x0.score(x, SIGMAS))


# ------------------------------------------------------------------------------------------------- common options
def test_batch_chunking_is_identical():
    calls = []

    def fn(x, s):
        calls.append(x.shape[0])
        return gauss_x0(x, s)

    x = rows(11)
    s = torch.linspace(0.1, 3, 11, dtype=torch.float64)
    one = CallableAdapter(fn, SHAPE, dtype=torch.float64)(x, s)
    chunked = CallableAdapter(fn, SHAPE, dtype=torch.float64, batch_size=4)(x, s)
    assert calls == [11, 4, 4, 3]
    assert torch.equal(one, chunked)
    net = EDMRaw()
    assert torch.equal(EDMAdapter(net, SHAPE)(x, s), EDMAdapter(net, SHAPE, batch_size=3)(x, s))


def test_dtype_and_device_handling():
    seen = {}

    class Net32(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def forward(self, x, sigma):
            seen["x"], seen["s"] = x.dtype, sigma.dtype
            return gauss_x0(x, sigma) * self.w

    d = EDMAdapter(Net32(), SHAPE, precondition=False)
    assert d.dtype == torch.float32 and d.device == torch.device("cpu")
    x = rows()
    out = d(x, SIGMAS)
    assert out.dtype == torch.float64 and seen == {"x": torch.float32, "s": torch.float32}
    torch.testing.assert_close(out, gauss_x0(x, SIGMAS), rtol=1e-5, atol=1e-5)
    assert d.score(x, SIGMAS).dtype == torch.float64
    # a parameterless callable follows the caller: float64 in, float64 computation, no rounding to float32
    f = CallableAdapter(lambda x, s: (seen.update(x=x.dtype), gauss_x0(x, s))[1], SHAPE)
    torch.testing.assert_close(f(x, SIGMAS), gauss_x0(x, SIGMAS), rtol=1e-12, atol=1e-12)
    assert seen["x"] == torch.float64 and f.config()["dtype"] == "caller's"
    assert EDMAdapter(Net32(), SHAPE, dtype=torch.float64).dtype == torch.float64


def test_class_labels_reach_the_net():
    got = []

    def fn(x, s, class_labels):
        got.append(class_labels.clone())
        return x * 0 + class_labels.view(-1, 1, 1, 1).to(x.dtype)

    d = CallableAdapter(fn, SHAPE, batch_size=2)
    x = rows(3, dtype=torch.float32)
    out = d(x, 1.0, class_labels=torch.tensor([4, 5, 6]))
    assert torch.equal(out[:, 0, 0, 0], torch.tensor([4.0, 5.0, 6.0]))
    assert [g.tolist() for g in got] == [[4, 5], [6]]

    def kw(x, sigma, labels=None):
        got.append(labels)
        return x

    CallableAdapter(kw, SHAPE, label_kw="labels")(x, 1.0, class_labels=2)
    assert got[-1].tolist() == [2, 2, 2]
    CallableAdapter(kw, SHAPE, label_kw="labels")(x, 1.0)
    assert got[-1] is None  # unconditional calls pass nothing

    one_hot = []

    def edm(x, sigma, class_labels=None):
        one_hot.append(class_labels)
        return x

    EDMAdapter(edm, SHAPE, precondition=False, label_dim=10)(x, 1.0, class_labels=torch.tensor([1, 2, 9]))
    assert one_hot[0].shape == (3, 10) and one_hot[0].argmax(1).tolist() == [1, 2, 9]


def test_bad_inputs_raise_clear_errors():
    toy = VPToy(vp_alphas_cumprod("linear"))
    with pytest.raises(ValueError, match="prediction"):
        VPAdapter(toy, image_shape=SHAPE, prediction="score")
    with pytest.raises(ValueError, match="t_mapping"):
        VPAdapter(toy, image_shape=SHAPE, t_mapping="linear")
    with pytest.raises(ValueError, match="VP schedule"):
        VPAdapter(toy, image_shape=SHAPE, alphas_cumprod="sigmoid")
    with pytest.raises(ValueError, match="image_shape is required"):
        VPAdapter(toy)
    with pytest.raises(TypeError, match="callable"):
        EDMAdapter(42, SHAPE)
    with pytest.raises(ValueError, match="kind"):
        CallableAdapter(lambda x, s: x, SHAPE, kind="v")
    with pytest.raises(ValueError, match="image_shape"):
        CallableAdapter(lambda x, s: x, (4, 4))
    d = CallableAdapter(lambda x, s: x, SHAPE)
    with pytest.raises(ValueError, match="expected shape"):
        d(torch.zeros(2, 1, 4, 4), 1.0)
    with pytest.raises(ValueError, match="sigma"):
        d(torch.zeros(2, *SHAPE), 0.0)


# ------------------------------------------------------------------------------------------------- models
def _randomise_output(m):
    torch.nn.init.normal_(m.out.weight, std=0.1)
    torch.nn.init.normal_(m.out.bias, std=0.1)
    return m


def test_model_shapes_and_labels():
    torch.manual_seed(0)
    x, c = torch.randn(2, 3, 8, 8), torch.randn(2)
    for m in (LocalResNet(3, 8, 2), SmallUNet(3, 8, 1), LocalResNet(3, 8, 1, label_dim=4)):
        assert m(x, c).shape == x.shape
    m = _randomise_output(LocalResNet(3, 8, 1, label_dim=4))
    a, b = m(x, c, torch.tensor([0, 1])), m(x, c, torch.tensor([2, 3]))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="padding"):
        LocalResNet(1, 8, 1, padding="reflect")
    cfg = LocalResNet(1, 64, 8).config()
    assert cfg["receptive_field"] == 2 * (2 * 8 + 2) + 1 == 37


def test_circular_resnet_is_translation_equivariant():
    torch.manual_seed(1)
    m = _randomise_output(LocalResNet(1, 8, 2, padding="circular")).eval()
    x, c = torch.randn(2, 1, 12, 12), torch.randn(2)
    with torch.no_grad():
        shifted = m(torch.roll(x, (3, -5), (2, 3)), c)
        ref = torch.roll(m(x, c), (3, -5), (2, 3))
        torch.testing.assert_close(shifted, ref, rtol=1e-5, atol=1e-5)
        z = _randomise_output(LocalResNet(1, 8, 2, padding="zeros")).eval()
        assert (z(torch.roll(x, (3, -5), (2, 3)), c) - torch.roll(z(x, c), (3, -5), (2, 3))).abs().max() > 1e-3


def test_resnet_receptive_field():
    torch.manual_seed(2)
    m = _randomise_output(LocalResNet(1, 8, 2, norm="none")).eval()  # GroupNorm statistics are image-wide
    rf = m.receptive_field
    assert rf == 13
    r = rf // 2
    x, c = torch.randn(1, 1, 32, 32), torch.randn(1)
    x2 = x.clone()
    x2[0, 0, 16, 16] += 1.0
    with torch.no_grad():
        diff = (m(x2, c) - m(x, c)).abs()[0, 0]
    yy, xx = torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij")
    inside = ((yy - 16).abs() <= r) & ((xx - 16).abs() <= r)
    assert diff[~inside].max() == 0
    assert diff[16 - r, 16 - r] > 0 and diff[16 + r, 16] > 0  # the corner and edge of the field do change


# ------------------------------------------------------------------------------------------------- trainer
TINY = dict(channels=8, blocks=1, batch_size=8, progress=False)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convolutions run far faster on one thread, above all on a shared, oversubscribed machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_data(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, 1, 8, 8), generator=g) * 2 - 1


def test_training_memorises_a_small_set():
    # 8 two-level images: memorisable, and locally predictable, so a tiny ResNet learns them in 100 steps.
    data = torch.linspace(-0.9, 0.9, 8).view(8, 1, 1, 1) * torch.ones(8, 1, 8, 8)
    data[..., :4] *= -1
    res = train_network(data, steps=100, lr=1e-2, **{**TINY, "channels": 16})
    first, last = sum(res.losses[:20]) / 20, sum(res.losses[-20:]) / 20
    assert last < 0.6 * first, (first, last)
    # λ(σ)-weighted denoising error on fixed probes, against the untrained network (F = 0: D = c_skip·x)
    sig = torch.tensor([0.2, 0.5, 1.0, 2.0]).repeat_interleave(8)
    x0 = data.repeat(4, 1, 1, 1)
    x = x0 + sig.view(-1, 1, 1, 1) * torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    s4 = sig.view(-1, 1, 1, 1)
    lam = (s4**2 + 0.25) / (s4 * 0.5) ** 2
    base = (lam * (0.25 / (s4**2 + 0.25) * x - x0) ** 2).mean()
    trained = (lam * (res.denoiser(x, sig) - x0) ** 2).mean()
    assert trained < 0.5 * base, (float(trained), float(base))
    assert isinstance(res.denoiser, EDMAdapter) and res.denoiser.image_shape == (1, 8, 8)


def test_same_seed_same_weights_and_checkpoint_round_trip(tmp_path):
    a = train_network(tiny_data(), steps=6, seed=3, out_dir=tmp_path / "a", checkpoint_every=3, **TINY)
    b = train_network(tiny_data(), steps=6, seed=3, **TINY)
    c = train_network(tiny_data(), steps=6, seed=4, **TINY)
    sa, sb, sc = (r.model.state_dict() for r in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert [p.rsplit("/", 1)[-1] for p in a.checkpoints] == ["step0000003.pt", "net.pt"]
    ck = torch.load(a.checkpoints[-1], weights_only=True)  # plain types and tensors only
    assert ck["arch"] == "resnet" and ck["step"] == 6 and ck["seed"] == 3 and ck["sigma_range"] == [0.002, 80.0]
    x = torch.randn(3, 1, 8, 8)
    s = torch.tensor([0.1, 1.0, 10.0])
    torch.testing.assert_close(load_network(a.checkpoints[-1])(x, s), a.denoiser(x, s), rtol=0, atol=0)
    raw = load_network(a.checkpoints[-1], use_ema=False)
    torch.testing.assert_close(raw(x, s), EDMAdapter(a.model, (1, 8, 8))(x, s), rtol=0, atol=0)


class ScriptableGauss(torch.nn.Module):
    def forward(self, x, sigma):
        s = sigma.view(-1, 1, 1, 1)
        return 0.3 + 0.49 / (0.49 + s * s) * (x - 0.3)  # MU, S inlined (TorchScript sees no globals)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_load_network_fallbacks(tmp_path):
    net = ScriptableGauss()
    ts = tmp_path / "net.ts"
    torch.jit.save(torch.jit.script(net), str(ts))
    x = rows(2, dtype=torch.float32)
    d = load_network(ts, image_shape=SHAPE)
    torch.testing.assert_close(d(x, 1.0), gauss_x0(x, 1.0))
    pk = tmp_path / "net.pkl"
    torch.save(net, pk)
    with pytest.raises(ValueError, match="allow_pickle"):
        load_network(pk, image_shape=SHAPE)
    torch.testing.assert_close(load_network(pk, image_shape=SHAPE, allow_pickle=True)(x, 1.0), gauss_x0(x, 1.0))
    sd = tmp_path / "sd.pt"
    torch.save({"w": torch.zeros(1)}, sd)
    with pytest.raises(ValueError, match="not a train_network checkpoint"):
        load_network(sd)
    junk = tmp_path / "junk.pt"
    junk.write_text("hello")
    with pytest.raises(ValueError):
        load_network(junk, image_shape=SHAPE)
    with pytest.raises(FileNotFoundError):
        load_network(tmp_path / "missing.pt")


def test_cli_train_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(
        [
            "train",
            "--dataset",
            "mnist32",
            "--subset",
            "16",
            "--steps",
            "4",
            "--batch-size",
            "4",
            "--channels",
            "8",
            "--blocks",
            "1",
            "--checkpoint-every",
            "2",
            "--threads",
            "1",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    for name in ("net.pt", "step0000002.pt", "losses.json", "loss.png"):
        assert (out / name).is_file(), name
    assert len(json.loads((out / "losses.json").read_text())["losses"]) == 4
    from PIL import Image

    with Image.open(out / "loss.png") as im:
        assert im.format == "PNG" and im.size == (960, 540)
        assert len(im.convert("RGB").getcolors(1 << 20)) > 20  # drawn, not blank
    assert str(out / "net.pt") in capsys.readouterr().out
    d = load_network(out / "net.pt")
    assert d.image_shape == (1, 32, 32) and d.net.receptive_field == 9


# ------------------------------------------------------------------------------------------------- with the samplers
def test_adapters_drive_the_samplers():
    from analytic_diffusion import sample

    exact = CallableAdapter(lambda x, s: gauss_x0(x, s), SHAPE)
    # EDM grid with Heun: the exact Gaussian denoiser reproduces the data distribution N(MU, S²)
    res = sample(EDMAdapter(EDMRaw(), SHAPE), n=64, steps=18, sampler="heun", progress=False, dtype=torch.float64)
    assert res.samples.dtype == torch.float64
    assert abs(float(res.samples.mean()) - MU) < 0.05 and abs(float(res.samples.std()) - S) < 0.05
    # DDIM on the VP-linear grid visits the network's own timesteps, so "nearest" is exact there
    toy = VPToy(vp_alphas_cumprod("linear"))
    vp = VPAdapter(toy, image_shape=SHAPE, alphas_cumprod="linear", dtype=torch.float64)
    kw = dict(n=4, steps=10, sampler="ddim", schedule="vp-linear", progress=False, dtype=torch.float64)
    torch.testing.assert_close(sample(vp, **kw).samples, sample(exact, **kw).samples, rtol=1e-9, atol=1e-9)
