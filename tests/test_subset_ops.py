"""ops.subset (the k-NN denoisers' float64 rescoring and weighted mean): the C++ kernels against the torch path
and a brute-force float64 reference, with mirrored indices, empty slots, every key dtype and bad input."""

import pytest
import torch
from reference import mirror

from analytic_diffusion.ops import KeyBank, cpu_backend, subset

pytestmark = [pytest.mark.cpu_isa, pytest.mark.usefixtures("cpu_kernels")]  # built (else a failure)


def _bank(rng, kind, n=37, c=2, h=3, w=5):
    u = torch.randint(0, 256, (n, c * h * w), generator=rng, dtype=torch.uint8)
    if kind == "uint8":
        return KeyBank(u, 2 / 255, -1.0, image_shape=(c, h, w))
    return KeyBank((u.double() / 127.5 - 1).to(getattr(torch, kind)), image_shape=(c, h, w))


def _candidates(bank):
    """Every candidate row in float64: the N stored ones, then the N mirrored ones."""
    c, h, w = bank.image_shape
    y = bank.rows(0, bank.n, torch.float64)
    return torch.cat([y, mirror(y.reshape(-1, c, h, w)).reshape(bank.n, -1)])


@pytest.mark.parametrize("kind", ["uint8", "float32", "float64"])
def test_relative_d2_and_weighted_sum_match_reference(rng, kind):
    bank = _bank(rng, kind)
    y = _candidates(bank)
    q = torch.randn(6, bank.dim, generator=rng, dtype=torch.float64) * 3
    index = torch.randint(0, 2 * bank.n, (6, 23), generator=rng)
    index[torch.rand(index.shape, generator=rng) < 0.2] = -1
    ref = torch.randint(0, 2 * bank.n, (6,), generator=rng)
    d = ((q[:, None] - y[None]) ** 2).sum(-1)  # (6, 2N) brute force
    want = torch.where(
        index >= 0,
        torch.gather(d, 1, index.clamp_min(0)) - d.gather(1, ref[:, None]),
        torch.full(index.shape, float("inf"), dtype=torch.float64),
    )
    got = subset.relative_d2(q, bank, index, ref, flips=True)
    fin = index >= 0
    assert torch.equal(torch.isinf(got), ~fin)
    assert torch.allclose(got[fin], want[fin], rtol=1e-10, atol=1e-9)
    assert torch.all(got[index == ref[:, None]] == 0)  # the reference row itself: exactly 0
    w = torch.rand(index.shape, generator=rng, dtype=torch.float64)
    w[:, 0] = 0.0
    mean = subset.weighted_sum(bank, index, w, flips=True)
    want_mean = torch.einsum("bk,bkd->bd", torch.where(fin, w, 0.0), y[index.clamp_min(0)])
    assert torch.allclose(mean, want_mean, rtol=1e-12, atol=1e-12)
    # the torch path (taken when autograd needs it) agrees, and carries gradients
    qg = q.clone().requires_grad_(True)
    slow = subset.relative_d2(qg, bank, index, ref, flips=True)
    assert slow.requires_grad and torch.allclose(slow[fin], got[fin], rtol=1e-10, atol=1e-9)


def test_a_row_depends_on_that_row_only(rng):
    bank = _bank(rng, "uint8", n=53)
    q = torch.randn(9, bank.dim, generator=rng, dtype=torch.float64)
    index = torch.randint(0, bank.n, (9, 31), generator=rng)
    ref = index[:, 0].contiguous()
    whole = subset.relative_d2(q, bank, index, ref)
    parts = torch.cat([subset.relative_d2(q[b : b + 1], bank, index[b : b + 1], ref[b : b + 1]) for b in range(9)])
    assert torch.equal(whole, parts)


def test_bad_input_is_named(rng):
    bank = _bank(rng, "uint8")
    q = torch.zeros(2, bank.dim, dtype=torch.float64)
    index = torch.zeros(2, 3, dtype=torch.int64)
    ref = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="index"):  # a mirrored index without flips
        subset.relative_d2(q, bank, index + bank.n, ref)
    with pytest.raises(ValueError, match="index"):
        subset.weighted_sum(bank, index - 2, torch.ones(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="ref"):
        subset.relative_d2(q, bank, index, ref - 1)
    with pytest.raises(ValueError, match="width"):
        cpu_backend.subset_relative_d2(q, bank, index, ref, 7)
    with pytest.raises(ValueError, match="weight"):
        subset.weighted_sum(bank, index, torch.ones(2, 4, dtype=torch.float64))


@pytest.mark.parametrize("method", ["topk", "knn"])
def test_denoisers_native_path_matches_torch_path(rng, method):
    """topk / knn through the C++ subset kernels equal their torch path (what a call needing autograd runs),
    with mirrored candidates and class labels."""
    from analytic_diffusion.data.dataset import Dataset
    from analytic_diffusion.denoisers import make_denoiser

    u = torch.randint(0, 256, (61, 1, 4, 6), generator=rng, dtype=torch.uint8)
    ds = Dataset.from_array(u, torch.randint(0, 3, (61,), generator=rng))
    opts = {"k": 9} if method == "topk" else {"k": 9, "ref_size": 7}
    den = make_denoiser(method, ds, flips=True, dtype=torch.float64, **opts)
    x = ds.images_float(torch.randint(0, 61, (5,), generator=rng), torch.float64)
    x = x + 0.4 * torch.randn(x.shape, generator=rng, dtype=torch.float64)
    labels = torch.randint(0, 3, (5,), generator=rng)
    for sigma in (0.05, 5.0):
        fast = den(x, sigma, class_labels=labels)
        slow = den(x.clone().requires_grad_(True), sigma, class_labels=labels)
        assert slow.requires_grad
        assert torch.allclose(fast, slow.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["topk", "knn"])
def test_skipping_negligible_candidates_changes_nothing(rng, monkeypatch, method):
    """At low σ most screened candidates are proven negligible from the screen's distances and never rescored;
    the output equals the one that rescores every candidate (to 1e-15) and the brute-force float64 posterior over
    the exact k nearest (to 1e-6: a near-tie at the k-th place may swap a candidate of weight ~1e-9)."""
    from reference import posterior_bruteforce

    import analytic_diffusion.denoisers.neighbours as nb
    from analytic_diffusion.data.dataset import Dataset
    from analytic_diffusion.denoisers import make_denoiser
    from analytic_diffusion.ops import knn_search

    u = torch.randint(0, 256, (300, 1, 4, 6), generator=rng, dtype=torch.uint8)
    ds = Dataset.from_array(u)
    y = ds.keys().rows(0, 300, torch.float64)
    x = ds.images_float(torch.randint(0, 300, (6,), generator=rng), torch.float64)
    x = (x + 0.3 * torch.randn(x.shape, generator=rng, dtype=torch.float64)).float()
    den = make_denoiser(method, ds, k=40, **({"ref_size": 0} if method == "knn" else {}))
    q = x.reshape(6, -1)
    for sigma in (0.15, 0.6, 3.0):
        got = den(x, sigma).reshape(6, -1).double()
        with monkeypatch.context() as m:
            m.setattr(nb, "_negligible", lambda den, q, d2, valid, coef: torch.zeros_like(valid))
            full = den(x, sigma).reshape(6, -1).double()
        assert torch.allclose(got, full, rtol=0, atol=1e-15)
        d = ((q.double()[:, None] - y[None]) ** 2).sum(-1)
        allowed = torch.zeros_like(d, dtype=torch.bool).scatter_(1, torch.argsort(d, dim=1, stable=True)[:, :40], True)
        want, _, _ = posterior_bruteforce(q, y, torch.full((6,), sigma), allowed=allowed)
        assert torch.allclose(got, want, rtol=0, atol=1e-6)
    d2, _ = knn_search(q, ds.keys(), 48)
    coef = nb._coef(torch.full((6,), 0.15, dtype=torch.float64), 1.0)
    assert bool(nb._negligible(den, q, d2, torch.isfinite(d2), coef).any())  # the skip was exercised
