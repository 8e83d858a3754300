"""Triton global-retrieval kernels against the float64 torch oracle.

On a CPU machine they run under TRITON_INTERPRET=1 (set by conftest.py; fp32 paths, the bf16 mode emulated by
exact fp32 products of the bf16 halves, which is what the tensor cores compute); on a CUDA machine with
TRITON_INTERPRET unset the same tests run compiled on the GPU. Outputs and scratch buffers are poisoned before
every launch.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[test]')")

from reference import noisy_queries, rel, uint8_bank  # noqa: E402

from analytic_diffusion.ops import KeyBank, knn_search, softmax_retrieval, torch_backend  # noqa: E402
from analytic_diffusion.ops import precision as P  # noqa: E402
from analytic_diffusion.ops import triton_backend as T  # noqa: E402

if T.unavailable_reason(torch.device("cuda") if not T.interpreting() else torch.device("cpu")) is not None:
    pytest.skip("Triton kernels need a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = torch.device("cpu") if T.interpreting() else torch.device("cuda")
SIGMAS = [1e-3, 1e-2, 0.1, 1.0, 10.0, 1e3]
BUDGET = 1 << 22


@pytest.fixture(autouse=True)
def poisoned():
    from analytic_diffusion.kernels import global_retrieval

    global_retrieval.poison_outputs = True
    yield
    global_retrieval.poison_outputs = False


def to_dev(bank: KeyBank) -> KeyBank:
    return KeyBank(
        bank.values.to(DEVICE),
        bank.scale,
        bank.shift,
        labels=None if bank.labels is None else bank.labels.to(DEVICE),
        image_shape=bank.image_shape,
    )


def float_bank(rng, n, d, labels=None):
    v = torch.rand(n, d, generator=rng) * 2 - 1
    return KeyBank(v, labels=labels)


def oracle(q, bank, sigma, labels=None):
    coef = torch.full((q.shape[0],), 1 / (2 * sigma * sigma), dtype=torch.float64)
    cpu = KeyBank(bank.values.cpu(), bank.scale, bank.shift, labels=None if bank.labels is None else bank.labels.cpu())
    return torch_backend.softmax_partial(
        q.double().cpu(), cpu, coef, query_labels=labels, dtype=torch.float64, memory_budget=BUDGET
    )


def ours(q, bank, sigma, labels=None, **kw):
    coef = torch.full((q.shape[0],), 1 / (2 * sigma * sigma), dtype=torch.float64, device=DEVICE)
    return T.softmax_partial(
        q.to(DEVICE), bank, coef, dtype=torch.float32, query_labels=None if labels is None else labels.to(DEVICE), **kw
    )


def assert_close(st, ref, tol=1e-4):
    assert torch.isfinite(st.o).all() and torch.isfinite(st.l).all()
    assert rel(st.mean().cpu(), ref.mean()) <= tol
    assert rel(st.effective_neighbours().cpu(), ref.effective_neighbours()) <= tol
    assert rel(st.max_weight().cpu(), ref.max_weight()) <= tol


@pytest.mark.parametrize("keys", ["uint8", "float32"])
@pytest.mark.parametrize("n,d,b", [(1, 7, 1), (257, 37, 3), (1009, 787, 2)])
def test_split_n_matches_float64(rng, keys, n, d, b):
    bank = uint8_bank(rng, n, 1, 1, d) if keys == "uint8" else float_bank(rng, n, d)
    dev_bank = to_dev(bank)
    for sigma in SIGMAS if d < 100 else [1e-3, 0.1, 1e3]:
        q = noisy_queries(rng, bank, b, sigma)
        assert T.plan(q.to(DEVICE), dev_bank, torch.ones(b, dtype=torch.float64, device=DEVICE))[0][0] == "split_n"
        assert_close(ours(q, dev_bank, sigma), oracle(q, bank, sigma))


@pytest.mark.parametrize("mode", ["exact", "tf32", "bf16"])
def test_two_pass_error_within_stated_bound(rng, mode):
    """Forced onto the fastest dot (no fallback), every row's logit and mean error stay within the bound."""
    bank = uint8_bank(rng, 211, 1, 3, 13)
    dev_bank = to_dev(bank)
    consts = T._dataset_constants(dev_bank, DEVICE)
    kind = P.dot_kinds(mode)[0]
    for sigma in SIGMAS:
        q = noisy_queries(rng, bank, 19, sigma)
        got = ours(q, dev_bank, sigma, precision=mode, max_logit_error=1e30)
        ref = oracle(q, bank, sigma)
        coef = torch.full((19,), 1 / (2 * sigma * sigma), dtype=torch.float64)
        bound = P.logit_error_bound(
            coef, q.double() - consts["center"].cpu(), consts["absmax"].cpu(), bank.scale, consts["norm_max"], kind
        )
        m_err = (got.m.double().cpu() - ref.m).abs()
        assert (m_err <= bound + 1e-6 * ref.m.abs()).all(), (sigma, m_err.max(), bound.min())
        mean_err = (got.mean().double().cpu() - ref.mean()).abs().max(1).values
        allowed = (torch.exp(2 * bound) - 1) + 4 * P.WEIGHT_ROUNDOFF[kind] + 1e-5
        assert (mean_err <= allowed).all(), (sigma, mean_err.max(), allowed.min())


@pytest.mark.parametrize("mode", ["exact", "tf32", "bf16"])
def test_modes_keep_their_accuracy_at_every_sigma(rng, mode):
    """With the default tolerances (fallback on), exact stays at fp32 accuracy and fast modes within 1e-2."""
    bank = uint8_bank(rng, 150, 1, 5, 7)
    dev_bank = to_dev(bank)
    for sigma in SIGMAS:
        q = noisy_queries(rng, bank, 12, sigma)
        got, ref = ours(q, dev_bank, sigma, precision=mode), oracle(q, bank, sigma)
        assert rel(got.mean().cpu(), ref.mean()) <= (1e-4 if mode == "exact" else 1e-2)


def test_plan_follows_the_bound(rng):
    bank = to_dev(uint8_bank(rng, 100, 1, 4, 4))
    fbank = to_dev(float_bank(rng, 100, 16))

    def kinds(b, sigma, mode, kb=bank):
        q = noisy_queries(rng, kb, b, sigma).to(DEVICE)
        coef = torch.full((b,), 1 / (2 * sigma * sigma), dtype=torch.float64, device=DEVICE)
        return [k for k, _ in T.plan(q, kb, coef, mode)]

    assert kinds(4, 1e3, "bf16") == ["split_n"]  # small batches: direct distances, exact
    assert kinds(16, 1e-3, "bf16") == ["split_n"]  # low noise: every fast bound too loose
    assert kinds(16, 1e3, "exact") == ["two_pass:ieee"]
    assert kinds(16, 1e3, "bf16") == ["two_pass:bf16x2"]
    assert "two_pass:bf16x2" not in kinds(16, 1e3, "bf16", fbank)  # float keys are not exact in bf16
    rows = T.plan(
        noisy_queries(rng, bank, 16, 0.1).to(DEVICE),
        bank,
        torch.full((16,), 50.0, dtype=torch.float64, device=DEVICE),
        "exact",
    )
    assert sorted(torch.cat([r for _, r in rows]).tolist()) == list(range(16))  # every row served once


@pytest.mark.parametrize("b", [3, 12])
def test_class_labels_and_empty_class(rng, b):
    labels = torch.randint(0, 3, (120,), generator=rng)
    labels[labels == 2] = 1  # class 2 has no member
    bank = uint8_bank(rng, 120, 1, 3, 5, labels=labels)
    dev_bank = to_dev(bank)
    q = noisy_queries(rng, bank, b, 0.7)
    ql = torch.randint(0, 2, (b,), generator=rng)
    got = ours(q, dev_bank, 0.7, ql, max_logit_error=1e30)
    assert_close(got, oracle(q, bank, 0.7, ql))
    ql[0] = 2
    with pytest.raises(ValueError, match="no allowed candidate"):
        ours(q, dev_bank, 0.7, ql).mean()


@pytest.mark.parametrize("k", [1, 2, 5, 33])
def test_knn_fused_topk_matches_reference(rng, k):
    # 150 keys: two splits of 128 + 22 keys, three 64-key tiles for k = 33 (a 64-lane sort network, one split
    # with fewer than k keys); ~75 per class, so every row has 33 allowed neighbours
    labels = torch.randint(0, 2, (150,), generator=rng)
    bank = uint8_bank(rng, 150, 1, 4, 6, labels=labels)
    dev_bank = to_dev(bank)
    q = noisy_queries(rng, bank, 5, 0.3)
    for ql in (None, torch.randint(0, 2, (5,), generator=rng)):
        d, i = T.knn(q.to(DEVICE), dev_bank, k, query_labels=None if ql is None else ql.to(DEVICE), dtype=torch.float32)
        dr, ir = torch_backend.knn(q.double(), bank, k, query_labels=ql, dtype=torch.float64, memory_budget=BUDGET)
        assert torch.equal(i.cpu(), ir)
        assert rel(d.cpu(), dr) <= 1e-5


def test_knn_rejects_large_k_and_public_api_with_flips(rng):
    bank = uint8_bank(rng, 90, 1, 3, 4)
    dev_bank = to_dev(bank)
    q = noisy_queries(rng, bank, 3, 0.2)
    with pytest.raises(ValueError, match="k: the fused top-k"):
        T.knn(q.to(DEVICE), dev_bank, T.MAX_FUSED_TOPK + 1, dtype=torch.float32)
    d, i = knn_search(q.to(DEVICE), dev_bank, 4, flips=True, backend="triton")
    dr, ir = knn_search(q.double(), bank, 4, flips=True, backend="torch", dtype=torch.float64)
    assert torch.equal(i.cpu(), ir) and rel(d.cpu(), dr) <= 1e-5
    for b in (2, 11):
        q = noisy_queries(rng, bank, b, 0.4)
        got = softmax_retrieval(q.to(DEVICE), dev_bank, 0.4, flips=True, backend="triton")
        ref = softmax_retrieval(q.double(), bank, 0.4, flips=True, backend="torch", dtype=torch.float64)
        assert rel(got.mean.cpu(), ref.mean) <= 1e-4


def test_results_are_bitwise_repeatable(rng):
    bank = to_dev(uint8_bank(rng, 140, 1, 3, 9))
    for b, sigma in ((2, 0.3), (12, 1e3)):
        q = noisy_queries(rng, bank, b, sigma).to(DEVICE)
        a, c = ours(q, bank, sigma), ours(q, bank, sigma)
        assert torch.equal(a.o, c.o) and torch.equal(a.l, c.l) and torch.equal(a.m, c.m)


def test_clear_errors(rng):
    bank = to_dev(uint8_bank(rng, 20, 1, 2, 2))
    q = noisy_queries(rng, bank, 2, 0.5).to(DEVICE)
    with pytest.raises(ValueError, match="dtype"):
        softmax_retrieval(q, bank, 0.5, backend="triton", dtype=torch.float64)
    with pytest.raises(ValueError, match="second_moment"):
        softmax_retrieval(q, bank, 0.5, backend="triton", second_moment=True)
    with pytest.raises(ValueError, match="precision"):
        softmax_retrieval(q, bank, 0.5, backend="triton", precision="fp8")
    with pytest.raises(ValueError, match="max_logit_error"):
        softmax_retrieval(q, bank, 0.5, backend="triton", precision="bf16", max_logit_error=0)
    with pytest.raises(ValueError, match="uint8 or float32"):
        T.softmax_partial(
            q, KeyBank(bank.values.double()), torch.ones(2, dtype=torch.float64, device=DEVICE), dtype=torch.float32
        )


def test_real_mnist(rng):
    from analytic_diffusion.data import load_dataset

    ds = load_dataset("mnist").subset(1000, random=True, seed=3)
    bank = ds.keys()
    dev_bank = to_dev(bank)
    for sigma, b in ((1e-3, 3), (0.1, 2), (1.0, 12), (1e3, 12)):  # B = 12: two-pass where the bound allows
        q = noisy_queries(rng, bank, b, sigma)
        assert_close(ours(q, dev_bank, sigma), oracle(q, bank, sigma))
    q = noisy_queries(rng, bank, 4, 0.5)
    d, i = T.knn(q.to(DEVICE), dev_bank, 2, dtype=torch.float32)
    dr, ir = torch_backend.knn(q.double(), bank, 2, dtype=torch.float64, memory_budget=BUDGET)
    assert torch.equal(i.cpu(), ir) and rel(d.cpu(), dr) <= 1e-5


def test_denoisers_run_on_the_triton_backend(rng):
    from analytic_diffusion.data import load_dataset
    from analytic_diffusion.denoisers import make_denoiser

    ds = load_dataset("mnist").subset(300, random=True, seed=5)
    x = ds.images_float()[:3] + 0.3 * torch.randn(3, 1, 28, 28, generator=rng)
    for method in ("optimal", "nearest"):
        ref = make_denoiser(method, ds, backend="torch", dtype=torch.float64)(x.double(), 0.3)
        got = make_denoiser(method, ds.to(DEVICE) if DEVICE.type == "cuda" else ds, backend="triton")(x.to(DEVICE), 0.3)
        assert rel(got.cpu(), ref) <= 1e-4


def test_ahead_of_time_compile_for_hopper_without_spills():
    """PTX for sm_90 from this CPU machine; ptxas (sm_90a) must accept every shipped configuration, no spills."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "..", "bench", "triton_aot.py")
    r = subprocess.run([sys.executable, script, "--json"], capture_output=True, text=True, env=env, timeout=900)
    rows = json.loads(r.stdout)
    assert rows and all(row["ok"] for row in rows), [row for row in rows if not row["ok"]]
    assert all(row["spill_stores"] == 0 and row["spill_loads"] == 0 for row in rows), rows
    assert r.returncode == 0
    assert math.isfinite(sum(row["registers"] for row in rows))
