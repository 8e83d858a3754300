"""Certified pruning of the global retrieval: the reported bounds hold against the exact float64 posterior."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import noisy_queries, posterior_bruteforce, uint8_bank

from analytic_diffusion.denoisers import make_denoiser
from analytic_diffusion.ops import KeyBank, certified_retrieval, softmax_retrieval


def _exact64(x, bank, sigma, labels=None, flips=False):
    if x.shape[0] * bank.n * bank.dim > 4_000_000:  # MNIST-sized: the float64 torch oracle (chunked GEMMs)
        return softmax_retrieval(
            x.double(), bank, sigma, query_labels=labels, flips=flips, backend="torch", dtype=torch.float64
        ).mean
    y = bank.rows(0, bank.n, torch.float64)
    s = torch.as_tensor(sigma, dtype=torch.float64).expand(x.shape[0])
    allowed = None if labels is None else bank.labels[None, :] == labels[:, None]
    if flips:
        c, h, w = bank.image_shape
        y = torch.cat([y, y.reshape(-1, c, h, w).flip(-1).reshape(bank.n, -1)])
        allowed = None if allowed is None else torch.cat([allowed, allowed], 1)
    return posterior_bruteforce(x, y, s, allowed=allowed)[0]


def _check(r, x, bank, sigma, tol, labels=None, flips=False):
    """The bound holds, in float32 too: it accounts for the working precision's rounding at that σ."""
    ref = _exact64(x, bank, sigma, labels, flips)
    err = (r.mean.double() - ref).norm(dim=1)
    assert bool((r.skipped_weight <= tol * (1 + 1e-6)).all()), r.skipped_weight
    assert bool((err <= r.error_bound).all()), (err, r.error_bound)
    assert bool(((r.scored_fraction > 0) & (r.scored_fraction <= 1)).all())
    return err


@settings(max_examples=16, deadline=None, derandomize=True)
@given(
    log_sigma=st.floats(-3.0, 3.0),
    tol=st.sampled_from([1e-1, 1e-3, 1e-6]),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    flips=st.booleans(),
    labelled=st.booleans(),
)
def test_bound_holds_for_sigma_1e3_to_1e3(log_sigma, tol, seed, dtype, flips, labelled):
    rng = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (400,), generator=rng) if labelled else None
    bank = uint8_bank(rng, 400, c=1, h=6, w=8, labels=labels)  # D = 48: both prefilter stages and a residual band
    sigma = 10.0**log_sigma
    x = noisy_queries(rng, bank, 5, min(sigma, 3.0))
    q_labels = torch.randint(0, 3, (5,), generator=rng) if labelled else None
    r = certified_retrieval(x, bank, sigma, tolerance=tol, dtype=dtype, query_labels=q_labels, flips=flips)
    assert r.mean.dtype == dtype
    _check(r, x, bank, sigma, tol, q_labels, flips)


def test_prunes_and_holds_on_real_mnist():
    from analytic_diffusion.data import load_dataset

    full = load_dataset("mnist").keys()
    bank = KeyBank(full.values[:2000], full.scale, full.shift, full.labels[:2000], full.image_shape)
    rng = torch.Generator().manual_seed(7)
    for sigma in (0.05, 0.5, 2.0):
        x = noisy_queries(rng, bank, 6, sigma)
        r = certified_retrieval(x, bank, sigma, tolerance=1e-4)
        err = _check(r, x, bank, sigma, 1e-4)
        if sigma <= 0.5:  # the posterior has concentrated: almost every image is skipped
            assert float(r.scored_fraction.max()) < 0.05
            assert float(err.max()) < 1e-4


def test_tolerance_zero_is_the_exact_scan_bitwise(rng):
    bank = uint8_bank(rng, 300, c=1, h=4, w=5)
    x = noisy_queries(rng, bank, 7, 0.3)
    for flips in (False, True):
        exact = softmax_retrieval(x, bank, 0.3, flips=flips)
        r = certified_retrieval(x, bank, 0.3, tolerance=0, flips=flips)
        assert torch.equal(r.mean, exact.mean)
        assert float(r.skipped_weight.abs().max()) == 0.0 and bool((r.scored_fraction == 1).all())
    from analytic_diffusion.data import load_array

    ds = load_array(bank.values.reshape(-1, 1, 4, 5))
    img = x.reshape(-1, 1, 4, 5)
    assert torch.equal(make_denoiser("optimal", ds, tolerance=0.0)(img, 0.3), make_denoiser("optimal", ds)(img, 0.3))


@pytest.mark.parametrize("bad", [-1e-3, float("nan"), 1.5, "x", True])
def test_bad_tolerance_is_refused(rng, bad):
    bank = uint8_bank(rng, 50)
    with pytest.raises(ValueError, match="tolerance"):
        certified_retrieval(torch.zeros(1, bank.dim), bank, 1.0, tolerance=bad)
    from analytic_diffusion.data import load_array

    with pytest.raises(ValueError, match="tolerance"):
        make_denoiser("optimal", load_array(bank.values.reshape(-1, 1, 3, 5)), tolerance=bad)


def test_certificates_add_across_shards(rng):
    bank = uint8_bank(rng, 600, c=1, h=5, w=6)
    x = noisy_queries(rng, bank, 4, 0.4)
    parts = [
        KeyBank(bank.values[a:b], bank.scale, bank.shift, image_shape=bank.image_shape)
        for a, b in ((0, 250), (250, 600))
    ]
    states = [certified_retrieval(x, p, 0.4, tolerance=1e-3, dtype=torch.float64, return_partial=True) for p in parts]
    cert = states[0].combine(states[1])
    mean = cert.state.mean()
    err = (mean - _exact64(x, bank, 0.4)).norm(dim=1)
    assert bool((cert.skipped_weight() <= 1e-3 * (1 + 1e-6)).all())
    assert bool((err <= cert.error_bound(mean)).all())
    assert int(cert.candidates[0]) == 600


def test_sampling_and_smoothed_report_the_certificate(tmp_path, capsys):
    from analytic_diffusion.cli import main

    args = [
        "sample",
        "--method",
        "optimal",
        "--dataset",
        "mnist",
        "--subset",
        "200",
        "--n",
        "2",
        "--steps",
        "2",
        "--no-progress",
        "--out",
        str(tmp_path / "run"),
    ]
    assert main(args + ["--tolerance", "1e-3"]) == 0
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 0 < saved["scored_fraction"] <= 1 and saved["certificate"]["tolerance"] == 1e-3
    assert math.isfinite(saved["certificate"]["error_bound_max"])
    assert json.loads((tmp_path / "run" / "config.json").read_text())["denoiser"]["tolerance"] == 1e-3
    bad = args[:-1] + [str(tmp_path / "bad")]  # a fresh folder: a used one is refused before the options
    assert main(bad + ["--tolerance", "-1"]) == 2 and "tolerance" in capsys.readouterr().err
    from analytic_diffusion.data import load_dataset

    ds = load_dataset("mnist").subset(200)
    d = make_denoiser("smoothed", ds, tolerance=1e-3, num_perturbations=2)
    x = torch.randn(3, *ds.image_shape) * 0.3
    p = d.posterior(x, 0.3)
    assert p.error_bound.shape == (3,) and bool((p.skipped_weight <= 1e-3 * (1 + 1e-6)).all())


def test_batch_size_changes_nothing(rng):
    """Each sample's result and certificate depend on that sample only (fixed-shape prefilter blocks)."""
    bank = uint8_bank(rng, 3000, c=1, h=6, w=8)
    x = torch.cat([noisy_queries(rng, bank, 5, 0.05), noisy_queries(rng, bank, 6, 3.0)])
    sigma = torch.tensor([0.05] * 5 + [3.0] * 6)
    whole = certified_retrieval(x, bank, sigma, tolerance=1e-4)
    for b in (0, 4, 7, 10):
        one = certified_retrieval(x[b : b + 1], bank, sigma[b : b + 1], tolerance=1e-4)
        assert torch.equal(one.mean[0], whole.mean[b]) and float(one.error_bound[0]) == float(whole.error_bound[b])


def test_optimal_draw_takes_the_tolerance(rng):
    from analytic_diffusion.data import load_array

    bank = uint8_bank(rng, 500, c=1, h=4, w=6)
    ds = load_array(bank.values.reshape(-1, 1, 4, 6))
    x = noisy_queries(rng, bank, 3, 0.05).reshape(-1, 1, 4, 6)
    pruned = make_denoiser("optimal", ds, tolerance=1e-3)
    assert torch.equal(make_denoiser("optimal-draw", ds, tolerance=1e-3, scale=0.0)(x, 0.05), pruned(x, 0.05))
    assert pruned.pruning_summary()["denoiser_calls"] == 1


def test_a_class_without_images_is_refused(rng):
    bank = uint8_bank(rng, 100, labels=torch.zeros(100, dtype=torch.long))
    with pytest.raises(ValueError, match="no allowed candidate"):
        certified_retrieval(torch.zeros(2, bank.dim), bank, 0.1, tolerance=1e-3, query_labels=torch.tensor([0, 1]))
