"""Training dynamics of memorisation (analytic_diffusion.analysis.dynamics): tiny end-to-end runs, onset logic, CLI, errors."""

import json
import math

import pytest
import torch

from analytic_diffusion.analysis.dynamics import memorization_onset, training_dynamics
from analytic_diffusion.cli import main
from analytic_diffusion.data import Dataset

torch.set_num_threads(1)

TINY = dict(
    steps=4,
    checkpoint_every=2,
    n_samples=4,
    sample_steps=2,
    n_probe=2,
    progress=False,
    train_kwargs=dict(channels=8, blocks=1, batch_size=4),
)


def random_images(n=12, side=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Dataset.from_array(torch.rand(n, 1, side, side, generator=g) * 2 - 1)


# ----------------------------------------------------------------------------------------- onset logic
def test_onset_is_the_first_step_at_or_above_the_threshold():
    steps = [10, 20, 30, 40]
    assert memorization_onset(steps, [0.0, 0.25, 0.5, 1.0]) == 30  # >= counts
    assert memorization_onset(steps, [0.0, 0.75, 0.25, 1.0]) == 20  # first crossing, even if it dips after
    assert memorization_onset(steps, [0.0, 0.1, 0.49, 0.4]) is None
    assert memorization_onset(steps, [float("nan"), 0.2, 0.6, 0.9]) == 30  # NaN never counts
    assert memorization_onset(steps, [0.0, 0.2, 0.3, 0.4], threshold=0.25) == 30
    assert memorization_onset([], []) is None


def test_onset_rejects_bad_series():
    with pytest.raises(ValueError, match="2 steps for 3 ratios"):
        memorization_onset([1, 2], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="strictly increasing"):
        memorization_onset([2, 1], [0.1, 0.2])


# ----------------------------------------------------------------------------------------- end to end
def test_tiny_run_writes_metrics_and_plots(tmp_path):
    ds = random_images()
    res = training_dynamics(ds, (8, 4), out_dir=tmp_path, **TINY)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(res))  # the returned dict is what was written
    assert res["config"]["sizes"] == [4, 8]
    assert set(res["sizes"]) == {"4", "8"} and set(res["onset"]) == {"4", "8"}
    # 12 images, largest subset 8: the 2 probe images are held out (outside every subset).
    assert res["probe"]["kind"] == "heldout" and res["probe"]["n"] == 2
    assert res["probe"]["sigmas"] == [0.5, 1.0, 2.0]
    for key, entry in res["sizes"].items():
        assert entry["n"] == int(key) and entry["steps"] == [2, 4]
        rows = entry["checkpoints"]
        assert [r["step"] for r in rows] == [2, 4]
        for r in rows:
            assert 0.0 <= r["memorization_ratio"] <= 1.0
            assert r["nn_distance_median"] > 0 and 0 < r["nn_ratio_median"] <= 1
            assert len(r["agreement"]["r2"]) == len(r["agreement"]["mse"]) == 3
            assert all(math.isfinite(v) for v in r["agreement"]["r2"] + r["agreement"]["mse"] + [r["loss"]])
            assert r["r2_mean"] == pytest.approx(sum(r["agreement"]["r2"]) / 3)
        assert entry["onset_step"] == memorization_onset([2, 4], [r["memorization_ratio"] for r in rows])
        assert entry["onset_step"] == res["onset"][key]
        assert entry["peak_memorization_ratio"] == max(r["memorization_ratio"] for r in rows)
        for f in entry["checkpoint_files"]:
            assert (tmp_path / f).is_file()
    from PIL import Image

    for name in ("memorization_vs_step.png", "agreement_vs_step.png", "peak_ratio_vs_size.png"):
        with Image.open(tmp_path / name) as im:
            assert im.format == "PNG" and im.size == (960, 600), name
            assert len(im.convert("RGB").getcolors(1 << 20)) > 20, name  # drawn, not blank
    # Same seeds, same numbers.
    again = training_dynamics(ds, (4, 8), out_dir=tmp_path / "again", **TINY)
    assert again["sizes"]["4"]["checkpoints"] == res["sizes"]["4"]["checkpoints"]


def test_copying_sampler_gives_an_onset_at_the_first_checkpoint(tmp_path, monkeypatch):
    """With samples that are training images the ratio is 1, so the onset is the first checkpoint; the onset
    plot is written. With the whole dataset used for training, the probe falls back to training images."""
    import analytic_diffusion.sampling.generate as sampling

    ds = random_images(n=8)
    current = {}
    real_subset = Dataset.subset

    def remember(self, n, **kw):
        sub = real_subset(self, n, **kw)
        current["x"] = sub.images_float()
        return sub

    def copies(den, n, **kw):
        x = current["x"]
        return sampling.SampleResult(x[torch.arange(n) % x.shape[0]], list(range(n)), torch.zeros(1))

    monkeypatch.setattr(Dataset, "subset", remember)
    monkeypatch.setattr(sampling, "sample", copies)
    res = training_dynamics(ds, (4, 8), out_dir=tmp_path, keep_checkpoints=False, **TINY)
    assert res["onset"] == {"4": 2, "8": 2}
    assert all(r["memorization_ratio"] == 1.0 for e in res["sizes"].values() for r in e["checkpoints"])
    assert res["plots"]["onset_vs_size"] == "onset_vs_size.png" and (tmp_path / "onset_vs_size.png").is_file()
    assert res["probe"]["kind"] == "train"
    assert not list(tmp_path.glob("size_*/*.pt"))  # deleted once evaluated


def test_cli_end_to_end(tmp_path, capsys):
    out = tmp_path / "dyn"
    rc = main(
        [
            "dynamics",
            "--dataset",
            "mnist",
            "--resolution",
            "8",
            "--sizes",
            "4,8",
            "--steps",
            "4",
            "--checkpoint-every",
            "2",
            "--samples",
            "4",
            "--sample-steps",
            "2",
            "--channels",
            "8",
            "--blocks",
            "1",
            "--batch-size",
            "4",
            "--n-probe",
            "2",
            "--threads",
            "1",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["sizes"] == [4, 8] and m["config"]["train_kwargs"]["channels"] == 8
    assert m["config"]["n_samples"] == 4 and m["probe"]["kind"] == "heldout"
    assert [r["step"] for r in m["sizes"]["8"]["checkpoints"]] == [2, 4]
    assert (out / "memorization_vs_step.png").is_file() and (out / "size_8" / "net.pt").is_file()
    assert "N =      8" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize(
    "sizes, kw, match",
    [
        ((), {}, "at least one"),
        ((4, 13), {}, "13 is larger than the dataset"),
        ((1,), {}, "integer >= 2"),
        ((4, 4), {}, "duplicate"),
        ((4,), {"checkpoint_every": 5}, r"checkpoint_every \(5\) must be <= steps \(4\)"),
        ((4,), {"steps": 0}, "steps must be"),
        ((4,), {"n_samples": 0}, "n_samples must be"),
        ((4,), {"train_kwargs": {"seed": 1}}, "set by training_dynamics"),
        ((12,), {"probe": "heldout"}, "no image is left"),
        ((4,), {"arch": "mlp"}, "arch must be"),
        ((4,), {"sigmas": (0.0,)}, "sigmas"),
    ],
)
def test_bad_arguments_raise_clear_errors(tmp_path, sizes, kw, match):
    args = {**TINY, **kw}
    with pytest.raises(ValueError, match=match):
        training_dynamics(random_images(), sizes, out_dir=tmp_path, **args)
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--sizes", ""], "--sizes: give at least one value"),
        (["--sizes", "4,x"], "--sizes: expected"),
        (["--sizes", "4", "--checkpoint-every", "9"], "checkpoint_every"),
        (["--sizes", "20000"], "larger than the dataset"),
    ],
)
def test_cli_bad_arguments(tmp_path, capsys, argv, match):
    rc = main(["dynamics", "--dataset", "mnist", "--steps", "4", *argv, "--out", str(tmp_path / "x"), "--no-progress"])
    assert rc == 2
    assert match in capsys.readouterr().err
