"""Posterior variance, Gumbel-max posterior draws and the variance-injected denoiser, against brute force."""

import math

import pytest
import torch
from reference import mirror, noisy_queries, rel, uint8_bank

from analytic_diffusion.analysis.variance import (
    PosteriorSampleDenoiser,
    posterior_moments,
    posterior_variance,
    variance_sweep,
)
from analytic_diffusion.data import Dataset
from analytic_diffusion.denoisers import Optimal
from analytic_diffusion.denoisers.sample_seeds import row_generators
from analytic_diffusion.ops import (
    KeyBank,
    PartialState,
    combine_partials,
    knn_search,
    posterior_draw,
    softmax_retrieval,
)

SIGMAS = [1e-3, 1e-2, 0.1, 0.5, 1.0, 10.0, 1e3]


def candidates(bank, flips):
    y = bank.rows(0, bank.n, torch.float64)
    if flips:
        c, h, w = bank.image_shape
        y = torch.cat([y, mirror(y.reshape(-1, c, h, w)).reshape(bank.n, -1)])
    return y


def weights_bruteforce(x, y, sigma, temperature=1.0, allowed=None):
    d = ((x.double()[:, None, :] - y[None]) ** 2).sum(-1)
    logits = -d / (2 * torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1) ** 2 * temperature)
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.softmax(logits, 1)


def moments_bruteforce(x, y, sigma, centred=False, **kw):
    """Explicit weights, Σ w y² − mean² (float64); ``centred``: Σ w (y − mean)² term by term instead (no
    cancellation, for data far from the origin where even float64 loses ~5 digits the raw way)."""
    w = weights_bruteforce(x, y, sigma, **kw)
    mean = w @ y
    if centred:
        return mean, (w[:, :, None] * (y[None] - mean[:, None, :]) ** 2).sum(1)
    return mean, (w @ (y * y) - mean * mean).clamp_min(0)


# ------------------------------------------------------------------------------------------- variance
@pytest.mark.parametrize("sigma", SIGMAS)
@pytest.mark.parametrize("flips", [False, True])
@pytest.mark.parametrize("budget", [1 << 12, 1 << 26])  # many tiny chunks, and one chunk
def test_variance_float64_matches_bruteforce(rng, sigma, flips, budget):
    bank = uint8_bank(rng, 157)
    x = noisy_queries(rng, bank, 5, min(sigma, 3.0))
    mean_ref, var_ref = moments_bruteforce(x, candidates(bank, flips), torch.full((5,), sigma, dtype=torch.float64))
    r = softmax_retrieval(
        x, bank, sigma, backend="torch", dtype=torch.float64, memory_budget=budget, flips=flips, second_moment=True
    )
    assert rel(r.mean, mean_ref) < 1e-10
    scale = max(float(var_ref.abs().max()), 1e-3)  # the variance scale (≈ 0 only when σ → 0)
    assert float((r.variance - var_ref).abs().max()) / scale < 1e-9
    assert bool((r.variance >= 0).all())


def test_default_path_unchanged_and_mean_bit_identical(rng):
    bank = uint8_bank(rng, 301)
    x = noisy_queries(rng, bank, 4, 0.5)
    for dtype in (torch.float32, torch.float64):
        a = softmax_retrieval(x, bank, 0.4, backend="torch", dtype=dtype, memory_budget=1 << 12)
        b = softmax_retrieval(x, bank, 0.4, backend="torch", dtype=dtype, memory_budget=1 << 12, second_moment=True)
        assert a.variance is None and b.variance is not None
        assert torch.equal(a.mean, b.mean)
        assert softmax_retrieval(x, bank, 0.4, backend="torch", return_partial=True).o2 is None


def test_variance_per_sample_sigma_labels_flips(rng):
    labels = torch.randint(0, 3, (211,), generator=rng)
    bank = uint8_bank(rng, 211, c=2, h=3, w=3, labels=labels)
    x = noisy_queries(rng, bank, 6, 0.3)
    sig = torch.tensor([1e-3, 0.05, 0.3, 1.0, 5.0, 100.0])
    ql = torch.tensor([0, 1, 2, 2, 1, 0])
    allowed = (labels[None, :] == ql[:, None]).repeat(1, 2)
    mean_ref, var_ref = moments_bruteforce(x, candidates(bank, True), sig, allowed=allowed)
    for budget in (1 << 10, 1 << 26):
        r = softmax_retrieval(
            x,
            bank,
            sig,
            query_labels=ql,
            flips=True,
            backend="torch",
            dtype=torch.float64,
            memory_budget=budget,
            second_moment=True,
        )
        assert rel(r.mean, mean_ref) < 1e-10
        assert float((r.variance - var_ref).abs().max()) < 1e-10


@pytest.mark.parametrize("sigma", SIGMAS)
def test_variance_float32_close_to_float64_far_from_origin(rng, sigma):
    """Every pixel near +1 with a small spread: raw Σ w y² − mean² would cancel ~all digits in float32."""
    n, d = 301, 97
    y = 1.0 - 0.02 * torch.rand(n, d, generator=rng, dtype=torch.float64)
    bank = KeyBank(y.float())
    x = (y[:4] + min(sigma, 0.05) * torch.randn(4, d, generator=rng, dtype=torch.float64)).float()
    r64 = softmax_retrieval(
        x, bank, sigma, backend="torch", dtype=torch.float64, second_moment=True, memory_budget=1 << 14
    )
    r32 = softmax_retrieval(
        x, bank, sigma, backend="torch", dtype=torch.float32, second_moment=True, memory_budget=1 << 14
    )
    _, var_ref = moments_bruteforce(
        x, bank.rows(0, n, torch.float64), torch.full((4,), sigma, dtype=torch.float64), centred=True
    )
    data_var = bank.rows(0, n, torch.float64).var(0, unbiased=False).mean()
    assert float((r64.variance - var_ref).abs().max()) / float(data_var) < 1e-9
    assert float((r32.variance.double() - r64.variance).abs().max()) / float(data_var) < 1e-4
    assert bool((r32.variance >= 0).all()) and bool(torch.isfinite(r32.variance).all())


@pytest.mark.parametrize("sigma", [1e-2, 0.3, 3.0])
def test_variance_float32_uint8_images(rng, sigma):
    bank = uint8_bank(rng, 400, c=1, h=8, w=8)
    x = noisy_queries(rng, bank, 8, sigma)
    r64 = softmax_retrieval(x, bank, sigma, backend="torch", dtype=torch.float64, second_moment=True)
    r32 = softmax_retrieval(
        x, bank, sigma, backend="torch", dtype=torch.float32, second_moment=True, memory_budget=1 << 13
    )
    data_var = bank.rows(0, bank.n, torch.float64).var(0, unbiased=False).mean()
    assert float((r32.variance.double() - r64.variance).abs().max()) / float(data_var) < 1e-4
    assert bool((r32.variance >= 0).all())


def test_shards_combine_exactly(rng):
    bank = uint8_bank(rng, 240, labels=torch.randint(0, 2, (240,), generator=rng))
    x = noisy_queries(rng, bank, 5, 0.4)
    ql = torch.tensor([0, 1, 1, 0, 1])
    full = softmax_retrieval(
        x,
        bank,
        0.4,
        query_labels=ql,
        flips=True,
        backend="torch",
        dtype=torch.float64,
        second_moment=True,
        return_partial=True,
    )
    cuts = [0, 7, 90, 91, 240]  # uneven shards, one of a single row (often no candidate of the class)
    shards = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        sub = KeyBank(
            bank.values[a:b], bank.scale, bank.shift, labels=bank.labels[a:b], image_shape=bank.image_shape
        )  # each shard centres on its own mean
        shards.append(
            softmax_retrieval(
                x,
                sub,
                0.4,
                query_labels=ql,
                flips=True,
                backend="torch",
                dtype=torch.float64,
                second_moment=True,
                return_partial=True,
            )
        )
    comb = combine_partials(shards)
    assert rel(comb.mean(), full.mean()) < 1e-12
    assert float((comb.variance() - full.variance()).abs().max()) < 1e-12
    # A state without o2 does not combine with one that has it.
    plain = softmax_retrieval(x, bank, 0.4, query_labels=ql, backend="torch", return_partial=True)
    with pytest.raises(ValueError, match="second moment"):
        plain.combine(full.to(torch.float32))


def test_empty_state_combines(rng):
    bank = uint8_bank(rng, 30)
    x = noisy_queries(rng, bank, 3, 0.5)
    s = softmax_retrieval(x, bank, 0.5, backend="torch", dtype=torch.float64, second_moment=True, return_partial=True)
    e = PartialState.empty(3, bank.dim, dtype=torch.float64, second_moment=True)
    for c in (e.combine(s), s.combine(e)):
        assert torch.equal(c.mean(), s.mean()) and torch.equal(c.variance(), s.variance())
    with pytest.raises(ValueError, match="second_moment=True"):
        softmax_retrieval(x, bank, 0.5, backend="torch", return_partial=True).variance()


def test_variance_limits(rng):
    bank = uint8_bank(rng, 120)
    x = noisy_queries(rng, bank, 4, 0.05)
    y = bank.rows(0, bank.n, torch.float64)
    small = softmax_retrieval(x, bank, 1e-5, backend="torch", dtype=torch.float64, second_moment=True)
    assert float(small.variance.abs().max()) < 1e-12
    big = softmax_retrieval(x, bank, 1e5, backend="torch", dtype=torch.float64, second_moment=True)
    data_var = y.var(0, unbiased=False)
    assert float((big.variance - data_var[None]).abs().max()) < 1e-6 * float(data_var.max())
    # float32 too: exact zeros at σ → 0, no NaN/Inf anywhere
    s32 = softmax_retrieval(x, bank, 1e-5, backend="torch", dtype=torch.float32, second_moment=True)
    assert float(s32.variance.abs().max()) < 1e-6


def test_second_moment_backend_rules(rng):
    bank = uint8_bank(rng, 40)
    x = noisy_queries(rng, bank, 2, 0.5)
    r = softmax_retrieval(x, bank, 0.5, backend="auto", second_moment=True)  # auto falls back to torch
    assert r.variance is not None
    with pytest.raises(ValueError, match="the cpu kernels have no second-moment"):
        softmax_retrieval(x, bank, 0.5, backend="cpu", second_moment=True)


def test_denoiser_level_variance(rng):
    imgs = torch.randint(0, 256, (90, 1, 4, 6), generator=rng, dtype=torch.uint8)
    labels = torch.randint(0, 3, (90,), generator=rng)
    ds = Dataset(imgs, labels).with_flips()
    den = Optimal(ds, dtype=torch.float64)
    x = torch.randn(4, 1, 4, 6, generator=rng)
    sig = torch.tensor([0.05, 0.3, 1.0, 20.0])
    cl = torch.tensor([0, 2, 1, 1])
    mean, var = posterior_moments(x, den, sig, class_labels=cl)
    y = ds.images_float(dtype=torch.float64).reshape(ds.n, -1)
    allowed = labels.repeat(2)[None, :] == cl[:, None]
    mean_ref, var_ref = moments_bruteforce(x.reshape(4, -1), y, sig, allowed=allowed)
    assert mean.shape == x.shape and var.shape == x.shape
    assert rel(mean.reshape(4, -1), mean_ref) < 1e-10
    assert float((var.reshape(4, -1) - var_ref).abs().max()) < 1e-10
    assert torch.allclose(mean.float(), den(x, sig, class_labels=cl).float(), atol=1e-6)
    v = posterior_variance(den, x, sig, class_labels=cl)
    assert v.dtype == x.dtype and torch.allclose(v.double(), var, atol=1e-7)
    # Datasets and key banks work as sources too.
    m2, v2 = posterior_moments(x.reshape(4, -1).double(), ds, sig, class_labels=cl)
    assert rel(m2, mean_ref) < 1e-10 and float((v2 - var_ref).abs().max()) < 1e-10
    with pytest.raises(ValueError, match="no training image has label"):
        posterior_moments(x, den, sig, class_labels=torch.tensor([0, 1, 2, 7]))


# ------------------------------------------------------------------------------------------- draws
def test_gumbel_draw_frequencies_match_softmax(rng):
    """20000 draws on N = 5 candidates: frequencies within 4 standard errors of the softmax weights."""
    y = torch.randn(5, 6, generator=rng, dtype=torch.float64)
    bank = KeyBank(y)
    x = y.mean(0, keepdim=True) + 0.1 * torch.randn(1, 6, generator=rng, dtype=torch.float64)
    d = ((x - y) ** 2).sum(1)
    sigma = float((d.max() - d.min()).sqrt())  # logits span 1/2 nat: every weight is well above 0
    w = weights_bruteforce(x, y, torch.tensor([sigma]))[0]
    assert float(w.min()) > 0.01  # non-trivial weights
    draws = 20000
    xs = x.expand(draws, -1).contiguous()  # one query per draw: independent Gumbel noise for each
    idx, rows = posterior_draw(
        xs, bank, sigma, generator=torch.Generator().manual_seed(7), dtype=torch.float64, memory_budget=1 << 16
    )
    assert torch.equal(rows, y[idx])
    freq = torch.bincount(idx, minlength=5).double() / draws
    se = (w * (1 - w) / draws).sqrt()
    assert bool(((freq - w).abs() < 4 * se).all()), (freq, w)
    chi2 = float(((freq - w) ** 2 / w).sum() * draws)
    assert chi2 < 23.5  # 4 degrees of freedom, p ≈ 1e-4


def test_gumbel_draws_with_flips_labels_and_per_sample_sigma(rng):
    """Frequencies over 2N candidates (flips) with a class filter match the brute-force weights."""
    labels = torch.tensor([0, 1, 0, 1])
    u = torch.randint(0, 256, (4, 1 * 2 * 3), generator=rng, dtype=torch.uint8)
    bank = KeyBank(u, 2 / 255, -1.0, labels=labels, image_shape=(1, 2, 3))
    y = candidates(bank, True)
    draws = 8000
    x = (y[:1] + 0.2 * torch.randn(1, 6, generator=rng, dtype=torch.float64)).float().expand(draws, -1)
    sig = torch.where(torch.arange(draws) % 2 == 0, torch.tensor(0.8), torch.tensor(2.0))
    ql = torch.zeros(draws, dtype=torch.long)
    idx, rows = posterior_draw(
        x, bank, sig, generator=torch.Generator().manual_seed(3), query_labels=ql, flips=True, memory_budget=1 << 12
    )
    assert torch.allclose(rows.double(), y[idx], atol=1e-6)  # mirrored rows come back mirrored
    allowed = (labels.repeat(2) == 0)[None, :]
    assert bool(allowed[0, idx].all())
    for par, s in ((0, 0.8), (1, 2.0)):
        sel = idx[par::2]
        w = weights_bruteforce(x[:1], y, torch.tensor([s]), allowed=allowed)[0]
        freq = torch.bincount(sel, minlength=8).double() / sel.numel()
        se = (w * (1 - w) / sel.numel()).sqrt().clamp_min(1e-12)
        assert bool(((freq - w).abs() <= 4 * se + 1e-12).all()), (freq, w)


def test_gumbel_draw_deterministic_and_chunk_independent(rng):
    bank = uint8_bank(rng, 200)
    x = noisy_queries(rng, bank, 6, 1.0)
    out = []
    for budget, dtype in ((1 << 10, torch.float32), (1 << 26, torch.float32), (1 << 12, torch.float64)):
        idx, _ = posterior_draw(
            x, bank, 3.0, generator=torch.Generator().manual_seed(11), dtype=dtype, memory_budget=budget
        )
        out.append(idx)
    assert torch.equal(out[0], out[1])  # the same noise stream whatever the chunking
    assert torch.equal(out[0], out[2])  # and the dtype (float32 logit rounding cannot flip this argmax)
    g = torch.Generator().manual_seed(11)
    a, _ = posterior_draw(x, bank, 3.0, generator=g)
    b, _ = posterior_draw(x, bank, 3.0, generator=g)  # the stream moves on: fresh draws
    assert torch.equal(a, out[0])
    assert not torch.equal(a, b)


@pytest.mark.parametrize("flips", [False, True])
def test_gumbel_small_sigma_draws_nearest(rng, flips):
    bank = uint8_bank(rng, 150)
    x = noisy_queries(rng, bank, 10, 0.3)
    _, nn = knn_search(x, bank, 1, flips=flips, backend="torch", dtype=torch.float64)
    for seed in range(5):
        idx, _ = posterior_draw(x, bank, 1e-4, generator=torch.Generator().manual_seed(seed), flips=flips)
        assert torch.equal(idx, nn[:, 0])


def test_draw_errors(rng):
    bank = uint8_bank(rng, 10, labels=torch.zeros(10, dtype=torch.long))
    x = noisy_queries(rng, bank, 2, 0.5)
    with pytest.raises(TypeError, match="generator"):
        posterior_draw(x, bank, 0.5, generator=3)
    with pytest.raises(ValueError, match="no allowed candidate"):
        posterior_draw(x, bank, 0.5, generator=torch.Generator(), query_labels=torch.tensor([0, 1]))


# ------------------------------------------------------------------------------------------- denoiser
def small_dataset(rng, n=60, flips=False):
    imgs = torch.randint(0, 256, (n, 1, 5, 4), generator=rng, dtype=torch.uint8)
    return Dataset(imgs, torch.randint(0, 2, (n,), generator=rng)).with_flips(flips)


@pytest.mark.parametrize("mode", ["draw", "noise"])
def test_wrapper_lambda_zero_is_optimal(rng, mode):
    ds = small_dataset(rng, flips=True)
    x = torch.randn(5, 1, 5, 4, generator=rng)
    sig = torch.tensor([0.01, 0.1, 0.5, 2.0, 50.0])
    opt = Optimal(ds)
    w = PosteriorSampleDenoiser(ds, mode=mode, scale=0.0, seed=3)
    assert torch.equal(w(x, sig), opt(x, sig))
    assert torch.equal(w(x, sig, class_labels=[1, 0, 1, 1, 0]), opt(x, sig, class_labels=[1, 0, 1, 1, 0]))


def test_wrapper_draw_mode(rng):
    ds = small_dataset(rng, flips=True)
    x = torch.randn(6, 1, 5, 4, generator=rng)
    sig = torch.tensor([0.2, 0.5, 1.0, 1.0, 3.0, 0.05])
    cand = ds.images_float(dtype=torch.float64).reshape(ds.n, -1)
    naive = PosteriorSampleDenoiser(ds, mode="draw", scale=1.0, seed=5, dtype=torch.float64)
    out = naive(x.double(), sig)
    # λ = 1 returns training images (or mirrored copies) exactly
    d = ((out.reshape(6, 1, -1) - cand[None]) ** 2).sum(-1).min(1).values
    assert float(d.max()) < 1e-20
    # a pure function of each query: the same on a new object, on a second call, and row by row
    again = PosteriorSampleDenoiser(ds, mode="draw", scale=1.0, seed=5, dtype=torch.float64)
    assert torch.equal(again(x.double(), sig), out)
    assert torch.equal(naive(x.double(), sig), out)
    rows = torch.cat([naive(x[i : i + 1].double(), sig[i : i + 1]) for i in range(6)])
    assert torch.equal(rows, out)
    # λ in (0, 1) mixes the optimal mean and the same draw stream
    half = PosteriorSampleDenoiser(ds, mode="draw", scale=0.25, seed=5, dtype=torch.float64)
    mean = Optimal(ds, dtype=torch.float64)(x.double(), sig)
    assert torch.allclose(half(x.double(), sig), 0.75 * mean + 0.25 * out, atol=1e-12)


def test_wrapper_noise_mode(rng):
    ds = small_dataset(rng)
    x = torch.randn(4, 1, 5, 4, generator=rng, dtype=torch.float64)
    sig = torch.tensor([0.3, 0.6, 1.0, 4.0])
    den = PosteriorSampleDenoiser(ds, mode="noise", scale=0.7, seed=2, dtype=torch.float64)
    out = den(x, sig)
    mean, var = posterior_moments(x, den, sig)
    gens = row_generators("optimal-draw", 2, sig.double())
    xi = torch.stack([torch.randn(20, generator=g, dtype=torch.float64) for g in gens]).reshape(x.shape)
    assert torch.allclose(out, mean + 0.7 * var.sqrt() * xi, atol=1e-12)
    assert torch.equal(den.posterior_variance(x, sig), var)
    # σ → 0: no variance, so no noise
    tiny = torch.full((4,), 1e-4)
    assert torch.allclose(den(x, tiny), Optimal(ds, dtype=torch.float64)(x, tiny), atol=1e-12, rtol=0)


def test_wrapper_bad_inputs(rng):
    ds = small_dataset(rng)
    with pytest.raises(ValueError, match="scale"):
        PosteriorSampleDenoiser(ds, scale=-0.1)
    with pytest.raises(ValueError, match="scale"):
        PosteriorSampleDenoiser(ds, mode="noise", scale=float("nan"))
    with pytest.raises(ValueError, match="\\[0, 1\\]"):
        PosteriorSampleDenoiser(ds, mode="draw", scale=1.5)
    with pytest.raises(ValueError, match="mode"):
        PosteriorSampleDenoiser(ds, mode="gaussian")
    with pytest.raises(ValueError, match="seed"):
        PosteriorSampleDenoiser(ds, seed=-1)
    PosteriorSampleDenoiser(ds, mode="noise", scale=3.0)  # larger injections are fine in noise mode
    assert PosteriorSampleDenoiser.name == "optimal-draw"


def test_variance_sweep_smoke(rng, tmp_path):
    ds = small_dataset(rng, n=40)
    res = variance_sweep(ds, scales=(0.0, 1.0), n=3, steps=4, grid_path=tmp_path / "grid.png")
    assert [r["scale"] for r in res.rows] == [0.0, 1.0]
    for r in res.rows:
        assert 0.0 <= r["memorization_ratio"] <= 1.0 and math.isfinite(r["nn_distance_median"])
    assert "lambda" in res.table()
    from PIL import Image

    with Image.open(tmp_path / "grid.png") as im:  # one labelled row per λ, each 3 tiles wide
        h, w = ds.image_shape[1:]
        zoom = max(1, 64 // h)
        tile_h, tile_w = 2 + h * zoom + 2, 2 + 3 * (w * zoom + 2)
        assert im.format == "PNG" and im.size[1] == 2 * tile_h + 4 and im.size[0] > tile_w
        labels = im.convert("L").crop((0, 0, im.size[0] - tile_w, im.size[1]))
        assert labels.getextrema()[0] < 128  # the λ labels are drawn
    # same seeds: λ = 0 is the optimal denoiser's run
    from analytic_diffusion.sampling.generate import sample

    ref = sample(Optimal(ds), 3, steps=4, progress=False).samples
    assert torch.equal(res.samples[0.0], ref)
