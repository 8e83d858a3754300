"""Outputs continuous in the input, and the determinism matrix (issue 24, "randomness that is not continuous").

* A one-ulp change of x moves every method's output by at most ULP_BOUND (float64; the stochastic methods' draws
  used to hash x's bytes, so one ulp redrew everything).
* The matrix: batch size, thread count 1 vs 2, every instruction set this CPU runs, 1 vs 2 vs 3 ranks, for every
  method, on whole sampled trajectories: bitwise where the README promises it (batch size, n, threads), within
  MATRIX_BOUND elsewhere (instruction sets, ranks; and batch size for bbels and pspc, see the README).
"""

import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given
from hypothesis import strategies as st

import analytic_diffusion as ad
from analytic_diffusion.data import Dataset
from analytic_diffusion.denoisers.sample_seeds import sample_identity
from analytic_diffusion.ops import cpu_backend
from analytic_diffusion.ops.distributed import ShardGroup

# One ulp of x, σ in [0.03, 30]: the method's Lipschitz constant (‖Cov‖/σ² ≲ 1e3 here) times the ulp, plus the
# working dtype's rounding of the two calls. Measured worst over 160 draws: float32 7.3e-4 (pca_locality at σ =
# 0.03); the old x-hashed draws moved smoothed by 1.8, optimal-draw by 1.9 and knn by 0.72.
ULP_BOUND = {torch.float64: 1e-9, torch.float32: 1e-2}
# float32 trajectories of 4 Heun steps on a grid ending at σ = 0.05: per-call rounding (~1e-7) grown by the
# problem's conditioning, up to ‖Cov‖/σ² ≈ 400 at the last step (measured: at most 1.4e-4, bbels across
# instruction sets). A redraw of a stochastic method's noise moves a sample by O(1).
MATRIX_BOUND = 1e-3
GRID = {"sigma_min": 0.05}

METHODS = {
    "optimal": {},
    "topk": {"k": 5},
    "nearest": {},
    "knn": {"k": 5, "ref_size": 10},
    "smoothed": {"smoothing": 0.4, "num_perturbations": 3},
    "optimal-draw": {"scale": 0.5},
    "optimal-draw-noise": {"scale": 0.5, "mode": "noise"},
    "wiener": {},
    "ls": {"patch": 3},
    "els": {"patch": 3},
    "bbels": {"patch": 3},
    "pspc": {"patch": 5},
    "pspc-flex": {},
    "pca_locality": {},
}
# The README's exceptions to bitwise across batch sizes: bbels and pspc (a few float32 ulps per call), and
# optimal-draw's noise mode, whose mean and variance come from the torch reference's GEMMs (their rounding follows
# the batch shape).
NOT_BITWISE_IN_BATCH = {"bbels", "pspc", "optimal-draw-noise"}
SHAPE = (1, 8, 8)


def _dataset(seed: int = 11, n: int = 40) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randint(0, 256, (n, *SHAPE), generator=g, dtype=torch.uint8)
    imgs[:, :, :, 0] = 0  # a column with no variance: pspc-flex's and pca_locality's masks meet a null space
    return Dataset(imgs, torch.arange(n) % 3)


def _make(name: str, ds: Dataset, dtype=torch.float32):
    method = "optimal-draw" if name.startswith("optimal-draw") else name
    return ad.make_denoiser(method, ds, dtype=dtype, **METHODS[name])


def _sample(name: str, ds: Dataset, **kw) -> torch.Tensor:
    return ad.sample(_make(name, ds), 3, steps=4, seed=5, schedule_kwargs=GRID, progress=False, **kw).samples


# ------------------------------------------------------------------------------------------------ one ulp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", sorted(METHODS))
@given(seed=st.integers(0, 2**31 - 1), log_sigma=st.floats(-1.5, 1.5))
def test_one_ulp_moves_every_method_by_at_most_the_bound(name, dtype, seed, log_sigma):
    ds = _dataset()
    den = _make(name, ds, dtype)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, *SHAPE, generator=g, dtype=torch.float64).to(dtype)
    sigma = torch.full((3,), 10.0**log_sigma, dtype=torch.float64)
    nudged = torch.nextafter(x, torch.full_like(x, float("inf")))
    assert not torch.equal(nudged, x)
    moved = float((den(nudged, sigma) - den(x, sigma)).abs().max())
    assert moved <= ULP_BOUND[dtype], (name, moved)


@pytest.mark.parametrize("name", ["smoothed", "knn", "optimal-draw", "optimal-draw-noise"])
def test_draws_follow_the_sample_not_the_values(rng, name):
    """Inside a sampler each row's draws belong to its sample: the same sample at the same σ draws alike whatever
    its x, two samples draw differently; a call on another number of rows is refused."""
    ds = _dataset()
    den = _make(name, ds)
    x = torch.randn(2, *SHAPE, generator=rng)
    with sample_identity([7, 8]):  # σ = 3: a broad posterior, so that the draws show in the answer
        a = den(x, 3.0)
        swapped = den(x.flip(0), 3.0)  # sample 7 now has sample 8's x and the other way round
    with sample_identity([8, 7]):
        assert torch.equal(den(x.flip(0), 3.0), a.flip(0))
    assert not torch.equal(swapped, a.flip(0)), "the draws must follow the sample id"
    with (
        pytest.raises(ValueError, match="sample_identity: 2 sample ids are set, but the denoiser was called on 3"),
        sample_identity([1, 2]),
    ):
        den(torch.zeros(3, *SHAPE), 3.0)


# ------------------------------------------------------------------------------------------------ the matrix
def test_pspc_flex_masks_do_not_depend_on_the_thread_count(monkeypatch, tmp_path):
    """MNIST's pixels without variance had Wiener rows of eigensolver noise, which picked their masks: 1 and 2
    threads (each with a cold statistics cache) chose ~1e4 different mask pixels. Warm caches filled by the
    other thread count too."""
    before = torch.get_num_threads()
    try:
        masks = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            monkeypatch.setenv("AD_CACHE_DIR", str(tmp_path / f"cache-{threads}"))
            den = ad.make_denoiser("pspc-flex", ad.load_dataset("mnist").subset(300))
            masks[threads] = [den.masks_for(s) for s in (80.0, 0.5, 0.02)]
        torch.set_num_threads(2)  # the 1-thread run's cache, read with 2 threads
        monkeypatch.setenv("AD_CACHE_DIR", str(tmp_path / "cache-1"))
        den = ad.make_denoiser("pspc-flex", ad.load_dataset("mnist").subset(300))
        warm = [den.masks_for(s) for s in (80.0, 0.5, 0.02)]
        for a, b, c in zip(masks[1], masks[2], warm):
            assert torch.equal(a, b) and torch.equal(a, c), (int((a != b).sum()), int((a != c).sum()))
    finally:
        torch.set_num_threads(before)


def _threads(monkeypatch, n: int) -> None:
    monkeypatch.setenv("AD_NUM_THREADS", str(n))
    torch.set_num_threads(n)


@pytest.mark.cpu_isa
@pytest.mark.parametrize("name", sorted(METHODS))
def test_batch_size_and_threads_change_nothing(name, monkeypatch, tmp_path):
    """Bitwise across batch size (bbels, pspc: within the bound) and across 1 and 2 threads; for pspc-flex with a
    cold statistics cache on each side and with a cache filled by the other thread count."""
    before = torch.get_num_threads()
    try:
        results = {}
        for threads in (1, 2):
            _threads(monkeypatch, threads)
            monkeypatch.setenv("AD_CACHE_DIR", str(tmp_path / f"cold-{threads}"))
            results[threads] = _sample(name, _dataset())
            monkeypatch.setenv("AD_CACHE_DIR", str(tmp_path / f"cold-{3 - threads}"))  # the other count's cache
            assert torch.equal(_sample(name, _dataset()), results[threads]), "a warm cache changed the answer"
        assert torch.equal(results[1], results[2]), float((results[1] - results[2]).abs().max())
        one_by_one = _sample(name, _dataset(), batch_size=1)
        if name in NOT_BITWISE_IN_BATCH:
            assert float((one_by_one - results[1]).abs().max()) <= MATRIX_BOUND
        else:
            assert torch.equal(one_by_one, results[1]), float((one_by_one - results[1]).abs().max())
    finally:
        torch.set_num_threads(before)


@pytest.mark.cpu_isa
@pytest.mark.parametrize("name", sorted(METHODS))
def test_instruction_sets_agree_to_rounding(name, monkeypatch):
    """Every instruction set this CPU runs: the same trajectory to within the bound (smoothed differed by 2.0
    between AVX2 and AVX-512 while its draws hashed x); bitwise from run to run within one."""
    runs = {}
    for isa in cpu_backend.runnable_isas():
        monkeypatch.setenv("AD_CPU_ISA", isa)
        runs[isa] = _sample(name, _dataset())
        assert torch.equal(_sample(name, _dataset()), runs[isa])
    widest = runs[cpu_backend.runnable_isas()[-1]]
    for isa, got in runs.items():
        assert float((got - widest).abs().max()) <= MATRIX_BOUND, (isa, float((got - widest).abs().max()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_samples(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["AD_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        shard = _dataset().shard(ShardGroup())
        torch.save({name: _sample(name, shard) for name in METHODS}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_agree_with_one_process_to_rounding(world, tmp_path):
    """Dataset-parallel sampling over 2 and 3 ranks: every rank the same bits, and the one-process trajectory to
    within the bound (smoothed differed by 2.0: the combine order moved x̂0 by 1e-7, and the hash redrew)."""
    mp.spawn(_rank_samples, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for name in METHODS:
        alone = _sample(name, _dataset())
        for r in range(world):
            assert torch.equal(ranks[r][name], ranks[0][name]), (name, r)
        assert float((ranks[0][name] - alone).abs().max()) <= MATRIX_BOUND, (name, world)


def test_smoothed_jacobian_is_the_derivative_of_the_denoiser(rng):
    """Its perturbations no longer move with x, so a finite difference of the denoiser itself agrees with jvp."""
    den = _make("smoothed", _dataset(), torch.float64)
    x = torch.randn(2, *SHAPE, generator=rng, dtype=torch.float64)
    v = torch.randn(2, *SHAPE, generator=rng, dtype=torch.float64)
    eps = 1e-6
    fd = (den(x + eps * v, 1.5) - den(x - eps * v, 1.5)) / (2 * eps)
    assert float((den.jvp(x, 1.5, v) - fd).abs().max()) <= 1e-6 * float(fd.abs().max())
