"""Same-location local denoisers (LS, PSPC-Square, PSPC-Flex, pca_locality) against brute-force float64 loops.

The references below are written independently of the package: explicit Python loops over pixels, crops and
coordinates, full (non-streamed) softmax over an explicitly built candidate list (mirrors included), on tiny
images with fresh random inputs. Tiny memory budgets force many chunks in the package code.
"""

import math

import pytest
import torch
from reference import rel

from analytic_diffusion.data import Dataset
from analytic_diffusion.denoisers import Optimal
from analytic_diffusion.denoisers.local import PSPC, LocalScore, PSPCFlex, wiener_heatmap
from analytic_diffusion.denoisers.patch_schedule import PatchSchedule
from analytic_diffusion.denoisers.pca_locality import PCALocality
from analytic_diffusion.ops import combine_partials
from analytic_diffusion.ops.local_retrieval import (
    coordinate_retrieval,
    crop_masks,
    local_score,
    mask_composite,
    masks_from_heatmap,
    pspc_square,
)

TINY = 3000  # bytes: a handful of candidates per chunk
SIGMAS = (1e-3, 0.05, 0.7, 4.0, 1e3)


# ------------------------------------------------------------------------------------------- fixtures / helpers
@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread is faster, and on a shared 2-core machine two OpenMP threads contend badly
    (a 1024² eigh measured 0.15 s on 1 thread vs 8 s on 2 under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_data(rng, shape=(2, 6, 6), n=5, labels=True, uint8=False):
    if uint8:
        imgs = torch.randint(0, 256, (n, *shape), generator=rng, dtype=torch.uint8)
    else:
        imgs = torch.rand(n, *shape, generator=rng) * 2 - 1
    lab = torch.tensor([i % 2 for i in range(n)]) if labels else None
    return Dataset.from_array(imgs, lab)


def queries(rng, ds, b=2, sigma=1.0):
    x0 = ds.images_float(torch.randint(0, ds.num_stored, (b,), generator=rng), torch.float64)
    return x0 + float(min(sigma, 3.0)) * torch.randn(x0.shape, generator=rng, dtype=torch.float64)


def candidate_list(ds, flips):
    """Explicit float64 candidates (N or 2N, C, H, W) and their labels: stored images, then mirrors."""
    y = ds.images_float(None, torch.float64)
    lab = ds.labels if ds.labels is not None else torch.zeros(ds.num_stored, dtype=torch.long)
    if flips:
        y = torch.cat([y, y.flip(-1)])
        lab = torch.cat([lab, lab])
    return y, lab


def softmax_weights(d, sigma, allowed):
    logits = -d / (2.0 * sigma * sigma)
    logits = torch.where(allowed, logits, torch.full_like(logits, -math.inf))
    return torch.softmax(logits, 0)


def allowed_for(lab, label):
    return torch.ones_like(lab, dtype=torch.bool) if label is None else lab == label


def ls_brute(x, y, lab, sigma, k, label=None):
    _C, H, W = x.shape
    r = k // 2
    allowed = allowed_for(lab, label)
    out = torch.empty_like(x)
    for i in range(H):
        for j in range(W):
            i0, i1, j0, j1 = max(0, i - r), min(H, i + r + 1), max(0, j - r), min(W, j + r + 1)
            d = ((x[None, :, i0:i1, j0:j1] - y[:, :, i0:i1, j0:j1]) ** 2).sum((1, 2, 3))
            w = softmax_weights(d, sigma, allowed)
            out[:, i, j] = (w[:, None] * y[:, :, i, j]).sum(0)
    return out


def pspc_brute(x, y, lab, sigma, k, label=None):
    _C, H, W = x.shape
    allowed = allowed_for(lab, label)
    comp = torch.zeros_like(x)
    cnt = torch.zeros_like(x)
    for i in range(H - k + 1):
        for j in range(W - k + 1):
            d = ((x[None, :, i : i + k, j : j + k] - y[:, :, i : i + k, j : j + k]) ** 2).sum((1, 2, 3))
            w = softmax_weights(d, sigma, allowed)
            comp[:, i : i + k, j : j + k] += (w[:, None, None, None] * y[:, :, i : i + k, j : j + k]).sum(0)
            cnt[:, i : i + k, j : j + k] += 1
    return comp / cnt


def flex_brute(x, y, lab, sigma, masks, label=None):
    _C, _H, _W = x.shape
    allowed = allowed_for(lab, label)
    comp = torch.zeros_like(x)
    cnt = torch.zeros_like(x)
    for p in range(masks.shape[0]):
        mk = masks[p]
        d = ((x[None] - y) ** 2)[:, :, mk].sum((1, 2))
        w = softmax_weights(d, sigma, allowed)
        mean = (w[:, None, None, None] * y).sum(0)
        comp[:, mk] += mean[:, mk]
        cnt[:, mk] += 1
    return comp / cnt


def coord_brute(x, y, lab, sigma, mask, label=None, block=None):
    """Per-coordinate softmax; with ``block`` the studio's chunk-averaged softmax over consecutive blocks."""
    xf, yf = x.reshape(-1), y.reshape(y.shape[0], -1)
    allowed = allowed_for(lab, label)
    out = torch.empty_like(xf)
    e = (xf[None] - yf) ** 2
    for m in range(xf.numel()):
        d = (e * mask[:, m].double()[None]).sum(1)
        if block is None:
            out[m] = (softmax_weights(d, sigma, allowed) * yf[:, m]).sum()
        else:
            means = []
            for s in range(0, yf.shape[0], block):
                a = allowed[s : s + block]
                if a.any():
                    means.append((softmax_weights(d[s : s + block], sigma, a) * yf[s : s + block, m]).sum())
            out[m] = sum(means) / len(means)
    return out.reshape(x.shape)


def pick_labels(rng, b, labelled):
    return torch.randint(0, 2, (b,), generator=rng) if labelled else None


# ------------------------------------------------------------------------------------------- LS
@pytest.mark.parametrize("shape", [(2, 6, 6), (2, 5, 7)])
@pytest.mark.parametrize("flips,labelled", [(False, False), (True, False), (False, True), (True, True)])
def test_ls_matches_bruteforce(rng, shape, flips, labelled):
    ds = make_data(rng, shape, uint8=labelled)
    y, lab = candidate_list(ds, flips)
    _, H, W = shape
    for k in range(1, 2 * max(H, W) + 2, 2):  # every odd k, up to past the covering size
        sigma = SIGMAS[(k // 2) % len(SIGMAS)]
        x = queries(rng, ds, 2, sigma)
        labels = pick_labels(rng, 2, labelled)
        den = LocalScore(ds, patch=k, flips=flips, dtype=torch.float64, memory_budget=TINY)
        out = den(x, sigma, labels)
        for b in range(2):
            ref = ls_brute(x[b], y, lab, sigma, k, None if labels is None else int(labels[b]))
            assert rel(out[b], ref) < 1e-10, (k, sigma, b)


def test_ls_window_covering_image_is_optimal(rng):
    ds = make_data(rng, (2, 5, 7))
    for flips in (False, True):
        for sigma in (1e-3, 0.7, 1e3):
            x = queries(rng, ds, 3, sigma)
            labels = pick_labels(rng, 3, True)
            opt = Optimal(ds, flips=flips, dtype=torch.float64, backend="torch")(x, sigma, labels)
            for k in (13, 41):  # 2·max(H, W) − 1 = 13
                out = LocalScore(ds, patch=k, flips=flips, dtype=torch.float64, memory_budget=TINY)(x, sigma, labels)
                assert rel(out, opt) < 1e-10, (flips, sigma, k)


def test_ls_shards_combine_exactly(rng):
    imgs = torch.rand(9, 2, 6, 6, generator=rng) * 2 - 1
    full = Dataset.from_array(imgs)
    x = queries(rng, full, 3, 0.5)
    sigma = torch.tensor([0.05, 0.5, 5.0], dtype=torch.float64)
    whole = local_score(x, full.keys(), sigma, patch=3, flips=True, dtype=torch.float64, memory_budget=TINY)
    parts = [
        local_score(
            x,
            Dataset.from_array(imgs[a:b]).keys(),
            sigma,
            patch=3,
            flips=True,
            dtype=torch.float64,
            memory_budget=TINY,
            return_partial=True,
        )
        for a, b in ((0, 4), (4, 5), (5, 9))
    ]
    merged = combine_partials(parts).mean().reshape(3, 6, 6, 2).permute(0, 3, 1, 2)
    assert rel(merged, whole) < 1e-12
    state = parts[0]
    assert state.m.shape == (3 * 36,) and state.o.shape == (3 * 36, 2)


# ------------------------------------------------------------------------------------------- PSPC-Square
@pytest.mark.parametrize("shape", [(2, 6, 6), (2, 5, 7)])
@pytest.mark.parametrize("flips,labelled", [(False, False), (True, True), (True, False)])
def test_pspc_matches_bruteforce(rng, shape, flips, labelled):
    ds = make_data(rng, shape)
    y, lab = candidate_list(ds, flips)
    _, H, W = shape
    for k in range(1, min(H, W) + 1):  # every size, even ones included
        sigma = SIGMAS[k % len(SIGMAS)]
        x = queries(rng, ds, 2, sigma)
        labels = pick_labels(rng, 2, labelled)
        out = PSPC(ds, patch=k, flips=flips, dtype=torch.float64, memory_budget=TINY)(x, sigma, labels)
        for b in range(2):
            ref = pspc_brute(x[b], y, lab, sigma, k, None if labels is None else int(labels[b]))
            assert rel(out[b], ref) < 1e-10, (k, sigma, b)


def test_pspc_full_crop_is_optimal_and_flips_default_on(rng):
    ds = make_data(rng, (2, 6, 6))
    assert PSPC(ds, patch=3).flips is True and PSPC(ds, patch=3, flips=False).flips is False
    for flips in (False, True):
        for sigma in SIGMAS:
            x = queries(rng, ds, 2, sigma)
            labels = pick_labels(rng, 2, True)
            opt = Optimal(ds, flips=flips, dtype=torch.float64, backend="torch")(x, sigma, labels)
            out = PSPC(ds, patch=6, flips=flips, dtype=torch.float64, memory_budget=TINY)(x, sigma, labels)
            assert rel(out, opt) < 1e-10


def test_pspc_default_schedule(rng):
    ds = make_data(rng, (2, 6, 6))
    den = PSPC(ds, dtype=torch.float64, memory_budget=TINY)  # the paper's CIFAR schedule, clipped to 6
    assert den.patch.sizes[0] == 6 and den.patch.sizes[-1] == 3 and den.patch.k_for(80.0) == 6
    assert den.patch.k_for(0.002) == 3 and den.config()["patch"]["patch_sizes"][7] == 6
    sigma = torch.tensor([80.0, 0.002], dtype=torch.float64)
    x = queries(rng, ds, 2, 1.0)
    out = den(x, sigma)
    y, lab = candidate_list(ds, True)
    assert rel(out[0], pspc_brute(x[0], y, lab, 80.0, 6)) < 1e-10
    assert rel(out[1], pspc_brute(x[1], y, lab, 0.002, 3)) < 1e-10


def test_mixed_sigma_batches_fill_poisoned_outputs(rng, monkeypatch):
    """Samples at different σ (different k, masks) are grouped; every row of the (poisoned) output is written."""
    ds = make_data(rng, (2, 6, 6))
    table = {0.01: 3, 1.0: 4, 50.0: 6}
    dens = [
        LocalScore(ds, patch=PatchSchedule([1, 3, 5], [0.01, 1.0, 50.0]), dtype=torch.float64),
        PSPC(ds, patch=table, dtype=torch.float64),
        PSPCFlex(ds, tau=0.6, dtype=torch.float64),
        PCALocality(ds, threshold=0.05, dtype=torch.float64),
    ]
    sigma = torch.tensor([50.0, 0.01, 1.0, 50.0, 0.01], dtype=torch.float64)
    x = queries(rng, ds, 5, 1.0)
    labels = pick_labels(rng, 5, True)
    singles = [torch.stack([den(x[i : i + 1], sigma[i], labels[i : i + 1])[0] for i in range(5)]) for den in dens]
    real = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: real(*a, **k).fill_(float("nan")))
    for den, single in zip(dens, singles):
        out = den(x, sigma, labels)
        assert torch.isfinite(out).all() and rel(out, single) < 1e-12, den.name


# ------------------------------------------------------------------------------------------- PSPC-Flex
def random_masks(rng, H, W, dup=True):
    m = torch.rand(H * W, H, W, generator=rng) < 0.35
    m.view(H * W, H * W)[torch.arange(H * W), torch.arange(H * W)] = True  # every pixel covered
    if dup:
        m[3] = m[0]  # repeated masks must count with their multiplicity
    return m


@pytest.mark.parametrize("flips,labelled", [(False, False), (True, True)])
def test_flex_matches_bruteforce(rng, flips, labelled):
    ds = make_data(rng, (2, 5, 7))
    y, lab = candidate_list(ds, flips)
    for sigma in SIGMAS:
        masks = random_masks(rng, 5, 7)
        x = queries(rng, ds, 2, sigma)
        labels = pick_labels(rng, 2, labelled)
        den = PSPCFlex(ds, masks=masks, flips=flips, dtype=torch.float64, memory_budget=TINY)
        out = den(x, sigma, labels)
        for b in range(2):
            ref = flex_brute(x[b], y, lab, sigma, masks, None if labels is None else int(labels[b]))
            assert rel(out[b], ref) < 1e-10, (sigma, b)


def test_flex_with_crop_masks_equals_pspc_and_tables(rng):
    ds = make_data(rng, (2, 6, 6))
    x = queries(rng, ds, 2, 0.5)
    for k in (1, 2, 4, 6):
        crops = crop_masks((6, 6), k)
        ref = pspc_square(x, ds.keys(), 0.5, patch=k, dtype=torch.float64, memory_budget=TINY)
        out = mask_composite(x, ds.keys(), 0.5, crops, dtype=torch.float64, memory_budget=TINY)
        assert rel(out, ref) < 1e-10
    # a {σ: masks} table and a callable give the masks of the nearest σ
    a, b = random_masks(rng, 6, 6), random_masks(rng, 6, 6)
    table = PSPCFlex(ds, masks={0.1: a, 10.0: b}, dtype=torch.float64)
    fn = PSPCFlex(ds, masks=lambda s: a if s < 1 else b, dtype=torch.float64)
    sig = torch.tensor([0.2, 7.0], dtype=torch.float64)
    assert torch.equal(table.masks_for(0.2), a) and torch.equal(table.masks_for(7.0), b)
    for den in (table, fn):
        out = den(x, sig)
        y, lab = candidate_list(ds, True)
        assert rel(out[0], flex_brute(x[0], y, lab, 0.2, a)) < 1e-10
        assert rel(out[1], flex_brute(x[1], y, lab, 7.0, b)) < 1e-10


def test_masks_from_heatmap_matches_greedy(rng):
    H, W = 4, 5
    heat = torch.rand(H, W, H, W, generator=rng, dtype=torch.float64) ** 3
    for tau in (0.05, 0.3, 0.5, 0.9, 1.0):
        masks = masks_from_heatmap(heat, tau)
        assert masks.shape == (H * W, H, W) and masks.dtype == torch.bool
        for p in range(H * W):
            h = heat.reshape(H * W, H * W)[p]
            order = sorted(range(H * W), key=lambda q: -float(h[q]))
            keep, mass = set(), 0.0
            for q in order:  # largest first until a fraction tau of the mass is held
                if mass >= tau * float(h.sum()) and tau < 1.0:
                    break
                keep.add(q)
                mass += float(h[q])
            got = set(masks.reshape(H * W, H * W)[p].nonzero().flatten().tolist())
            assert got == keep, (tau, p)


def test_wiener_default_flex_runs_and_tau_one_is_optimal(rng):
    ds = make_data(rng, (2, 6, 6), n=7)
    heat = wiener_heatmap(ds, 0.5)
    assert heat.shape == (6, 6, 6, 6) and (heat >= 0).all()
    x = queries(rng, ds, 2, 1.0)
    opt = Optimal(ds, flips=True, dtype=torch.float64, backend="torch")(x, 1.0)
    full = PSPCFlex(ds, tau=1.0, dtype=torch.float64, memory_budget=TINY)
    assert full.masks_for(1.0).all()
    assert rel(full(x, 1.0), opt) < 1e-10
    den = PSPCFlex(ds, dtype=torch.float64)  # paper's τ schedule: τ = 1 at σ = 80, 0.3 at σ = 0.002
    assert den.tau_for(80.0) == 1.0 and den.tau_for(0.002) == 0.3
    small = den.masks_for(0.002)
    assert not small.all() and small.view(36, 36).diagonal().all()
    assert torch.isfinite(den(x, torch.tensor([80.0, 0.002]))).all()


# ------------------------------------------------------------------------------------------- pca_locality
@pytest.mark.parametrize("flips,labelled", [(False, False), (True, True)])
def test_coordinate_retrieval_matches_bruteforce(rng, flips, labelled):
    ds = make_data(rng, (2, 4, 5))
    D = ds.dim
    y, lab = candidate_list(ds, flips)
    for sigma in SIGMAS:
        mask = torch.rand(D, D, generator=rng) < 0.3
        mask[:, 5] = False  # an empty support: equal weights
        x = queries(rng, ds, 2, sigma)
        labels = pick_labels(rng, 2, labelled)
        for block in (None, 1, 2, 3, y.shape[0]):
            out = coordinate_retrieval(
                x,
                ds.keys(),
                sigma,
                mask,
                query_labels=labels,
                flips=flips,
                softmax="exact" if block is None else "chunked",
                chunk_size=block,
                dtype=torch.float64,
                memory_budget=TINY,
            )
            for b in range(2):
                ref = coord_brute(x[b], y, lab, sigma, mask, None if labels is None else int(labels[b]), block)
                assert rel(out[b], ref) < 1e-10, (sigma, block, b)


def independent_locality_mask(ds, sigma, theta, flips):
    """Population covariance of the (augmented) images -> eigh -> Wiener -> row/diag -> threshold, from scratch."""
    y, _ = candidate_list(ds, flips)
    f = y.reshape(y.shape[0], -1)
    fc = f - f.mean(0)
    lam, U = torch.linalg.eigh(fc.t() @ fc / f.shape[0])
    lam = lam.clamp_min(0)
    A = U @ torch.diag(lam / (lam + sigma**2)) @ U.t()
    M = torch.empty_like(A)
    for n in range(A.shape[0]):
        dg = A[n, n] if abs(float(A[n, n])) >= 1e-6 else 1.0
        M[n] = A[n] / dg
    return M.abs() >= theta * M.abs().max()


@pytest.mark.parametrize("flips", [False, True])
def test_pca_locality_end_to_end(rng, flips):
    ds = make_data(rng, (2, 4, 5), n=6)
    dsf = ds.with_flips(flips)
    y, lab = candidate_list(ds, flips)
    theta = 0.05
    den = PCALocality(dsf, threshold=theta, dtype=torch.float64, memory_budget=TINY)
    assert den.flips is flips
    for sigma in (0.05, 0.7, 4.0):
        mask = den.mask_for(sigma)
        ref_mask = independent_locality_mask(ds, sigma, theta, flips)
        assert (mask != ref_mask).sum() <= 2  # threshold ties at rounding level only
        assert den.mask_for(sigma) is mask  # cached
        x = queries(rng, ds, 2, sigma)
        labels = pick_labels(rng, 2, True)
        out = den(x, sigma, labels)
        for b in range(2):
            assert rel(out[b], coord_brute(x[b], y, lab, sigma, mask, int(labels[b]))) < 1e-10


def test_pca_locality_identities(rng):
    ds = make_data(rng, (2, 5, 6), n=6)
    N = ds.num_stored
    for flips in (False, True):
        for sigma in SIGMAS:
            x = queries(rng, ds, 2, sigma)
            opt = Optimal(ds, flips=flips, dtype=torch.float64, backend="torch")(x, sigma)
            for kw in (dict(mask="full"), dict(threshold=0.0), dict(threshold=-1.0)):
                out = PCALocality(ds, flips=flips, dtype=torch.float64, memory_budget=TINY, **kw)(x, sigma)
                assert rel(out, opt) < 1e-10
            total = N * (2 if flips else 1)
            exact = PCALocality(ds, flips=flips, threshold=0.05, dtype=torch.float64, memory_budget=TINY)(x, sigma)
            one = PCALocality(
                ds,
                flips=flips,
                threshold=0.05,
                softmax="chunked",
                chunk_size=total,
                dtype=torch.float64,
                memory_budget=TINY,
            )(x, sigma)
            assert rel(one, exact) < 1e-10
    # K < N is the studio's chunk-averaged softmax: not the posterior mean
    x = queries(rng, ds, 2, 2.0)
    exact = PCALocality(ds, mask="full", dtype=torch.float64)(x, 2.0)
    wssm = PCALocality(ds, mask="full", softmax="chunked", chunk_size=2, dtype=torch.float64)(x, 2.0)
    assert rel(wssm, exact) > 1e-3


# ------------------------------------------------------------------------------------------- precision, budgets
def test_float32_matches_float64(rng):
    ds = make_data(rng, (2, 6, 6), n=6, uint8=True)
    masks = random_masks(rng, 6, 6)
    makers = [
        lambda dt: LocalScore(ds, patch=3, dtype=dt, memory_budget=TINY),
        lambda dt: LocalScore(ds, patch=7, flips=True, dtype=dt),
        lambda dt: PSPC(ds, patch=4, dtype=dt, memory_budget=TINY),
        lambda dt: PSPCFlex(ds, masks=masks, dtype=dt, memory_budget=TINY),
        lambda dt: PCALocality(ds, threshold=0.01, dtype=dt, memory_budget=TINY),
        lambda dt: PCALocality(ds, threshold=0.01, softmax="chunked", chunk_size=4, flips=True, dtype=dt),
    ]
    for sigma in (1e-3, 0.3, 1e3):
        x = queries(rng, ds, 2, sigma)
        labels = pick_labels(rng, 2, True)
        for make in makers:
            a = make(torch.float32)(x.float(), sigma, labels)
            b = make(torch.float64)(x, sigma, labels)
            assert a.dtype == torch.float32 and rel(a, b) < 1e-4, (make(torch.float64).name, sigma)


def test_budget_does_not_change_result(rng):
    ds = make_data(rng, (2, 6, 6), n=7)
    x = queries(rng, ds, 2, 0.3)
    for make in (
        lambda mb: LocalScore(ds, patch=5, flips=True, dtype=torch.float64, memory_budget=mb),
        lambda mb: PSPC(ds, patch=3, dtype=torch.float64, memory_budget=mb),
        lambda mb: PSPCFlex(
            ds, masks=random_masks(torch.Generator().manual_seed(1), 6, 6), dtype=torch.float64, memory_budget=mb
        ),
        lambda mb: PCALocality(ds, threshold=0.02, dtype=torch.float64, memory_budget=mb),
    ):
        big, tiny = make(1 << 28)(x, 0.3), make(1)(x, 0.3)
        assert rel(tiny, big) < 1e-12


# ------------------------------------------------------------------------------------------- bad inputs
def test_bad_inputs(rng):
    ds = make_data(rng, (2, 6, 6))
    with pytest.raises(ValueError, match="patch"):
        LocalScore(ds, patch=4)
    with pytest.raises(ValueError, match="patch"):
        LocalScore(ds)  # LS needs a patch size
    with pytest.raises(ValueError, match="patch"):
        PSPC(ds, patch=7)  # k > H
    with pytest.raises(ValueError, match="patch"):
        PSPC(ds, patch=0)
    with pytest.raises(ValueError, match="patch"):
        PSPC(ds, patch={1.0: 3, 10.0: 8})
    with pytest.raises(ValueError, match="masks"):
        PSPCFlex(ds, masks=torch.ones(36, 6, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="masks"):
        PSPCFlex(ds, masks=torch.ones(36, 6, 6))  # not bool
    empty = torch.ones(36, 6, 6, dtype=torch.bool)
    empty[4] = False
    with pytest.raises(ValueError, match="masks.*cover no pixel"):
        PSPCFlex(ds, masks=empty)
    uncovered = torch.zeros(36, 6, 6, dtype=torch.bool)
    uncovered[:, :3] = True
    with pytest.raises(ValueError, match="masks.*covered by no mask"):
        PSPCFlex(ds, masks=uncovered)
    with pytest.raises(ValueError, match="masks"):
        PSPCFlex(ds, masks="gradient")
    with pytest.raises(ValueError, match="masks"):
        PSPCFlex(ds, masks=lambda s: torch.ones(3, 6, 6, dtype=torch.bool))(queries(rng, ds), 1.0)
    with pytest.raises(ValueError, match="tau"):
        PSPCFlex(ds, tau=0.0)
    with pytest.raises(ValueError, match="tau"):
        PSPCFlex(ds, tau=float("nan"))
    with pytest.raises(ValueError, match="patch"):
        PSPCFlex(ds, patch=3)
    with pytest.raises(ValueError, match="threshold"):
        PCALocality(ds, threshold=float("nan"))
    with pytest.raises(ValueError, match="softmax"):
        PCALocality(ds, softmax="wssm")
    with pytest.raises(ValueError, match="chunk_size"):
        PCALocality(ds, softmax="chunked", chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size"):
        PCALocality(ds, softmax="chunked")
    with pytest.raises(ValueError, match="mask"):
        PCALocality(ds, mask="sparse")
    with pytest.raises(ValueError, match="patch"):
        PCALocality(ds, patch=3)
    for cls in (LocalScore, PSPC, PSPCFlex, PCALocality):
        with pytest.raises(ValueError, match="backend"):
            cls(ds, backend="cudnn", **({"patch": 3} if cls in (LocalScore, PSPC) else {}))
    with pytest.raises(ValueError, match="backend"):  # no C++ CPU kernel for PSPC-Flex
        PSPCFlex(ds, backend="cpu")
    with pytest.raises(ValueError, match="heatmap"):
        masks_from_heatmap(torch.rand(6, 6, 6), 0.5)
    with pytest.raises(ValueError, match="class_labels"):
        LocalScore(ds, patch=3)(queries(rng, ds), 1.0, torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="mask"):
        coordinate_retrieval(queries(rng, ds), ds.keys(), 1.0, torch.ones(5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="patch"):
        local_score(queries(rng, ds), ds.keys(), 1.0, patch=2)


# ------------------------------------------------------------------------------------------- real data
def test_mnist_outputs_finite():
    from analytic_diffusion.data import load_dataset

    ds = load_dataset("mnist32").subset(300)
    x0 = ds.images_float([0, 1])
    g = torch.Generator().manual_seed(0)
    dens = [
        LocalScore(ds, patch=7),
        PSPC(ds),
        PSPCFlex(ds, tau=0.5),
        PCALocality(ds),
        PCALocality(ds, softmax="chunked", chunk_size=128),
    ]
    for sigma in (0.01, 1.0, 80.0):
        x = x0 + sigma * torch.randn(x0.shape, generator=g)
        for den in dens:
            out = den(x, sigma)
            assert out.shape == x.shape and torch.isfinite(out).all(), (den.name, sigma)
            # convex combinations of images in [-1, 1], each normalised by its own weight total: a few ulps (it was
            # 1 + 1.1e-5 for pspc-flex when an einsum's sequential float32 sums made the numerator)
            assert out.abs().max() <= 1.0 + 4 * torch.finfo(torch.float32).eps, (den.name, sigma)


class _OneRank:
    """A process group of one rank (combine = the state itself): a shard that is the whole set, in one process."""

    rank, world = 0, 1

    def combine(self, state, what=""):
        return state

    def sum(self, t, what=""):
        return t


@pytest.mark.cpu_isa
def test_pca_locality_shard_makes_the_whole_sets_choice(rng):
    """A shard of a dataset chooses the backend the whole set would (auto: the fused C++ kernel for float32 on the
    CPU) and refuses what it refuses (float64 on the float32 kernel), instead of running the torch path silently."""
    from analytic_diffusion.ops import KeyBank
    from analytic_diffusion.ops.distributed import Shard

    u = torch.randint(0, 256, (300, 12), generator=rng, dtype=torch.uint8)
    labels = torch.randint(0, 3, (300,), generator=rng)
    whole = KeyBank(u, 2 / 255, -1.0, labels, (1, 3, 4))
    shard = KeyBank(u, 2 / 255, -1.0, labels, (1, 3, 4), shard=Shard(_OneRank(), 0, 300))
    mask = torch.rand(12, 12, generator=rng) < 0.4
    x = torch.randn(5, 12, generator=rng)
    q = torch.tensor([0, 1, 2, 0, 1])
    for backend in ("auto", "cpu", "torch"):
        for labels_ in (None, q):
            a = coordinate_retrieval(x, whole, 0.3, mask, backend=backend, flips=True, query_labels=labels_)
            b = coordinate_retrieval(x, shard, 0.3, mask, backend=backend, flips=True, query_labels=labels_)
            assert torch.equal(a, b), backend
    for keys in (whole, shard):
        with pytest.raises(ValueError, match="dtype: the cpu pca_locality kernel computes in float32"):
            coordinate_retrieval(x.double(), keys, 0.3, mask, backend="cpu", dtype=torch.float64)
