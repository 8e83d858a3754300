"""Dataset-parallel retrieval on torch.distributed (gloo on CPU): 2 and 3 real processes give the single-process
answer for every family, the same bits on every rank and from run to run; faults stop every rank, never hang.

One spawned job per world size runs every check inside one process group (torch start-up costs ~2 s a process).
Rendezvous on 127.0.0.1 only.
"""

import datetime
import json
import os
import socket
import time
import traceback

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import seed_for

from analytic_diffusion.data import Dataset
from analytic_diffusion.denoisers import make_denoiser
from analytic_diffusion.denoisers.posterior_sample import posterior_moments
from analytic_diffusion.metrics import memorization
from analytic_diffusion.ops import knn_search, posterior_draw, softmax_retrieval
from analytic_diffusion.ops.distributed import ShardError, ShardGroup, shard_range
from analytic_diffusion.sampling.parallel import Parallel, sample_parallel

SEED = seed_for("module:tests/test_distributed.py") % 100_000
N, SHAPE, B = 23, (1, 8, 8), 5
FAULT_TIMEOUT_S = 3  # 23 rows: uneven shards over 2 and 3 ranks
SIGMAS = torch.tensor([0.05, 0.3, 1.0, 3.0, 20.0], dtype=torch.float64)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(seed: int, flips: bool = False) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (N,) + SHAPE, generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 3, (N,), generator=g)
    return Dataset.from_array(images, labels).with_flips(flips)


def _queries(seed: int, dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((B,) + SHAPE, generator=g, dtype=torch.float64).clamp(-1.5, 1.5).to(dtype)


# (method, options, dtype): the families of the issue, float64 on the oracle, float32 on the default backends.
METHODS = [
    ("optimal", {"backend": "torch"}, torch.float64),
    ("optimal", {}, torch.float32),
    ("topk", {"k": 5}, torch.float64),
    ("nearest", {}, torch.float32),
    ("knn", {"k": 4, "ref_size": 6}, torch.float64),
    ("smoothed", {"smoothing": 0.4, "num_perturbations": 2}, torch.float64),
    ("optimal-draw", {"mode": "draw", "scale": 0.5}, torch.float64),
    ("optimal-draw", {"mode": "noise", "scale": 0.5}, torch.float64),
    ("ls", {"patch": 3, "backend": "torch"}, torch.float64),
    ("ls", {"patch": 3}, torch.float32),
    ("els", {"patch": 3, "backend": "torch"}, torch.float64),
    ("bbels", {"patch": 3}, torch.float32),
    ("pspc", {"patch": 5, "backend": "torch"}, torch.float64),
    ("pspc", {"patch": 5}, torch.float32),
    ("pspc-flex", {}, torch.float64),
    ("pca_locality", {"backend": "torch"}, torch.float64),
    # float32 pca_locality on both paths: a shard makes the whole set's choice (the torch path when asked, the
    # fused C++ kernel under auto), so each is compared with itself (the two differ in rounding, which
    # near-tied coordinates at σ = 0.05 amplify past 1e-5)
    ("pca_locality", {"backend": "torch"}, torch.float32),
    ("pca_locality", {}, torch.float32),
    ("wiener", {}, torch.float64),
]


def families(make_ds, seed: int, flip_modes=(False, True)) -> dict:
    """Every family's output on fresh queries; ``make_ds(flips)`` gives the whole set or this rank's shard."""
    out = {}
    for flips in flip_modes:
        ds = make_ds(flips)
        labels = torch.tensor([0, 1, 2, 0, 1])
        for method, opts, dtype in METHODS:
            d = make_denoiser(method, ds, dtype=dtype, **opts)
            x = _queries(seed + 7, dtype)
            cond = labels if method in ("optimal", "topk", "ls") else None
            out[f"{method}{sorted(opts.items())}-{dtype}-flips{flips}"] = d(x, SIGMAS, cond).clone()
        q = _queries(seed + 3, torch.float64).reshape(B, -1)
        keys = ds.keys()
        mean, var = posterior_moments(q, ds, SIGMAS)
        out[f"moments-flips{flips}"] = torch.cat([mean, var], 1)
        out[f"knn-flips{flips}"] = torch.cat(
            [t.double() for t in knn_search(q, keys, 7, flips=flips, dtype=torch.float64)], 1
        )
        gen = torch.Generator().manual_seed(seed + 5)
        out[f"draw-flips{flips}"] = torch.cat(
            [t.double().reshape(B, -1) for t in posterior_draw(q, keys, SIGMAS, generator=gen, flips=flips)], 1
        )
        r = softmax_retrieval(q, keys, SIGMAS, flips=flips, dtype=torch.float64, backend="torch")
        out[f"summary-flips{flips}"] = torch.stack([r.max_weight, r.effective_neighbours], 1)
        mean, vals, _vecs = ds.pca(cache=False)
        out[f"stats-flips{flips}"] = torch.cat([mean, ds.covariance(cache=False).reshape(-1), vals])
        out[f"classes-flips{flips}"] = torch.tensor(ds.classes, dtype=torch.float64)
        rep = memorization(_queries(seed + 9, torch.float64), ds)
        out[f"memo-flips{flips}"] = torch.stack([rep.nn_index.double(), rep.nn_distance, rep.ratio], 1)
    return out


def _sample_block(par, seed: int) -> torch.Tensor:
    """Sample parallel: n = 7 samples split over the ranks (seed i stays with sample i), gathered in order."""
    d = make_denoiser("optimal", _data(seed), backend="torch", dtype=torch.float64)
    return sample_parallel(d, 7, par, seed=seed, steps=3, dtype=torch.float64, progress=False).samples


def _worker(rank: int, world: int, port: int, out_dir: str, job: str, seed: int) -> None:
    os.environ.setdefault("AD_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=FAULT_TIMEOUT_S if job == "faults" else 120),
    )
    try:
        group = ShardGroup()
        result = {}
        if job == "families":
            shard = lambda flips: _data(seed, flips).shard(group)  # noqa: E731
            # 2 ranks: both flip modes, twice (run to run); 3 ranks: flips on (the longer path), once
            modes = (False, True) if world == 2 else (True,)
            first = families(shard, seed, modes)
            result = {
                "first": first,
                "second": families(shard, seed, modes) if world == 2 else first,
                "samples": _sample_block(Parallel("samples", samples=group, rank=rank, world=world), seed),
            }
        elif job == "faults":
            try:  # ranks that loaded different data: every rank raises naming the fingerprints
                _data(seed + rank).shard(group)
            except ShardError as e:
                result["mismatch"] = str(e)
            try:  # more ranks than images
                Dataset.from_array(torch.zeros(world - 1, *SHAPE, dtype=torch.uint8)).shard(group)
            except ValueError as e:
                result["too_many"] = str(e)
            ds = _data(seed).shard(group)
            d = make_denoiser("optimal", ds, backend="torch", dtype=torch.float64)
            t0 = time.perf_counter()
            try:  # rank 1 raises and then hangs (alive, never joining): rank 0 stops within the group's timeout
                if rank == 1:
                    raise RuntimeError("injected failure on rank 1")
                d(_queries(seed, torch.float64), SIGMAS)
            except (ShardError, RuntimeError) as e:
                result["peer_failed"] = str(e)
            result["waited_s"] = time.perf_counter() - t0
            if rank == 1:
                time.sleep(FAULT_TIMEOUT_S + 2)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        if job == "faults":  # the group is broken on purpose: leave without gloo's teardown (it would abort)
            os._exit(0)
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        if job != "faults":
            dist.destroy_process_group()


def _spawn(world: int, job: str, tmp_path) -> list:
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path), job, SEED), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def single():
    return families(lambda flips: _data(SEED, flips), SEED)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


@pytest.mark.parametrize("world", [2, 3])
def test_dataset_parallel_matches_single_process(world, single, tmp_path):
    ranks = _spawn(world, "families", tmp_path)
    alone = _sample_block(Parallel(), SEED)
    for res in ranks:  # sample parallel: the single-process samples (batches of another size: GEMM rounding)
        assert torch.equal(res["samples"], ranks[0]["samples"])
        assert _rel(res["samples"], alone) <= 1e-12
    for r, res in enumerate(ranks):
        for run in ("first", "second"):
            assert set(res[run]) == {k for k in single if world == 2 or "flipsTrue" in k}
            for name, got in res[run].items():  # same bits on every rank and from run to run
                assert torch.equal(got, ranks[0]["first"][name]), (name, r, run)
    for name, got in ranks[0]["first"].items():
        ref = single[name]
        # float32 1e-5; float64 1e-12, except σ·sqrt(Var) of the noise mode: where the posterior collapses
        # (σ = 0.05) Var ~ 1e-20 carries absolute rounding ~1e-17 in any summation order, and sqrt turns
        # that into ~1e-9 (the single-process value is no closer to the exact one).
        tol = 1e-5 if "float32" in name else 1e-7 if "noise" in name else 1e-12
        if os.environ.get("AD_DIST_REPORT"):
            print(f"{name}: {_rel(got, ref):.2e}")
            continue
        assert _rel(got, ref) <= tol, (name, _rel(got, ref))


def test_shard_range_is_contiguous_and_balanced():
    for n in (3, 10, 23):
        for world in (1, 2, 3):
            ranges = [shard_range(n, world, r) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            sizes = [b - a for a, b in ranges]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="at least one image"):
        shard_range(2, 3, 0)


def test_faults_stop_every_rank_with_a_clear_message(tmp_path):
    world = 2
    ranks = _spawn(world, "faults", tmp_path)
    for _r, res in enumerate(ranks):
        assert "different datasets" in res["mismatch"] and "rank 0:" in res["mismatch"], res
        assert "at least one image" in res["too_many"]
    assert "injected failure on rank 1" in ranks[1]["peer_failed"]
    assert "another rank failed" in ranks[0]["peer_failed"], ranks[0]["peer_failed"]
    assert ranks[0]["waited_s"] < FAULT_TIMEOUT_S + 3  # stopped by the timeout, not a hang


def test_torchrun_cli_on_a_packed_shard_matches_single_process(tmp_path):
    """`torchrun ... -m analytic_diffusion sample --parallel dataset` on a packed set streamed in tiny blocks
    writes the single-process samples; rendezvous on 127.0.0.1."""
    import subprocess
    import sys

    from analytic_diffusion.data.packed import pack
    from analytic_diffusion.sampling.run import run_sample

    pack(_data(SEED), tmp_path / "packed")
    out = tmp_path / "dist"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        "-m",
        "analytic_diffusion",
        "sample",
        "--method",
        "topk",
        "--k",
        "6",
        "--parallel",
        "dataset",
        "--dataset",
        str(tmp_path / "packed"),
        "--memory-budget",
        "1K",
        "-n",
        "3",
        "--random-classes",
        "--steps",
        "3",
        "--out",
        str(out),
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "AD_DIST_TIMEOUT": "60"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_sample(
        method="topk",
        dataset=str(tmp_path / "packed"),
        n=3,
        steps=3,
        method_options={"k": 6},
        random_classes=True,
        out=str(tmp_path / "single"),
        progress=False,
    )
    a, b = np.load(tmp_path / "single" / "samples.npz"), np.load(out / "samples.npz")
    assert np.abs(a["samples"] - b["samples"]).max() <= 1e-5
    assert (a["nn_index"] == b["nn_index"]).all()
    assert json.loads((out / "config.json").read_text())["parallel"] == {
        "mode": "dataset",
        "world": 2,
        "dataset_ranks": 2,
        "sample_ranks": None,
    }
