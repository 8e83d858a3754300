"""Nothing silently wrong (issue 24, "data lost or silently wrong"): what a run reads from disk proves itself, ranks
agree on the whole run before they combine anything, EDM's unconditional label rows stay unconditional, and the
top-k set does not depend on the working precision."""

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
