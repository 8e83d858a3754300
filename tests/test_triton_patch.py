"""The fused ELS / bbELS patch kernel (implicit im2col) against the float64 torch reference.

CPU: Triton interpreter (conftest.py sets TRITON_INTERPRET=1); GPU: compiled, with TRITON_INTERPRET=0.
Outputs are poisoned before every launch.
"""
import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[test]')")

from analytic_diffusion.data import Dataset, load_dataset  # noqa: E402
from analytic_diffusion.denoisers import make_denoiser  # noqa: E402
from analytic_diffusion.ops import KeyBank  # noqa: E402
from analytic_diffusion.ops import triton_backend as T  # noqa: E402
from analytic_diffusion.ops.patch_retrieval import choose_patch_backend, patch_softmax_partial  # noqa: E402
from reference import rel  # noqa: E402

if T.unavailable_reason(torch.device("cpu") if T.interpreting() else torch.device("cuda")) is not None:
    pytest.skip("Triton kernels need a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = torch.device("cpu") if T.interpreting() else torch.device("cuda")


@pytest.fixture(autouse=True)
def poisoned():
    from analytic_diffusion.kernels import global_retrieval
    global_retrieval.poison_outputs = True
    yield
    global_retrieval.poison_outputs = False


def bank(rng, n, c, h, w, labels=None, dtype=torch.uint8):
    if dtype == torch.uint8:
        v = torch.randint(0, 256, (n, c * h * w), generator=rng, dtype=torch.uint8)
        return KeyBank(v, 2 / 255, -1.0, labels=labels, image_shape=(c, h, w))
    return KeyBank(torch.rand(n, c * h * w, generator=rng) * 2 - 1, labels=labels, image_shape=(c, h, w))


def on_device(kb):
    return KeyBank(kb.values.to(DEVICE), kb.scale, kb.shift, labels=None if kb.labels is None else kb.labels.to(DEVICE),
                   image_shape=kb.image_shape)


@pytest.mark.parametrize("keys", [torch.uint8, torch.float32])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_patch_kernel_matches_reference(rng, keys, k):
    c, h, w = 3, 6, 5
    labels = torch.randint(0, 3, (17,), generator=rng)
    labels[labels == 2] = 0
    kb = bank(rng, 17, c, h, w, labels, keys)
    pos = torch.cartesian_prod(torch.arange(h), torch.arange(w))  # every centre: borders use the zero padding
    q = torch.rand(11, c * k * k, generator=rng) * 2 - 1
    ql = torch.randint(0, 2, (11,), generator=rng)
    for sigma in (1e-3, 0.1, 1.0, 1e3):
        for flips, lab in ((False, None), (True, ql)):
            ref = patch_softmax_partial(q.double(), kb, sigma, pos, k, dtype=torch.float64, flips=flips,
                                        query_labels=lab, backend="torch")
            got = patch_softmax_partial(q.to(DEVICE), on_device(kb), sigma, pos.to(DEVICE), k, dtype=torch.float32,
                                        flips=flips, query_labels=None if lab is None else lab.to(DEVICE),
                                        backend="triton")
            assert rel(got.mean().cpu(), ref.mean()) <= 1e-4
            assert rel(got.effective_neighbours().cpu(), ref.effective_neighbours()) <= 1e-4


def test_empty_class_and_shards(rng):
    c, h, w, k = 1, 5, 5, 3
    labels = torch.tensor([0, 0, 1, 1, 0, 1])
    kb = bank(rng, 6, c, h, w, labels)
    pos = torch.cartesian_prod(torch.arange(1, 4), torch.arange(1, 4))
    q = torch.rand(4, 9, generator=rng) * 2 - 1
    ref = patch_softmax_partial(q.double(), kb, 0.4, pos, k, dtype=torch.float64, backend="torch")
    dk = on_device(kb)
    a = patch_softmax_partial(q.to(DEVICE), dk, 0.4, pos.to(DEVICE), k, stop=2, backend="triton")
    b = patch_softmax_partial(q.to(DEVICE), dk, 0.4, pos.to(DEVICE), k, start=2, backend="triton")
    assert rel(a.combine(b).mean().cpu(), ref.mean()) <= 1e-4  # shards combine exactly
    st = patch_softmax_partial(q.to(DEVICE), dk, 0.4, pos.to(DEVICE), k, query_labels=torch.full((4,), 2, device=DEVICE),
                               backend="triton")
    with pytest.raises(ValueError, match="no allowed candidate"):
        st.mean()


@pytest.mark.parametrize("method,k", [("els", 3), ("bbels", 3), ("bbels", 5)])
def test_els_and_bbels_denoisers_on_triton(rng, method, k):
    """Every padding rule: circular ELS; bbELS interior, edge bands and corners (k = 5 on 7×6: 2-pixel corners)."""
    imgs = torch.randint(0, 256, (12, 2, 7, 6), generator=rng, dtype=torch.uint8)
    ds = Dataset(imgs)
    x = ds.images_float()[:2] + 0.5 * torch.randn(2, 2, 7, 6, generator=rng)
    for sigma in (0.01, 0.5, 50.0):
        ref = make_denoiser(method, ds, patch=k, backend="torch", dtype=torch.float64)(x.double(), sigma)
        got = make_denoiser(method, ds.to(DEVICE) if DEVICE.type == "cuda" else ds, patch=k,
                            backend="triton")(x.to(DEVICE), sigma)
        assert rel(got.cpu(), ref) <= 1e-4


def test_bbels_on_mnist_with_flips(rng):
    # Real digits, cropped to their central 14×14 so that the interpreter (every program in NumPy) stays quick.
    mnist = load_dataset("mnist").subset(6, random=True, seed=1)
    ds = Dataset(mnist.images[:, :, 7:21, 7:21].contiguous())
    x = ds.images_float()[:1] + 0.3 * torch.randn(1, 1, 14, 14, generator=rng)
    ref = make_denoiser("bbels", ds, patch=3, flips=True, backend="torch", dtype=torch.float64)(x.double(), 0.3)
    got = make_denoiser("bbels", ds.to(DEVICE) if DEVICE.type == "cuda" else ds, patch=3, flips=True,
                        backend="triton")(x.to(DEVICE), 0.3)
    assert rel(got.cpu(), ref) <= 1e-4


def test_backend_choice_and_errors(rng):
    kb = bank(rng, 4, 1, 4, 4)
    q = torch.rand(2, 9, generator=rng)
    assert choose_patch_backend("auto", q, kb, torch.float32)[0] == "torch"  # CPU tensors: the reference
    with pytest.raises(ValueError, match="backend"):
        choose_patch_backend("cpu", q, kb, torch.float32)
    with pytest.raises(ValueError, match="backend"):
        make_denoiser("els", Dataset(torch.zeros(3, 1, 4, 4, dtype=torch.uint8)), patch=3, backend="cuda")
    with pytest.raises(ValueError, match="dtype"):
        patch_softmax_partial(q.to(DEVICE).double(), on_device(kb), 0.5, torch.tensor([[1, 1]], device=DEVICE), 3,
                              dtype=torch.float64, backend="triton")


@pytest.mark.parametrize("k", [1, 3, 5, 13])
def test_ls_on_the_same_position_kernel(rng, k):
    """LS: every pixel's own position only (k = 13 on 6×5 covers the whole image: LS = optimal there)."""
    from analytic_diffusion.ops.local_retrieval import local_score
    labels = torch.randint(0, 2, (14,), generator=rng)
    imgs = torch.randint(0, 256, (14, 2, 6, 5), generator=rng, dtype=torch.uint8)
    ds = Dataset(imgs, labels)
    x = ds.images_float()[:3] + 0.4 * torch.randn(3, 2, 6, 5, generator=rng)
    ql = torch.tensor([0, 1, 1])
    for sigma, flips, lab in ((0.01, False, None), (0.4, True, ql), (100.0, False, ql)):
        ref = local_score(x.double(), ds.keys(), sigma, patch=k, flips=flips, query_labels=lab, dtype=torch.float64,
                          backend="torch")
        got = local_score(x.to(DEVICE), on_device(ds.keys()), sigma, patch=k, flips=flips,
                          query_labels=None if lab is None else lab.to(DEVICE), backend="triton")
        assert rel(got.cpu(), ref) <= 1e-4
    den = make_denoiser("ls", ds.to(DEVICE) if DEVICE.type == "cuda" else ds, patch=k, backend="triton")
    ref = make_denoiser("ls", ds, patch=k, backend="torch", dtype=torch.float64)(x.double(), 0.3)
    assert rel(den(x.to(DEVICE), 0.3).cpu(), ref) <= 1e-4
