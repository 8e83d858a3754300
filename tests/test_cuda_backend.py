"""The CUDA kernels (csrc/cuda, analytic_diffusion._cuda, ops/cuda_backend.py).

* Everywhere nvcc is on PATH: every .cu compiles for sm_90a and ptxas reports no spill stores in any kernel.
* Everywhere: the backend's argument checks (dtype, device) and ``available()`` / ``unavailable_reason()``.
* Where the extension is built, or else under the host SIMT emulator (tests/cuda_emu, where the CUDA headers
  are installed): its host-side helpers, argument validation, and the global kernels against the float64 oracle
  on small shapes (the patch kernels: tests/test_fused_patch.py).
* On a CUDA device: the kernels against the float64 torch backend (the oracle), on fresh random inputs (uint8
  and float32 keys, σ from 1e-3 to 1e3, prime N and D, B across query blocks, column slabs for D > 8192, class
  labels with an empty class), outputs and scratch poisoned with NaN before every call, determinism (two calls
  bitwise equal), and on a 2000-image subset of the real MNIST.
"""

import os
import re
import shutil
import subprocess

import pytest
import torch
from reference import noisy_images, noisy_queries, rel, uint8_bank

from analytic_diffusion.ops import KeyBank, cuda_backend, torch_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
SIGMAS = (1e-3, 1e-2, 0.1, 1.0, 10.0, 1e3)
TOL = 1e-4
BUDGET = 1 << 24

# Skipped only where there is no GPU: on a GPU machine a missing or broken _cuda extension FAILS these tests
# (a silent skip would look green after a failed CUDA build).
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _extension_on_gpu_machines(request):
    if (
        request.node.get_closest_marker("gpu") is not None
        and torch.cuda.is_available()
        and (not cuda_backend.available() or cuda_backend._emulated())
    ):
        pytest.fail(
            f"this machine has a GPU but backend 'cuda' is unavailable: {cuda_backend.unavailable_reason()}",
            pytrace=False,
        )


# ----------------------------------------------------------------------------------------- compile check
def parse_ptxas(text):
    """{kernel: (registers, spill store bytes)} from `nvcc -Xptxas -v` output."""
    out, current, props = {}, None, None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            current = m.group(1)
            out[current] = [None, None]
            continue
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            props = m.group(1)
            continue
        m = re.search(r"(\d+) bytes spill stores", line)
        if m and props in out:
            out[props][1] = int(m.group(1))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and current is not None:
            out[current][0] = int(m.group(1))
    return {k: tuple(v) for k, v in out.items()}


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("source", sorted(f for f in os.listdir(CUDA_DIR) if f.endswith(".cu")))
def test_cuda_sources_compile_without_spills(source, tmp_path):
    cmd = [
        "nvcc",
        "-std=c++17",
        "-arch=sm_90a",
        "-Xptxas",
        "-v",
        "-I",
        CUDA_DIR,
        "-c",
        os.path.join(CUDA_DIR, source),
        "-o",
        str(tmp_path / "x.o"),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    kernels = parse_ptxas(r.stdout + r.stderr)
    assert kernels, "ptxas reported no kernel:\n" + r.stderr
    for name, (regs, spills) in kernels.items():
        assert spills == 0, f"{name}: {spills} bytes spill stores ({regs} registers)"
        assert regs is not None and regs <= 255, f"{name}: {regs} registers"


def test_parse_ptxas():
    text = (
        "ptxas info    : Compiling entry function '_Z1kv' for 'sm_90a'\n"
        "ptxas info    : Function properties for _Z1kv\n"
        "    0 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads\n"
        "ptxas info    : Used 40 registers, used 1 barriers, 356 bytes cmem[0]\n"
    )
    assert parse_ptxas(text) == {"_Z1kv": (40, 8)}


# ---------------------------------------------------------------------------------- checks without a GPU
def test_availability_is_a_clear_answer():
    ok = cuda_backend.available()
    assert isinstance(ok, bool)
    reason = cuda_backend.unavailable_reason()
    assert (reason is None) == ok
    if not ok:
        assert isinstance(reason, str) and reason


def test_rejects_float64_and_host_tensors(rng):
    bank = uint8_bank(rng, 20, 1, 3, 5)
    q = noisy_queries(rng, bank, 2, 0.5)
    coef = torch.ones(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="dtype"):
        cuda_backend.softmax_partial(q, bank, coef, dtype=torch.float64)
    with pytest.raises(ValueError, match="dtype"):
        cuda_backend.knn(q, bank, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="CUDA device"):
        cuda_backend.softmax_partial(q, bank, coef, dtype=torch.float32)
    with pytest.raises(ValueError, match="CUDA device"):
        cuda_backend.knn(q, bank, 2, dtype=torch.float32)


def test_extension_host_helpers(cuda_fused):  # the built extension, or its host-emulation build
    ext = cuda_backend._cuda
    assert ext.num_splits(1) == 1 and ext.num_splits(64) == 2 and ext.num_splits(10**6) == 256
    assert [ext.query_block(d) for d in (1, 512, 513, 1024, 2048, 4096, 4097, 100000)] == [16, 16, 8, 8, 4, 2, 1, 1]
    assert ext.softmax_scratch_bytes(100, 10) == ext.num_splits(100) * 16 * 13 * 4
    assert ext.knn_scratch_bytes(100, 10, 5) == ext.num_splits(100) * 16 * 5 * 8
    n, err = ext.device_count()
    assert n >= 0 and isinstance(err, str)


def test_extension_validates_arguments(cuda_fused):
    ext = cuda_backend._cuda
    args = dict(
        queries=1,
        keys=1,
        key_type=0,
        B=1,
        N=1,
        D=1,
        scale=1.0,
        shift=0.0,
        coef=1,
        key_labels=0,
        query_labels=0,
        m=1,
        l=1,
        l2=1,
        o=1,
        scratch=1,
        scratch_bytes=1 << 20,
        stream=0,
    )
    for bad, match in (
        ({"key_type": 3}, "key_type"),
        ({"N": 0}, "N"),
        ({"D": 0}, "D"),
        ({"queries": 0}, "queries"),
        ({"query_labels": 8}, "query_labels"),
        ({"scratch_bytes": 0}, "scratch"),
    ):
        with pytest.raises(ValueError, match=match):
            ext.softmax_retrieval(**{**args, **bad})
    kargs = dict(
        queries=1,
        keys=1,
        key_type=0,
        B=1,
        N=1,
        D=1,
        scale=1.0,
        shift=0.0,
        k=33,
        key_labels=0,
        query_labels=0,
        dist=1,
        index=1,
        scratch=1,
        scratch_bytes=1 << 20,
        stream=0,
    )
    with pytest.raises(ValueError, match="k"):
        ext.knn_search(**kargs)


# ------------------------------------------------------------------------------------------ GPU helpers
def float_bank(rng, n, d, labels=None):
    """float32 keys in [-1, 1] with the identity map."""
    return KeyBank(torch.rand((n, d), generator=rng) * 2 - 1, labels=labels)


def make_bank(rng, kind, n, d, labels=None):
    return uint8_bank(rng, n, 1, 1, d, labels=labels) if kind == "uint8" else float_bank(rng, n, d, labels)


def to_device(bank, dev):
    return KeyBank(
        bank.values.to(dev),
        bank.scale,
        bank.shift,
        labels=None if bank.labels is None else bank.labels.to(dev),
        image_shape=bank.image_shape,
    )


def to_cuda(bank):
    return to_device(bank, "cuda")


def coef_for(sigma, b):
    return torch.full((b,), 1.0 / (2.0 * sigma * sigma), dtype=torch.float64)


def oracle(q, bank, coef, query_labels=None):
    return torch_backend.softmax_partial(
        q, bank, coef, query_labels=query_labels, dtype=torch.float64, memory_budget=BUDGET
    )


def device_softmax(q, bank, coef, dev, query_labels=None):
    out = cuda_backend.softmax_partial(
        q.to(dev),
        to_device(bank, dev),
        coef.to(dev),
        dtype=torch.float32,
        query_labels=None if query_labels is None else query_labels.to(dev),
        poison=True,
    )
    return out.to("cpu")


def gpu_softmax(q, bank, coef, query_labels=None):
    return device_softmax(q, bank, coef, "cuda", query_labels)


def check_state(got, ref, empty=None):
    """The partial state against the oracle; rows in ``empty`` must be exactly (−inf, 0, 0, 0)."""
    empty = torch.zeros_like(ref.l, dtype=torch.bool) if empty is None else empty
    for name in ("m", "l", "l2", "o"):
        assert not torch.isnan(getattr(got, name)).any(), f"{name}: NaN (a poisoned value was not written)"
        assert getattr(got, name).dtype == torch.float32
    if empty.any():
        assert torch.all(got.m[empty] == float("-inf"))
        assert torch.all(got.l[empty] == 0) and torch.all(got.l2[empty] == 0) and torch.all(got.o[empty] == 0)
    full = ~empty
    if not full.any():
        return
    m, l, l2, o = got.m[full].double(), got.l[full].double(), got.l2[full].double(), got.o[full].double()
    rm, rl, rl2, ro = ref.m[full], ref.l[full], ref.l2[full], ref.o[full]
    assert torch.isfinite(m).all() and torch.all(l >= 1) and torch.all(l2 > 0)
    assert float(((m - rm).abs() / rm.abs().clamp_min(1.0)).max()) <= TOL
    assert rel(o / l[:, None], ro / rl[:, None]) <= TOL
    assert rel(l, rl) <= 10 * TOL and rel(l2, rl2) <= 10 * TOL


def check_knn(got_d, got_i, ref_d, ref_i, q, bank):
    """Same neighbours in the same order as the oracle (ties by the lower index). fp32 distances may swap two
    candidates whose exact distances agree to fp32 rounding: a position may then hold another index, but its
    exact distance must equal the oracle's at that rank."""
    assert got_d.dtype == torch.float32 and got_i.dtype == torch.int64
    assert not torch.isnan(got_d).any()
    fin = torch.isfinite(ref_d)
    assert torch.all(got_i[~fin] == -1) and torch.all(torch.isinf(got_d[~fin]))
    assert torch.all(got_i[fin] >= 0)
    if not fin.any():
        return
    assert rel(got_d[fin], ref_d[fin]) <= 1e-5
    for b in range(got_i.shape[0]):
        sel = got_i[b][fin[b]]
        assert len(set(sel.tolist())) == len(sel)
        exact = ((q[b].double()[None, :] - bank.gather(sel, torch.float64)) ** 2).sum(1)
        r = ref_d[b][fin[b]]
        assert torch.allclose(exact, r, rtol=1e-5, atol=1e-7), (b, sel, ref_i[b])
        swapped = sel != ref_i[b][fin[b]]
        if swapped.any():  # only near-ties may differ from the oracle's order
            assert torch.allclose(r[swapped], exact[swapped], rtol=2e-6, atol=1e-9), (b, sel, ref_i[b])


def check_random_softmax(rng, kind, sigma, B, N, D):
    bank = make_bank(rng, kind, N, D)
    q = noisy_queries(rng, bank, B, sigma)
    coef = coef_for(sigma, B)
    check_state(gpu_softmax(q, bank, coef), oracle(q, bank, coef))


def device_knn(q, bank, k, dev, query_labels=None):
    d, i = cuda_backend.knn(
        q.to(dev),
        to_device(bank, dev),
        k,
        dtype=torch.float32,
        poison=True,
        query_labels=None if query_labels is None else query_labels.to(dev),
    )
    return d.cpu(), i.cpu()


def gpu_knn(q, bank, k, query_labels=None):
    return device_knn(q, bank, k, "cuda", query_labels)


# ------------------------------------------------------------------ the kernels' logic without a GPU (emulated)
def test_global_kernels_under_host_emulation(cuda_fused, rng):
    """csrc/cuda/global_retrieval.cu on CPU tensors under the host SIMT emulator (tests/cuda_emu; on a GPU machine
    the real extension): softmax partials at σ 1e-3 … 1e3 across the query-block sizes (D = 13, 787, 4097), with
    labels and an empty class, and the k-NN scan, against the float64 oracle, outputs and scratch poisoned."""
    dev = cuda_fused.device
    for kind, sigma, B, N, D in (
        ("uint8", 1e3, 3, 31, 13),
        ("float32", 1e-3, 17, 300, 787),
        ("uint8", 1.0, 2, 100, 4097),
    ):
        bank = make_bank(rng, kind, N, D)
        q = noisy_queries(rng, bank, B, sigma)
        check_state(device_softmax(q, bank, coef_for(sigma, B), dev), oracle(q, bank, coef_for(sigma, B)))
    labels = torch.randint(0, 3, (200,), generator=rng)
    bank = make_bank(rng, "uint8", 200, 50, labels=labels)
    q = noisy_queries(rng, bank, 5, 0.3)
    ql = torch.tensor([0, 1, 2, 3, 1])  # class 3 has no candidate
    check_state(
        device_softmax(q, bank, coef_for(0.3, 5), dev, ql), oracle(q, bank, coef_for(0.3, 5), ql), empty=ql == 3
    )
    for k in (1, 5):
        rd, ri = torch_backend.knn(q, bank, k, dtype=torch.float64, memory_budget=BUDGET)
        check_knn(*device_knn(q, bank, k, dev), rd, ri, q, bank)


# -------------------------------------------------------------------------------------------- GPU tests
@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["uint8", "float32"])
@pytest.mark.parametrize("sigma", SIGMAS)
def test_softmax_matches_oracle(kind, sigma, rng):
    check_random_softmax(rng, kind, sigma, B=17, N=1009, D=787)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 3, 17])
@pytest.mark.parametrize("N", [1, 31, 1009])
@pytest.mark.parametrize("D", [1, 13, 787, 3072, 8193])
def test_softmax_shapes(B, N, D, rng):
    for kind, sigma in (("uint8", 1.0), ("float32", 0.1)):
        check_random_softmax(rng, kind, sigma, B, N, D)


@needs_gpu
@pytest.mark.gpu
def test_softmax_per_row_sigma_and_affine_map(rng):
    """One σ per row (heterogeneous timesteps) and a non-trivial affine map on float keys."""
    B, N, D = 19, 1009, 97
    raw = torch.round(torch.randn((N, D), generator=rng) * 256) / 256  # exact under the map in fp32
    bank = KeyBank(raw, scale=0.5, shift=0.25)
    q = noisy_queries(rng, bank, B, 0.3)
    sig = torch.logspace(-2, 2, B, dtype=torch.float64)
    coef = 1.0 / (2.0 * sig * sig)
    check_state(gpu_softmax(q, bank, coef), oracle(q, bank, coef))


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["uint8", "float32"])
def test_softmax_labels_with_empty_class(kind, rng):
    B, N, D = 17, 1009, 787
    labels = torch.randint(0, 4, (N,), generator=rng)  # classes 0..3 present
    bank = make_bank(rng, kind, N, D, labels=labels)
    q = noisy_queries(rng, bank, B, 1.0)
    ql = torch.randint(0, 4, (B,), generator=rng)
    ql[[0, 5, 16]] = 4  # class 4 has no candidate
    coef = coef_for(1.0, B)
    got = gpu_softmax(q, bank, coef, ql)
    check_state(got, oracle(q, bank, coef, ql), empty=ql == 4)
    with pytest.raises(ValueError, match="no allowed candidate"):
        got.mean()
    # Only the classes that exist: every row has candidates and the mean is defined.
    ql[ql == 4] = 1
    got = gpu_softmax(q, bank, coef, ql)
    ref = oracle(q, bank, coef, ql)
    assert rel(got.mean(), ref.mean()) <= TOL


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["uint8", "float32"])
@pytest.mark.parametrize("k", [1, 2, 5, 32])
def test_knn_matches_oracle(kind, k, rng):
    for B, N, D in ((1, 1009, 787), (17, 1009, 787), (3, 31, 13), (3, 257, 8193)):
        bank = make_bank(rng, kind, N, D)
        q = noisy_queries(rng, bank, B, 0.1)
        kk = min(k, N)
        rd, ri = torch_backend.knn(q, bank, kk, dtype=torch.float64, memory_budget=BUDGET)
        check_knn(*gpu_knn(q, bank, kk), rd, ri, q, bank)


@needs_gpu
@pytest.mark.gpu
def test_knn_ties_labels_and_padding(rng):
    base = torch.randint(0, 256, (7, 787), generator=rng, dtype=torch.uint8)
    vals = base.repeat(150, 1)  # row j is row j % 7: many exact ties, across tiles and splits
    labels = torch.arange(vals.shape[0]) % 3
    bank = KeyBank(vals, 2 / 255, -1.0, labels=labels)
    q = noisy_queries(rng, bank, 17, 0.05)
    rd, ri = torch_backend.knn(q, bank, 32, dtype=torch.float64, memory_budget=BUDGET)
    check_knn(*gpu_knn(q, bank, 32), rd, ri, q, bank)
    ql = torch.randint(0, 4, (17,), generator=rng)  # class 3 is empty: rows padded with (inf, -1)
    ql[0] = 3
    rd, ri = torch_backend.knn(q, bank, 32, query_labels=ql, dtype=torch.float64, memory_budget=BUDGET)
    d, i = gpu_knn(q, bank, 32, ql)
    check_knn(d, i, rd, ri, q, bank)
    assert torch.all(i[0] == -1)
    small = KeyBank(base[:3].clone(), 2 / 255, -1.0)  # k > N: padded
    d, i = gpu_knn(q[:, :787], small, 5)
    assert torch.all(i[:, 3:] == -1) and torch.all(torch.isinf(d[:, 3:]))


@needs_gpu
@pytest.mark.gpu
def test_deterministic(rng):
    B, N, D = 19, 5003, 787
    bank = to_cuda(make_bank(rng, "uint8", N, D, labels=torch.randint(0, 3, (N,), generator=rng)))
    q = (
        bank.gather(torch.randint(0, N, (B,), generator=rng).cuda(), torch.float32)
        + 0.3 * torch.randn((B, D), generator=rng).cuda()
    )
    coef = coef_for(0.3, B).cuda()
    ql = torch.randint(0, 3, (B,), generator=rng).cuda()
    for labels in (None, ql):
        a = cuda_backend.softmax_partial(q, bank, coef, query_labels=labels, dtype=torch.float32, poison=True)
        b = cuda_backend.softmax_partial(q, bank, coef, query_labels=labels, dtype=torch.float32)
        for name in ("m", "l", "l2", "o"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        d1, i1 = cuda_backend.knn(q, bank, 8, query_labels=labels, dtype=torch.float32, poison=True)
        d2, i2 = cuda_backend.knn(q, bank, 8, query_labels=labels, dtype=torch.float32)
        assert torch.equal(d1, d2) and torch.equal(i1, i2)


@needs_gpu
@pytest.mark.gpu
def test_runs_on_the_current_stream(rng):
    bank = make_bank(rng, "uint8", 1009, 787)
    q = noisy_queries(rng, bank, 5, 0.5)
    coef = coef_for(0.5, 5)
    ref = oracle(q, bank, coef)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        got = cuda_backend.softmax_partial(q.cuda(), to_cuda(bank), coef.cuda(), dtype=torch.float32, poison=True)
    side.synchronize()
    check_state(got.to("cpu"), ref)


# ------------------------------------------------------------------------------------------------ MNIST
@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("sigma", SIGMAS)
def test_mnist_softmax_and_nearest(mnist2000, rng, sigma):
    keys = mnist2000.keys()
    x = noisy_images(mnist2000, rng, 5, sigma).reshape(5, -1)
    coef = coef_for(sigma, 5)
    check_state(gpu_softmax(x, keys, coef), oracle(x, keys, coef))
    rd, ri = torch_backend.knn(x, keys, 2, dtype=torch.float64, memory_budget=BUDGET)  # memorisation ratio
    check_knn(*gpu_knn(x, keys, 2), rd, ri, x, keys)


@needs_gpu
@pytest.mark.gpu
def test_mnist_class_conditional(mnist2000, rng):
    keys = mnist2000.keys()
    x = noisy_images(mnist2000, rng, 4, 0.5).reshape(4, -1)
    ql = torch.tensor([0, 3, 7, 9])
    coef = coef_for(0.5, 4)
    check_state(gpu_softmax(x, keys, coef, ql), oracle(x, keys, coef, ql))
    rd, ri = torch_backend.knn(x, keys, 3, query_labels=ql, dtype=torch.float64, memory_budget=BUDGET)
    check_knn(*gpu_knn(x, keys, 3, ql), rd, ri, x, keys)
