"""Agreement metrics against hand-computed values, and the comparison drivers on a denoiser vs itself."""

import json
import math

import pytest
import torch

from analytic_diffusion.analysis.agreement import single_step, trajectories
from analytic_diffusion.data import Dataset
from analytic_diffusion.denoisers import make_denoiser
from analytic_diffusion.metrics import (
    mann_whitney_u,
    mse,
    nearest_train_distance,
    novelty,
    pearson_r,
    r2,
    score_cosine,
    to_jsonable,
)
from analytic_diffusion.sampling.generate import sample


def img(*rows):
    """Rows of values -> (B, 1, 1, D) images."""
    return torch.tensor(rows, dtype=torch.float64)[:, None, None, :]


# ------------------------------------------------------------------------------------------- per-sample metrics
def test_mse_per_sample():
    out = mse(img([1, 2], [3, 4]), torch.zeros(2, 1, 1, 2))
    assert out.tolist() == [2.5, 12.5] and out.dtype == torch.float64


def test_r2_unbiased_reference_variance():
    # ref = [0, 2, 4, 6]: mean 3, unbiased variance 20/3; Σ(pred − ref)² = 1 -> r² = 1 − 1 / (4 · 20/3) = 0.9625
    out = r2(img([1, 2, 4, 6]), img([0, 2, 4, 6]))
    assert out.item() == pytest.approx(0.9625, abs=1e-15)
    # asymmetric: the variance comes from ref (pred = [0,2,4,6] has var 20/3, [1,2,4,6] has 59/12)
    assert r2(img([0, 2, 4, 6]), img([1, 2, 4, 6])).item() == pytest.approx(1 - 1 / (4 * 59 / 12))


def test_r2_zero_variance_is_replaced_by_one():
    # constant reference: Var = 0 -> 1, so r² = 1 − Σ(pred − ref)² / D = 1 − 4/4 = 0
    assert r2(img([2, 2, 2, 4]), img([2, 2, 2, 2])).item() == 0.0
    assert r2(img([2, 2, 2, 2]), img([2, 2, 2, 2])).item() == 1.0
    out = r2(img([2, 2, 2, 4], [1, 2, 4, 6]), img([2, 2, 2, 2], [0, 2, 4, 6]))  # per sample
    assert out.tolist() == pytest.approx([0.0, 0.9625])


def test_pearson_r_hand_value_and_invariances(rng):
    # centred a = [-1, 0, 1], b = [-1, 1, 0]: dot 1, norms √2 -> 0.5
    assert pearson_r(img([1, 2, 3]), img([1, 3, 2])).item() == pytest.approx(0.5, abs=1e-15)
    a = torch.randn(5, 1, 4, 4, generator=rng, dtype=torch.float64)
    b = torch.randn(5, 1, 4, 4, generator=rng, dtype=torch.float64)
    r = pearson_r(a, b)
    scale = torch.rand(5, 1, 1, 1, generator=rng, dtype=torch.float64) * 3 + 0.1
    shift = torch.randn(5, 1, 1, 1, generator=rng, dtype=torch.float64)
    torch.testing.assert_close(pearson_r(a * scale + shift, b), r)  # affine invariance, per sample
    torch.testing.assert_close(pearson_r(a, b * 2 - 7), r)
    torch.testing.assert_close(pearson_r(-a, b), -r)  # sign flips r (not squared)
    torch.testing.assert_close(pearson_r(a, 3 * a + 1), torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(pearson_r(a, -a), -torch.ones(5, dtype=torch.float64))
    # against the textbook formula
    fa, fb = a.reshape(5, -1), b.reshape(5, -1)
    ref = torch.stack([torch.corrcoef(torch.stack([fa[i], fb[i]]))[0, 1] for i in range(5)])
    torch.testing.assert_close(r, ref)
    assert pearson_r(img([1, 1, 1]), img([1, 2, 3])).item() == 0.0  # constant image


def test_score_cosine():
    out = score_cosine(img([1, 0], [1, 2], [0, 0]), img([1, 1], [-2, -4], [1, 0]))
    assert out.tolist() == pytest.approx([1 / math.sqrt(2), -1.0, 0.0])


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shapes differ"):
        mse(torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 3))


# ------------------------------------------------------------------------------------------- Mann–Whitney U
def test_mann_whitney_u_hand_example_with_ties():
    # combined 1, 2, 2, 2, 3, 4, 5: mid-rank of the three 2s is 3; R_a = 1 + 3 + 3 + 7 = 14, U_a = 14 − 10 = 4
    # (pairs a > b: 0 + ½ + ½ + 3 = 4). Var = 4·3/12 · (8 − (3³ − 3)/(7·6)) = 8 − 4/7; z = (4 − 6)/√Var.
    out = mann_whitney_u([1, 2, 2, 5], [2, 3, 4])
    assert out["U"] == 4.0 and out["U_b"] == 8.0
    assert out["z"] == pytest.approx(-2 / math.sqrt(8 - 4 / 7), abs=1e-12)
    assert out["auc"] == pytest.approx(4 / 12)
    assert out["p_value"] == pytest.approx(math.erfc(abs(out["z"]) / math.sqrt(2)))


def test_mann_whitney_u_matches_pair_count(rng):
    a = torch.randint(0, 6, (23,), generator=rng).double()
    b = torch.randint(0, 6, (17,), generator=rng).double()
    pairs = (a[:, None] > b[None, :]).double().sum() + 0.5 * (a[:, None] == b[None, :]).double().sum()
    out = mann_whitney_u(a, b)
    assert out["U"] == pytest.approx(float(pairs))
    assert mann_whitney_u(b, a)["z"] == pytest.approx(-out["z"])
    assert mann_whitney_u([1.0, 1.0], [1.0])["z"] == 0.0  # all tied


@pytest.mark.parametrize(
    "m, n, levels",
    [(1, 1, 0), (2, 1, 0), (7, 5, 0), (40, 33, 0), (300, 211, 0), (9, 12, 3), (50, 61, 6), (400, 350, 20), (3, 3, 1)],
)
def test_mann_whitney_u_matches_scipy(m, n, levels, rng):
    """The hand-written U against scipy.stats.mannwhitneyu (the test extra): U of the first sample, and the
    two-sided p of the tie-corrected normal approximation without continuity correction (ours). Continuous
    samples (levels 0) and integer samples with many ties (levels > 0; one level: every value tied)."""
    from scipy.stats import mannwhitneyu

    def draw(k, shift):
        if levels == 0:
            return torch.randn(k, generator=rng, dtype=torch.float64) + shift
        return torch.randint(0, levels, (k,), generator=rng).double()

    a, b = draw(m, 0.3), draw(n, 0.0)
    ours = mann_whitney_u(a, b)
    ref = mannwhitneyu(a.numpy(), b.numpy(), alternative="two-sided", use_continuity=False, method="asymptotic")
    assert ours["U"] == pytest.approx(float(ref.statistic), rel=1e-12, abs=1e-12)
    assert ours["U_b"] == pytest.approx(m * n - float(ref.statistic), rel=1e-12, abs=1e-12)
    if math.isnan(ref.pvalue):  # scipy: no variance when every value is tied; ours reports z = 0, p = 1
        assert levels == 1 and ours["z"] == 0.0 and ours["p_value"] == 1.0
    else:
        assert ours["p_value"] == pytest.approx(float(ref.pvalue), rel=1e-9, abs=1e-15)
    # scipy's statistic is U of its first argument whichever way round: swapping the samples mirrors U and z.
    swapped = mann_whitney_u(b, a)
    ref_swapped = mannwhitneyu(b.numpy(), a.numpy(), alternative="two-sided", use_continuity=False, method="asymptotic")
    assert swapped["U"] == pytest.approx(float(ref_swapped.statistic), rel=1e-12, abs=1e-12)
    assert swapped["z"] == pytest.approx(-ours["z"], abs=1e-12)


def test_novelty_distances_are_exact(rng):
    train = torch.rand(30, 1, 4, 4, generator=rng) * 2 - 1
    ds = Dataset.from_array(train)
    q = torch.rand(7, 1, 4, 4, generator=rng) * 2 - 1
    d = nearest_train_distance(q, ds)
    ref = torch.cdist(q.reshape(7, -1).double(), train.reshape(30, -1).double()).min(1).values
    torch.testing.assert_close(d, ref)
    out = novelty(train[:5].clone(), ds, q)  # copies of training images: distance 0, far below the test set
    assert out["samples"]["max"] == 0.0 and out["memorization"]["memorization_ratio"] == 1.0
    assert out["mann_whitney"]["U"] == 0.0 and out["mann_whitney"]["z"] < 0


# ------------------------------------------------------------------------------------------- drivers
@pytest.fixture
def tiny(rng):
    x = torch.rand(40, 1, 6, 6, generator=rng) * 2 - 1
    return Dataset.from_array(x)


def test_single_step_hand_case_and_self_agreement(tiny):
    x0 = tiny.images_float()[:5]
    sigmas = [2.0, 0.3]
    identity = lambda x, s, **kw: x  # noqa: E731
    zero = lambda x, s, **kw: torch.zeros_like(x)  # noqa: E731
    out = single_step({"zero": zero, "same": identity}, identity, x0, sigmas, seed=7)
    g = torch.Generator().manual_seed(7)
    for i, s in enumerate(sigmas):
        x = x0.double() + s * torch.randn(x0.shape, generator=g).double()
        x32 = x.float().double()  # what the models saw
        assert out["methods"]["zero"]["mse"][i].item() == pytest.approx(x32.pow(2).mean().item(), rel=1e-12)
    assert out["methods"]["zero"]["score_cosine_per_sample"].shape == (2, 5)
    assert torch.all(out["methods"]["same"]["mse"] == 0) and torch.all(out["methods"]["same"]["r2"] == 1)
    wiener = make_denoiser("wiener", tiny)
    out = single_step({"w": wiener}, wiener, x0, [5.0, 0.5, 0.05])
    m = out["methods"]["w"]
    assert torch.all(m["mse"] == 0) and torch.all(m["r2"] == 1)
    torch.testing.assert_close(m["score_cosine"], torch.ones(3, dtype=torch.float64))
    json.dumps(to_jsonable(out))


def test_trajectories_self_and_other(tiny):
    wiener = make_denoiser("wiener", tiny)
    optimal = make_denoiser("optimal", tiny)
    out = trajectories(
        {"self": wiener, "optimal": optimal}, wiener, steps=4, sampler="ddim", schedule="kamb-cosine", seeds=[3, 0, 1]
    )
    assert out["seeds"] == [3, 0, 1] and out["sigmas"].shape == (4,)
    assert bool((out["sigmas"][1:] < out["sigmas"][:-1]).all())
    s = out["methods"]["self"]
    for key in ("trajectory", "single"):
        assert torch.all(s[key]["mse"] == 0) and torch.all(s[key]["r2"] == 1)
    torch.testing.assert_close(s["final"]["pearson_r"], torch.ones(3, dtype=torch.float64))
    assert s["final"]["pearson_r_median"] == pytest.approx(1.0)
    o = out["methods"]["optimal"]
    assert o["trajectory"]["r2"].shape == (4,) and float(o["trajectory"]["mse"].max()) > 0
    assert float(o["final"]["pearson_r"].min()) < 1
    # non-consecutive seeds give the same sample per seed as sample() does
    ref = sample(wiener, 1, steps=4, sampler="ddim", schedule="kamb-cosine", seed=3, progress=False).samples
    torch.testing.assert_close(out["reference"]["samples"][:1], ref)
    text = json.dumps(to_jsonable(out, skip=("samples",)))
    assert "samples" not in text
    with pytest.raises(ValueError, match="duplicate"):
        trajectories({"a": wiener}, wiener, steps=2, seeds=[1, 1])
    with pytest.raises(ValueError, match="give n"):
        trajectories({"a": wiener}, wiener, steps=2, seeds=0)


def test_to_jsonable_nan():
    assert to_jsonable({"a": torch.tensor([1.0, float("nan")]), "b": float("inf")}) == {"a": [1.0, None], "b": None}
