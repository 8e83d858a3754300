"""Packed datasets: pack / map round trip, clear errors for damaged files, and out-of-core retrieval that streams
the mapped file within the memory budget (peak RSS measured) and gives the in-memory answer."""

import json
import re

import pytest
import torch

from analytic_diffusion.data import Dataset, load_dataset
from analytic_diffusion.data.packed import load_packed, pack
from analytic_diffusion.metrics import memorization
from analytic_diffusion.ops import knn_search, posterior_draw, softmax_retrieval, streaming


def _random_set(rng, n, shape=(1, 6, 6), labels=True) -> Dataset:
    images = torch.randint(0, 256, (n,) + shape, generator=rng, dtype=torch.uint8)
    lab = torch.randint(0, 4, (n,), generator=rng) if labels else None
    return Dataset.from_array(images, lab, source="random")


def test_pack_round_trip(rng, tmp_path):
    ds = _random_set(rng, 37)
    header = pack(ds, tmp_path / "p")
    back = load_dataset(str(tmp_path / "p"))
    assert torch.equal(back.images, ds.images) and torch.equal(back.labels, ds.labels)
    assert back.source == "random" and header["shape"] == [37, 1, 6, 6]
    assert back.cache_params()["content"] == f"packed:{header['checksum']}"
    part = load_packed(tmp_path / "p", rows=(10, 20))
    assert torch.equal(part.images, ds.images[10:20]) and torch.equal(part.labels, ds.labels[10:20])
    x = torch.randn(3, 36, generator=rng, dtype=torch.float64)
    ref = softmax_retrieval(x, ds.keys(), 0.7, backend="torch", dtype=torch.float64).mean
    got = softmax_retrieval(x, back.keys(), 0.7, backend="torch", dtype=torch.float64).mean
    assert torch.equal(got, ref)
    # Streamed in blocks of 3 rows (a 216-byte budget): the same answers; the draw's noise runs on across blocks.
    budget = 216
    assert streaming.block_rows(back.keys(), budget) == 3
    sigma = torch.tensor([0.2, 0.7, 5.0], dtype=torch.float64)
    for flips in (False, True):
        kw = dict(flips=flips, dtype=torch.float64)
        ref = softmax_retrieval(x, ds.keys(), sigma, backend="torch", second_moment=True, **kw)
        got = softmax_retrieval(x, back.keys(), sigma, backend="torch", second_moment=True, memory_budget=budget, **kw)
        assert (got.mean - ref.mean).norm() / ref.mean.norm() < 1e-12
        assert (got.variance - ref.variance).norm() / ref.variance.norm() < 1e-12
        d_ref, i_ref = knn_search(x, ds.keys(), 6, **kw)
        d, i = knn_search(x, back.keys(), 6, memory_budget=budget, **kw)
        assert torch.equal(i, i_ref) and torch.allclose(d, d_ref, rtol=1e-12)
        draws = [
            posterior_draw(x, k, sigma, generator=torch.Generator().manual_seed(4), memory_budget=b, **kw)[0]
            for k, b in ((ds.keys(), 2**20), (back.keys(), budget))
        ]
        assert torch.equal(draws[0], draws[1])
    with pytest.raises(ValueError, match="uint8"):
        pack(Dataset.from_array(torch.rand(3, 1, 4, 4) * 2 - 1), tmp_path / "f")
    with pytest.raises(ValueError, match="resolution"):
        load_dataset(str(tmp_path / "p"), resolution=4)


def test_damaged_files_name_the_file(rng, tmp_path):
    ds = _random_set(rng, 50)
    path = tmp_path / "p"
    pack(ds, path)
    images = path / "images.npy"
    raw = bytearray(images.read_bytes())
    raw[-7] ^= 0x10  # one flipped bit in the last image
    images.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"images\.npy: checksum mismatch in rows 0:50"):
        load_packed(path)
    images.write_bytes(bytes(raw[:-100]))  # truncated
    with pytest.raises(ValueError, match=r"images\.npy: cannot map.*truncated"):
        load_packed(path)
    pack(ds, path, overwrite=True)
    header = json.loads((path / "header.json").read_text())
    header["block_checksums"][0] = "0" * 32  # a header that does not match the data
    (path / "header.json").write_text(json.dumps(header))
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_packed(path)
    (path / "header.json").write_text('{"format": "analytic-diffusion-packed"')
    with pytest.raises(ValueError, match=r"header\.json: not a readable"):
        load_packed(path)
    pack(ds, path, overwrite=True)
    (path / "labels.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"labels\.npy"):
        load_packed(path)
    (path / "images.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"images\.npy"):
        load_packed(path)


def _peak_rss_kib() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1))


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak resident set size (Linux >= 4.0)
        f.write("5")


def test_out_of_core_scan_within_budget(rng, tmp_path, monkeypatch):
    """A 24 MiB packed set scanned with a 4 MiB budget (12 blocks): the in-memory answers, and the peak RSS grows
    by a fraction of the file, where the same scan keeping the pages grows by about the whole file."""
    n, shape = 8192, (3, 32, 32)
    file_mib = n * 3072 / 2**20
    ds = _random_set(rng, n, shape)
    pack(ds, tmp_path / "big")
    x = (torch.randn(4, 3072, generator=rng) * 0.5).clamp(-1, 1)
    sigma = torch.tensor([0.3, 1.0, 3.0, 10.0])
    exact_mean = ds.images.reshape(n, -1).sum(0, dtype=torch.int64).double() * ds.scale / n + ds.shift
    in_memory = (softmax_retrieval(x, ds.keys(), sigma).mean, knn_search(x, ds.keys(), 5), exact_mean)
    del ds
    from analytic_diffusion.ops import retrieval

    monkeypatch.setattr(retrieval, "DEFAULT_MEMORY_BUDGET", 4 * 2**20)  # what AD_MEMORY_BUDGET=4M sets
    mapped = load_packed(tmp_path / "big")  # verifying the checksums is itself a streaming pass
    budget = 4 * 2**20
    keys = mapped.keys()
    assert keys.pages is not None and -(-n // streaming.block_rows(keys, budget)) >= 10

    def scan(k):
        mean = softmax_retrieval(x, k, sigma, memory_budget=budget).mean
        nn = knn_search(x, k, 5, memory_budget=budget)
        return mean, nn

    keys.get_center(torch.float64)
    _reset_peak_rss()
    base = _peak_rss_kib()
    mean, nn = scan(keys)
    stats = mapped.mean(cache=False)
    grown = (_peak_rss_kib() - base) / 1024
    assert grown < 0.4 * file_mib, (grown, file_mib)
    assert (mean - in_memory[0]).norm() / in_memory[0].norm() < 1e-5
    assert torch.equal(nn[1], in_memory[1][1]) and torch.allclose(nn[0], in_memory[1][0], rtol=1e-5)
    assert (stats - in_memory[2]).abs().max() < 1e-12
    # The measurement can fail: the same scan over the mapping without handing pages back holds the whole file.
    kept = load_packed(tmp_path / "big", verify=False).keys()
    kept.pages = None
    _reset_peak_rss()
    base = _peak_rss_kib()
    scan(kept)
    assert (_peak_rss_kib() - base) / 1024 > 0.8 * file_mib
    memorization(torch.zeros(2, *shape), mapped, memory_budget=budget)  # the metrics path streams too
