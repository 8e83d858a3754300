"""The global retrieval primitive on the reference torch backend, against brute force in float64."""

import pytest
import torch
from reference import knn_bruteforce, noisy_queries, posterior_bruteforce, rel, uint8_bank

from analytic_diffusion.ops import KeyBank, PartialState, combine_partials, gather_rows, knn_search, softmax_retrieval

SIGMAS = [1e-4, 1e-3, 1e-2, 0.1, 0.5, 1.0, 10.0, 1e3, 1e4]


@pytest.mark.parametrize("sigma", SIGMAS)
@pytest.mark.parametrize("budget", [1 << 12, 1 << 26])  # many small chunks, and one chunk
def test_float64_matches_bruteforce(rng, sigma, budget):
    bank = uint8_bank(rng, 257)
    x = noisy_queries(rng, bank, 5, min(sigma, 3.0))
    ref, wmax, neff = posterior_bruteforce(x, bank.rows(0, bank.n, torch.float64), torch.full((5,), sigma))
    r = softmax_retrieval(x, bank, sigma, backend="torch", dtype=torch.float64, memory_budget=budget)
    assert rel(r.mean, ref) < 1e-10
    assert torch.allclose(r.max_weight, wmax, rtol=1e-9)
    assert torch.allclose(r.effective_neighbours, neff, rtol=1e-9)


@pytest.mark.parametrize("sigma", SIGMAS)
def test_float32_within_1e4_of_float64_far_from_origin(rng, sigma):
    """Every pixel near +1: the expanded distance would cancel badly without centring."""
    n, d = 301, 97
    y = 1.0 - 0.02 * torch.rand(n, d, generator=rng, dtype=torch.float64)
    bank = KeyBank(y.float())
    x = (y[:4] + min(sigma, 0.05) * torch.randn(4, d, generator=rng, dtype=torch.float64)).float()
    r64 = softmax_retrieval(x, bank, sigma, backend="torch", dtype=torch.float64)
    r32 = softmax_retrieval(x, bank, sigma, backend="torch", dtype=torch.float32)
    ref, _, _ = posterior_bruteforce(x, bank.rows(0, n, torch.float64), torch.full((4,), sigma))
    assert rel(r64.mean, ref) < 1e-10
    assert rel(r32.mean, r64.mean) < 1e-4
    assert torch.isfinite(r32.mean).all() and torch.isfinite(r32.effective_neighbours).all()


def test_per_row_sigma_and_labels(rng):
    labels = torch.randint(0, 3, (211,), generator=rng)
    bank = uint8_bank(rng, 211, c=2, h=3, w=3, labels=labels)
    x = noisy_queries(rng, bank, 6, 0.3)
    sig = torch.tensor([1e-3, 0.05, 0.3, 1.0, 5.0, 100.0])
    ql = torch.tensor([0, 1, 2, 2, 1, 0])
    allowed = labels[None, :] == ql[:, None]
    ref, _, _ = posterior_bruteforce(x, bank.rows(0, 211, torch.float64), sig, allowed=allowed)
    r = softmax_retrieval(x, bank, sig, query_labels=ql, backend="torch", dtype=torch.float64, memory_budget=1 << 12)
    assert rel(r.mean, ref) < 1e-10


def test_flips_equal_explicit_augmentation(rng):
    bank = uint8_bank(rng, 53, c=3, h=4, w=5)
    imgs = bank.rows(0, bank.n, torch.float64).reshape(-1, 3, 4, 5)
    aug = torch.cat([imgs, imgs.flip(-1)]).reshape(106, -1)
    x = noisy_queries(rng, bank, 3, 0.5)
    for sigma in (0.01, 0.7, 30.0):
        ref, _, _ = posterior_bruteforce(x, aug, torch.full((3,), sigma))
        r = softmax_retrieval(x, bank, sigma, flips=True, backend="torch", dtype=torch.float64)
        assert rel(r.mean, ref) < 1e-10


def test_shards_combine_exactly(rng):
    u = torch.randint(0, 256, (300, 20), generator=rng, dtype=torch.uint8)
    labels = torch.randint(0, 2, (300,), generator=rng)
    labels[200:] = 0  # the last shard has no candidate of class 1
    x = torch.randn(4, 20, generator=rng)
    ql = torch.tensor([0, 1, 1, 0])
    whole = KeyBank(u, 2 / 255, -1.0, labels=labels)
    full = softmax_retrieval(x, whole, 0.4, query_labels=ql, backend="torch", dtype=torch.float64, return_partial=True)
    parts = [
        softmax_retrieval(
            x,
            KeyBank(u[s:e], 2 / 255, -1.0, labels=labels[s:e]),
            0.4,
            query_labels=ql,
            backend="torch",
            dtype=torch.float64,
            return_partial=True,
        )
        for s, e in [(0, 1), (1, 200), (200, 300)]
    ]
    comb = combine_partials(parts)
    assert torch.isfinite(comb.o).all()
    assert rel(comb.mean(), full.mean()) < 1e-12
    assert torch.allclose(comb.m, full.m) and torch.allclose(comb.l, full.l, rtol=1e-12)


def test_empty_partial_is_neutral_and_mean_refuses_empty(rng):
    s = PartialState.empty(2, 3, dtype=torch.float64)
    other = PartialState(
        torch.tensor([0.5, -1.0], dtype=torch.float64),
        torch.tensor([2.0, 1.0]).double(),
        torch.tensor([1.5, 1.0]).double(),
        torch.rand(2, 3, generator=rng).double(),
    )
    c = s.combine(other)
    assert torch.equal(c.o, other.o) and torch.equal(c.l, other.l)
    with pytest.raises(ValueError, match="no allowed candidate"):
        s.mean()


def test_limits_nearest_and_mean(rng):
    bank = uint8_bank(rng, 101)
    x = torch.randn(3, bank.dim, generator=rng)
    y = bank.rows(0, bank.n, torch.float64)
    _, nn = knn_bruteforce(x, y, 1)
    small = softmax_retrieval(x, bank, 1e-4, backend="torch", dtype=torch.float32)
    assert torch.allclose(small.mean.double(), y[nn[:, 0]], atol=1e-6)
    assert torch.allclose(small.max_weight, torch.ones(3))
    big = softmax_retrieval(x, bank, 1e4, backend="torch", dtype=torch.float32)
    assert torch.allclose(big.mean.double(), y.mean(0).expand(3, -1), atol=1e-5)
    assert torch.allclose(big.effective_neighbours, torch.full((3,), 101.0), rtol=1e-4)


@pytest.mark.parametrize("k", [1, 2, 7, 101])
def test_knn_matches_bruteforce(rng, k):
    bank = uint8_bank(rng, 101)
    x = noisy_queries(rng, bank, 5, 0.2)
    d_ref, i_ref = knn_bruteforce(x, bank.rows(0, 101, torch.float64), k)
    d, i = knn_search(x, bank, k, backend="torch", dtype=torch.float64, memory_budget=1 << 11)
    assert torch.equal(i, i_ref)
    assert torch.allclose(d, d_ref, rtol=1e-12, atol=1e-12)


def test_knn_flips_index_convention(rng):
    bank = uint8_bank(rng, 31, c=1, h=4, w=6)
    imgs = bank.rows(0, 31, torch.float64).reshape(-1, 1, 4, 6)
    aug = torch.cat([imgs, imgs.flip(-1)]).reshape(62, -1)
    x = (aug[[40, 3]] + 0.01 * torch.randn(2, 24, generator=rng, dtype=torch.float64)).float()
    _d, i = knn_search(x, bank, 4, flips=True, backend="torch", dtype=torch.float64)
    _d_ref, i_ref = knn_bruteforce(x, aug, 4)
    assert torch.equal(i, i_ref) and i[0, 0] == 40
    assert torch.allclose(gather_rows(bank, i, torch.float64), aug[i_ref])


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(sigma=0.0), "sigma"),
        (dict(sigma=-1.0), "sigma"),
        (dict(sigma=float("nan")), "sigma"),
        (dict(backend="gpu"), "backend"),
        (dict(temperature=0.0), "temperature"),
        (dict(x=torch.zeros(2, 5)), "D = 15"),
        (dict(x=torch.full((2, 15), float("nan"))), "NaN"),
        (dict(query_labels=torch.tensor([0, 1])), "labels"),
        (dict(flips=True, image_shape=None), "image shape"),
        (dict(sigma=torch.ones(3)), "one value per sample"),
    ],
)
def test_bad_input_is_named(rng, bad, match):
    args = dict(x=torch.zeros(2, 15), sigma=1.0)
    bank = uint8_bank(rng, 10)
    if "image_shape" in bad:
        bad.pop("image_shape")
        bank = KeyBank(bank.values, bank.scale, bank.shift)
    args.update(bad)
    x, sigma = args.pop("x"), args.pop("sigma")
    with pytest.raises((ValueError, TypeError), match=match):
        softmax_retrieval(x, bank, sigma, **args)


def test_keybank_rejects_bad_data():
    with pytest.raises(ValueError, match="empty"):
        KeyBank(torch.zeros(0, 4))
    with pytest.raises(TypeError, match="uint8 or a float"):
        KeyBank(torch.zeros(3, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="k:"):
        knn_search(torch.zeros(1, 4), KeyBank(torch.zeros(3, 4)), 4)
