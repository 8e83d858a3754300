"""viz.plots: matplotlib (Agg) figures written as PNGs of the requested size, that show what they were given."""

import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from analytic_diffusion.viz.images import tile
from analytic_diffusion.viz.plots import calibration_plot, labelled_rows, line_plot, loss_plot

TAB_BLUE = np.array([31, 119, 180])  # matplotlib's first colour: the first series is drawn in it


def png(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB")).astype(np.int16)


def ink(a: np.ndarray) -> float:
    """Share of pixels that are not white."""
    return float((a < 250).any(-1).mean())


def near(a: np.ndarray, colour, tol=40) -> int:
    return int((np.abs(a - colour).sum(-1) < tol).sum())


@pytest.fixture
def nrng(rng):
    """A numpy generator seeded from the session's per-test torch generator (replayable with AD_TEST_SEED)."""
    import torch

    return np.random.default_rng(int(torch.randint(2**31, (1,), generator=rng)))


@pytest.fixture
def sig(nrng):
    return np.sort(np.exp(nrng.uniform(np.log(2e-3), np.log(80.0), 12)))[::-1]


def test_line_plot_png_size_and_drawn_series(tmp_path, nrng, sig):
    y = nrng.uniform(0, 1, sig.size)
    line_plot(tmp_path / "a.png", sig, {"one": y}, xlabel="σ", ylabel="r²", title="t")
    a = png(tmp_path / "a.png")
    assert a.shape == (600, 960, 3) and 0.02 < ink(a) < 0.6
    assert near(a, TAB_BLUE) > 200  # the line and markers of the series
    line_plot(tmp_path / "b.png", sig, {"one": y[::-1]}, xlabel="σ", ylabel="r²", title="t")
    b = png(tmp_path / "b.png")
    assert a.shape == b.shape and (np.abs(a - b).sum(-1) > 0).mean() > 0.002  # other data, other picture


def test_line_plot_gaps_and_clipping(tmp_path, nrng, sig):
    y = nrng.uniform(0.1, 1, sig.size)
    y_gap = y.copy().tolist()
    y_gap[3], y_gap[4], y_gap[7] = float("nan"), float("inf"), None
    # log axes drop non-positive values; values beyond ylim are drawn on the frame's edge: no error either way
    line_plot(tmp_path / "g.png", sig, {"gappy": y_gap, "neg": -y}, logy=True, ylim=(0.05, 0.5))
    line_plot(tmp_path / "full.png", sig, {"gappy": y.tolist(), "neg": -y}, logy=True, ylim=(0.05, 0.5))
    g, full = png(tmp_path / "g.png"), png(tmp_path / "full.png")
    assert near(g, TAB_BLUE) < near(full, TAB_BLUE)  # the gap removes part of the line
    line_plot(
        tmp_path / "lin.png", np.arange(5), {"x": [0, 1, 2, 3, 40]}, logx=False, ylim=(None, 3), size=(500, 300), dpi=80
    )
    lin = png(tmp_path / "lin.png")
    assert lin.shape == (300, 500, 3) and ink(lin) > 0.02
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a degenerate ylim (every r² is 1) is widened, not a singular axis
        line_plot(tmp_path / "flat.png", sig, {"r2": [1.0] * sig.size}, ylim=(1.0, 1.0))
    assert near(png(tmp_path / "flat.png"), TAB_BLUE) > 200


def test_line_plot_refuses_nothing_to_draw(tmp_path, sig):
    p = tmp_path / "x.png"
    with pytest.raises(ValueError, match="series: expected a non-empty dict"):
        line_plot(p, sig, {})
    with pytest.raises(ValueError, match="x: expected at least one value"):
        line_plot(p, [], {"a": []})
    with pytest.raises(ValueError, match=r"series 'a': has 2 values for 12 x values"):
        line_plot(p, sig, {"a": [1.0, 2.0]})
    with pytest.raises(ValueError, match="no finite values"):
        line_plot(p, sig, {"a": [float("nan")] * sig.size})
    with pytest.raises(ValueError, match="no finite values"):
        line_plot(p, sig, {"a": [-1.0] * sig.size}, logy=True)
    with pytest.raises(ValueError, match="ylim: a log y axis"):
        line_plot(p, sig, {"a": [1.0] * sig.size}, logy=True, ylim=(0, 1))
    with pytest.raises(ValueError, match="ylim: expected lo <= hi"):
        line_plot(p, sig, {"a": [1.0] * sig.size}, ylim=(1, 0))
    with pytest.raises(TypeError, match=r"ylim: expected \(lo, hi\)"):
        line_plot(p, sig, {"a": [1.0] * sig.size}, ylim=("low", 1))
    with pytest.raises(TypeError, match="series 'a': expected a sequence of numbers"):
        line_plot(p, sig, {"a": ["x"] * sig.size})
    with pytest.raises(ValueError, match="size: expected at least"):
        line_plot(p, sig, {"a": [1.0] * sig.size}, size=(10, 10))
    assert not p.exists()


def test_plots_leave_pyplot_and_the_backend_alone(tmp_path):
    import matplotlib

    backend = dict.__getitem__(matplotlib.rcParams, "backend")  # raw value: get_backend() may resolve it
    had_pyplot = "matplotlib.pyplot" in sys.modules
    line_plot(tmp_path / "p.png", [1, 2, 3], {"a": [1, 2, 3]}, logx=False)
    assert dict.__getitem__(matplotlib.rcParams, "backend") == backend
    assert ("matplotlib.pyplot" in sys.modules) == had_pyplot  # no pyplot state (nothing in this suite loads it)
    assert png(tmp_path / "p.png").shape == (600, 960, 3)


def test_loss_plot(tmp_path, nrng):
    losses = np.exp(-np.linspace(0, 3, 200)) * nrng.uniform(0.8, 1.2, 200)
    last = loss_plot(tmp_path / "l.png", losses.tolist())
    a = png(tmp_path / "l.png")
    assert a.shape == (540, 960, 3) and near(a, TAB_BLUE) > 300
    assert last == pytest.approx(losses[-4:].mean())  # window = 200 // 50
    bad = losses.copy()
    bad[50:], bad[10] = np.nan, -1.0  # diverged at step 51; a non-positive value is a gap too
    assert loss_plot(tmp_path / "d.png", bad) is None
    assert not np.array_equal(png(tmp_path / "d.png"), a)
    assert loss_plot(tmp_path / "n.png", [float("nan")] * 3) is None  # nothing drawable: a note, no error
    assert ink(png(tmp_path / "n.png")) > 0.005
    with pytest.raises(ValueError, match="losses: expected at least one value"):
        loss_plot(tmp_path / "e.png", [])


def _calib(nrng, steps=7, sizes=(3, 5, 7, 9)):
    sig = np.geomspace(80, 0.01, steps)
    vals = nrng.uniform(0, 1, (steps, len(sizes)))
    chosen = [sizes[int(j)] for j in vals.argmax(1)]
    picks = [[k, k, sizes[0]] for k in chosen]
    return sig, list(sizes), chosen, picks, vals


def test_calibration_plot(tmp_path, nrng):
    sig, sizes, chosen, picks, vals = _calib(nrng)
    calibration_plot(tmp_path / "a.png", sig, sizes, chosen, picks, vals, metric="cosine", title="els vs net")
    a = png(tmp_path / "a.png")
    assert a.shape == (500, 1200, 3) and ink(a) > 0.1
    vals2 = vals.copy()
    vals2[2] = np.nan  # a row without finite values is left blank, not an error
    calibration_plot(tmp_path / "b.png", sig, sizes, chosen, picks, vals2, metric="cosine", title="els vs net")
    assert (np.abs(png(tmp_path / "b.png") - a).sum(-1) > 0).mean() > 0.005
    with pytest.raises(ValueError, match=r"values: expected shape \(7, 4\)"):
        calibration_plot(tmp_path / "c.png", sig, sizes, chosen, picks, vals[:, :3])
    with pytest.raises(ValueError, match="not among candidate_sizes"):
        calibration_plot(tmp_path / "c.png", sig, sizes, [11] * 7, picks, vals)
    with pytest.raises(ValueError, match="one entry per σ"):
        calibration_plot(tmp_path / "c.png", sig, sizes, chosen[:3], picks, vals)
    with pytest.raises(ValueError, match="sigmas: expected finite values > 0"):
        calibration_plot(tmp_path / "c.png", -sig, sizes, chosen, picks, vals)


def test_labelled_rows_places_tiles_pixel_for_pixel(tmp_path, nrng):
    import torch

    x = torch.from_numpy(nrng.uniform(-1, 1, (5, 3, 16, 16))).float()
    strips = [("network", np.asarray(tile(x, 5))), ("λ = 0.5\nmem 20%\nNN 1.23", np.asarray(tile(x[:3], 3)))]
    w, h = labelled_rows(tmp_path / "r.png", strips)
    a = png(tmp_path / "r.png")
    assert a.shape == (h, w, 3)
    s0, s1 = strips[0][1], strips[1][1]
    label_w = w - s0.shape[1]
    assert h == s0.shape[0] + s1.shape[0] + 4 and label_w > 30
    np.testing.assert_array_equal(a[: s0.shape[0], label_w:], s0)
    np.testing.assert_array_equal(a[s0.shape[0] + 4 :, label_w : label_w + s1.shape[1]], s1)
    assert ink(a[:, :label_w]) > 0.01  # the labels
    with pytest.raises(ValueError, match="rows: expected at least one"):
        labelled_rows(tmp_path / "e.png", [])
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        labelled_rows(tmp_path / "e.png", [("a", np.zeros((4, 4), np.uint8))])
