"""Patch-size calibration: toy denoisers with a known best k per σ, real denoisers end to end, and the CLI."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from analytic_diffusion.analysis.calibration import calibrate_patch_sizes, split_probes
from analytic_diffusion.cli import main
from analytic_diffusion.data import Dataset
from analytic_diffusion.denoisers import DENOISERS, make_denoiser
from analytic_diffusion.denoisers.local_base import LocalDenoiser
from analytic_diffusion.denoisers.patch_presets import load_patch_schedule
from analytic_diffusion.denoisers.patch_schedule import PatchSchedule
from analytic_diffusion.grids import get_schedule

SIZES = (3, 5, 7, 9, 11)
SHAPE = (1, 6, 6)


def target_index(sigma: float) -> int:
    """The toy's best size index at σ: grows with log σ (0 … 4)."""
    return max(0, min(4, math.floor(math.log2(sigma) + 3)))


class ToyReference:
    """x̂0 = x / (1 + σ²): the posterior mean of N(0, I) data."""

    image_shape = SHAPE

    def __call__(self, x, sigma, class_labels=None):
        return x / (1 + sigma.view(-1, 1, 1, 1) ** 2)


class ToyMethod:
    """Matches the reference exactly for one k per σ (shifted by 2 per class label) and drifts, orthogonally to
    the target score, by |index(k) − index(target)| elsewhere, so both metrics prefer the target k strictly."""

    def __init__(self, k, probes=None):
        self.k, self.probes = k, probes
        self.image_shape = SHAPE
        self.u = torch.linspace(-1, 1, int(np.prod(SHAPE)), dtype=torch.float64).roll(7).reshape(1, *SHAPE)

    def __call__(self, x, sigma, class_labels=None):
        if self.probes is None:  # trajectory mode: the reference's x̂0, labels shift the best k
            ref = ToyReference()(x, sigma)
            shift = torch.zeros(len(x)) if class_labels is None else class_labels.double()
        else:  # clean mode: the probe's own clean image, picked by its label
            ref = self.probes[class_labels.cpu()].to(x.dtype)
            shift = torch.zeros(len(x))
        a = (ref - x).flatten(1).double()
        u = self.u.flatten(1).expand_as(a)
        u_perp = u - (u * a).sum(1, keepdim=True) / (a * a).sum(1, keepdim=True) * a
        tgt = torch.tensor([min(4, target_index(float(s)) + int(h)) for s, h in zip(sigma, shift)])
        delta = (SIZES.index(self.k) - tgt).abs().double().view(-1, 1)
        return (ref.flatten(1).double() + 0.05 * delta * u_perp).reshape(x.shape).to(x.dtype)


def expected_table(sched, shift=0):
    return [SIZES[min(4, target_index(float(s)) + shift)] for s in sched.sigmas[:-1]]


@pytest.mark.parametrize("metric", ["cosine", "mse"])
def test_toy_recovers_the_known_table(metric):
    sched = get_schedule("kamb-cosine", 9)
    table, report = calibrate_patch_sizes(
        ToyMethod, ToyReference(), None, candidate_sizes=SIZES, schedule=sched, seeds=3, metric=metric, progress=False
    )
    want = expected_table(sched)
    assert len(set(want)) >= 4  # the grid spans several sizes
    assert table.sizes == want and table.sigmas == pytest.approx(sched.sigmas[:-1].tolist())
    assert [table.k_for(float(s)) for s in sched.sigmas[:-1]] == want
    table.check_covers(sched.sigmas.tolist())
    assert report["sizes"] == want and report["candidate_sizes"] == list(SIZES)
    assert report["best_per_seed"] == [[k] * 3 for k in want]
    values = np.asarray(report["values"])
    assert values.shape == (9, len(SIZES))
    best = values.argmax(1) if metric == "cosine" else values.argmin(1)
    assert [SIZES[j] for j in best] == want
    if metric == "cosine":
        assert values.max(1) == pytest.approx(1.0)
    else:
        assert values.min(1) == pytest.approx(0.0, abs=1e-12)
    assert report["timesteps"] == pytest.approx([i / 10 for i in range(9, 0, -1)] + [0.0])
    json.dumps(report)  # serialisable for the CLI's file


def test_median_over_seeds():
    sched = get_schedule("karras", 6, sigma_min=0.3, sigma_max=3.0)
    # Labels shift each seed's best k by 0, 0, 1, 2, 2 sizes: the median pick is the +1 size.
    table, report = calibrate_patch_sizes(
        ToyMethod,
        ToyReference(),
        None,
        candidate_sizes=SIZES,
        schedule=sched,
        seeds=[5, 6, 7, 8, 9],
        class_labels=[0, 0, 1, 2, 2],
        progress=False,
    )
    assert table.sizes == expected_table(sched, 1)
    assert report["seeds"] == [5, 6, 7, 8, 9] and report["class_labels"] == [0, 0, 1, 2, 2]
    for picks, base in zip(report["best_per_seed"], expected_table(sched)):
        i = SIZES.index(base)
        assert picks == [SIZES[min(4, i + h)] for h in (0, 0, 1, 2, 2)]
    assert report["mode"] == [min(p, key=lambda k: (-p.count(k), k)) for p in report["best_per_seed"]]
    # Two seeds a size apart: the median falls between two sizes and rounds to the smaller one.
    table, _ = calibrate_patch_sizes(
        ToyMethod,
        ToyReference(),
        None,
        candidate_sizes=SIZES,
        schedule=sched,
        seeds=2,
        class_labels=[0, 1],
        progress=False,
    )
    assert table.sizes == expected_table(sched)
    # Median of 3 and 9 among (3, 5, 9, ...) is 6: rounds to the nearest allowed size, 5.
    from analytic_diffusion.analysis.calibration import _median_size

    assert _median_size([3, 9], (3, 5, 9, 11)) == 5 and _median_size([3, 7], (3, 5, 7)) == 5
    assert _median_size([3, 5], (3, 5, 7)) == 3


def test_trajectory_follows_the_reference_ddim():
    """The candidates are evaluated on the reference's own DDIM (η = 0) states."""
    sched = get_schedule("karras", 4, sigma_min=0.5, sigma_max=5.0)
    seen = []

    class Recorder(ToyReference):
        def __call__(self, x, sigma, class_labels=None):
            seen.append(x.clone())
            return super().__call__(x, sigma)

    calibrate_patch_sizes(
        lambda k: Recorder() if k == 3 else ToyReference(),
        ToyReference(),
        None,
        candidate_sizes=(3, 5),
        schedule=sched,
        seeds=[11, 12],
        progress=False,
    )
    x = torch.stack([torch.randn(SHAPE, generator=torch.Generator().manual_seed(s)) for s in (11, 12)]) * 5.0
    s = sched.sigmas.tolist()
    for i in range(4):
        assert torch.allclose(seen[i], x, atol=1e-5)
        x0 = x / (1 + s[i] ** 2)
        x = x0 + s[i + 1] / s[i] * (x - x0)


@pytest.mark.parametrize("metric", ["cosine", "mse"])
def test_clean_reference_with_probe_images(metric):
    g = torch.Generator().manual_seed(0)
    probes = torch.rand((4, *SHAPE), generator=g) * 2 - 1
    sched = get_schedule("karras", 7, sigma_min=0.2, sigma_max=5.0)
    table, report = calibrate_patch_sizes(
        lambda k: ToyMethod(k, probes),
        "clean",
        None,
        candidate_sizes=SIZES,
        schedule=sched,
        seeds=3,
        metric=metric,
        probe_images=probes,
        class_labels=torch.arange(4),
        progress=False,
    )
    assert table.sizes == expected_table(sched)
    assert report["reference"] == "clean" and report["n_probe"] == 4


def test_split_probes_and_clean_reference_holds_them_out():
    imgs = torch.linspace(-1, 1, 30 * 16).reshape(30, 1, 4, 4)
    ds = Dataset.from_array(imgs, labels=torch.arange(30) % 3)
    cand, probes, labels = split_probes(ds, 5)
    assert cand.num_stored == 25 and torch.equal(probes, imgs[25:]) and labels.tolist() == [1, 2, 0, 1, 2]
    with pytest.raises(ValueError, match="n_probe"):
        split_probes(ds, 30)
    built = []

    def make(k, dataset):
        built.append(dataset.num_stored)
        return make_denoiser("optimal", dataset)

    calibrate_patch_sizes(make, "clean", ds, candidate_sizes=(1, 3), steps=3, seeds=2, n_probe=5, progress=False)
    assert built == [25, 25]
    # A one-argument make_method built on the full dataset would contain the probes: refused.
    with pytest.raises(ValueError, match="split_probes"):
        calibrate_patch_sizes(
            lambda k: make_denoiser("optimal", ds),
            "clean",
            ds,
            candidate_sizes=(3,),
            steps=3,
            seeds=1,
            n_probe=5,
            progress=False,
        )


def test_argument_errors():
    ref = ToyReference()
    with pytest.raises(ValueError, match="metric"):
        calibrate_patch_sizes(ToyMethod, ref, None, candidate_sizes=SIZES, metric="l1", progress=False)
    with pytest.raises(ValueError, match="candidate_sizes"):
        calibrate_patch_sizes(ToyMethod, ref, None, candidate_sizes=(3, 0), progress=False)
    with pytest.raises(ValueError, match="seeds"):
        calibrate_patch_sizes(ToyMethod, ref, None, candidate_sizes=SIZES, seeds=0, progress=False)
    with pytest.raises(ValueError, match="class_labels"):
        calibrate_patch_sizes(ToyMethod, ref, None, candidate_sizes=SIZES, seeds=2, class_labels=[1], progress=False)
    with pytest.raises(ValueError, match="no 'patch' option"):
        calibrate_patch_sizes("optimal", "clean", None, candidate_sizes=SIZES, progress=False)


# ---------------------------------------------------------------- real denoisers


class TinyLS(LocalDenoiser):
    """Kamb & Ganguli's LS machine (same-location k×k windows, zero padding, centre-pixel values), written
    plainly for tests: the window covering the image (k ≥ 2H − 1) is the optimal denoiser."""

    name = "tiny-ls"
    default_patch = 3

    def _denoise_k(self, x, s, labels, k):
        y = self.dataset.images_float(dtype=torch.float64)  # (N, C, H, W)
        d = ((x.double()[:, None] - y[None]) ** 2).sum(2)  # (B, N, H, W)
        B, N, H, W = d.shape
        box = F.avg_pool2d(d.reshape(B * N, 1, H, W), k, stride=1, padding=k // 2, count_include_pad=True)
        logits = -box.reshape(B, N, H, W) * k * k / (2 * s.double().view(-1, 1, 1, 1) ** 2 * self.temperature)
        if labels is not None:
            keep = self.dataset.labels[None, :] == labels[:, None]
            logits = logits.masked_fill(~keep[:, :, None, None], -math.inf)
        w = torch.softmax(logits, dim=1)  # (B, N, H, W)
        return torch.einsum("bnhw,nchw->bchw", w, y)


def local_method():
    """A registered local method ('ls' once the local methods land), else the test's TinyLS."""
    for name in ("ls", "bbels"):
        if name in DENOISERS:
            return name
    return None


@pytest.fixture
def tiny_ls(monkeypatch):
    monkeypatch.setitem(DENOISERS, TinyLS.name, TinyLS)
    return TinyLS.name


@pytest.fixture(scope="module")
def mnist8():
    from analytic_diffusion.data import load_dataset

    ds = load_dataset("mnist32").subset(120)
    small = F.avg_pool2d(ds.images_float(), 4)  # 8×8 keeps the test fast
    return Dataset.from_array(small, labels=ds.labels)


def test_end_to_end_against_optimal(mnist8, tiny_ls):
    """LS with a window covering the image equals the optimal denoiser: it wins every step (cos = 1)."""
    sched = get_schedule("karras", 5, sigma_min=0.3, sigma_max=5.0)
    table, report = calibrate_patch_sizes(
        tiny_ls,
        make_denoiser("optimal", mnist8, dtype=torch.float64),
        mnist8,
        candidate_sizes=(3, 5, 15),
        schedule=sched,
        seeds=3,
        method_options={"dtype": torch.float64},
        dtype=torch.float64,
        progress=False,
    )
    assert table.sizes == [15] * 5
    values = np.asarray(report["values"])
    assert values[:, -1] == pytest.approx(1.0, abs=1e-9)
    # Scores at high σ are dominated by −x/σ², so cosines there sit near 1 for every k (Kamb's metric).
    assert (values[:, 0] < 1 - 1e-7).all() and values[-1, 0] < 0.99


def test_end_to_end_clean_and_wiener(mnist8, tiny_ls):
    table, report = calibrate_patch_sizes(
        tiny_ls,
        "clean",
        mnist8,
        candidate_sizes=(1, 3, 5, 7),
        steps=6,
        seeds=2,
        n_probe=6,
        metric="mse",
        progress=False,
    )
    assert set(table.sizes) <= {1, 3, 5, 7} and len(table.sizes) == 6 and np.isfinite(report["values"]).all()
    table, _ = calibrate_patch_sizes(
        tiny_ls, "wiener", mnist8, candidate_sizes=(3, 7), steps=4, seeds=2, progress=False
    )
    assert len(table.sizes) == 4


# ---------------------------------------------------------------- CLI


def test_cli_calibrate_then_sample(tmp_path, tiny_ls, capsys):
    method = local_method() or tiny_ls
    out = tmp_path / "cal" / "sched.json"
    rc = main(
        [
            "calibrate",
            "--method",
            method,
            "--dataset",
            "mnist32",
            "--subset",
            "40",
            "--reference",
            "clean",
            "--n-probe",
            "4",
            "--sizes",
            "3,5,7",
            "--steps",
            "5",
            "--seeds",
            "2",
            "--metric",
            "mse",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    from PIL import Image

    with Image.open(tmp_path / "cal" / "sched.png") as im:
        assert im.format == "PNG" and im.size == (1200, 500)
        assert len(im.convert("RGB").getcolors(1 << 20)) > 20  # drawn, not blank
    obj = json.loads(out.read_text())
    assert len(obj["patch_sizes"]) == 5 and obj["calibration"]["n_probe"] == 4
    assert obj["calibration"]["dataset"].count("N=44")
    sch = load_patch_schedule(str(out))
    assert sch.sigmas == pytest.approx(get_schedule("kamb-cosine", 5).sigmas[:-1].tolist())
    assert "k = " in capsys.readouterr().out
    # The file feeds `sample --patch-schedule` on the same grid ...
    run = tmp_path / "run"
    rc = main(
        [
            "sample",
            "--method",
            method,
            "--dataset",
            "mnist32",
            "--subset",
            "40",
            "--n",
            "2",
            "--steps",
            "5",
            "--sampler",
            "ddim",
            "--schedule",
            "kamb-cosine",
            "--patch-schedule",
            str(out),
            "--no-progress",
            "--out",
            str(run),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert json.loads((run / "config.json").read_text())["denoiser"]["patch"]["patch_sizes"] == obj["patch_sizes"]
    # ... and a grid it does not cover fails up front with a clear message.
    rc = main(
        [
            "sample",
            "--method",
            method,
            "--dataset",
            "mnist32",
            "--subset",
            "40",
            "--n",
            "2",
            "--steps",
            "5",
            "--patch-schedule",
            str(out),
            "--no-progress",
            "--out",
            str(tmp_path / "uncovered"),
        ]
    )
    assert rc == 2 and "sampler visits σ = 80" in capsys.readouterr().err
    rc = main(
        [
            "sample",
            "--method",
            method,
            "--dataset",
            "mnist32",
            "--subset",
            "40",
            "--n",
            "2",
            "--steps",
            "3",
            "--patch",
            "5",
            "--no-progress",
            "--out",
            str(tmp_path / "run2"),
        ]
    )
    assert rc == 0, capsys.readouterr().err


def test_cli_reference_trajectories(tmp_path, tiny_ls, capsys):
    out = tmp_path / "s.json"
    rc = main(
        [
            "calibrate",
            "--method",
            tiny_ls,
            "--dataset",
            "mnist32",
            "--subset",
            "30",
            "--reference",
            "wiener",
            "--sizes",
            "3,9",
            "--steps",
            "3",
            "--seeds",
            "2",
            "--schedule",
            "karras",
            "--sigma-max",
            "10",
            "--out",
            str(out),
            "--no-progress",
            "--no-plot",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert not (tmp_path / "s.png").exists()
    obj = json.loads(out.read_text())
    assert obj["calibration"]["reference"] == "wiener" and obj["calibration"]["schedule"] == "karras"
    assert obj["sigmas"][0] == pytest.approx(10.0)


def test_cli_reference_checkpoint(tmp_path, tiny_ls, capsys):
    """A trained network's checkpoint is a reference too (Kamb & Ganguli calibrate against their CNNs)."""
    from analytic_diffusion.data import load_dataset
    from analytic_diffusion.networks import train_network

    train_network(
        load_dataset("mnist32").subset(16),
        steps=2,
        channels=8,
        blocks=1,
        batch_size=4,
        progress=False,
        out_dir=tmp_path / "net",
    )
    out = tmp_path / "s.json"
    args = [
        "calibrate",
        "--method",
        tiny_ls,
        "--dataset",
        "mnist32",
        "--subset",
        "30",
        "--sizes",
        "3,9",
        "--steps",
        "3",
        "--seeds",
        "2",
        "--out",
        str(out),
        "--no-progress",
        "--no-plot",
    ]
    assert main([*args, "--reference", str(tmp_path / "net" / "net.pt")]) == 0, capsys.readouterr().err
    obj = json.loads(out.read_text())
    assert obj["calibration"]["reference"] == "net" and len(obj["calibration"]["sizes"]) == 3
    assert obj["calibration"]["reference_spec"]["kind"] == "checkpoint"
    assert main([*args, "--reference", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt' does not exist" in capsys.readouterr().err


def test_cli_errors(tmp_path, tiny_ls, capsys):
    base = [
        "--dataset",
        "mnist32",
        "--subset",
        "20",
        "--n",
        "1",
        "--steps",
        "2",
        "--no-progress",
        "--out",
        str(tmp_path / "r"),
    ]
    assert main(["sample", "--method", "optimal", "--patch", "5", *base]) == 2
    assert "--patch does not apply to --method optimal" in capsys.readouterr().err
    assert main(["sample", "--method", "wiener", "--patch-schedule", "kamb-mnist", *base]) == 2
    assert "--patch-schedule does not apply to --method wiener" in capsys.readouterr().err
    assert main(["sample", "--method", tiny_ls, "--patch", "5", "--patch-schedule", "kamb-mnist", *base]) == 2
    assert "either --patch or --patch-schedule" in capsys.readouterr().err
    assert main(["sample", "--method", tiny_ls, "--patch-schedule", "nope", *base]) == 2
    assert "unknown patch schedule 'nope'" in capsys.readouterr().err
    assert main(["sample", "--method", tiny_ls, "--patch", "4", *base]) == 2
    assert "odd" in capsys.readouterr().err
    for flag, value in (
        ("--threshold", "0.05"),
        ("--softmax", "chunked"),
        ("--chunk-size", "64"),
        ("--masks", "wiener"),
        ("--tau", "0.5"),
    ):
        assert main(["sample", "--method", "optimal", flag, value, *base]) == 2
        assert f"{flag} does not apply to --method optimal" in capsys.readouterr().err
    assert main(["calibrate", "--method", "optimal", "--out", str(tmp_path / "x.json")]) == 2
    assert "nothing to calibrate" in capsys.readouterr().err
    assert main(["calibrate", "--method", tiny_ls, "--sizes", "3,x", "--out", str(tmp_path / "x.json")]) == 2
    assert "--sizes" in capsys.readouterr().err


def test_cli_schedules_lists_presets(capsys):
    assert main(["schedules"]) == 0
    text = capsys.readouterr().out
    assert "kamb-mnist-resnet-zeros" in text and "pspc-cifar10" in text and "kamb-mnist = " in text
    assert "σ in [0, 11.03]" in text and "32 32 32" in text


def test_method_options_wiring(monkeypatch):
    """Each new flag reaches the method only under its option name."""
    from analytic_diffusion.cli import build_parser
    from analytic_diffusion.cli.sample import _method_options

    class Opts(LocalDenoiser):
        name = "opts"

        def __init__(self, dataset, *, masks=None, threshold=None, softmax="exact", chunk_size=None, tau=None, **kw):
            super().__init__(dataset, **kw)

    monkeypatch.setitem(DENOISERS, "opts", Opts)
    args = build_parser().parse_args(
        [
            "sample",
            "--method",
            "opts",
            "--patch-schedule",
            "kamb-mnist",
            "--masks",
            "wiener",
            "--threshold",
            "0.05",
            "--softmax",
            "chunked",
            "--chunk-size",
            "512",
            "--tau",
            "80:1,1.5:0.7, 0.002:0.3",
        ]
    )
    opts = _method_options(args)
    assert isinstance(opts["patch"], PatchSchedule) and opts["patch"].name == "kamb-mnist-resnet-zeros"
    assert opts["masks"] == "wiener" and opts["threshold"] == 0.05 and opts["softmax"] == "chunked"
    assert opts["chunk_size"] == 512 and opts["tau"] == {80.0: 1.0, 1.5: 0.7, 0.002: 0.3}
    args = build_parser().parse_args(["sample", "--method", "opts", "--patch", "7", "--tau", "0.4"])
    opts = _method_options(args)
    assert opts["patch"] == 7 and opts["tau"] == 0.4
    with pytest.raises(ValueError, match="--tau"):
        _method_options(build_parser().parse_args(["sample", "--method", "opts", "--tau", "0.4,x"]))

    class SingularMask(LocalDenoiser):  # pca_locality names its option mask=
        name = "single"

        def __init__(self, dataset, *, mask="wiener", **kw):
            super().__init__(dataset, **kw)

    monkeypatch.setitem(DENOISERS, "single", SingularMask)
    opts = _method_options(build_parser().parse_args(["sample", "--method", "single", "--masks", "wiener"]))
    assert opts["mask"] == "wiener" and "masks" not in opts


def test_masks_file(tmp_path, monkeypatch):
    from analytic_diffusion.cli.sample import _load_masks

    np.save(tmp_path / "m.npy", np.ones((4, 4), dtype=np.float32))
    assert torch.equal(_load_masks(str(tmp_path / "m.npy")), torch.ones(4, 4))
    with pytest.raises(FileNotFoundError, match="missing.npy"):
        _load_masks(str(tmp_path / "missing.npy"))
    assert _load_masks("wiener") == "wiener" and _load_masks("full") == "full"
    (tmp_path / "bad.npy").write_text("not numpy")
    with pytest.raises(ValueError, match="bad.npy"):
        _load_masks(str(tmp_path / "bad.npy"))


def test_make_method_dataset_argument_detection():
    from analytic_diffusion.analysis.calibration import _accepts_dataset

    assert not _accepts_dataset(lambda k: k) and not _accepts_dataset(lambda k, probes=None: k)
    assert _accepts_dataset(lambda k, ds: k) and _accepts_dataset(lambda k, dataset=None: k)
    assert not _accepts_dataset(ToyMethod)  # (k, probes=None)
