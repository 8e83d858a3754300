"""ELS / bbELS and the patch retrieval op against brute-force float64 loops written independently here.

The brute force builds, for every output pixel, its candidate list by the method's rule with explicit Python
loops over training images (and their mirrors), candidate centres and border classes, cuts every patch from
an explicitly padded numpy copy, computes direct squared differences, a full softmax and the weighted centre
pixels. Nothing here calls the package's padding, grouping or chunking code.
"""

import numpy as np
import pytest
import torch
from reference import float32_tolerance, rel, row_rel

from analytic_diffusion.data.dataset import Dataset
from analytic_diffusion.denoisers.equivariant import BoundaryBrokenELS, EquivariantLocalScore
from analytic_diffusion.ops.partial import combine_partials
from analytic_diffusion.ops.patch_retrieval import (
    PATCH_MEMORY_CAP,
    _chunk_plan,
    effective_budget,
    patch_softmax_retrieval,
)

C, N = 2, 5
SIGMAS = [1e-3, 0.05, 1.0, 1e3]


# ------------------------------------------------------------------------------------------- brute force
def _pad(img, d, mode):
    """(C, H, W) numpy -> padded by d on each side (circular or zeros)."""
    return np.pad(img, ((0, 0), (d, d), (d, d)), mode="wrap" if mode == "circular" else "constant")


def _els_rule(i, j, h, w, d):
    return [(r, c) for r in range(d, h - d) for c in range(d, w - d)]


def _ls_rule(i, j, h, w, d):
    return [(i, j)]


def _bbels_rule(i, j, h, w, d):
    top, bottom, left, right = i < d, i >= h - d, j < d, j >= w - d
    n_borders = top + bottom + left + right
    if n_borders == 0:
        return _els_rule(i, j, h, w, d)
    if n_borders >= 2:
        return [(i, j)]
    if top or bottom:  # same row offset from the same border, anywhere along it away from the side borders
        return [(i, c) for c in range(w) if not (c < d or c >= w - d)]
    return [(r, j) for r in range(h) if not (r < d or r >= h - d)]


def brute(x, train, sigmas, k, rule, query_mode, flips=False, train_labels=None, labels=None, temperature=1.0):
    """float64 numpy loops -> (B, C, H, W) torch."""
    x = x.double().numpy()
    train = train.double().numpy()
    b_, _, h, w = x.shape
    d = k // 2
    variants = []  # (padded image, image, label)
    for n in range(train.shape[0]):
        imgs = [train[n]] + ([train[n][:, :, ::-1].copy()] if flips else [])
        for img in imgs:
            variants.append((_pad(img, d, "zeros"), img, None if train_labels is None else int(train_labels[n])))
    out = np.zeros_like(x)
    for b in range(b_):
        xp = _pad(x[b], d, query_mode)
        for i in range(h):
            for j in range(w):
                q = xp[:, i : i + k, j : j + k].ravel()
                keys, vals = [], []
                for padded, img, lab in variants:
                    if labels is not None and lab != int(labels[b]):
                        continue
                    for r, c in rule(i, j, h, w, d):
                        keys.append(padded[:, r : r + k, c : c + k].ravel())
                        vals.append(img[:, r, c])
                keys, vals = np.stack(keys), np.stack(vals)
                dist = ((keys - q[None, :]) ** 2).sum(1)
                logits = -dist / (2.0 * float(sigmas[b]) ** 2 * temperature)
                wgt = np.exp(logits - logits.max())
                out[b, :, i, j] = (wgt[:, None] * vals).sum(0) / wgt.sum()
    return torch.from_numpy(out)


# ------------------------------------------------------------------------------------------- fixtures
def make_data(rng, h, w, labels=True, bright=False):
    lo = 180 if bright else 0
    imgs = torch.randint(lo, 256, (N, C, h, w), generator=rng, dtype=torch.uint8)
    lab = torch.tensor([0, 1, 0, 1, 1]) if labels else None
    ds = Dataset.from_array(imgs, lab)
    return ds, ds.images_float(dtype=torch.float64)[:N]


def make_query(rng, train, sigmas):
    """x = x0 + σ·ε with x0 a training image (memorised regime) or a blend, per sample."""
    b = len(sigmas)
    idx = torch.randint(0, train.shape[0], (b,), generator=rng)
    x0 = train[idx].clone()
    x0[1::2] = 0.5 * (train[idx[1::2]] + train[(idx[1::2] + 1) % train.shape[0]])
    s = torch.tensor(sigmas, dtype=torch.float64).view(-1, 1, 1, 1)
    return x0 + s * torch.randn(x0.shape, generator=rng, dtype=torch.float64), torch.tensor(sigmas, dtype=torch.float64)


SHAPES = [(6, 6), (5, 7)]


# ------------------------------------------------------------------------------------------- ELS / bbELS
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("flips,cond", [(False, False), (True, False), (True, True)])
def test_els_matches_bruteforce(rng, shape, k, flips, cond):
    ds, train = make_data(rng, *shape)
    x, s = make_query(rng, train, SIGMAS)
    labels = torch.randint(0, 2, (len(SIGMAS),), generator=rng) if cond else None
    den = EquivariantLocalScore(ds, patch=k, dtype=torch.float64, flips=flips)
    out = den(x, s, labels)
    ref = brute(x, train, s, k, _els_rule, "circular", flips, ds.labels, labels)
    assert rel(out, ref) < 1e-10


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 3, 5, 7, 15])
@pytest.mark.parametrize("flips,cond", [(False, False), (True, True)])
def test_bbels_matches_bruteforce(rng, shape, k, flips, cond):
    ds, train = make_data(rng, *shape)
    x, s = make_query(rng, train, SIGMAS)
    labels = torch.randint(0, 2, (len(SIGMAS),), generator=rng) if cond else None
    den = BoundaryBrokenELS(ds, patch=k, dtype=torch.float64, flips=flips)
    out = den(x, s, labels)
    ref = brute(x, train, s, k, _bbels_rule, "zeros", flips, ds.labels, labels)
    assert rel(out, ref) < 1e-10


@pytest.mark.parametrize(
    "cls,rule,mode,k",
    [
        (EquivariantLocalScore, _els_rule, "circular", 3),
        (BoundaryBrokenELS, _bbels_rule, "zeros", 3),
        (BoundaryBrokenELS, _bbels_rule, "zeros", 5),
    ],
)
def test_tiny_budget_forces_many_chunks(rng, cls, rule, mode, k):
    h, w = 5, 7
    ds, train = make_data(rng, h, w)
    x, s = make_query(rng, train, [0.02, 0.3])
    budget = 6000
    feat = C * k * k
    # The plan really splits images and positions: fewer than all N images / all positions per chunk.
    n_img, n_pos = _chunk_plan(N, (h - 2 * (k // 2)) * (w - 2 * (k // 2)), feat, C, h + k, w + k, 4, 8, budget)
    assert n_img == 1 and n_pos < (h - 2 * (k // 2)) * (w - 2 * (k // 2))
    out = cls(ds, patch=k, dtype=torch.float64, flips=True, memory_budget=budget, temperature=0.7)(x, s)
    ref = brute(x, train, s, k, rule, mode, True, temperature=0.7)
    assert rel(out, ref) < 1e-10


@pytest.mark.parametrize("cls", [EquivariantLocalScore, BoundaryBrokenELS])
@pytest.mark.parametrize("sigma", [1e-3, 0.03, 0.7, 1e3])
@pytest.mark.parametrize("bright", [False, True])
def test_float32_matches_float64(rng, cls, sigma, bright):
    ds, train = make_data(rng, 6, 6, bright=bright)
    x, s = make_query(rng, train, [sigma] * 3)
    x = x.float()
    out32 = cls(ds, patch=3, dtype=torch.float32, flips=True)(x, s)  # auto: the C++ kernel on CPU
    ref32 = cls(ds, patch=3, dtype=torch.float32, flips=True, backend="torch")(x, s)
    den64 = cls(ds, patch=3, dtype=torch.float64, flips=True)
    out64 = den64(x.double(), s)
    assert out32.dtype == torch.float32 and ref32.dtype == torch.float32
    # the reference's float32 path promotes low-σ rows to float64: exact for the rounded input itself
    assert rel(ref32, out64) < 1e-4
    # the fused float32 kernel: within float32's own resolution of this input (see float32_tolerance)
    assert bool((row_rel(out32, out64) < float32_tolerance(lambda xi: den64(xi, s), x.double(), out64)).all())


# ------------------------------------------------------------------------------------------- identities
@pytest.mark.parametrize("k", [3, 5])
def test_bbels_interior_equals_els_interior(rng, k):
    h, w = 7, 9
    ds, train = make_data(rng, h, w)
    x, s = make_query(rng, train, SIGMAS)
    a = EquivariantLocalScore(ds, patch=k, dtype=torch.float64, flips=True)(x, s)
    b = BoundaryBrokenELS(ds, patch=k, dtype=torch.float64, flips=True)(x, s)
    d = k // 2
    inner = (slice(None), slice(None), slice(d, h - d), slice(d, w - d))
    assert rel(b[inner], a[inner]) < 1e-12
    assert rel(b, a) > 1e-6  # and the borders really differ


def _ls_brute(x, train, s, k, flips):
    return brute(x, train, s, k, _ls_rule, "zeros", flips)


@pytest.mark.parametrize("shape,k", [((6, 6), 3), ((5, 7), 5), ((5, 7), 7), ((6, 6), 11)])
def test_bbels_corners_equal_ls(rng, shape, k):
    h, w = shape
    ds, train = make_data(rng, h, w)
    x, s = make_query(rng, train, SIGMAS)
    out = BoundaryBrokenELS(ds, patch=k, dtype=torch.float64, flips=True)(x, s)
    ls = _ls_brute(x, train, s, k, True)
    d = k // 2
    corner = torch.zeros(h, w, dtype=torch.bool)
    for i in range(h):
        for j in range(w):
            corner[i, j] = ((i < d) + (i >= h - d) + (j < d) + (j >= w - d)) >= 2
    assert corner.any()
    assert rel(out[..., corner], ls[..., corner]) < 1e-10
    if k >= max(h, w):  # every pixel is a corner or in a one-position edge band: bbELS is LS
        assert rel(out, ls) < 1e-10
    try:  # the package's LS, when present (the brute force above does not depend on it)
        from analytic_diffusion.denoisers.local import LocalScore
    except ImportError:
        return
    pkg = LocalScore(ds, patch=k, dtype=torch.float64, flips=True)(x, s)
    assert rel(out[..., corner], pkg[..., corner]) < 1e-9


def test_els_k1_is_per_pixel_softmax_over_all_pixels(rng):
    ds, train = make_data(rng, 5, 7)
    x, s = make_query(rng, train, SIGMAS)
    out = EquivariantLocalScore(ds, patch=1, dtype=torch.float64, flips=True)(x, s)
    pix = train.permute(0, 2, 3, 1).reshape(-1, C)  # every pixel of every image (mirrors: the same set)
    q = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, C)
    logits = -((q[:, :, None, :] - pix[None, None]) ** 2).sum(-1) / (2 * s.view(-1, 1, 1) ** 2)
    ref = (torch.softmax(logits, -1) @ pix).reshape(x.shape[0], 5, 7, C).permute(0, 3, 1, 2)
    assert rel(out, ref) < 1e-10


@pytest.mark.parametrize("cls", [EquivariantLocalScore, BoundaryBrokenELS])
def test_shards_combine_exactly(rng, cls):
    ds, train = make_data(rng, 6, 6)
    x, s = make_query(rng, train, [0.05, 0.5])
    labels = torch.tensor([1, 0])
    den = cls(ds, patch=3, dtype=torch.float64, flips=True, memory_budget=20000)
    full = den(x, s, labels)
    parts = [den.partial(x, s, labels, start=a, stop=b) for a, b in [(0, 1), (1, 3), (3, 3), (3, 5)]]
    combined = den.from_partial(combine_partials(parts), x.shape[0])
    assert rel(combined, full) < 1e-13
    whole = den.partial(x, s, labels)
    # m is a logit in nats: shards chunk the expanded-form GEMM differently, which rounds logits of size
    # ‖q‖²/2σ² differently by a few float64 ulps (seen: 3.6e-13 nats), so compare in nats, not relatively.
    assert float((combine_partials(parts).m - whole.m).abs().max()) < 1e-10
    # Shard (0, 1) holds only a label-0 image: sample 0 (label 1) has no candidate there.
    assert bool(torch.isinf(parts[0].m[:36]).all()) and bool((parts[0].l[:36] == 0).all())
    with pytest.raises(ValueError, match="no allowed candidate"):
        den.from_partial(parts[0], x.shape[0])


def test_op_keys_differ_from_values_arbitrary_positions(rng):
    """The op alone: arbitrary query rows, a hand-picked centre set (incl. zero-padded border centres)."""
    ds, train = make_data(rng, 5, 7)
    keys = ds.keys()
    k, d = 3, 1
    positions = torch.tensor([[0, 0], [2, 3], [4, 6], [1, 5], [3, 1]])
    q = torch.randn(9, C * k * k, generator=rng, dtype=torch.float64)
    sig = torch.rand(9, generator=rng, dtype=torch.float64) + 0.1
    qlab = torch.randint(0, 2, (9,), generator=rng)
    res = patch_softmax_retrieval(
        q, keys, sig, positions, k, query_labels=qlab, flips=True, dtype=torch.float64, memory_budget=5000
    )
    tr = train.numpy()
    for r in range(9):
        cand, vals = [], []
        for n in range(N):
            if int(ds.labels[n]) != int(qlab[r]):
                continue
            for img in (tr[n], tr[n][:, :, ::-1]):
                p = _pad(img, d, "zeros")
                for i, j in positions.tolist():
                    cand.append(p[:, i : i + k, j : j + k].ravel())
                    vals.append(img[:, i, j])
        cand, vals = np.stack(cand), np.stack(vals)
        lg = -((cand - q[r].numpy()) ** 2).sum(1) / (2 * float(sig[r]) ** 2)
        wgt = np.exp(lg - lg.max())
        ref = (wgt[:, None] * vals).sum(0) / wgt.sum()
        assert np.abs(res.mean[r].numpy() - ref).max() < 1e-12
        assert abs(float(res.max_weight[r]) - wgt.max() / wgt.sum()) < 1e-12
    st = patch_softmax_retrieval(
        q, keys, sig, positions, k, query_labels=qlab, flips=True, dtype=torch.float64, return_partial=True
    )
    torch.testing.assert_close(st.o / st.l[:, None], res.mean, rtol=1e-12, atol=1e-14)
    shards = [
        patch_softmax_retrieval(
            q,
            keys,
            sig,
            positions,
            k,
            query_labels=qlab,
            flips=True,
            dtype=torch.float64,
            return_partial=True,
            start=a,
            stop=b,
        )
        for a, b in [(0, 2), (2, 5)]
    ]
    # values lie in [-1, 1] and each side sums up to 30 weighted terms in its own order, rescaled by exp(Δm): the
    # difference is absolute, a few dozen ulps of 1 (1.6e-14 for one seed, on a mean of 0.04)
    torch.testing.assert_close(combine_partials(shards).mean(), res.mean, rtol=1e-13, atol=1e-13)


def test_budget_is_capped():
    assert effective_budget(64 * 10**9) == PATCH_MEMORY_CAP <= 2 * 2**30
    assert effective_budget(1000) == 1000


def test_schedule_groups_samples_by_k(rng):
    from analytic_diffusion.denoisers.patch_schedule import PatchSchedule

    ds, train = make_data(rng, 6, 6)
    x, s = make_query(rng, train, [0.01, 1.0, 0.01])
    sched = PatchSchedule([1, 3], [0.01, 1.0])
    out = EquivariantLocalScore(ds, patch=sched, dtype=torch.float64)(x, s)
    ref1 = brute(x[[0, 2]], train, s[[0, 2]], 1, _els_rule, "circular")
    ref3 = brute(x[[1]], train, s[[1]], 3, _els_rule, "circular")
    assert rel(out[[0, 2]], ref1) < 1e-10 and rel(out[[1]], ref3) < 1e-10


# ------------------------------------------------------------------------------------------- bad input
def test_bad_inputs(rng):
    ds, _train = make_data(rng, 5, 7)
    with pytest.raises(ValueError, match="patch"):
        EquivariantLocalScore(ds, patch=4)
    with pytest.raises(ValueError, match="patch"):
        BoundaryBrokenELS(ds, patch=2)
    with pytest.raises(ValueError, match="patch"):
        EquivariantLocalScore(ds, patch=7)  # > min(H, W) = 5
    BoundaryBrokenELS(ds, patch=7)  # fine: corners fall back to LS
    den = EquivariantLocalScore(ds, patch=3)
    with pytest.raises(ValueError, match="x"):
        den(torch.zeros(2, C, 5, 6), 1.0)
    with pytest.raises(ValueError, match="x"):
        den(torch.zeros(C, 5, 7), 1.0)
    with pytest.raises(ValueError, match="sigma"):
        den(torch.zeros(2, C, 5, 7), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="sigma"):
        den(torch.zeros(2, C, 5, 7), torch.tensor([1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="class_labels"):
        den(torch.zeros(2, C, 5, 7), 1.0, torch.tensor([0, 7]))
    keys = ds.keys()
    pos = torch.tensor([[2, 3]])
    with pytest.raises(ValueError, match="queries"):
        patch_softmax_retrieval(torch.zeros(4, C * 9 + 1), keys, 1.0, pos, 3)
    with pytest.raises(ValueError, match="patch"):
        patch_softmax_retrieval(torch.zeros(4, C * 16), keys, 1.0, pos, 4)
    with pytest.raises(ValueError, match="positions"):
        patch_softmax_retrieval(torch.zeros(4, C * 9), keys, 1.0, torch.tensor([[5, 0]]), 3)
    with pytest.raises(ValueError, match="positions"):
        patch_softmax_retrieval(torch.zeros(4, C * 9), keys, 1.0, torch.tensor([1, 2]), 3)
    with pytest.raises(ValueError, match="query_labels"):
        patch_softmax_retrieval(torch.zeros(4, C * 9), keys, 1.0, pos, 3, query_labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="memory_budget"):
        patch_softmax_retrieval(torch.zeros(4, C * 9), keys, 1.0, pos, 3, memory_budget=0)
