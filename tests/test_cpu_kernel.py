"""The C++ CPU kernels (analytic_diffusion._cpu) against a brute-force float64 reference written here.

The reference computes direct distances Σ (q − y)² in float64 with y = scale·key + shift, logits −coef·dist,
and the partial state (m, l, l2, o) with exp(logit − max). Inputs are fresh random draws (prime N and D,
uint8 / float32 / float64 keys, σ from 1e-3 to 1e3, class filters, data near +1). The kernel allocates its own
outputs, so instead of poisoning buffers every output is checked to be finite where it should be.
"""

import numpy as np
import pytest
import torch

from analytic_diffusion import _cpu  # the package builds it everywhere: an import error fails, never skips
from analytic_diffusion.ops import KeyBank, cpu_backend, knn_search, softmax_retrieval, torch_backend

pytestmark = pytest.mark.cpu_isa

SIGMAS = (1e-3, 1e-1, 1.0, 10.0, 1e3)
SCALE, SHIFT = 2.0 / 255.0, -1.0
TOL = {np.float64: 1e-10, np.float32: 1e-4}


@pytest.fixture
def nrng(rng):
    """A NumPy generator from the test's own seed (conftest's ``rng``)."""
    return np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=rng)))


# ----------------------------------------------------------------------------------------------- reference
def ref_rows(keys, scale, shift):
    return keys.astype(np.float64) * scale + shift


def ref_dist2(q, y):
    """Direct squared distances (B, N) in float64, one query row at a time (bounded memory)."""
    q = q.astype(np.float64)
    return np.stack([((qb[None, :] - y) ** 2).sum(1) for qb in q])


def ref_allowed(B, N, key_labels, query_labels):
    if key_labels is None or query_labels is None:
        return np.ones((B, N), bool)
    return key_labels[None, :] == query_labels[:, None]


def ref_softmax(q, keys, scale, shift, coef, key_labels=None, query_labels=None):
    y = ref_rows(keys, scale, shift)
    z = -coef.astype(np.float64)[:, None] * ref_dist2(q, y)
    z = np.where(ref_allowed(q.shape[0], keys.shape[0], key_labels, query_labels), z, -np.inf)
    m = z.max(1)
    safe = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(z - safe[:, None])
    return m, p.sum(1), (p * p).sum(1), p @ y


def ref_knn(q, keys, scale, shift, k, key_labels=None, query_labels=None):
    d = ref_dist2(q, ref_rows(keys, scale, shift))
    d = np.where(ref_allowed(q.shape[0], keys.shape[0], key_labels, query_labels), d, np.inf)
    out_d = np.full((q.shape[0], k), np.inf)
    out_i = np.full((q.shape[0], k), -1, np.int64)
    for b in range(q.shape[0]):
        order = np.lexsort((np.arange(d.shape[1]), d[b]))  # by distance, then index
        order = order[np.isfinite(d[b, order])][:k]
        out_d[b, : len(order)], out_i[b, : len(order)] = d[b, order], order
    return out_d, out_i


def check_knn(q, keys, scale, shift, k, d, i, qdtype, key_labels=None, query_labels=None):
    """Kernel k-NN vs the reference. float64: identical indices. float32: near-ties may swap, so the chosen
    indices must be distinct, allowed, and have the reference's sorted distances (within rounding)."""
    rd, ri = ref_knn(q, keys, scale, shift, k, key_labels, query_labels)
    assert d.dtype == qdtype and i.dtype == np.int64 and d.shape == (q.shape[0], k) and i.shape == d.shape
    np.testing.assert_array_equal(i == -1, ri == -1)
    np.testing.assert_array_equal(np.isinf(d), np.isinf(rd))
    fin = np.isfinite(rd)
    np.testing.assert_allclose(d[fin], rd[fin], rtol=TOL[qdtype] * 10, atol=TOL[qdtype] * 10)
    assert np.all(np.diff(np.where(np.isinf(d), np.finfo(np.float64).max, d), axis=1) >= 0)
    if qdtype == np.float64:
        np.testing.assert_array_equal(i, ri)
        return rd, ri
    full = ref_dist2(q, ref_rows(keys, scale, shift))
    allowed = ref_allowed(q.shape[0], keys.shape[0], key_labels, query_labels)
    for b in range(q.shape[0]):
        sel = i[b][i[b] >= 0]
        assert len(set(sel.tolist())) == len(sel) and allowed[b, sel].all()
        np.testing.assert_allclose(full[b, sel], rd[b, : len(sel)], rtol=TOL[qdtype] * 10, atol=TOL[qdtype] * 10)
    return rd, ri


# ------------------------------------------------------------------------------------------------- inputs
def make_keys(rng, n, d, kdtype, near_one=False):
    if kdtype == np.uint8:
        if near_one:
            return (255 - rng.integers(0, 3, (n, d))).astype(np.uint8)
        return rng.integers(0, 256, (n, d), dtype=np.uint8)
    raw = rng.uniform(0, 255, (n, d))
    if near_one:
        raw = 255 - rng.uniform(0, 2, (n, d))
    return raw.astype(kdtype)


def make_queries(rng, keys, b, sigma, qdtype, scale=SCALE, shift=SHIFT):
    """Noisy copies of random candidate rows (the denoising setting): every σ regime is non-trivial."""
    y = ref_rows(keys[rng.integers(0, keys.shape[0], b)], scale, shift)
    return np.ascontiguousarray((y + sigma * rng.standard_normal(y.shape)).astype(qdtype))


def coef_for(sigma, b, qdtype):
    return np.full(b, 1.0 / (2.0 * sigma * sigma), qdtype)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def check_state(out, ref, qdtype, *, empty_rows=()):
    m, l, l2, o = out
    rm, rl, rl2, ro = ref
    tol = TOL[qdtype]
    for name, a in zip(("m", "l", "l2", "o"), out):
        assert a.dtype == qdtype, f"{name}: dtype {a.dtype}"
    full = np.array([b not in empty_rows for b in range(len(rm))], bool)
    # Rows without candidates: m = -inf, everything else exactly zero, no NaN anywhere.
    assert not any(np.isnan(a).any() for a in out)
    if (~full).any():
        assert np.all(m[~full] == -np.inf)
        assert np.all(l[~full] == 0) and np.all(l2[~full] == 0) and np.all(o[~full] == 0)
    if not full.any():
        return
    m, l, l2, o, rm, rl, rl2, ro = (a[full] for a in (m, l, l2, o, rm, rl, rl2, ro))
    assert np.isfinite(m).all() and np.isfinite(l).all() and np.isfinite(l2).all() and np.isfinite(o).all()
    assert np.all(l >= 1) and np.all(l2 > 0)  # the max logit contributes exp(0) = 1
    # m: the max logit (nats); relative, with a floor of 1 nat-scale for logits near 0.
    assert np.max(np.abs(m - rm) / np.maximum(1.0, np.abs(rm))) <= tol, (m, rm)
    assert rel(o / l[:, None], ro / rl[:, None]) <= tol
    # l and l2 are sums of weights exp(logit - m): their relative error is the absolute logit error, ~coef·|dist
    # error|. A float32 distance sum of D terms carries ~√D·u relative rounding, so at |logit| ~ 3e4 nats (σ = 1e-3)
    # the logits themselves are only known to ~0.05 nats: the bound grows with |m|.
    u = float(np.finfo(qdtype).eps) / 2
    ltol = tol * 10 + np.sqrt(o.shape[1]) * u * float(np.max(np.abs(rm)))
    assert rel(l, rl) <= ltol and rel(l2, rl2) <= 2 * ltol


# -------------------------------------------------------------------------------------------- softmax tests
@pytest.mark.parametrize("qdtype", [np.float64, np.float32])
@pytest.mark.parametrize("kdtype", [np.uint8, np.float32, np.float64])
@pytest.mark.parametrize("sigma", SIGMAS)
def test_softmax_dtypes_sigmas(qdtype, kdtype, sigma, nrng):
    rng = nrng
    B, N, D = 17, 257, 784
    keys = make_keys(rng, N, D, kdtype)
    q = make_queries(rng, keys, B, sigma, qdtype)
    coef = coef_for(sigma, B, qdtype)
    out = _cpu.softmax_retrieval(q, keys, SCALE, SHIFT, coef, None, None, 2)
    check_state(out, ref_softmax(q, keys, SCALE, SHIFT, coef), qdtype)


@pytest.mark.parametrize("B", [1, 3, 17])
@pytest.mark.parametrize("N", [1, 7, 257, 1031])
@pytest.mark.parametrize("D", [1, 13, 784])
def test_softmax_shapes(B, N, D, nrng):
    rng = nrng
    for qdtype, kdtype, sigma in ((np.float64, np.uint8, 1.0), (np.float32, np.float32, 0.1)):
        keys = make_keys(rng, N, D, kdtype)
        q = make_queries(rng, keys, B, sigma, qdtype)
        coef = coef_for(sigma, B, qdtype)
        out = _cpu.softmax_retrieval(q, keys, SCALE, SHIFT, coef, None, None, 2)
        check_state(out, ref_softmax(q, keys, SCALE, SHIFT, coef), qdtype)


@pytest.mark.parametrize("qdtype", [np.float64, np.float32])
@pytest.mark.parametrize("sigma", [1e-3, 1.0, 1e3])
def test_softmax_identity_map_and_other_affine(qdtype, sigma, nrng):
    """Float keys of the query dtype with the identity map are read in place; other maps are applied."""
    rng = nrng
    N, D, B = 263, 29, 5
    for scale, shift in ((1.0, 0.0), (0.5, 0.25), (-3.0, 2.0)):
        # Keys with few mantissa bits: scale·key + shift is exact in float32 too, so the reference's rows are
        # the kernel's rows whichever way it rounds (with or without FMA) and σ = 1e-3 stays well-conditioned.
        keys = (np.round(rng.standard_normal((N, D)) * 256) / 256).astype(qdtype)
        q = make_queries(rng, keys, B, sigma, qdtype, scale, shift)
        coef = coef_for(sigma, B, qdtype)
        out = _cpu.softmax_retrieval(q, keys, scale, shift, coef, None, None, 1)
        check_state(out, ref_softmax(q, keys, scale, shift, coef), qdtype)


@pytest.mark.parametrize("qdtype", [np.float64, np.float32])
@pytest.mark.parametrize("sigma", [1e-3, 1e-1, 1.0])
def test_softmax_near_plus_one(qdtype, sigma, nrng):
    """Every pixel ≈ +1: the direct form has no cancellation (the expanded form would lose it all)."""
    rng = nrng
    N, D, B = 1031, 784, 3
    keys = make_keys(rng, N, D, np.uint8, near_one=True)
    q = np.ascontiguousarray((1.0 - np.abs(sigma * rng.standard_normal((B, D)))).astype(qdtype))
    coef = coef_for(sigma, B, qdtype)
    out = _cpu.softmax_retrieval(q, keys, SCALE, SHIFT, coef, None, None, 2)
    check_state(out, ref_softmax(q, keys, SCALE, SHIFT, coef), qdtype)


@pytest.mark.parametrize("qdtype", [np.float64, np.float32])
def test_softmax_labels(qdtype, nrng):
    rng = nrng
    N, D, B = 1031, 13, 17
    keys = make_keys(rng, N, D, np.uint8)
    key_labels = rng.integers(0, 4, N).astype(np.int64)  # classes 0..3 present
    query_labels = rng.integers(0, 5, B).astype(np.int64)  # class 4 has no candidate
    query_labels[[0, 5]] = 4
    query_labels[[1, 2]] = 2
    q = make_queries(rng, keys, B, 1.0, qdtype)
    coef = coef_for(1.0, B, qdtype)
    out = _cpu.softmax_retrieval(q, keys, SCALE, SHIFT, coef, key_labels, query_labels, 2)
    empty = tuple(np.flatnonzero(query_labels == 4))
    check_state(out, ref_softmax(q, keys, SCALE, SHIFT, coef, key_labels, query_labels), qdtype, empty_rows=empty)
    # key_labels alone (no query labels): unconditional retrieval.
    out = _cpu.softmax_retrieval(q, keys, SCALE, SHIFT, coef, key_labels, None, 2)
    check_state(out, ref_softmax(q, keys, SCALE, SHIFT, coef), qdtype)


def test_softmax_all_rows_empty(nrng):
    rng = nrng
    keys = make_keys(rng, 300, 13, np.uint8)
    q = make_queries(rng, keys, 3, 1.0, np.float32)
    m, l, l2, o = _cpu.softmax_retrieval(
        q, keys, SCALE, SHIFT, coef_for(1.0, 3, np.float32), np.zeros(300, np.int64), np.ones(3, np.int64), 2
    )
    assert np.all(m == -np.inf) and np.all(l == 0) and np.all(l2 == 0) and np.all(o == 0)


@pytest.mark.parametrize("qdtype", [np.float64, np.float32])
@pytest.mark.parametrize("kdtype", [np.uint8, np.float32])
def test_threads_bitwise(qdtype, kdtype, nrng):
    """Segments depend on N only and combine in order: 1 and 2 threads give identical bits."""
    rng = nrng
    N, D, B = 3079, 97, 33
    keys = make_keys(rng, N, D, kdtype)
    key_labels = rng.integers(0, 3, N).astype(np.int64)
    query_labels = rng.integers(0, 3, B).astype(np.int64)
    q = make_queries(rng, keys, B, 0.5, qdtype)
    coef = coef_for(0.5, B, qdtype)
    for kl, ql in ((None, None), (key_labels, query_labels)):
        a = _cpu.softmax_retrieval(q, keys, SCALE, SHIFT, coef, kl, ql, 1)
        b = _cpu.softmax_retrieval(q, keys, SCALE, SHIFT, coef, kl, ql, 2)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
        da, ia = _cpu.knn_search(q, keys, SCALE, SHIFT, 9, kl, ql, 1)
        db, ib = _cpu.knn_search(q, keys, SCALE, SHIFT, 9, kl, ql, 2)
        np.testing.assert_array_equal(da, db)
        np.testing.assert_array_equal(ia, ib)


def test_batch_invariance(nrng):
    """A query's result does not depend on the other queries of the batch (pairing, blocks, labels)."""
    rng = nrng
    N, D, B = 1031, 101, 17
    keys = make_keys(rng, N, D, np.uint8)
    key_labels = rng.integers(0, 2, N).astype(np.int64)
    query_labels = rng.integers(0, 2, B).astype(np.int64)
    q = make_queries(rng, keys, B, 1.0, np.float32)
    coef = coef_for(1.0, B, np.float32)
    full = _cpu.softmax_retrieval(q, keys, SCALE, SHIFT, coef, key_labels, query_labels, 2)
    for b in (0, 7, 16):
        one = _cpu.softmax_retrieval(
            q[b : b + 1], keys, SCALE, SHIFT, coef[b : b + 1], key_labels, query_labels[b : b + 1], 2
        )
        for x, y in zip(full, one):
            np.testing.assert_array_equal(x[b : b + 1], y)


def test_isa_override(monkeypatch):
    """AD_CPU_ISA selects each instruction set this CPU runs (global and patch tables alike), unset means the
    widest, and a name that is not an instruction set is an error rather than the default path."""
    runnable = cpu_backend.runnable_isas()
    assert runnable[0] == "base" and set(runnable) <= {"base", "avx2", "avx512"}
    monkeypatch.delenv("AD_CPU_ISA", raising=False)
    assert cpu_backend.isa() == _cpu.patch_isa() == runnable[-1]
    for isa in runnable:
        monkeypatch.setenv("AD_CPU_ISA", isa)
        assert cpu_backend.isa() == _cpu.patch_isa() == isa
    monkeypatch.setenv("AD_CPU_ISA", "avx512f")
    with pytest.raises(ValueError, match="AD_CPU_ISA: expected one of base, avx2, avx512"):
        cpu_backend.isa()
    keys = np.zeros((3, 4), np.uint8)
    with pytest.raises(ValueError, match="AD_CPU_ISA"):
        _cpu.softmax_retrieval(np.zeros((1, 4)), keys, SCALE, SHIFT, np.ones(1), None, None, 1)


@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])
def test_each_isa_matches(monkeypatch, isa, nrng):
    """Every compiled instruction set (AD_CPU_ISA caps the choice) agrees with the reference, and is
    thread-count independent; the default run uses the widest one the CPU has."""
    monkeypatch.setenv("AD_CPU_ISA", isa)
    if _cpu.isa() != isa:
        pytest.skip(f"kernels for {isa} not built or not supported by this CPU")
    rng = nrng
    N, D, B = 1031, 784, 5
    keys = make_keys(rng, N, D, np.uint8)
    for qdtype in (np.float64, np.float32):
        for sigma in (1e-2, 1.0, 1e2):
            q = make_queries(rng, keys, B, sigma, qdtype)
            coef = coef_for(sigma, B, qdtype)
            out = _cpu.softmax_retrieval(q, keys, SCALE, SHIFT, coef, None, None, 2)
            check_state(out, ref_softmax(q, keys, SCALE, SHIFT, coef), qdtype)
            out1 = _cpu.softmax_retrieval(q, keys, SCALE, SHIFT, coef, None, None, 1)
            for x, y in zip(out, out1):
                np.testing.assert_array_equal(x, y)
        d, i = _cpu.knn_search(q, keys, SCALE, SHIFT, 5, None, None, 2)
        check_knn(q, keys, SCALE, SHIFT, 5, d, i, qdtype)


# ------------------------------------------------------------------------------------------------ knn tests
@pytest.mark.parametrize("qdtype", [np.float64, np.float32])
@pytest.mark.parametrize("kdtype", [np.uint8, np.float32, np.float64])
@pytest.mark.parametrize("N,D,k", [(1, 13, 1), (7, 1, 7), (257, 784, 5), (1031, 13, 64)])
def test_knn(qdtype, kdtype, N, D, k, nrng):
    rng = nrng
    keys = make_keys(rng, N, D, kdtype)
    q = make_queries(rng, keys, 17, 0.3, qdtype)
    d, i = _cpu.knn_search(q, keys, SCALE, SHIFT, k, None, None, 2)
    if D == 1:  # uint8 keys in one dimension: exact distance ties that float rounding may order either way
        rd, _ = ref_knn(q, keys, SCALE, SHIFT, k)
        np.testing.assert_allclose(d, rd, rtol=TOL[qdtype] * 10, atol=TOL[qdtype] * 10)
    else:
        check_knn(q, keys, SCALE, SHIFT, k, d, i, qdtype)


@pytest.mark.parametrize("k", [3, 150, 700, 2048])
def test_knn_selection_buffer(k, nrng):
    """The per-segment buffer + threshold selection: k small, near and above the segment size (compactions and
    none), with a class filter; float64 queries so that the indices must match the reference exactly."""
    keys = make_keys(nrng, 4099, 17, np.uint8)
    q = make_queries(nrng, keys, 5, 0.3, np.float64)
    key_labels = nrng.integers(0, 3, 4099).astype(np.int64)
    query_labels = np.array([0, 1, 2, 1, 0], np.int64)
    d, i = _cpu.knn_search(q, keys, SCALE, SHIFT, k, key_labels, query_labels, 2)
    check_knn(q, keys, SCALE, SHIFT, k, d, i, np.float64, key_labels, query_labels)


def test_knn_ties_and_padding(nrng):
    rng = nrng
    base = make_keys(rng, 40, 13, np.uint8)
    keys = np.concatenate([base, base, base])  # every row three times: exact ties, broken by index
    q = make_queries(rng, keys, 3, 0.2, np.float64)
    d, i = _cpu.knn_search(q, keys, SCALE, SHIFT, 9, None, None, 2)
    _, ri = ref_knn(q, keys, SCALE, SHIFT, 9)
    np.testing.assert_array_equal(i, ri)
    assert np.all(i[:, 0] < 40) and np.all(i[:, 1] == i[:, 0] + 40) and np.all(i[:, 2] == i[:, 0] + 80)
    np.testing.assert_array_equal(d[:, 0], d[:, 1])
    # Class filter with fewer than k allowed candidates: padded with (inf, -1); an empty class is all padding.
    key_labels = np.zeros(120, np.int64)
    key_labels[[3, 50, 111]] = 1
    d, i = _cpu.knn_search(q, keys, SCALE, SHIFT, 5, key_labels, np.array([1, 2, 0], np.int64), 2)
    _rd, ri = ref_knn(q, keys, SCALE, SHIFT, 5, key_labels, np.array([1, 2, 0], np.int64))
    np.testing.assert_array_equal(i, ri)
    assert set(i[0, :3]) == {3, 50, 111} and np.all(i[0, 3:] == -1) and np.all(np.isinf(d[0, 3:]))
    assert np.all(i[1] == -1) and np.all(d[1] == np.inf)
    assert np.all(key_labels[i[2]] == 0)


# --------------------------------------------------------------------------------------------- error tests
def _args(**over):
    rng = np.random.default_rng(0)
    a = dict(
        queries=rng.standard_normal((3, 13)),
        keys=rng.integers(0, 256, (20, 13), dtype=np.uint8),
        key_scale=SCALE,
        key_shift=SHIFT,
        coef=np.ones(3),
        key_labels=None,
        query_labels=None,
        num_threads=1,
    )
    a.update(over)
    return a


@pytest.mark.parametrize(
    "over,exc,match",
    [
        (dict(queries=np.zeros((3, 13), np.int32)), TypeError, "queries"),
        (dict(queries=np.zeros((3, 13), np.float16)), TypeError, "queries"),
        (dict(queries=[[0.0] * 13] * 3), TypeError, "queries"),
        (dict(keys=np.zeros((20, 13), np.int16)), TypeError, "keys"),
        (dict(coef=np.ones(3, np.float32)), TypeError, "coef"),
        (dict(key_labels=np.zeros(20, np.int32)), TypeError, "key_labels"),
        (dict(key_labels=np.zeros(20, np.int64), query_labels=np.zeros(3, np.int32)), TypeError, "query_labels"),
        (dict(queries=np.zeros(13)), ValueError, "queries"),
        (dict(queries=np.zeros((3, 12))), ValueError, "keys"),
        (dict(keys=np.zeros((20, 13, 1), np.uint8)), ValueError, "keys"),
        (dict(coef=np.ones(4)), ValueError, "coef"),
        (dict(queries=np.zeros((13, 3)).T), ValueError, "contiguous"),
        (dict(keys=np.zeros((13, 20), np.uint8).T), ValueError, "contiguous"),
        (dict(key_labels=np.zeros(19, np.int64)), ValueError, "key_labels"),
        (dict(key_labels=np.zeros(20, np.int64), query_labels=np.zeros(2, np.int64)), ValueError, "query_labels"),
        (dict(query_labels=np.zeros(3, np.int64)), ValueError, "key_labels"),
        (dict(key_scale=float("nan")), ValueError, "key_scale"),
    ],
)
def test_errors(over, exc, match):
    a = _args(**over)
    with pytest.raises(exc, match=match):
        _cpu.softmax_retrieval(**a)
    if match != "coef":  # knn_search shares the validation of everything but coef
        a.pop("coef")
        with pytest.raises(exc, match=match):
            _cpu.knn_search(k=2, **a)


def test_knn_k_errors():
    a = _args()
    a.pop("coef")
    with pytest.raises(ValueError, match="k"):
        _cpu.knn_search(k=21, **a)
    with pytest.raises(ValueError, match="k"):
        _cpu.knn_search(k=0, **a)
    _d, i = _cpu.knn_search(k=20, **a)  # k == N is allowed
    assert np.all(np.sort(i, 1) == np.arange(20))


# ------------------------------------------------------------------------------- Python wrappers and entry
def _bank(rng, n, d, labels=False, shape=None):
    vals = torch.from_numpy(make_keys(rng, n, d, np.uint8))
    lab = torch.from_numpy(rng.integers(0, 3, n).astype(np.int64)) if labels else None
    return KeyBank(vals, scale=SCALE, shift=SHIFT, labels=lab, image_shape=shape)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_backend_wrappers(dtype, nrng):
    rng = nrng
    bank = _bank(rng, 1031, 97, labels=True)
    q = torch.from_numpy(make_queries(rng, bank.values.numpy(), 5, 0.5, np.float64))
    coef = torch.full((5,), 2.0, dtype=torch.float64)
    ql = torch.tensor([0, 1, 2, 0, 1])
    got = cpu_backend.softmax_partial(q, bank, coef, query_labels=ql, dtype=dtype)
    ref = torch_backend.softmax_partial(q, bank, coef, query_labels=ql, dtype=torch.float64, memory_budget=1 << 20)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert got.o.dtype == dtype
    assert rel(got.mean().numpy(), ref.mean().numpy()) <= tol
    assert rel(got.m.numpy(), ref.m.numpy()) <= tol
    assert rel(got.l.numpy(), ref.l.numpy()) <= 10 * tol
    d, i = cpu_backend.knn(q, bank, 7, query_labels=ql, dtype=dtype)
    rd, ri = torch_backend.knn(q, bank, 7, query_labels=ql, dtype=torch.float64, memory_budget=1 << 20)
    assert rel(d.numpy(), rd.numpy()) <= tol
    if dtype == torch.float64:
        assert torch.equal(i, ri)
    else:
        check_knn(
            q.numpy().astype(np.float32),
            bank.values.numpy(),
            SCALE,
            SHIFT,
            7,
            d.numpy(),
            i.numpy(),
            np.float32,
            bank.labels.numpy(),
            ql.numpy(),
        )


@pytest.mark.parametrize("sigma", [1e-3, 1.0, 1e3])
def test_entry_point_cpu_vs_torch(sigma, nrng):
    rng = nrng
    bank = _bank(rng, 257, 3 * 5 * 7, labels=True, shape=(3, 5, 7))
    x = torch.from_numpy(make_queries(rng, bank.values.numpy(), 4, sigma, np.float64))
    ql = torch.tensor([2, 0, 1, 2])
    for kwargs in (dict(), dict(query_labels=ql), dict(flips=True), dict(query_labels=ql, flips=True)):
        got = softmax_retrieval(x, bank, sigma, backend="cpu", **kwargs)
        ref = softmax_retrieval(x, bank, sigma, backend="torch", dtype=torch.float64, **kwargs)
        assert rel(got.mean.numpy(), ref.mean.numpy()) <= 1e-10
        assert rel(got.max_weight.numpy(), ref.max_weight.numpy()) <= 1e-9
        assert rel(got.effective_neighbours.numpy(), ref.effective_neighbours.numpy()) <= 1e-9
        got32 = softmax_retrieval(x.float(), bank, sigma, backend="cpu")
        ref64 = softmax_retrieval(x, bank, sigma, backend="torch", dtype=torch.float64)
        assert rel(got32.mean.numpy(), ref64.mean.numpy()) <= 1e-4
        d, i = knn_search(x, bank, 6, backend="cpu", **kwargs)
        rd, ri = knn_search(x, bank, 6, backend="torch", dtype=torch.float64, **kwargs)
        assert torch.equal(i, ri)
        assert rel(d.numpy(), rd.numpy()) <= 1e-10


def test_module_info():
    assert _cpu.isa() in ("avx512", "avx2", "base")
    assert isinstance(_cpu.openmp, bool)
    assert _cpu.num_segments(1) == 1 and _cpu.num_segments(257) == 2 and _cpu.num_segments(10**6) == 64
