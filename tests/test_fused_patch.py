"""The fused local-family kernels against the float64 torch reference: the ELS / bbELS patch kernel (implicit
im2col), LS and PSPC on the same-position kernel — each on every fused backend, Triton, CUDA and C++ (the ``fused``
fixture) — and pca_locality's sparse-stencil coordinate kernel (on the same three: ``coordinate_fused``).

CPU: Triton under the interpreter (conftest.py sets TRITON_INTERPRET=1) and the CUDA sources under the host SIMT
emulator (tests/cuda_emu); GPU: compiled Triton (TRITON_INTERPRET=0) and the built CUDA extension.
Outputs are poisoned before every launch.
"""

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[test]')")

from reference import check_patch_contract, float32_tolerance, rel, row_rel

from analytic_diffusion.data import Dataset, load_dataset
from analytic_diffusion.denoisers import make_denoiser
from analytic_diffusion.ops import KeyBank
from analytic_diffusion.ops import triton_backend as T
from analytic_diffusion.ops.patch_retrieval import choose_patch_backend, patch_softmax_partial

if T.unavailable_reason(torch.device("cpu") if T.interpreting() else torch.device("cuda")) is not None:
    pytest.skip("Triton kernels need a CUDA device or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = torch.device("cpu") if T.interpreting() else torch.device("cuda")


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    from analytic_diffusion.kernels import global_retrieval

    from analytic_diffusion.ops import cpu_backend, cuda_backend

    monkeypatch.setattr(global_retrieval, "poison_outputs", True)
    monkeypatch.setattr(cuda_backend, "poison_outputs", True)
    monkeypatch.setattr(cpu_backend, "poison_outputs", True)


def bank(rng, n, c, h, w, labels=None, dtype=torch.uint8):
    if dtype == torch.uint8:
        v = torch.randint(0, 256, (n, c * h * w), generator=rng, dtype=torch.uint8)
        return KeyBank(v, 2 / 255, -1.0, labels=labels, image_shape=(c, h, w))
    return KeyBank(torch.rand(n, c * h * w, generator=rng) * 2 - 1, labels=labels, image_shape=(c, h, w))


def on_device(kb, device=DEVICE):
    return KeyBank(
        kb.values.to(device),
        kb.scale,
        kb.shift,
        labels=None if kb.labels is None else kb.labels.to(device),
        image_shape=kb.image_shape,
    )


def dataset_on(ds, device):
    return ds.to(device) if device.type == "cuda" else ds


@pytest.mark.parametrize("keys", [torch.uint8, torch.float32])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_patch_kernel_matches_reference(fused, rng, keys, k):
    # 7 images: unequal classes (labels 2 -> 0) and a few image-list splits per class; the interpreter's cost
    # grows with the image count, the borders (every centre) and σ range do not need more
    c, h, w = 3, 6, 5
    labels = torch.randint(0, 3, (7,), generator=rng)
    labels[labels == 2] = 0
    labels[:2] = torch.tensor([0, 1])  # both query classes have candidates whatever the draw (7 images can miss one)
    kb = bank(rng, 7, c, h, w, labels, keys)
    pos = torch.cartesian_prod(torch.arange(h), torch.arange(w))  # every centre: borders use the zero padding
    q = torch.rand(11, c * k * k, generator=rng) * 2 - 1
    ql = torch.randint(0, 2, (11,), generator=rng)
    for sigma in (1e-3, 0.1, 1.0, 1e3):
        for flips, lab in ((False, None), (True, ql)):

            def reference(qi, sigma=sigma, flips=flips, lab=lab):
                return patch_softmax_partial(
                    qi, kb, sigma, pos, k, dtype=torch.float64, flips=flips, query_labels=lab, backend="torch"
                )

            ref = reference(q.double())
            got = patch_softmax_partial(
                q.to(fused.device),
                on_device(kb, fused.device),
                sigma,
                pos.to(fused.device),
                k,
                dtype=torch.float32,
                flips=flips,
                query_labels=None if lab is None else lab.to(fused.device),
                backend=fused.name,
            )
            # Two candidates within float32's resolution of the query (σ = 0.1, logits ~1e3 nats: about one draw in
            # 20 has such a row) make a row ill-conditioned in float32: per-row tolerances from the reference's own
            # sensitivity to the query's rounding (float32_tolerance), 1e-4 elsewhere.
            tol = float32_tolerance(lambda qi: reference(qi).mean(), q.double(), ref.mean())
            assert (row_rel(got.mean().cpu(), ref.mean()) <= tol).all(), sigma
            neff = ref.effective_neighbours()[:, None]
            tol = float32_tolerance(lambda qi: reference(qi).effective_neighbours()[:, None], q.double(), neff)
            assert (row_rel(got.effective_neighbours().cpu()[:, None], neff) <= tol).all(), sigma


def test_empty_class_and_shards(fused, rng):
    c, h, w, k = 1, 5, 5, 3
    labels = torch.tensor([0, 0, 1, 1, 0, 1])
    kb = bank(rng, 6, c, h, w, labels)
    pos = torch.cartesian_prod(torch.arange(1, 4), torch.arange(1, 4))
    q = torch.rand(4, 9, generator=rng) * 2 - 1
    ref = patch_softmax_partial(q.double(), kb, 0.4, pos, k, dtype=torch.float64, backend="torch")
    dk = on_device(kb, fused.device)
    a = patch_softmax_partial(q.to(fused.device), dk, 0.4, pos.to(fused.device), k, stop=2, backend=fused.name)
    b = patch_softmax_partial(q.to(fused.device), dk, 0.4, pos.to(fused.device), k, start=2, backend=fused.name)
    assert rel(a.combine(b).mean().cpu(), ref.mean()) <= 1e-4  # shards combine exactly
    st = patch_softmax_partial(
        q.to(fused.device),
        dk,
        0.4,
        pos.to(fused.device),
        k,
        query_labels=torch.full((4,), 2, device=fused.device),
        backend=fused.name,
    )
    with pytest.raises(ValueError, match="no allowed candidate"):
        st.mean()


@pytest.mark.parametrize("method,k", [("els", 3), ("bbels", 3), ("bbels", 5)])
def test_els_and_bbels_denoisers(fused, rng, method, k):
    """Every padding rule: circular ELS; bbELS interior, edge bands and corners (k = 5 on 7×6: 2-pixel corners).
    5 stored images (the interpreter's time grows with them; the padding rules are per position)."""
    imgs = torch.randint(0, 256, (5, 2, 7, 6), generator=rng, dtype=torch.uint8)
    ds = Dataset(imgs)
    x = ds.images_float()[:2] + 0.5 * torch.randn(2, 2, 7, 6, generator=rng)
    reference = make_denoiser(method, ds, patch=k, backend="torch", dtype=torch.float64)
    for sigma in (0.01, 0.5, 50.0):
        ref = reference(x.double(), sigma)
        got = make_denoiser(method, dataset_on(ds, fused.device), patch=k, backend=fused.name)(
            x.to(fused.device), sigma
        )
        # σ = 0.01: two patches can nearly tie for a pixel at float32's resolution of x (see float32_tolerance)
        tol = float32_tolerance(lambda xi: reference(xi, sigma), x.double(), ref)
        assert bool((row_rel(got.cpu(), ref) <= tol).all()), (sigma, row_rel(got.cpu(), ref), tol)


def test_bbels_on_mnist_with_flips(fused, rng):
    # Real digits, cropped to their central 14×14 so that the interpreter (every program in NumPy) stays quick.
    mnist = load_dataset("mnist").subset(6, random=True, seed=1)
    ds = Dataset(mnist.images[:, :, 7:21, 7:21].contiguous())
    x = ds.images_float()[:1] + 0.3 * torch.randn(1, 1, 14, 14, generator=rng)
    ref = make_denoiser("bbels", ds, patch=3, flips=True, backend="torch", dtype=torch.float64)(x.double(), 0.3)
    got = make_denoiser("bbels", dataset_on(ds, fused.device), patch=3, flips=True, backend=fused.name)(
        x.to(fused.device), 0.3
    )
    assert rel(got.cpu(), ref) <= 1e-4


def test_backend_choice_reason_is_a_sentence_when_no_offered_kernel_runs(monkeypatch):
    """On a CUDA device where Triton could run but the caller does not offer it, the reason was None (and with the
    CUDA kernel offered but unavailable, "None; ..."): it names what was offered instead."""
    from types import SimpleNamespace

    monkeypatch.setattr(T, "unavailable_reason", lambda device: None)  # Triton could run here
    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    q = SimpleNamespace(device=cuda)
    kb = SimpleNamespace(values=torch.zeros(1, 1, dtype=torch.uint8), device=cuda)
    name, why = choose_patch_backend("auto", q, kb, torch.float32, fused=("cpu",))
    assert name == "torch"
    assert isinstance(why, str) and "cpu" in why and "None" not in why
    name, why = choose_patch_backend("auto", q, kb, torch.float32, fused=("cpu", "cuda"))
    assert name in ("torch", "cuda")  # cuda where the extension is built for a GPU
    assert isinstance(why, str) and why and "None" not in why


def test_backend_choice_and_errors(rng):
    kb = bank(rng, 4, 1, 4, 4)
    q = torch.rand(2, 9, generator=rng)
    assert choose_patch_backend("auto", q, kb, torch.float32)[0] == "cpu"  # CPU tensors, float32: the C++ kernel
    assert choose_patch_backend("auto", q, kb, torch.float64)[0] == "torch"  # float64: the reference
    assert choose_patch_backend("auto", q, kb, torch.float32, fused=("triton",))[0] == "torch"  # not offered
    with pytest.raises(ValueError, match="backend"):
        choose_patch_backend("cudnn", q, kb, torch.float32)
    with pytest.raises(ValueError, match="backend"):
        make_denoiser("els", Dataset(torch.zeros(3, 1, 4, 4, dtype=torch.uint8)), patch=3, backend="cudnn")
    with pytest.raises(ValueError, match="dtype"):
        patch_softmax_partial(
            q.to(DEVICE).double(),
            on_device(kb),
            0.5,
            torch.tensor([[1, 1]], device=DEVICE),
            3,
            dtype=torch.float64,
            backend="triton",
        )


@pytest.mark.parametrize("k", [1, 3, 5, 13])
def test_ls_on_the_same_position_kernel(fused, rng, k):
    """LS: every pixel's own position only (k = 13 on 6×5 covers the whole image: LS = optimal there)."""
    from analytic_diffusion.ops.local_retrieval import local_score

    labels = torch.randint(0, 2, (14,), generator=rng)
    labels[:2] = torch.tensor([0, 1])  # both query classes have candidates whatever the draw
    imgs = torch.randint(0, 256, (14, 2, 6, 5), generator=rng, dtype=torch.uint8)
    ds = Dataset(imgs, labels)
    x = ds.images_float()[:3] + 0.4 * torch.randn(3, 2, 6, 5, generator=rng)
    ql = torch.tensor([0, 1, 1])
    for sigma, flips, lab in ((0.01, False, None), (0.4, True, ql), (100.0, False, ql)):
        ref = local_score(
            x.double(), ds.keys(), sigma, patch=k, flips=flips, query_labels=lab, dtype=torch.float64, backend="torch"
        )
        got = local_score(
            x.to(fused.device),
            on_device(ds.keys(), fused.device),
            sigma,
            patch=k,
            flips=flips,
            query_labels=None if lab is None else lab.to(fused.device),
            backend=fused.name,
        )
        assert rel(got.cpu(), ref) <= 1e-4
    den = make_denoiser("ls", dataset_on(ds, fused.device), patch=k, backend=fused.name)
    ref = make_denoiser("ls", ds, patch=k, backend="torch", dtype=torch.float64)(x.double(), 0.3)
    assert rel(den(x.to(fused.device), 0.3).cpu(), ref) <= 1e-4


@pytest.mark.parametrize(
    "keys,k", [(torch.uint8, 1), (torch.uint8, 2), (torch.float32, 3), (torch.uint8, 4), (torch.uint8, 5)]
)
def test_pspc_on_the_same_position_kernel(fused, rng, keys, k):
    """PSPC-Square: every crop fully inside, whole-crop values, overlap average; odd and even k (k = 5 = H: one crop,
    the optimal denoiser), mirrors (an even k's mirrored window is not centred on W − 1 − p)."""
    from analytic_diffusion.ops.local_retrieval import pspc_square

    labels = torch.randint(0, 2, (13,), generator=rng)
    labels[:2] = torch.tensor([0, 1])  # both query classes have candidates (13 draws missed one for a seed)
    kb = bank(rng, 13, 2, 5, 6, labels, keys)
    x = torch.rand(3, 2, 5, 6, generator=rng) * 2 - 1
    ql = torch.tensor([1, 0, 1])
    for sigma, flips, lab in ((1e-3, True, None), (0.3, True, ql), (1e3, False, ql)):

        def reference(xi):
            return pspc_square(
                xi, kb, sigma, patch=k, flips=flips, query_labels=lab, dtype=torch.float64, backend="torch"
            )

        ref = reference(x.double())
        got = pspc_square(
            x.to(fused.device),
            on_device(kb, fused.device),
            sigma,
            patch=k,
            flips=flips,
            query_labels=None if lab is None else lab.to(fused.device),
            backend=fused.name,
        )
        # k = 1 at σ = 1e-3: single-pixel crops nearly tie in float32 (see float32_tolerance)
        tol = float32_tolerance(reference, x.double(), ref)
        assert got.dtype == torch.float32 and bool((row_rel(got.cpu(), ref) <= tol).all()), (sigma, flips)


def test_pspc_denoiser_on_mnist(fused, rng):
    mnist = load_dataset("mnist").subset(8, random=True, seed=2)
    ds = Dataset(mnist.images[:, :, 6:22, 6:22].contiguous())
    x = ds.images_float()[:1] + 0.4 * torch.randn(1, 1, 16, 16, generator=rng)
    ref = make_denoiser("pspc", ds, patch=6, backend="torch", dtype=torch.float64)(x.double(), 0.4)
    got = make_denoiser("pspc", dataset_on(ds, fused.device), patch=6, backend=fused.name)(x.to(fused.device), 0.4)
    assert rel(got.cpu(), ref) <= 1e-4


def test_split_count_bounds_the_partials():
    from analytic_diffusion.ops.fused_patch import split_count

    assert split_count(1, 50000) == 132 and split_count(11, 7) == 7  # few rows: split the images
    assert split_count(1024, 50000) == 17  # one 32×32 image of ELS rows: 64 tiles × 17 splits ≈ 1056 programs
    assert split_count(64 * 900, 50000) == 1  # PSPC k = 3 on a 64-image CIFAR batch: no (S, R, C·k²) blow-up
    assert split_count(0, 5) == 5 and split_count(20, 0) == 1


def test_cuda_patch_kernel_contract(cuda_fused, rng):
    """The CUDA kernel's partials directly (the contract the driver shares with Triton and the C++ kernel, see
    reference.patch_contract_cases): poisoned outputs; several candidate tiles per split and a partial last tile;
    R not a multiple of the query block; one query row per CTA for a 3×32×32 whole-crop patch (the largest PSPC
    crop of CIFAR-10 shapes)."""
    from analytic_diffusion.ops import cuda_backend

    assert cuda_backend._cuda.patch_query_block(2, 3, 32) == 1 and cuda_backend._cuda.patch_query_block(0, 1, 3) == 8
    check_patch_contract(rng, cuda_backend.patch_partials, cuda_fused.device)


def test_cuda_patch_kernel_argument_errors(cuda_fused):
    from analytic_diffusion.ops import cuda_backend

    ext = cuda_backend._cuda
    with pytest.raises(ValueError, match="rule"):
        ext.patch_partials(1, 1, 0, 1, 1, 1, 1, 7, 1, 1, 4, 4, 3, 1.0, 0.0, 1, 64.0, 1, 1, 1, 1, 1, 0)
    with pytest.raises(ValueError, match="k:"):  # 3·64² values per row: more than the kernel's shared memory
        ext.patch_partials(1, 1, 0, 1, 1, 1, 1, 2, 1, 3, 64, 64, 64, 1.0, 0.0, 1, 64.0, 1, 1, 1, 1, 1, 0)
    with pytest.raises(ValueError, match="null"):
        ext.patch_partials(0, 1, 0, 1, 1, 1, 1, 0, 1, 1, 4, 4, 3, 1.0, 0.0, 1, 64.0, 1, 1, 1, 1, 1, 0)
    q = torch.zeros(1, 9)
    with pytest.raises(ValueError, match="rule"):
        cuda_backend.patch_partials(
            q,
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


# ------------------------------------------------------------------------------ pca_locality (sparse stencils)
def test_stencil_table_and_chunk_cuts():
    from analytic_diffusion.ops.fused_coordinate import _chunk_splits, cached_stencil_table, stencil_table

    mask = torch.tensor([[1, 0, 0], [1, 0, 1], [0, 0, 1]], dtype=torch.bool)  # column m = support of output m
    assert stencil_table(mask).tolist() == [[0, -1, 1], [1, -1, 2]]
    assert cached_stencil_table(mask) is cached_stencil_table(mask)  # one table per mask in use
    mask[2, 1] = True  # an in-place change is seen
    assert cached_stencil_table(mask).tolist() == [[0, 2, 1], [1, -1, 2]]
    assert stencil_table(torch.zeros(4, 4, dtype=torch.bool)).shape == (0, 4)
    assert _chunk_splits(10, 0, 4) == ([0, 4, 8, 10], [0, 1, 2])
    assert _chunk_splits(10, 10, 4) == ([0, 2, 6, 10], [2, 3, 4])  # chunk 2 = stored 8, 9 + mirrors 0, 1
    assert _chunk_splits(8, 8, 4) == ([0, 4, 8], [2, 3])


def random_mask(rng, d, density):
    mask = torch.rand(d, d, generator=rng) < density
    mask |= torch.eye(d, dtype=torch.bool)
    mask[:, 1] = False  # an output with an empty support: equal weights (the dataset mean there)
    return mask


@pytest.mark.parametrize("keys,splits", [(torch.uint8, 20), (torch.float32, 1)])
def test_coordinate_kernel_matches_reference(coordinate_fused, rng, keys, splits, monkeypatch):
    """Every σ, flips, labels, exact and chunk-averaged softmax; prime N, D = 70 (not a multiple of the tile)."""
    from analytic_diffusion.ops import cpu_backend, cuda_backend, fused_coordinate
    from analytic_diffusion.ops.local_retrieval import coordinate_retrieval

    monkeypatch.setattr(fused_coordinate, "TARGET_PROGRAMS", splits)  # 20: several candidate splits to combine
    monkeypatch.setattr(fused_coordinate, "CPU_TARGET_TASKS", splits)
    monkeypatch.setattr(fused_coordinate, "CPU_MIN_SPLIT", 5)
    monkeypatch.setattr(cpu_backend, "poison_outputs", True)
    monkeypatch.setattr(cuda_backend, "poison_outputs", True)
    dev = coordinate_fused.device
    c, h, w = 2, 5, 7
    labels = torch.randint(0, 2, (37,), generator=rng)
    kb = bank(rng, 37, c, h, w, labels, keys)
    mask = random_mask(rng, c * h * w, 0.15)
    x = torch.rand(3, c, h, w, generator=rng) * 2 - 1
    ql = torch.tensor([0, 1, 1])
    for sigma, flips, lab, softmax, chunk in (
        (1e-3, False, None, "exact", None),
        (1e3, True, ql, "exact", None),
        (0.1, True, ql, "exact", None),
        (1.0, False, None, "exact", None),
        (1e-3, True, None, "chunked", 8),
        (0.1, False, ql, "chunked", 5),
        (1.0, True, ql, "chunked", 8),
        (1e3, False, None, "chunked", 5),
    ):

        def reference(xi):
            return coordinate_retrieval(
                xi,
                kb,
                sigma,
                mask,
                flips=flips,
                query_labels=lab,
                softmax=softmax,
                chunk_size=chunk,
                dtype=torch.float64,
                backend="torch",
            )

        ref = reference(x.double())
        got = coordinate_retrieval(
            x.to(dev),
            on_device(kb, dev),
            sigma,
            mask.to(dev),
            flips=flips,
            query_labels=None if lab is None else lab.to(dev),
            softmax=softmax,
            chunk_size=chunk,
            backend=coordinate_fused.name,
        )
        # σ = 1e-3 puts logits near 1e5: a coordinate whose candidates nearly tie is ill-conditioned in
        # float32 (chunk averaging over 5–8 candidates makes such ties common); see float32_tolerance
        tol = float32_tolerance(reference, x.double(), ref)
        err = row_rel(got.cpu(), ref)
        assert got.dtype == torch.float32 and bool((err <= tol).all()), (sigma, flips, softmax, err, tol)


def test_coordinate_kernel_full_mask_is_optimal_and_errors(coordinate_fused, rng):
    from analytic_diffusion.ops import softmax_retrieval
    from analytic_diffusion.ops.local_retrieval import coordinate_retrieval

    dev, name = coordinate_fused.device, coordinate_fused.name
    kb = bank(rng, 9, 1, 3, 4)
    x = torch.rand(2, 1, 3, 4, generator=rng) * 2 - 1
    full = torch.ones(12, 12, dtype=torch.bool)
    got = coordinate_retrieval(x.to(dev), on_device(kb, dev), 0.3, full.to(dev), backend=name)
    ref = softmax_retrieval(x.reshape(2, -1).double(), kb, 0.3, backend="torch", dtype=torch.float64).mean
    assert rel(got.cpu().reshape(2, -1), ref) <= 1e-4
    with pytest.raises(ValueError, match="dtype"):
        coordinate_retrieval(
            x.to(dev).double(), on_device(kb, dev), 0.3, full.to(dev), dtype=torch.float64, backend=name
        )
    with pytest.raises(ValueError, match="no allowed candidate"):
        kl = bank(rng, 4, 1, 3, 4, labels=torch.tensor([0, 0, 1, 1]))
        coordinate_retrieval(
            x.to(dev),
            on_device(kl, dev),
            0.3,
            full.to(dev),
            query_labels=torch.tensor([0, 2], device=dev),
            backend=name,
        )
    with pytest.raises(ValueError, match="backend"):
        make_denoiser("pca_locality", Dataset(torch.zeros(3, 1, 4, 4, dtype=torch.uint8)), backend="cudnn")


def test_pca_locality_on_mnist(coordinate_fused, rng):
    """The real Wiener masks of MNIST (θ = 0.005: ~21 of 784 inputs per output at σ = 0.5), the denoiser end to end."""
    dev = coordinate_fused.device
    ds = load_dataset("mnist").subset(40, random=True, seed=3)
    x = ds.images_float()[:1] + 0.5 * torch.randn(1, 1, 28, 28, generator=rng)
    for sigma, softmax, chunk in (
        (0.05, "exact", None),
        (0.5, "exact", None),
        (5.0, "exact", None),
        (0.5, "chunked", 20),
    ):
        ref = make_denoiser(
            "pca_locality", ds, backend="torch", dtype=torch.float64, softmax=softmax, chunk_size=chunk
        )(x.double(), sigma)
        got = make_denoiser(
            "pca_locality",
            ds.to(dev) if dev.type == "cuda" else ds,
            backend=coordinate_fused.name,
            softmax=softmax,
            chunk_size=chunk,
        )(x.to(dev), sigma)
        assert rel(got.cpu(), ref) <= 1e-4, (sigma, softmax)


_SCHEDULE_CHILD = r"""
import importlib.util, os, sys
import torch
spec = importlib.util.spec_from_file_location("_cuda", sys.argv[1])
ext = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ext)
ext.HOST_EMULATION = True
from analytic_diffusion.ops import cuda_backend
cuda_backend._cuda, cuda_backend._REASON = ext, None
gen = torch.Generator().manual_seed(int(sys.argv[2]))
skip_bits = float(sys.argv[3])
n, h, w, k = 6, 8, 8, 3  # 6 images x 64 centres: 3 candidate tiles of 128
images = torch.randint(0, 256, (n, 1, h, w), generator=gen, dtype=torch.uint8)
pos = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(-1, 2)
pos = pos.to(torch.int32).contiguous()
for rows in (1, 3):
    q = (torch.rand(rows, k * k, generator=gen) * 2 - 1).contiguous()
    args = (q, images, torch.arange(n, dtype=torch.int32), pos, torch.full((rows,), 4.0))
    kw = dict(k=k, scale=2 / 255, shift=-1.0, splits=1, rule="shared", skip_bits=skip_bits, poison=True)
    os.environ.pop("AD_EMU_SCHEDULE", None)
    want = cuda_backend.patch_partials(*args, **kw)
    os.environ["AD_EMU_SCHEDULE"] = "warp-serial"
    got = cuda_backend.patch_partials(*args, **kw)
    for name, g, e in zip(("m", "l", "l2", "o"), got, want):
        assert torch.equal(g, e), f"{rows} rows: {name} differs between the schedules: {g} vs {e}"
print("OK")
"""


@pytest.mark.parametrize("skip_bits", [64.0, -1.0])
def test_cuda_patch_kernel_is_schedule_independent(cuda_fused, rng, skip_bits):
    """The shared rule's tile-skip decision under both thread schedules of the host emulator (round robin and
    warp-serial, tests/cuda_emu/emu.h): bitwise the same partials. When every thread took the decision from the
    running maxima while lane 0 of another warp was updating them (no barrier between), warp-serial made the
    warps decide differently once a row's max had moved (skip_bits ≤ 0 does that on the first tile): a divergent
    __syncthreads, which the emulator reports as a deadlock (abort). Hence a child process."""
    if cuda_fused.device.type == "cuda":
        pytest.skip("thread schedules are an emulator notion: this checks the kernel's logic on the CPU")
    import subprocess
    import sys

    from analytic_diffusion.ops import cuda_backend

    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=rng))
    r = subprocess.run(
        [sys.executable, "-c", _SCHEDULE_CHILD, cuda_backend._cuda.__file__, str(seed), str(skip_bits)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0 and "OK" in r.stdout, f"rc {r.returncode}: {r.stdout[-2000:]}{r.stderr[-2000:]}"
