"""Nothing silently wrong (issue 24, "data lost or silently wrong"): what a run reads from disk proves itself, ranks
agree on the whole run before they combine anything, EDM's unconditional label rows stay unconditional, and the
top-k set does not depend on the working precision."""

import datetime
import json
import os
import socket
import traceback

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from analytic_diffusion.data import Dataset
from analytic_diffusion.data import cache as stats_cache
from analytic_diffusion.data.packed import LABELS, load_packed, pack
from analytic_diffusion.denoisers import make_denoiser
from analytic_diffusion.files import FolderClaim


def _dataset(rng, n=60, shape=(1, 8, 8)) -> Dataset:
    return Dataset(torch.randint(0, 256, (n, *shape), generator=rng, dtype=torch.uint8), torch.arange(n) % 4)


# ------------------------------------------------------------------------------------------------ packed labels
def test_changed_labels_of_a_packed_set_are_caught(rng, tmp_path):
    """Every label changed: `--class-label 3` sampled 2s; now the load names the labels file."""
    ds = _dataset(rng)
    pack(ds, tmp_path / "P")
    lf = tmp_path / "P" / LABELS
    labels = np.load(lf)
    np.save(lf, (labels + 1) % 4)
    with pytest.raises(ValueError, match=r"labels\.npy: the labels do not match the header's checksum"):
        load_packed(tmp_path / "P")
    np.save(lf, labels)
    assert torch.equal(load_packed(tmp_path / "P").labels, ds.labels)


def test_labels_of_an_old_format_pack_load_with_a_warning(rng, tmp_path):
    pack(_dataset(rng), tmp_path / "P")
    header = json.loads((tmp_path / "P" / "header.json").read_text())
    header["version"] = 1
    del header["labels_checksum"]
    (tmp_path / "P" / "header.json").write_text(json.dumps(header))
    with pytest.warns(UserWarning, match="without a labels checksum"):
        assert load_packed(tmp_path / "P").labels is not None


# ------------------------------------------------------------------------------------------------ statistics cache
def _flip_bit(path, tensor_name: str, index: int = 0) -> None:
    """Flip the lowest mantissa bit of one float64 value of a cached tensor, keeping the file well-formed."""
    blob = torch.load(path, weights_only=True)
    t = blob["tensors"][tensor_name].reshape(-1)
    t.view(torch.int64)[index] ^= 1 << 40
    torch.save(blob, path)


@pytest.mark.parametrize("entry,tensor", [("pca", "mean"), ("pca", "eigvals")])
def test_a_flipped_bit_in_the_cache_is_recomputed_with_a_warning(rng, entry, tensor):
    ds = _dataset(rng)
    x = torch.randn(3, 1, 8, 8, generator=rng)
    fresh = make_denoiser("wiener", ds)(x, 0.5)
    path = stats_cache.key_path(entry, ds.cache_params())
    assert path.is_file()
    _flip_bit(path, tensor)
    again = Dataset(ds.images, ds.labels)  # a new process: statistics come from the cache
    with pytest.warns(UserWarning, match=f"{path.name} is not a valid 'pca' entry .* recomputing it"):
        out = make_denoiser("wiener", again)(x, 0.5)
    assert torch.equal(out, fresh)  # before: off by ~1e-2 with no error
    again = Dataset(ds.images, ds.labels)  # and the rewritten entry is good again
    assert torch.equal(make_denoiser("wiener", again)(x, 0.5), fresh)


def test_swapped_cache_entries_are_recomputed_not_a_key_error(rng, recwarn):
    ds = _dataset(rng)
    ds.pca()
    mean_file = stats_cache.key_path("mean", ds.cache_params())
    pca_file = stats_cache.key_path("pca", ds.cache_params())
    a, b = mean_file.read_bytes(), pca_file.read_bytes()
    mean_file.write_bytes(b)
    pca_file.write_bytes(a)
    again = Dataset(ds.images, ds.labels)
    mean, vals, _ = again.pca()  # before: KeyError 'eigvals' (the stored key left out the entry's kind)
    ref = Dataset(ds.images, ds.labels).pca(cache=False)
    assert torch.equal(vals, ref[1]) and torch.equal(mean, ref[0])
    assert sum("is not a valid" in str(w.message) for w in recwarn) >= 1


# ------------------------------------------------------------------------------------------------ ranks agree
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_run(rank: int, world: int, port: int, out_dir: str, src: str) -> None:
    """One torchrun rank of `sample --parallel dataset`, given its own --seed / --temperature (as two nodes with
    different command lines would be)."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        AD_DIST_TIMEOUT="30",
        AD_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    from analytic_diffusion.ops.distributed import ShardError
    from analytic_diffusion.sampling.run import run_sample

    result = {}
    for case, kw in {
        "seed": dict(seed=rank),
        "temperature": dict(method_options={"temperature": 1.0 + rank}),
        "claimed": {},  # the same run, but the test process is writing its --out
    }.items():
        try:
            run_sample(
                method="optimal",
                dataset=src,
                n=2,
                steps=2,
                out=os.path.join(out_dir, f"out-{case}"),
                progress=False,
                parallel="dataset",
                **kw,
            )
            result[case] = "wrote samples"
        except (ShardError, ValueError) as e:
            result[case] = str(e)
        except BaseException:
            result[case] = traceback.format_exc()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    if dist.is_initialized():
        dist.destroy_process_group()


def test_ranks_given_different_runs_refuse_to_combine(rng, tmp_path):
    src = tmp_path / "P"
    pack(_dataset(rng, 23), src)
    with FolderClaim(tmp_path / "out-claimed"):
        mp.spawn(_rank_run, args=(2, _free_port(), str(tmp_path), str(src)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for res in results:
        assert "different runs" in res["seed"] and "seed (0 vs 1)" in res["seed"], res
        assert "different runs" in res["temperature"] and "temperature" in res["temperature"], res
    # rank 0 could not claim --out: both ranks stop at once with its message, neither waits for the other
    assert f"another process (pid {os.getpid()}) is writing" in results[0]["claimed"], results[0]
    assert results[1]["claimed"].endswith("(reported by rank 0)"), results[1]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("out-")]


# ------------------------------------------------------------------------------------------------ EDM labels
def test_edm_all_zero_label_rows_are_unconditional(rng):
    """EDM passes torch.zeros(B, label_dim) for an unconditional model: those rows were taken as class 0."""
    from analytic_diffusion.integrations import to_edm

    ds = _dataset(rng, 40)
    den = make_denoiser("optimal", ds, backend="torch", dtype=torch.float64)
    net = to_edm(den)
    x = torch.randn(4, 1, 8, 8, generator=rng, dtype=torch.float64)
    sigma = torch.tensor([0.3, 0.3, 2.0, 2.0], dtype=torch.float64)
    assert torch.equal(net(x, sigma, torch.zeros(4, 4)), den(x, sigma))
    mixed = torch.zeros(4, 4)
    mixed[1, 3] = mixed[2, 0] = 1  # rows 0 and 3 unconditional, 1 and 2 conditional
    out = net(x, sigma, mixed)
    assert torch.equal(out[[0, 3]], den(x[[0, 3]], sigma[[0, 3]]))
    assert torch.equal(out[[1, 2]], den(x[[1, 2]], sigma[[1, 2]], torch.tensor([3, 0])))
    assert not torch.allclose(out[0], den(x[:1], sigma[:1], torch.tensor([0]))[0])


@pytest.mark.parametrize("rows", [[[0.5, 0.5, 0, 0]], [[1, 1, 0, 0]], [[2, 0, 0, 0]], [[1, 0, 0]]])
def test_edm_label_rows_that_are_neither_one_hot_nor_zero_are_refused(rng, rows):
    from analytic_diffusion.integrations import to_edm

    net = to_edm(make_denoiser("optimal", _dataset(rng, 40)))
    with pytest.raises(ValueError, match="class_labels: "):
        net(torch.zeros(1, 1, 8, 8), 1.0, torch.tensor(rows, dtype=torch.float32))


# ------------------------------------------------------------------------------------------------ top-k screen
def _near_tied_set(rng):
    """60 images, all 255 but pixel j of image j at 254, and queries for which every image's own pixel nearly
    cancels: all 60 distances lie within float32 resolution (~1e-3) of each other, 100 times closer than that."""
    n = 60
    imgs = torch.full((n, 1, 32, 32), 255, dtype=torch.uint8)
    imgs.view(n, -1)[torch.arange(n), torch.arange(n)] = 254
    x = torch.ones(4, 1024)
    x[:, :n] = 1 - 1 / 255 + 1e-4 * torch.randn(4, n, generator=rng)
    x[:, n:] = 4.0  # far away on the pixels all images share: a large distance
    return Dataset(imgs), x.reshape(4, 1, 32, 32)


@pytest.mark.cpu_isa
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_topk_keeps_the_same_neighbours_in_float32_and_float64(rng, backend):
    """More than 8 candidates within float32 resolution of the 20th distance: the k + 8 screen kept a float32
    draw of them; the screen is now widened until a bound proves it holds the k nearest."""
    from analytic_diffusion.denoisers.neighbours import _nearest_exact

    ds, x = _near_tied_set(rng)
    q = x.reshape(4, -1)
    y = ds.images.reshape(60, -1).double() * ds.scale + ds.shift
    exact = ((q.double()[:, None] - y[None]) ** 2).sum(-1)
    truth = torch.argsort(exact, dim=1, stable=True)[:, :20].sort(1).values
    outs = {}
    for dtype in (torch.float32, torch.float64):
        den = make_denoiser("topk", ds, k=20, dtype=dtype, backend=backend)
        idx, _ = _nearest_exact(den, q, 20, None)
        assert torch.equal(idx.sort(1).values, truth), dtype
        outs[dtype] = den(x, 1e4)
    assert torch.allclose(outs[torch.float32], outs[torch.float64], rtol=0, atol=1e-6)  # both in x's float32


def test_knn_reference_screen_widens_for_near_ties():
    """The torch reference screens by the expanded form, whose float32 error here is ~1: a fixed k + 8 screen lost
    some of the 20 nearest by direct distance in every draw; the widened one keeps them all."""
    from analytic_diffusion.ops import knn_search

    n = 200
    imgs = torch.full((n, 1, 32, 32), 255, dtype=torch.uint8)
    imgs.view(n, -1)[torch.arange(n), torch.arange(n)] = 254
    g = torch.Generator().manual_seed(0)
    x = torch.ones(8, 1024)
    x[:, :n] = 1 - 1 / 255 + 1e-2 * torch.rand(8, n, generator=g)  # distances 1e-2 apart, resolved directly
    x[:, n:] = 4.0
    keys = Dataset(imgs).keys()
    every = knn_search(x, keys, n, backend="torch", dtype=torch.float32)  # all candidates: nothing to miss
    d, i = knn_search(x, keys, 20, backend="torch", dtype=torch.float32)
    assert torch.equal(d, every[0][:, :20]) and torch.equal(i, every[1][:, :20])


def _rank_killed(rank: int, world: int, port: int, out_dir: str) -> None:
    """Rank 1 dies by SIGKILL mid-run (no exception, no goodbye); rank 0 must stop, naming the step."""
    import signal
    import time

    os.environ["AD_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=5),
    )
    from analytic_diffusion.ops.distributed import ShardError, ShardGroup

    ds = _dataset(torch.Generator().manual_seed(3), 23).shard(ShardGroup())
    den = make_denoiser("optimal", ds, backend="torch", dtype=torch.float64)
    x = torch.zeros(2, 1, 8, 8, dtype=torch.float64)
    den(x, 1.0)  # one retrieval together
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    t0 = time.perf_counter()
    try:
        den(x, 1.0)
        result = "finished"
    except ShardError as e:
        result = str(e)
    with open(os.path.join(out_dir, "rank0.json"), "w") as f:
        json.dump({"error": result, "waited_s": time.perf_counter() - t0}, f)
    os._exit(0)  # the group is broken: leave without gloo's teardown


def test_a_killed_rank_stops_the_others_naming_the_step(tmp_path):
    port = _free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank_killed, args=(r, 2, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert procs[1].exitcode == -9 and procs[0].exitcode == 0
    res = json.loads((tmp_path / "rank0.json").read_text())
    assert "retrieval did not complete" in res["error"] and "another rank failed, died or timed out" in res["error"]
    assert res["waited_s"] < 5 + 3, res  # within the group's timeout, not a hang
