"""Dataset: storage, views, subsets, flips, and the float64 statistics with their on-disk cache."""

import os

import numpy as np
import pytest
import torch

from analytic_diffusion.data import Dataset, load_array
from analytic_diffusion.data import cache as stats_cache
from analytic_diffusion.ops.keys import KeyBank


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    path = tmp_path / "stats-cache"
    monkeypatch.setenv("AD_CACHE_DIR", str(path))
    return path


def random_uint8(n=40, c=3, h=5, w=6, seed=0, classes=4):
    g = np.random.default_rng(seed)
    return g.integers(0, 256, (n, c, h, w), dtype=np.uint8), g.integers(0, classes, n)


def as_float64(images_uint8):
    return images_uint8.astype(np.float64) * (2 / 255) - 1


def numpy_stats(x):
    """Reference mean and population covariance of (N, ...) float64 data."""
    flat = x.reshape(len(x), -1)
    mean = flat.mean(0)
    centred = flat - mean
    return mean, centred.T @ centred / len(flat)


def rel_err(a, b):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# ------------------------------------------------------------------ storage and layouts
def test_uint8_storage_properties_and_keybank():
    x, y = random_uint8()
    ds = Dataset.from_array(x, y, source="toy")
    assert ds.images.dtype == torch.uint8 and ds.num_stored == ds.n == 40 and len(ds) == 40
    assert ds.image_shape == (3, 5, 6) and ds.dim == 90 and not ds.flips
    assert ds.labels.dtype == torch.int64 and ds.classes == sorted(set(y.tolist()))
    assert ds.device == torch.device("cpu")
    keys = ds.keys()
    assert isinstance(keys, KeyBank) and keys is ds.keys()  # cached, so its center is computed once
    assert keys.values.data_ptr() == ds.images.data_ptr() and keys.values.shape == (40, 90)
    assert keys.image_shape == (3, 5, 6) and torch.equal(keys.labels, ds.labels)
    assert keys.scale == pytest.approx(2 / 255) and keys.shift == -1.0
    assert torch.equal(ds.images_float().reshape(40, -1), keys.rows(0, 40, torch.float32))
    assert np.allclose(ds.images_float(dtype=torch.float64).numpy(), as_float64(x), atol=1e-12)
    text = repr(ds)
    assert "toy" in text and "N=40" in text and "(3, 5, 6)" in text and "uint8" in text and "flips=False" in text


@pytest.mark.parametrize("layout", ["NCHW", "NHWC", "NHW"])
def test_from_array_layouts(layout):
    x, _ = random_uint8(c=3 if layout != "NHW" else 1)
    src = {"NCHW": x, "NHWC": x.transpose(0, 2, 3, 1), "NHW": x[:, 0]}[layout]
    ds = Dataset.from_array(torch.from_numpy(np.ascontiguousarray(src)) if layout == "NHWC" else src)
    assert torch.equal(ds.images, torch.from_numpy(x))


def test_float_input_and_value_ranges():
    g = np.random.default_rng(1)
    unit = g.random((6, 2, 5, 5)).astype(np.float32)
    signed = Dataset.from_array(unit * 2 - 1)
    assert signed.images.dtype == torch.float32 and signed.scale == 1.0 and signed.shift == 0.0
    assert torch.allclose(
        Dataset.from_array(unit, value_range=(0, 1)).images, torch.from_numpy(unit * 2 - 1), atol=1e-6
    )
    assert torch.allclose(
        Dataset.from_array(unit * 255, value_range=(0, 255)).images, torch.from_numpy(unit * 2 - 1), atol=1e-5
    )
    ints = Dataset.from_array(np.arange(16, dtype=np.int64).reshape(1, 4, 4))  # 0..255 integers -> uint8
    assert ints.images.dtype == torch.uint8


def test_bad_arrays_raise_with_the_source_named():
    x = np.zeros((4, 1, 3, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="toy.*NaN/Inf"):
        Dataset.from_array(np.where(np.eye(3, dtype=bool), np.nan, x), source="toy")
    with pytest.raises(ValueError, match="toy.*NaN/Inf"):
        Dataset.from_array(x + np.inf, source="toy")
    with pytest.raises(ValueError, match=r"toy.*outside the range \[-1, 1\].*value_range"):
        Dataset.from_array(x + 3, source="toy")
    with pytest.raises(ValueError, match=r"outside the range \[0, 1\]"):
        Dataset.from_array(x - 0.5, value_range=(0, 1))
    with pytest.raises(ValueError, match="toy.*empty"):
        Dataset.from_array(np.zeros((0, 1, 3, 3), np.uint8), source="toy")
    with pytest.raises(ValueError, match=r"toy: 4 images but labels have shape \(3,\)"):
        Dataset.from_array(x, labels=[0, 1, 2], source="toy")
    with pytest.raises(ValueError, match="toy.*NCHW, NHWC or NHW"):
        Dataset.from_array(np.zeros((4, 3)), source="toy")
    with pytest.raises(ValueError, match="labels must be integers"):
        Dataset.from_array(x, labels=[0.5, 1, 2, 3])
    with pytest.raises(ValueError, match="float images must lie in"):
        Dataset(torch.full((2, 1, 2, 2), 2.0))


# ------------------------------------------------------------------ subsets, classes, flips, devices
def test_subset_first_and_seeded_random():
    x, y = random_uint8(n=50)
    ds = Dataset.from_array(x, y)
    first = ds.subset(10)
    assert torch.equal(first.images, ds.images[:10]) and torch.equal(first.labels, ds.labels[:10])
    assert first.images.data_ptr() == ds.images.data_ptr()  # first-n is a view
    a, b, c = (ds.subset(10, random=True, seed=s) for s in (3, 3, 4))
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    rows = [int(np.flatnonzero((x.reshape(50, -1) == r.numpy().ravel()).all(1))[0]) for r in a.images]
    assert rows == sorted(rows) and len(set(rows)) == 10
    assert torch.equal(a.labels, torch.from_numpy(y[rows]))
    assert a.subset_desc != first.subset_desc and ds.subset(5).subset(2).subset_desc == "first5|first2"
    for bad in (0, 51):
        with pytest.raises(ValueError, match=r"subset: n must be in \[1, 50\]"):
            ds.subset(bad)


def test_filter_classes():
    x, y = random_uint8(n=60, classes=5)
    ds = Dataset.from_array(x, y)
    sub = ds.filter_classes([1, 3])
    assert sub.classes == [1, 3] and sub.num_stored == int(np.isin(y, [1, 3]).sum())
    assert torch.equal(sub.images, torch.from_numpy(x[np.isin(y, [1, 3])]))
    assert ds.filter_classes(2).classes == [2]
    with pytest.raises(ValueError, match=r"no image has a label in \[7\]"):
        ds.filter_classes([7])
    with pytest.raises(ValueError, match="has no labels"):
        Dataset.from_array(x, source="nolabels").filter_classes([1])


def test_flips_are_a_flag_and_index_mirrored_copies():
    x, _ = random_uint8(n=7)
    ds = Dataset.from_array(x)
    stored_float = Dataset.from_array(as_float64(x).astype(np.float32))
    assert stored_float.images_float().data_ptr() != stored_float.images.data_ptr()  # a copy, never an alias
    fl = ds.with_flips()
    assert fl.flips and fl.n == 14 and fl.num_stored == 7 and fl.images.data_ptr() == ds.images.data_ptr()
    assert not fl.with_flips(False).flips and not ds.flips
    every = fl.images_float()
    assert every.shape == (14, 3, 5, 6)
    assert torch.equal(every[7:], every[:7].flip(-1))
    picked = fl.images_float(torch.tensor([[0, 9], [13, 2]]))
    assert picked.shape == (2, 2, 3, 5, 6)
    assert torch.equal(picked[0, 1], every[2].flip(-1)) and torch.equal(picked[1, 0], every[6].flip(-1))
    assert torch.equal(fl.images_float(3), every[3])
    with pytest.raises(IndexError, match=r"out of range \[0, 7\)"):
        ds.images_float([7])


def test_to_device_keeps_metadata():
    x, y = random_uint8(n=5)
    ds = Dataset.from_array(x, y, source="toy").with_flips().subset(3)
    moved = ds.to("cpu")
    assert moved.flips and moved.source == "toy" and moved.subset_desc == "first3"
    assert torch.equal(moved.images, ds.images) and moved.cache_params() == ds.cache_params()


# ------------------------------------------------------------------ statistics
@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_mean_covariance_pca_match_numpy(dtype):
    x, _ = random_uint8(n=30, c=2, h=3, w=5)  # (w=4 would read as NHWC)
    ref_x = as_float64(x)
    ds = Dataset.from_array(x if dtype == "uint8" else ref_x.astype(np.float32))
    if dtype == "float32":
        ref_x = ref_x.astype(np.float32).astype(np.float64)
    mean_ref, cov_ref = numpy_stats(ref_x)
    mean, cov = ds.mean(cache=False), ds.covariance(cache=False)
    assert mean.dtype == cov.dtype == torch.float64 and cov.shape == (30, 30)
    assert rel_err(mean, mean_ref) < 1e-12 and rel_err(cov, cov_ref) < 1e-12
    _m, vals, U = ds.pca(cache=False)
    assert vals.shape == (30,) and U.shape == (30, 30) and bool((vals >= 0).all())
    assert bool((vals[:-1] >= vals[1:]).all())
    assert rel_err(U @ torch.diag(vals) @ U.T, cov_ref) < 1e-10
    assert rel_err(U.T @ U, torch.eye(30, dtype=torch.float64)) < 1e-12
    ref_vals = np.sort(np.clip(np.linalg.eigvalsh(cov_ref), 0, None))[::-1].copy()
    assert rel_err(vals, ref_vals) < 1e-10
    _, top, U3 = ds.pca(rank=3, cache=False)
    assert top.shape == (3,) and U3.shape == (30, 3) and torch.equal(top, vals[:3])
    with pytest.raises(ValueError, match=r"rank must be in \[1, 30\]"):
        ds.pca(rank=31, cache=False)


def test_stats_with_flips_equal_explicitly_mirrored_set():
    x, _ = random_uint8(n=25, c=3, h=4, w=5)
    fl = Dataset.from_array(x).with_flips()
    explicit = np.concatenate([x, x[..., ::-1]])
    mean_ref, cov_ref = numpy_stats(as_float64(explicit))
    assert float((fl.mean() - torch.from_numpy(mean_ref)).abs().max()) < 1e-10
    assert float((fl.covariance() - torch.from_numpy(cov_ref)).abs().max()) < 1e-10
    direct = Dataset.from_array(explicit)
    assert float((fl.covariance() - direct.covariance()).abs().max()) < 1e-10
    assert float((fl.pca()[1] - direct.pca()[1]).abs().max()) < 1e-10


def test_chunked_accumulation_matches_single_pass(monkeypatch):
    x, _ = random_uint8(n=37, c=1, h=4, w=4)
    whole = Dataset.from_array(x).covariance(cache=False)
    monkeypatch.setattr("analytic_diffusion.data.dataset.STATS_CHUNK_ELEMENTS", 16 * 5)  # 5 rows per chunk
    chunked = Dataset.from_array(x).covariance(cache=False)
    assert rel_err(chunked, whole) < 1e-13


def test_cache_hit_loads_from_disk(cache_dir, monkeypatch):
    x, _ = random_uint8(n=20, c=1, h=4, w=4)
    first = Dataset.from_array(x, source="toy")
    mean, cov, (_, _, U) = first.mean(), first.covariance(), first.pca()
    assert len(list(cache_dir.glob("*.pt"))) == 3

    def boom(*args, **kwargs):
        raise AssertionError("recomputed despite a cache hit")

    for name in ("_compute_mean", "_compute_covariance", "_compute_pca"):
        monkeypatch.setattr(Dataset, name, boom)
    again = Dataset.from_array(x.copy(), source="toy")  # fresh object, same content and metadata
    assert torch.equal(again.mean(), mean) and torch.equal(again.covariance(), cov)
    assert torch.equal(again.pca()[2], U)
    with pytest.raises(AssertionError, match="recomputed"):
        Dataset.from_array(x, source="toy").with_flips().covariance()  # different key: not a hit


def test_cache_key_changes_with_every_parameter():
    x, _ = random_uint8(n=20, c=1, h=4, w=4)
    ds = load_array(x, source="toy", split="train")
    variants = {
        "base": ds,
        "subset": ds.subset(10),
        "random subset": ds.subset(10, random=True),
        "flips": ds.with_flips(),
        "split": Dataset.from_array(x, source="toy", split="test"),
        # a no-op resize (4x4 -> 4x4) keeps the bytes: only the recorded transform tells the key apart
        "resolution": load_array(x, source="toy", split="train", resolution=4),
        "pad": load_array(x, source="toy", split="train", pad_to=6),
        "source": Dataset.from_array(x, source="other", split="train"),
        "content": Dataset.from_array(np.where(x == 0, 1, x).astype(np.uint8), source="toy", split="train"),
    }
    paths = {name: stats_cache.key_path("cov", d.cache_params()) for name, d in variants.items()}
    assert len(set(paths.values())) == len(paths)
    assert (
        stats_cache.key_path("cov", Dataset.from_array(x, source="toy", split="train").cache_params()) == paths["base"]
    )


def test_corrupt_cache_file_is_recomputed(cache_dir):
    x, _ = random_uint8(n=10, c=1, h=3, w=3)
    ds = Dataset.from_array(x)
    path = stats_cache.key_path("mean", ds.cache_params())
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="not a valid 'mean' entry .* recomputing it"):
        mean = ds.mean()
    assert rel_err(mean, numpy_stats(as_float64(x))[0]) < 1e-12
    assert torch.equal(torch.load(path, weights_only=True)["tensors"]["mean"], mean)  # rewritten, valid
    assert not [p for p in os.listdir(cache_dir) if p.endswith(".tmp")]  # atomic write left no temp file


def test_cache_false_writes_nothing(cache_dir):
    x, _ = random_uint8(n=10, c=1, h=3, w=3)
    Dataset.from_array(x).pca(cache=False)
    assert not cache_dir.exists() or not list(cache_dir.iterdir())


def test_flip_index_convention_matches_the_retrieval_ops():
    """Index i ≥ N means image i − N mirrored, in images_float and in knn_search alike."""
    from analytic_diffusion.ops import knn_search

    x, _ = random_uint8(n=12, c=1, h=5, w=6)
    fl = Dataset.from_array(x).with_flips()
    want = torch.tensor([2, 12 + 5, 12 + 11])
    queries = fl.images_float(want).reshape(3, -1)
    _, index = knn_search(queries, fl.keys(), 1, flips=fl.flips, backend="torch")
    assert index[:, 0].tolist() == want.tolist()
