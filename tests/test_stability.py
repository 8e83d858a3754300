"""Training-set stability: disjoint halves, a tiny end-to-end run, the CLI."""

import json

import pytest
import torch

from analytic_diffusion.analysis import disjoint_halves, training_set_stability
from analytic_diffusion.cli import main
from analytic_diffusion.data import Dataset

TINY = dict(steps=3, n_samples=2, sample_steps=3, train_kwargs=dict(channels=8, blocks=1, batch_size=4))


def random_images(rng, n=24, side=8):
    return Dataset.from_array((torch.rand(n, 1, side, side, generator=rng) * 255).to(torch.uint8), torch.arange(n) % 3)


def test_halves_are_disjoint_and_nested(rng):
    ds = random_images(rng)
    a, b = disjoint_halves(ds, 5, seed=3)
    rows = lambda d: {bytes(r.numpy()) for r in d.images.reshape(d.num_stored, -1)}  # noqa: E731
    assert a.num_stored == b.num_stored == 5 and not rows(a) & rows(b)
    a2, b2 = disjoint_halves(ds, 10, seed=3)
    assert a2.images.shape[0] == 10 and (rows(a) | rows(b)) <= (rows(a2) | rows(b2))
    assert a.labels is not None and a.labels.shape == (5,)
    with pytest.raises(ValueError, match="two disjoint halves"):
        disjoint_halves(ds, 13)
    with pytest.raises(ValueError, match="n: expected"):
        disjoint_halves(ds, 0)


def test_a_tiny_stability_run_writes_its_report(rng, tmp_path):
    ds = random_images(rng)
    res = training_set_stability(ds, (4, 8), out_dir=tmp_path, **TINY)
    assert set(res["sizes"]) == {"4", "8"}
    for entry in res["sizes"].values():
        for kind in ("network", "optimal"):
            assert len(entry[kind]["pearson_r"]) == 2 and all(-1 <= r <= 1 for r in entry[kind]["pearson_r"])
            assert entry[kind]["distance_median"] >= 0
        # Optimal denoisers of disjoint halves copy different images: their samples are never the same.
        assert entry["optimal"]["distance_median"] > 0.1
        assert 0 <= entry["memorization"]["A"] <= 1
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["sizes"]["8"]["network"]["pearson_r"] == res["sizes"]["8"]["network"]["pearson_r"]
    for name in ("stability.png", "samples_4.png", "samples_8.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_stability_checks_its_arguments(rng):
    ds = random_images(rng)
    with pytest.raises(ValueError, match="largest size"):
        training_set_stability(ds, (20,), **TINY)
    with pytest.raises(ValueError, match="train_kwargs"):
        training_set_stability(ds, (4,), **{**TINY, "train_kwargs": {"arch": "unet"}})


def test_stability_cli(tmp_path, capsys):
    rc = main(
        [
            "stability",
            "--dataset",
            "mnist",
            "--sizes",
            "4",
            "--steps",
            "2",
            "--samples",
            "2",
            "--sample-steps",
            "2",
            "--channels",
            "4",
            "--blocks",
            "1",
            "--batch-size",
            "4",
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert rc == 0 and "networks A vs B median r" in capsys.readouterr().out
    assert json.loads((tmp_path / "metrics.json").read_text())["config"]["sizes"] == [4]
    assert main(["stability", "--sizes", "4,x", "--out", str(tmp_path)]) == 2
