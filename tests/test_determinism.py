"""Every denoiser is a pure function of each sample: batch size, call order and n change nothing (issue 14 §1).

The stochastic methods (smoothed, knn, optimal-draw) draw from a stream per row, seeded by a hash of what names
the row (the sample's identity, σ, label; docs/design.md §14.4); these tests fail on a denoiser that holds one
generator advancing with every call. tests/test_continuity.py has the matrix over threads, ISAs and ranks.
"""

import pytest
import torch

import analytic_diffusion as ad
from analytic_diffusion.data import Dataset
from analytic_diffusion.ops import counter_rng

STOCHASTIC = {
    "smoothed": {"smoothing": 0.4, "num_perturbations": 3},
    "knn": {"k": 5, "ref_size": 20},
    "optimal-draw": {"scale": 0.5},
    "optimal-draw-noise": {"scale": 0.5, "mode": "noise"},
}


def _dataset(rng, n=60, flips=False):
    imgs = torch.randint(0, 256, (n, 1, 6, 5), generator=rng, dtype=torch.uint8)
    return Dataset(imgs, torch.randint(0, 3, (n,), generator=rng)).with_flips(flips)


def _make(name, ds, dtype=torch.float32, **kw):
    method = "optimal-draw" if name.startswith("optimal-draw") else name
    return ad.make_denoiser(method, ds, dtype=dtype, **STOCHASTIC[name], **kw)


@pytest.mark.parametrize("name", sorted(STOCHASTIC))
@pytest.mark.parametrize("flips", [False, True])
def test_same_query_same_answer_whatever_the_batch(rng, name, flips):
    ds = _dataset(rng, flips=flips)
    x = torch.randn(7, 1, 6, 5, generator=rng)
    sig = torch.rand(7, generator=rng, dtype=torch.float64) * 2 + 0.3
    den = _make(name, ds)
    whole = den(x, sig)
    assert torch.equal(den(x, sig), whole), "a second call changed the answer"
    assert torch.equal(_make(name, ds)(x, sig), whole), "a fresh object gave another answer"
    # The noise mode's mean and variance come from the torch reference GEMMs, whose rounding may change with
    # the batch shape (a 1-row product is a GEMV): same draws, answers equal to rounding. The others: bitwise.
    same = (lambda a, b: bool((a - b).abs().max() < 1e-5)) if name == "optimal-draw-noise" else torch.equal
    rows = torch.cat([den(x[i : i + 1], sig[i : i + 1]) for i in range(7)])
    assert same(rows, whole), "batch size changed the answer"
    perm = torch.randperm(7, generator=rng)
    assert same(den(x[perm], sig[perm]), whole[perm]), "batch order changed the answer"
    # different seeds, different draws (the randomness is real)
    assert not torch.equal(_make(name, ds, seed=1)(x, sig), whole)
    # the same query with a class label is conditioned, and still a pure function
    lab = torch.randint(0, 3, (7,), generator=rng)
    cond = den(x, sig, class_labels=lab)
    assert same(torch.cat([den(x[i : i + 1], sig[i : i + 1], class_labels=lab[i : i + 1]) for i in range(7)]), cond)


@pytest.mark.parametrize("name", sorted(STOCHASTIC))
def test_float32_and_float64_queries_draw_the_same(rng, name):
    ds = _dataset(rng)
    x = torch.randn(4, 1, 6, 5, generator=rng)
    a = _make(name, ds, torch.float32)(x, 0.8)
    b = _make(name, ds, torch.float64)(x.double(), 0.8)
    assert (a.double() - b).abs().max() < 1e-4


@pytest.mark.parametrize("method", ["smoothed", "knn", "optimal-draw"])
def test_samples_independent_of_batch_size_and_n(method):
    ds = ad.load_dataset("mnist").subset(120)
    opts = {"knn": {"k": 20, "ref_size": 50}}.get(method, {})
    den = ad.make_denoiser(method, ds, **opts)
    kw = dict(steps=4, seed=7, progress=False)
    full = ad.sample(den, 4, **kw).samples
    one = ad.sample(den, 4, batch_size=1, **kw).samples
    assert torch.equal(full, one)
    more = ad.sample(den, 6, batch_size=4, **kw).samples
    assert torch.equal(more[:4], full)


def _splitmix_reference(seed: int, j: int) -> float:
    m = (1 << 64) - 1
    z = (seed + (j + 1) * 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    z ^= z >> 31
    return ((z >> 11) + 0.5) / 2.0**53


def test_counter_uniforms_match_splitmix64(rng):
    seeds = torch.randint(0, 2**62, (5,), generator=rng)
    index = torch.randint(0, 10**6, (9,), generator=rng)
    u = counter_rng.uniform(seeds, index)
    ref = torch.tensor([[_splitmix_reference(int(s), int(j)) for s in seeds] for j in index], dtype=torch.float64)
    assert torch.equal(u, ref)
    assert float(u.min()) > 0 and float(u.max()) < 1


@pytest.mark.parametrize(
    "name, opts",
    [
        ("ls", {"patch": 5}),
        ("pspc", {"patch": 3}),
        ("els", {"patch": 3}),
        ("bbels", {"patch": 3}),
        ("wiener", {}),
        ("pca_locality", {}),
        ("pspc-flex", {"tau": 0.5, "memory_budget": 1 << 15}),
    ],
)
def test_deterministic_methods_are_bitwise_independent_of_the_batch(rng, name, opts):
    """The C++ patch kernel's split count and wiener's filter no longer follow the number of query rows.

    bbELS and PSPC are the stated exceptions (README "Determinism"): a single call may differ by a few float32
    ulps between batch sizes (bbELS: rows of several samples share a tile of the C++ shared-rule kernel)."""
    imgs = torch.randint(0, 256, (50, 1, 9, 8), generator=rng, dtype=torch.uint8)
    ds = Dataset(imgs)
    x = ds.images_float()[:4] + 0.5 * torch.randn(4, 1, 9, 8, generator=rng)
    den = ad.make_denoiser(name, ds, **opts)
    whole = den(x, 0.5)
    same = (lambda a, b: bool((a - b).abs().max() <= 1e-6)) if name in ("bbels", "pspc") else torch.equal
    assert same(torch.cat([den(x[i : i + 1], 0.5) for i in range(4)]), whole)
    assert same(torch.cat([den(x[:3], 0.5), den(x[3:], 0.5)]), whole)
