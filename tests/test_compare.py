"""``analytic-diffusion compare`` end to end on a small MNIST subset, and its input errors."""

import json
import sys
import types

import numpy as np
import pytest
from PIL import Image

from analytic_diffusion.analysis.compare import split_methods_options
from analytic_diffusion.cli import main

FAST = [
    "--dataset",
    "mnist32",
    "--subset",
    "200",
    "--seeds",
    "2",
    "--steps",
    "4",
    "--n-single",
    "4",
    "--n-test",
    "32",
    "--no-progress",
]
FILES = (
    "metrics.json",
    "config.json",
    "summary.md",
    "samples.png",
    "samples.npz",
    "r2_vs_sigma.png",
    "mse_vs_sigma.png",
    "single_step_r2_vs_sigma.png",
    "single_step_mse_vs_sigma.png",
)


def test_compare_writes_a_report(tmp_path):
    out = tmp_path / "cmp"
    rc = main(["compare", "--network", "method:wiener", "--methods", "optimal,wiener", *FAST, "--out", str(out)])
    assert rc == 0
    for name in FILES:
        assert (out / name).is_file(), name
    m = json.loads((out / "metrics.json").read_text())
    assert len(m["sigmas"]) == 4 and m["config"]["seeds"] == [0, 1]
    w, o = m["methods"]["wiener"], m["methods"]["optimal"]
    # the reference compared with itself
    assert w["trajectory"]["mse"] == [0.0] * 4 and w["trajectory"]["r2"] == [1.0] * 4
    assert w["single"]["r2"] == [1.0] * 4 and w["single_step"]["r2"] == [1.0] * 4
    assert w["final"]["pearson_r"] == pytest.approx([1.0, 1.0]) and w["final"]["pearson_r_median"] == pytest.approx(1)
    assert o["final"]["pearson_r_median"] < 1 and len(o["single_step"]["score_cosine"]) == 4
    # memorisation and novelty: the optimum copies, the Gaussian model does not
    assert o["memorization"]["memorization_ratio"] == 1.0 and w["memorization"]["memorization_ratio"] == 0.0
    assert o["novelty"]["samples"]["max"] < 1e-4 and o["novelty"]["mann_whitney"]["z"] < 0
    assert o["novelty"]["test"]["n"] == 32
    assert m["network"]["memorization"]["memorization_ratio"] == 0.0
    assert m["best"]["pearson_r_median"] == "wiener"
    summary = (out / "summary.md").read_text()
    assert "| optimal |" in summary and "**wiener**" in summary
    z = np.load(out / "samples.npz")
    assert z["network"].shape == (2, 1, 32, 32) and z["method_optimal"].shape == (2, 1, 32, 32)
    np.testing.assert_array_equal(z["network"], z["method_wiener"])
    rows = np.asarray(Image.open(out / "samples.png").convert("RGB"))
    tile_h, tile_w = 2 + 64 + 2, 2 + 2 * (64 + 2)  # two 32-px samples zoomed ×2, 2-px padding
    assert rows.shape[0] == 3 * tile_h + 2 * 4  # network, optimal, wiener (4-px gaps)
    net_row, opt_row, wie_row = (rows[i * (tile_h + 4) : i * (tile_h + 4) + tile_h, -tile_w:] for i in range(3))
    np.testing.assert_array_equal(net_row, wie_row)  # the reference is method:wiener: the same samples
    assert (net_row != opt_row).any()
    assert (rows[:, :-tile_w] < 128).any()  # the labels
    for name in FILES:
        if name.endswith("_sigma.png"):
            with Image.open(out / name) as im:
                assert im.format == "PNG" and im.size == (960, 600), name
                assert len(im.convert("RGB").getcolors(1 << 20)) > 20, name  # drawn, not blank


def test_compare_loads_checkpoints_through_networks(tmp_path, monkeypatch):
    """A checkpoint goes through analytic_diffusion.networks.load_network (stubbed here by a Wiener model)."""
    from analytic_diffusion.data import load_dataset
    from analytic_diffusion.denoisers import make_denoiser

    calls = []

    def load_network(path, device="cpu", allow_pickle=False):
        calls.append((path, device, allow_pickle))
        return make_denoiser("wiener", load_dataset("mnist32", resolution=16).subset(200))

    monkeypatch.setitem(sys.modules, "analytic_diffusion.networks", types.SimpleNamespace(load_network=load_network))
    ckpt = tmp_path / "net.pt"
    ckpt.write_bytes(b"stub")
    out = tmp_path / "cmp"
    rc = main(
        ["compare", "--network", str(ckpt), "--methods", "wiener", *FAST, "--resolution", "16", "--out", str(out)]
    )
    assert rc == 0 and calls == [(str(ckpt), "cpu", False)]  # pickles only with --allow-pickle
    m = json.loads((out / "metrics.json").read_text())
    assert m["network"]["label"] == "net" and m["config"]["network"]["kind"] == "checkpoint"
    assert m["methods"]["wiener"]["trajectory"]["r2"] == [1.0] * 4
    assert (
        main(
            [
                "compare",
                "--network",
                str(ckpt),
                "--allow-pickle",
                "--methods",
                "wiener",
                *FAST,
                "--resolution",
                "16",
                "--out",
                str(tmp_path / "cmp2"),
            ]
        )
        == 0
    )
    assert calls[-1] == (str(ckpt), "cpu", True)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--network", "method:wiener", "--methods", "optimal,nope"], "unknown method"),
        (["--network", "method:nope", "--methods", "optimal"], "unknown method"),
        (["--network", "missing/ckpt.pt", "--methods", "optimal"], "does not exist"),
        (["--network", "method:wiener", "--methods", "optimal", "--seeds", "0"], "--seeds"),
        (["--network", "method:wiener", "--methods", "optimal", "--seeds", "x"], "--seeds"),
        (["--network", "method:wiener", "--methods", "optimal", "--seeds", "1,-2"], "--seeds"),
        (["--network", "method:wiener", "--methods", "optimal", "--seeds", "1,1"], "duplicate"),
        (["--network", "method:optimal", "--methods", "optimal", "--rank", "3"], "apply to none"),
    ],
)
def test_compare_input_errors(tmp_path, capsys, args, message):
    rc = main(["compare", *args, "--no-progress", "--out", str(tmp_path / "x")])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_method_options_go_to_the_methods_that_take_them():
    from analytic_diffusion.denoisers.patch_presets import load_patch_schedule

    sched = load_patch_schedule("kamb-mnist")
    opts = split_methods_options(
        ["optimal", "wiener", "bbels"], {"patch": sched, "rank": 5}, extra={"backend": "torch"}
    )
    assert opts["bbels"] == {"patch": sched, "backend": "torch"}
    assert opts["wiener"] == {"rank": 5}
    assert opts["optimal"] == {"backend": "torch"}


def test_patch_schedule_is_checked_against_the_grid(tmp_path, capsys):
    rc = main(
        [
            "compare",
            "--network",
            "method:wiener",
            "--methods",
            "optimal,bbels",
            "--patch-schedule",
            "kamb-mnist",
            "--schedule",
            "karras",
            "--steps",
            "4",
            "--subset",
            "50",
            "--no-progress",
            "--out",
            str(tmp_path / "x"),
        ]
    )
    assert rc == 2 and "grid" in capsys.readouterr().err
