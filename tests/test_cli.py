"""The CLI's main job end to end on the embedded MNIST (small n and subset to stay fast)."""

import json

import numpy as np
import pytest
from PIL import Image

from analytic_diffusion.cli import main

FAST = ["--subset", "500", "--n", "6", "--steps", "4", "--no-progress"]


def run(tmp_path, *args):
    out = tmp_path / "run"
    rc = main(["sample", *args, *FAST, "--out", str(out)])
    return rc, out


def test_optimal_writes_a_run_folder_and_copies(tmp_path):
    rc, out = run(tmp_path, "--method", "optimal", "--save-x0")
    assert rc == 0
    for name in ("grid.png", "nearest.png", "samples.npz", "config.json", "metrics.json", "x0_strips.png"):
        assert (out / name).is_file(), name
    z = np.load(out / "samples.npz")
    assert z["samples"].shape == (6, 1, 28, 28) and list(z["seeds"]) == list(range(6))
    assert np.isfinite(z["samples"]).all()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["memorization_ratio"] == 1.0  # the exact optimum only reproduces training images
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "optimal" and config["sampler"] == "heun"
    assert Image.open(out / "grid.png").size[0] > 28


def test_wiener_samples_are_not_copies(tmp_path):
    rc, out = run(
        tmp_path,
        "--method",
        "wiener",
        "--dataset",
        "mnist32",
        "--sampler",
        "ddim",
        "--schedule",
        "vp-linear",
        "--clip-x0",
    )
    assert rc == 0
    assert json.loads((out / "metrics.json").read_text())["memorization_ratio"] == 0.0
    assert np.load(out / "samples.npz")["samples"].shape == (6, 1, 32, 32)


@pytest.mark.parametrize(
    "method, extra",
    [("topk", ["--k", "20"]), ("nearest", []), ("smoothed", ["--perturbations", "2"]), ("knn", ["--k", "50"])],
)
def test_every_method_runs(tmp_path, method, extra):
    rc, out = (
        run(tmp_path, "--method", method, "--random-classes", *extra)
        if method != "smoothed"
        else run(tmp_path, "--method", method, *extra)
    )
    assert rc == 0 and (out / "grid.png").is_file()


def test_bad_input_gets_a_clear_error(tmp_path, capsys):
    rc, _ = run(tmp_path, "--dataset", str(tmp_path / "missing.npz"))
    assert rc == 2 and "missing.npz" in capsys.readouterr().err
    rc, _ = run(tmp_path, "--method", "wiener", "--k", "3")
    assert rc == 2 and "--k does not apply to --method wiener" in capsys.readouterr().err
    rc, _ = run(tmp_path, "--class-label", "11")
    assert rc == 2 and "class" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sample", "--method", "nope"])


def test_methods_lists_every_method(capsys):
    from analytic_diffusion.denoisers import DENOISERS

    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    assert all(name in text for name in DENOISERS)


def test_info_reports_the_installation_and_checks_the_kernel(capsys, monkeypatch):
    from analytic_diffusion.ops import cpu_backend

    monkeypatch.delenv("AD_CPU_ISA", raising=False)
    assert main(["info", "--check"]) == 0
    out = capsys.readouterr().out
    isas = cpu_backend.runnable_isas()
    assert f"{', '.join(isas)}; in use: {isas[-1]}" in out
    assert "checksums match" in out and "matches the float64 reference" in out and "problem:" not in out
    monkeypatch.setenv("AD_CPU_ISA", "base")
    assert main(["info"]) == 0 and "in use: base" in capsys.readouterr().out
    monkeypatch.setenv("AD_CPU_ISA", "sse9")
    assert main(["info"]) == 2
    assert "AD_CPU_ISA: expected one of base, avx2, avx512" in capsys.readouterr().err


def test_info_check_fails_on_a_broken_install(capsys, monkeypatch):
    from analytic_diffusion.data import embedded

    monkeypatch.setattr(embedded, "_verified", False)
    monkeypatch.setattr(embedded, "IMAGES_FILE", "no-such-file.gz")
    assert main(["info", "--check"]) == 1
    assert "problem:" in capsys.readouterr().out
