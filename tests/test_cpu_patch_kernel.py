"""The C++ CPU patch kernel (csrc/cpu/patch_*.{h,cpp}) on its own: the partial-state contract it shares with the
Triton and CUDA kernels, every compiled instruction set, thread-count independence, runs of centres in any order
and direction, and the binding's argument checks. Through the denoisers it is also one of the ``fused`` backends
of tests/test_fused_patch.py."""

import numpy as np
import pytest
import torch
from reference import check_patch_contract, rel, uint8_bank

from analytic_diffusion.data import Dataset
from analytic_diffusion.denoisers import make_denoiser
from analytic_diffusion.ops import cpu_backend
from analytic_diffusion.ops.fused_patch import _finish, patch_partial
from analytic_diffusion.ops.patch_retrieval import interior_positions, patch_softmax_partial

pytestmark = [pytest.mark.cpu_isa, pytest.mark.usefixtures("cpu_kernels")]  # built (else a failure), outputs poisoned
ext = cpu_backend._cpu


@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])
def test_contract_on_every_instruction_set(rng, monkeypatch, isa):
    monkeypatch.setenv("AD_CPU_ISA", isa)
    if ext.patch_isa() != isa:
        pytest.skip(f"patch kernels for {isa} not built or not supported by this CPU")
    check_patch_contract(rng, cpu_backend.patch_partials, torch.device("cpu"), shuffle_positions=(isa != "base"))


def test_bitwise_independent_of_threads(rng, monkeypatch):
    ds = Dataset(torch.randint(0, 256, (40, 2, 9, 11), generator=rng, dtype=torch.uint8))
    x = ds.images_float()[:3] + 0.3 * torch.randn(3, 2, 9, 11, generator=rng)
    outs = {}
    for threads in ("1", "2", "3"):
        monkeypatch.setenv("AD_NUM_THREADS", threads)
        outs[threads] = [
            make_denoiser(m, ds, patch=3, backend="cpu", flips=True)(x, 0.2) for m in ("els", "bbels", "ls", "pspc")
        ]
    for a, b, c in zip(outs["1"], outs["2"], outs["3"]):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("per_row,whole", [(False, False), (True, False), (True, True)])
def test_centres_in_any_order(rng, per_row, whole):
    """Runs of consecutive centres are found left to right, right to left (mirror passes) or not at all (a shuffled
    list, isolated centres): same results as the reference whatever the order."""
    c, h, w, k, R = 2, 7, 19, 3, 23
    kb = uint8_bank(rng, 9, c, h, w)
    row = torch.full((w,), 3)
    cols = torch.arange(w)
    if per_row:  # a left-to-right run, a right-to-left run, then scattered centres
        pos = torch.cat(
            [
                torch.stack([row, cols], 1)[:10],
                torch.stack([row, cols.flip(0)], 1)[:9],
                torch.tensor([[0, 0], [6, 18], [2, 7], [2, 5]]),
            ]
        )
    else:
        pos = torch.cartesian_prod(torch.arange(h), torch.arange(w))[torch.randperm(h * w, generator=rng)]
    q = torch.rand(R, c * k * k, generator=rng) * 2 - 1
    coef = torch.full((R,), 1 / (2 * 0.3**2), dtype=torch.float64)
    ref = patch_partial(
        q,
        kb,
        coef,
        pos,
        k,
        query_labels=None,
        flips=True,
        start=0,
        stop=kb.n,
        per_row=per_row,
        whole=whole,
        backend="cpu",
    )
    if not per_row:
        oracle = patch_softmax_partial(q.double(), kb, 0.3, pos, k, flips=True, dtype=torch.float64, backend="torch")
        assert rel(ref.mean(), oracle.mean()) < 1e-5
    # the same call with the centres in list order reversed: the same state per row
    order = torch.arange(R - 1, -1, -1)
    rev = patch_partial(
        q[order],
        kb,
        coef,
        pos[order] if per_row else pos.flip(0),
        k,
        query_labels=None,
        flips=True,
        start=0,
        stop=kb.n,
        per_row=per_row,
        whole=whole,
        backend="cpu",
    )
    assert rel(rev.mean()[order], ref.mean()) < 1e-6


def test_large_patches_and_long_rows(rng):
    """C·k² = 3·15² features per row (the scratch of a same-position task grows with it) and rows longer than a
    vector (several lane groups per image row)."""
    ds = Dataset(torch.randint(0, 256, (6, 3, 17, 40), generator=rng, dtype=torch.uint8))
    x = ds.images_float()[:1] + 0.5 * torch.randn(1, 3, 17, 40, generator=rng)
    for method, k in (("ls", 15), ("pspc", 15), ("bbels", 15), ("els", 15)):
        ref = make_denoiser(method, ds, patch=k, backend="torch", dtype=torch.float64)(x.double(), 0.5)
        got = make_denoiser(method, ds, patch=k, backend="cpu")(x, 0.5)
        assert rel(got, ref) < 1e-4, method


def test_binding_checks_its_arguments():
    q = np.zeros((2, 9), np.float32)
    imgs = np.zeros((3, 1, 4, 4), np.uint8)
    idx = np.array([0, 2], np.int32)
    pos = np.array([[1, 1], [2, 2]], np.int32)
    coef = np.ones(2, np.float32)

    def call(**kw):
        args = dict(
            queries=q,
            images=imgs,
            image_index=idx,
            positions=pos,
            coef2=coef,
            k=3,
            scale=1.0,
            shift=0.0,
            splits=1,
            rule=0,
            num_threads=1,
        )
        args.update(kw)
        S = ext.patch_num_splits(len(args["image_index"]), args["splits"])
        V = 9 if args["rule"] == 2 else 1
        out = dict(
            m=np.empty((S, 2), np.float32),
            l=np.empty((S, 2), np.float32),
            l2=np.empty((S, 2), np.float32),
            o=np.empty((S, 2, V), np.float32),
        )
        out.update({k: v for k, v in kw.items() if k in out})
        args.update(out)
        ext.patch_partials(**args)
        return out

    got = call()
    assert np.isfinite(got["m"]).all() and (got["l"] > 0).all()
    with pytest.raises(ValueError, match="rule"):
        call(rule=3)
    with pytest.raises(ValueError, match="k:"):
        call(k=0)
    with pytest.raises(TypeError, match="images"):
        call(images=imgs.astype(np.float64))
    with pytest.raises(TypeError, match="queries"):
        call(queries=q.astype(np.float64))
    with pytest.raises(ValueError, match="queries"):
        call(queries=np.zeros((2, 8), np.float32))
    with pytest.raises(ValueError, match="image_index"):
        call(image_index=np.array([0, 3], np.int32))
    with pytest.raises(ValueError, match="positions"):
        call(positions=np.array([[1, 4], [2, 2]], np.int32))
    with pytest.raises(ValueError, match="positions"):  # same-position rules: one centre per row
        call(rule=1, positions=np.array([[1, 1]], np.int32))
    with pytest.raises(ValueError, match="coef2"):
        call(coef2=np.ones(3, np.float32))
    with pytest.raises(ValueError, match="o:"):
        call(o=np.empty((1, 2, 2), np.float32))
    with pytest.raises(ValueError, match="scale"):
        call(scale=float("nan"))
    with pytest.raises(ValueError, match="rule"):
        cpu_backend.patch_partials(
            torch.zeros(1, 9),
            torch.zeros(1, 1, 4, 4, dtype=torch.uint8),
            torch.zeros(1, dtype=torch.int32),
            torch.ones(1, 2, dtype=torch.int32),
            torch.ones(1),
            k=3,
            scale=1.0,
            shift=0.0,
            splits=1,
            rule="bogus",
        )


def test_no_images_leaves_rows_empty():
    """A split with no images (all of a class in another shard) is a valid empty state, not garbage."""
    m, _l, _l2, o = cpu_backend.patch_partials(
        torch.zeros(3, 9),
        torch.zeros(2, 1, 5, 5, dtype=torch.uint8),
        torch.zeros(0, dtype=torch.int32),
        interior_positions(5, 5, 3).to(torch.int32),
        torch.ones(3),
        k=3,
        scale=1.0,
        shift=0.0,
        splits=4,
        rule="shared",
    )
    assert m.shape == (0, 3) and o.shape == (0, 3, 1)
    st = _finish(
        *cpu_backend.patch_partials(
            torch.zeros(3, 9),
            torch.zeros(2, 1, 5, 5, dtype=torch.uint8),
            torch.tensor([1], dtype=torch.int32),
            interior_positions(5, 5, 3).to(torch.int32),
            torch.full((3,), float("inf")),
            k=3,
            scale=1.0,
            shift=0.0,
            splits=4,
            rule="shared",
        )
    )
    # σ → 0 with exact matches (zero image, zero queries): logit 0, not 0·inf = NaN
    assert torch.equal(st.m, torch.zeros(3)) and torch.equal(st.l, torch.full((3,), 9.0))
