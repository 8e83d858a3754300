"""Every input works or is refused clearly, before any work starts (issue 14 §2-8 and its tracebacks)."""

import io
import json
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import analytic_diffusion as ad
from analytic_diffusion.cli import main
from analytic_diffusion.data import Dataset, load_cifar, load_dataset, load_edm_zip, load_idx, load_numpy
from analytic_diffusion.denoisers import DENOISERS
from analytic_diffusion.sampling import run as run_module

FAST = ["--subset", "40", "--n", "2", "--steps", "2", "--no-progress", "--method", "nearest"]
OPTS = {
    "topk": {"k": 5},
    "knn": {"k": 5, "ref_size": 5},
    "ls": {"patch": 3},
    "els": {"patch": 3},
    "bbels": {"patch": 3},
    "pspc": {"patch": 3},
}


def small(rng, n=40, labels=True):
    imgs = torch.randint(0, 256, (n, 1, 6, 6), generator=rng, dtype=torch.uint8)
    return Dataset(imgs, torch.randint(0, 2, (n,), generator=rng) if labels else None)


def no_data_loading(monkeypatch):
    """Make any dataset load fail loudly: the checks under test must run before it."""

    def boom(*a, **k):
        raise AssertionError("the dataset was loaded before the input was checked")

    monkeypatch.setattr(run_module, "load_dataset", boom)


# ------------------------------------------------------------------------------------------- data sources
def test_empty_dataset_name_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "stray.png")  # "" must not load this folder
    with pytest.raises(ValueError, match="empty dataset name"):
        load_dataset("")
    assert main(["sample", "--dataset", "", *FAST, "--out", str(tmp_path / "o")]) == 2
    assert "empty dataset name" in capsys.readouterr().err


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(values).save(folder / "a.png")
    assert Image.open(folder / "a.png").mode.startswith("I")
    ds = load_dataset(str(folder))
    assert ds.images.dtype == torch.uint8
    assert ds.images.reshape(-1).tolist() == [0, 1, 128, 255]


def _cifar_bin(path, labels):
    rows = np.zeros((len(labels), 1 + 3072), np.uint8)
    rows[:, 0] = labels
    path.write_bytes(rows.tobytes())


def test_cifar_label_out_of_range_is_refused(tmp_path):
    good = tmp_path / "data_batch_1.bin"
    _cifar_bin(good, [0, 9, 3])
    assert load_cifar(good).labels.tolist() == [0, 9, 3]
    bad = tmp_path / "data_batch_2.bin"
    _cifar_bin(bad, [0, 11, 3])
    with pytest.raises(ValueError, match="label 11"):
        load_cifar(bad)


def test_negative_npz_labels_are_refused(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((3, 1, 4, 4), np.uint8), y=np.array([0, -1, 2]))
    with pytest.raises(ValueError, match="non-negative"):
        load_numpy(path)


@pytest.mark.parametrize(
    "meta, message",
    [
        ([["a.png", 0]], "must be an object"),
        ({"labels": [["a.png"]]}, "pairs"),
        ({"labels": {"a.png": 0}}, "pairs"),
        ({"labels": [["a.png", -2]]}, "non-negative"),
    ],
)
def test_edm_zip_bad_dataset_json_is_refused(tmp_path, meta, message):
    path = tmp_path / "d.zip"
    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(buf, format="PNG")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("a.png", buf.getvalue())
        z.writestr("dataset.json", json.dumps(meta))
    with pytest.raises(ValueError, match=message):
        load_edm_zip(path)


def test_idx_header_with_huge_sizes_names_the_file(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    dims = [2**31, 2**31, 2**31]  # a product that wraps to 0 in int64
    path.write_bytes((2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims))
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.*truncated"):
        load_idx(path)


def test_ambiguous_layout_needs_an_explicit_one():
    arr = np.random.default_rng(0).integers(0, 256, (5, 2, 6, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="ambiguous.*layout="):
        Dataset.from_array(arr)
    assert Dataset.from_array(arr, layout="NCHW").image_shape == (2, 6, 3)
    nhwc = Dataset.from_array(arr, layout="NHWC")
    assert nhwc.image_shape == (3, 2, 6)
    assert torch.equal(nhwc.images, torch.from_numpy(arr).permute(0, 3, 1, 2))
    with pytest.raises(ValueError, match="layout"):
        Dataset.from_array(arr, layout="CHW")
    # the unambiguous cases are read as before
    assert Dataset.from_array(np.zeros((5, 28, 28, 1), np.uint8)).image_shape == (1, 28, 28)
    assert Dataset.from_array(np.zeros((5, 3, 8, 8), np.uint8)).image_shape == (3, 8, 8)


def test_float64_data_stays_float64(rng):
    y = torch.rand(30, 1, 4, 4, generator=rng, dtype=torch.float64) * 2 - 1
    ds = Dataset.from_array(y)
    assert ds.images.dtype == torch.float64 and torch.equal(ds.images, y)
    x = y[:3] + 0.05 * torch.randn(3, 1, 4, 4, generator=rng, dtype=torch.float64)
    out = ad.make_denoiser("optimal", ds, dtype=torch.float64)(x, 0.05)
    d2 = ((x.reshape(3, 1, -1) - y.reshape(1, 30, -1)) ** 2).sum(-1)
    ref = (torch.softmax(-d2 / (2 * 0.05**2), 1) @ y.reshape(30, -1)).reshape(x.shape)
    assert float((out - ref).abs().max()) < 1e-12  # float32 storage would be ~1e-8 off


@pytest.mark.parametrize("method", ["pca_locality", "pspc-flex"])
def test_flips_on_the_denoiser_means_a_flipped_dataset(rng, method):
    ds = small(rng, n=60, labels=False)
    x = torch.randn(3, 1, 6, 6, generator=rng, dtype=torch.float64)
    kw = {"pca_locality": {"threshold": 0.05}, "pspc-flex": {"tau": 0.5}}[method]
    a = ad.make_denoiser(method, ds, flips=True, dtype=torch.float64, backend="torch", **kw)(x, 0.5)
    b = ad.make_denoiser(method, ds.with_flips(True), dtype=torch.float64, backend="torch", **kw)(x, 0.5)
    assert float((a - b).abs().max()) < 1e-12


# ------------------------------------------------------------------------------------------- denoiser calls
@pytest.mark.parametrize("name", sorted(DENOISERS))
def test_extreme_sigma_and_huge_queries_are_refused_clearly(rng, name):
    ds = small(rng)
    den = ad.make_denoiser(name, ds, **OPTS.get(name, {}))
    x = torch.randn(2, 1, 6, 6, generator=rng)
    for sigma in (1e-300, 1e-25, 1e-11, 2e10, 1e19, 1e155, 1e300):
        with pytest.raises(ValueError, match=r"sigma: .*supported range \[1e-10, 1e\+10\]"):
            den(x, sigma)
    with pytest.raises(ValueError, match="x: values up to 1e\\+30"):
        den(x * 0 + 1e30, 1.0)
    with pytest.raises(ValueError, match="x, sigma: .*too far"):
        den(x * 1e10, 1e-9)
    for sigma in (1e-10, 1e10):  # the edges of the range: finite answers
        for xx in (x, x * sigma):
            out = den(xx, sigma)
            assert torch.isfinite(out).all(), (name, sigma)


@pytest.mark.parametrize("name", ["optimal", "topk", "nearest", "knn", "smoothed", "optimal-draw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sigma_limits_nearest_and_mean(rng, name, dtype):
    ds = small(rng)
    y = ds.images_float(dtype=torch.float64)
    x = y[:3] + 0.2 * torch.randn(3, 1, 6, 6, generator=rng, dtype=torch.float64)
    opts = {
        "topk": {"k": ds.n},
        "knn": {"k": ds.n},
        "smoothed": {"smoothing": 0.0},
        "optimal-draw": {"scale": 0.0},
    }.get(name, {})
    den = ad.make_denoiser(name, ds, dtype=dtype, **opts)
    d2 = ((x.reshape(3, 1, -1) - y.reshape(1, ds.n, -1)) ** 2).sum(-1)
    nn = y[d2.argmin(1)]
    assert float((den(x.to(dtype), 1e-10).double() - nn).abs().max()) < 1e-6
    if name != "nearest":
        mean = y.mean(0, keepdim=True).expand_as(x)
        assert float((den(x.to(dtype), 1e10).double() - mean).abs().max()) < 1e-5


def test_topk_boundary_is_decided_in_float64():
    """k-th and (k+1)-th candidates tied in float32 but not in float64: both dtypes take the float64 nearer one."""
    rng = np.random.default_rng(0)
    v = rng.uniform(0.3, 0.6, size=(1, 4, 4))
    near = rng.uniform(-0.05, 0.05, size=(4, 1, 4, 4))
    far = rng.uniform(0.9, 1.0, size=(10, 1, 4, 4))
    # index 4: the farther twin (-(1 + 1e-12) v, lower index), index 5: the nearer one (v); query 0
    rows = np.concatenate([near, -(1 + 1e-12) * v[None], v[None], far])
    ds = Dataset.from_array(rows, layout="NCHW")
    x = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    y = torch.from_numpy(rows)
    d2 = (y.reshape(len(rows), -1) ** 2).sum(1)
    assert float(d2[4] - d2[5]) > 0  # the twin is farther in float64 ...
    assert float(d2[4].float() - d2[5].float()) == 0  # ... and tied in float32
    ref_set = torch.argsort(d2)[:5]
    w = torch.softmax(-d2[ref_set] / (2 * 1e4**2), 0)
    ref = (w[:, None] * y[ref_set].reshape(5, -1)).sum(0).reshape(x.shape)
    for dtype in (torch.float32, torch.float64):
        for backend in ("torch", "cpu"):
            out = ad.make_denoiser("topk", ds, k=5, dtype=dtype, backend=backend)(x.to(dtype), 1e4)
            assert float((out.double() - ref).abs().max()) < 1e-6, (dtype, backend)


@pytest.mark.parametrize("labels", [1.7, [0.5, 1.0], [True, False]])
def test_non_integral_class_labels_are_refused(rng, labels):
    den = ad.make_denoiser("optimal", small(rng))
    with pytest.raises((ValueError, TypeError), match="class_labels"):
        den(torch.zeros(2, 1, 6, 6), 1.0, class_labels=labels)
    assert torch.equal(
        den(torch.zeros(2, 1, 6, 6), 1.0, class_labels=[1.0, 0.0]),
        den(torch.zeros(2, 1, 6, 6), 1.0, class_labels=[1, 0]),
    )


def test_sigma_as_a_string_is_refused(rng):
    den = ad.make_denoiser("optimal", small(rng))
    with pytest.raises(TypeError, match="sigma"):
        den(torch.zeros(2, 1, 6, 6), "1.0")


@pytest.mark.parametrize("name", sorted(DENOISERS))
def test_empty_batch_gives_an_empty_result(rng, name):
    den = ad.make_denoiser(name, small(rng), **OPTS.get(name, {}))
    x = torch.zeros(0, 1, 6, 6)
    for fn in (den, den.score, den.eps):
        out = fn(x, 1.0)
        assert out.shape == (0, 1, 6, 6)


# ------------------------------------------------------------------------------------------- run folders / CLI
def test_seed_range(tmp_path, monkeypatch, capsys):
    den = ad.make_denoiser("nearest", load_dataset("mnist").subset(20))
    assert ad.sample(den, 1, steps=1, seed=2**64 - 1, progress=False).samples.shape[0] == 1
    with pytest.raises(ValueError, match="2\\^64"):
        ad.sample(den, 2, steps=1, seed=2**64 - 1, progress=False)
    no_data_loading(monkeypatch)
    assert main(["sample", *FAST, "--seed", str(2**64), "--out", str(tmp_path / "o")]) == 2
    assert "2^64" in capsys.readouterr().err


def test_large_seeds_are_stored_exactly(tmp_path):
    out = tmp_path / "o"
    # 2^63 − 1 and 2^63 side by side: numpy's default turns the pair into float64 and both into 2^63
    assert main(["sample", *FAST, "--seed", str(2**63 - 1), "--out", str(out)]) == 0
    seeds = np.load(out / "samples.npz")["seeds"]
    assert seeds.dtype == np.uint64 and seeds.tolist() == [2**63 - 1, 2**63]


def test_out_folder_policy(tmp_path, monkeypatch, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "old.txt").write_text("from an earlier run")
    with monkeypatch.context() as m:
        no_data_loading(m)
        assert main(["sample", *FAST, "--out", str(out)]) == 2
        assert "not empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    helptext = " ".join(capsys.readouterr().out.split())
    assert "must be new or empty unless --overwrite" in helptext and "renamed to --out" in helptext
    assert main(["sample", *FAST, "--out", str(out), "--overwrite"]) == 0
    assert not (out / "old.txt").exists() and (out / "samples.npz").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["o"]  # no staging folder left behind


def test_interrupted_run_leaves_no_finished_looking_folder(tmp_path, monkeypatch):
    out = tmp_path / "o"

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "save_nearest_panel", interrupted)
    assert _main_catching_interrupt(["sample", *FAST, "--out", str(out)]) == 130
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["file", "under-file"])
def test_out_naming_a_file_is_refused_before_work(tmp_path, monkeypatch, capsys, where):
    f = tmp_path / "f"
    f.write_text("x")
    no_data_loading(monkeypatch)
    assert main(["sample", *FAST, "--out", str(f if where == "file" else f / "sub")]) == 2
    assert "out:" in capsys.readouterr().err


@pytest.mark.parametrize("device, message", [("bogus", "unknown device"), ("cuda", "CUDA is not available")])
def test_bad_device_is_refused_before_work(tmp_path, monkeypatch, capsys, device, message):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device cuda is valid here")
    no_data_loading(monkeypatch)
    assert main(["sample", *FAST, "--device", device, "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err


def test_backend_is_refused_where_a_method_has_no_kernels(tmp_path, capsys):
    assert main(["sample", *FAST[:-2], "--method", "wiener", "--backend", "cpu", "--out", str(tmp_path / "o")]) == 2
    assert "--backend cpu does not apply to --method wiener" in capsys.readouterr().err


def _main_catching_interrupt(argv):
    try:
        return main(argv)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped the command line")


def test_ctrl_c_prints_one_line_and_exits_130(monkeypatch, capsys, tmp_path):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "run_sample", interrupted)
    assert _main_catching_interrupt(["sample", *FAST, "--out", str(tmp_path / "o")]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "interrupted"


# ------------------------------------------------------------------------------------------- issue 24: inputs
@pytest.mark.parametrize("where", ["x", "sigma", "class_labels"])
def test_meta_tensors_are_refused_by_name(rng, where):
    """`den(x.to("meta"), 1.0)` was a RuntimeError from Tensor.item()."""
    den = ad.make_denoiser("optimal", small(rng))
    args = {"x": torch.zeros(2, 1, 6, 6), "sigma": torch.ones(2), "class_labels": torch.zeros(2, dtype=torch.long)}
    args[where] = args[where].to("meta")
    with pytest.raises(ValueError, match=f"^{where}: a tensor on the 'meta' device has a shape but no values"):
        den(args["x"], args["sigma"], args["class_labels"])


def _fake_torchscript(path) -> None:
    """A zip with TorchScript's member names whose pickle is not one: torch.jit refuses it, nothing runs."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", b"not a pickle")
        z.writestr("archive/constants.pkl", b"x")
        z.writestr("archive/version", b"3")


def test_a_zip_posing_as_torchscript_is_a_clear_error(tmp_path, capsys):
    from analytic_diffusion.networks import load_network

    fake = tmp_path / "net.pt"
    _fake_torchscript(fake)
    with pytest.raises(ValueError, match="looks like a TorchScript file but torch.jit cannot load it"):
        load_network(fake, image_shape=(1, 28, 28))
    compare = ["compare", "--network", str(fake), "--methods", "wiener", "--subset", "40", "--seeds", "1"]
    rc = main([*compare, "--steps", "2", "--no-progress", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "looks like a TorchScript file" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "schedule,flag,value",
    [("vp-linear", "--sigma-max", "10"), ("vp-cosine", "--rho", "3"), ("karras", "--spacing", "leading")],
)
def test_grid_flags_of_another_schedule_are_refused_by_name(tmp_path, monkeypatch, capsys, schedule, flag, value):
    """`--sigma-max` with `--schedule vp-linear` surfaced as a TypeError of vp_linear()'s keywords."""
    no_data_loading(monkeypatch)
    rc = main(["sample", *FAST, "--schedule", schedule, flag, value, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert (
        rc == 2 and err.startswith(f"error: {flag}: applies to --schedule ") and f"not to --schedule {schedule}" in err
    )
