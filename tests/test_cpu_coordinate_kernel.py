"""The C++ CPU coordinate kernel of pca_locality (csrc/cpu/coordinate*.{h,cpp}) on its own: its per-split partials
against a float64 evaluation of the contract on every compiled instruction set (labels, empty supports, empty
splits, query groups of odd size, poisoned outputs), thread-count independence, and the binding's argument checks.
Through the denoiser it is also one of the ``coordinate_fused`` backends of tests/test_fused_patch.py."""

import math

import numpy as np
import pytest
import torch

from analytic_diffusion.data import Dataset
from analytic_diffusion.denoisers import make_denoiser
from analytic_diffusion.ops import cpu_backend
from analytic_diffusion.ops.fused_coordinate import stencil_table

pytestmark = [pytest.mark.cpu_isa, pytest.mark.usefixtures("cpu_kernels")]  # built (else a failure), outputs poisoned
ext = cpu_backend._cpu


def contract_partials(x, y, mask, vidx, coef2, cuts, image_labels=None, query_labels=None):
    """The contract in float64: (m base 2, l, o) per (split, query, coordinate), and per entry a bound on the fp32
    kernel's logit error over the split's candidates: y rounded to fp32 (half an ulp, ≤ 2^-24 for |y| ≤ 1) moves
    each (x − y)² by ≤ 2^-23 |x − y|, and the fp32 sum of the support's squares adds ≤ a few 2^-24 relative."""
    x, y, coef2 = x.double(), y.double(), coef2.double()
    e = x[:, None, :] - y[None, :, :]
    d = (e * e) @ mask.double()  # (B, N, D): masked distance per output coordinate
    a1 = e.abs() @ mask.double()
    z = -coef2[:, None, None] * d
    err = coef2[:, None, None] * (2.0**-22 * a1 + 2.0**-19 * d) + 1e-6
    if image_labels is not None:
        z = z.masked_fill((image_labels[None, :] != query_labels[:, None])[:, :, None], float("-inf"))
    vals = y[:, vidx.long()]  # (N, D)
    ms, ls, os_, tz = [], [], [], []
    for a, b in zip(cuts[:-1], cuts[1:]):
        zs = z[:, a:b]
        if b == a:
            shape = (x.shape[0], x.shape[1])
            ms.append(torch.full(shape, float("-inf"), dtype=torch.float64))
            ls.append(torch.zeros(shape, dtype=torch.float64))
            os_.append(torch.zeros(shape, dtype=torch.float64))
            tz.append(torch.zeros(shape, dtype=torch.float64))
            continue
        tz.append(err[:, a:b].max(1).values)
        m = zs.max(1).values
        w = torch.exp2(zs - torch.where(torch.isfinite(m), m, torch.zeros_like(m))[:, None])
        ms.append(m)
        ls.append(w.sum(1))
        os_.append((w * vals[None, a:b]).sum(1))
    return torch.stack(ms), torch.stack(ls), torch.stack(os_), torch.stack(tz)


def problem(rng, n=37, d=70, b=11, labels=False):
    images = torch.randint(0, 256, (n, d), generator=rng, dtype=torch.uint8)
    scale, shift = 2 / 255, -1.0
    y = images.double() * scale + shift
    x = (y[:b] + 0.3 * torch.randn(b, d, generator=rng, dtype=torch.float64)).float()
    mask = torch.rand(d, d, generator=rng) < 0.12
    mask |= torch.eye(d, dtype=torch.bool)
    mask[:, 3] = False  # an empty support: every candidate at distance 0
    vidx = torch.randperm(d, generator=rng).to(torch.int32)
    il = torch.randint(0, 3, (n,), generator=rng) if labels else None
    ql = torch.randint(0, 3, (b,), generator=rng) if labels else None
    return images, scale, shift, y, x, mask, vidx, il, ql


@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])
@pytest.mark.parametrize("labels", [False, True])
def test_partials_match_the_contract(rng, monkeypatch, isa, labels):
    monkeypatch.setenv("AD_CPU_ISA", isa)
    if ext.patch_isa() != isa:
        pytest.skip(f"kernels for {isa} not built or not supported by this CPU")
    images, scale, shift, y, x, mask, vidx, il, ql = problem(rng, labels=labels)
    cuts = [0, 5, 5, 36, 37]  # an empty split, a long one (several candidate blocks), a single candidate
    st = stencil_table(mask)
    for sigma in (1e-3, 0.1, 1.0, 1e3):
        coef2 = torch.full((x.shape[0],), 1 / (2 * sigma**2) / math.log(2), dtype=torch.float32)
        m, l, o = cpu_backend.coordinate_partials(
            x,
            images,
            st,
            vidx,
            coef2,
            torch.tensor(cuts, dtype=torch.int32),
            scale=scale,
            shift=shift,
            image_labels=il,
            query_labels=ql,
        )
        rm, rl, ro, tol_z = contract_partials(x, y, mask, vidx, coef2, cuts, il, ql)
        assert not (torch.isnan(m).any() or torch.isnan(l).any() or torch.isnan(o).any()), sigma
        assert torch.equal(torch.isfinite(m), torch.isfinite(rm)), sigma
        fin = torch.isfinite(rm)
        # base-2 logits from fp32 data and distances, within tol_z; at σ = 1e-3 the logits reach ~1e5 and fp32
        # cannot resolve their gaps much better (ill-conditioned, not a bug)
        assert ((m.double() - rm).abs() <= tol_z)[fin].all(), sigma
        assert (l.double()[~fin] == 0).all() and (o.double()[~fin] == 0).all()
        # l and o are relative to each side's own maximum; the mass and the mean then agree to 2^(±2 tol_z)
        spread = torch.exp2(2 * tol_z[fin]) - 1
        ld = l.double()[fin]
        assert ((ld - rl[fin]).abs() <= (1e-5 + spread) * rl[fin]).all(), sigma
        mean, rmean = o.double()[fin] / ld, ro[fin] / rl[fin]
        assert ((mean - rmean).abs() <= 1e-5 + 2 * spread).all(), sigma


def test_bitwise_independent_of_threads(rng, monkeypatch):
    ds = Dataset(torch.randint(0, 256, (300, 1, 8, 8), generator=rng, dtype=torch.uint8))
    x = ds.images_float()[:11] + 0.3 * torch.randn(11, 1, 8, 8, generator=rng)
    outs = []
    for threads in ("1", "2", "3"):
        monkeypatch.setenv("AD_NUM_THREADS", threads)
        outs.append(make_denoiser("pca_locality", ds, backend="cpu", threshold=0.05, flips=True)(x, 0.5))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_auto_takes_the_cpu_kernel_for_float32():
    from analytic_diffusion.ops.local_retrieval import COORDINATE_FUSED_KERNELS
    from analytic_diffusion.ops.patch_retrieval import choose_patch_backend

    ds = Dataset(torch.zeros(3, 1, 4, 4, dtype=torch.uint8))
    q = torch.zeros(1, 16)
    assert choose_patch_backend("auto", q, ds.keys(), torch.float32, fused=COORDINATE_FUSED_KERNELS)[0] == "cpu"
    assert choose_patch_backend("auto", q, ds.keys(), torch.float64, fused=COORDINATE_FUSED_KERNELS)[0] == "torch"


def test_binding_checks_its_arguments():
    x = np.zeros((2, 4), np.float32)
    imgs = np.zeros((3, 4), np.uint8)
    st = np.array([[0, 1, 2, 3], [1, -1, -1, -1]], np.int32)
    vidx = np.arange(4, dtype=np.int32)
    coef = np.ones(2, np.float32)
    splits = np.array([0, 3], np.int32)

    def call(**kw):
        args = dict(
            x=x,
            images=imgs,
            stencil=st,
            value_index=vidx,
            coef2=coef,
            splits=splits,
            scale=1.0,
            shift=0.0,
            image_labels=None,
            query_labels=None,
            num_threads=1,
        )
        args.update(kw)
        S = len(args["splits"]) - 1
        out = {k: np.empty((S, 2, 4), np.float32) for k in ("m", "l", "o")}
        out.update({k: v for k, v in kw.items() if k in out})
        args.update(out)
        ext.coordinate_partials(**args)
        return out

    assert np.isfinite(call()["m"]).all()
    with pytest.raises(TypeError, match="images: expected uint8 or float32"):
        call(images=imgs.astype(np.float64))
    with pytest.raises(ValueError, match="x: expected shape"):
        call(x=np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match="stencil: entries"):
        call(stencil=np.array([[0, 1, 2, 4]], np.int32))
    with pytest.raises(ValueError, match="value_index"):
        call(value_index=np.array([0, 1, 2, -1], np.int32))
    with pytest.raises(ValueError, match="splits: expected non-decreasing"):
        call(splits=np.array([0, 2, 1], np.int32))
    with pytest.raises(ValueError, match="splits: expected non-decreasing"):
        call(splits=np.array([0, 4], np.int32))
    with pytest.raises(ValueError, match="give both or neither"):
        call(image_labels=np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="query_labels: expected shape"):
        call(image_labels=np.zeros(3, np.int64), query_labels=np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="m: expected shape"):
        call(m=np.empty((2, 2, 4), np.float32))
    with pytest.raises(ValueError, match="scale, shift"):
        call(scale=float("nan"))
    with pytest.raises(ValueError, match="needs every operand on the CPU"):
        cpu_backend.coordinate_partials(
            torch.zeros(2, 4),
            torch.zeros(3, 4, dtype=torch.uint8),
            torch.zeros(1, 4, dtype=torch.int32),
            torch.zeros(4, dtype=torch.int32),
            torch.ones(2),
            torch.tensor([0, 3], dtype=torch.int32, device="meta"),
            scale=1.0,
            shift=0.0,
        )
