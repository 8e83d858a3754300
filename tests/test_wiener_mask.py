"""pca_locality's masks: the bounded float32 route (ops/wiener_mask.WienerMasks) gives the dense float64 rule's
booleans, and the studio rule (mask_rule="studio") matches an independent float64 re-implementation of the
studio's formula away from float32 rounding."""

import numpy as np
import pytest
import torch

from analytic_diffusion.data import Dataset
from analytic_diffusion.denoisers.pca_locality import PCALocality
from analytic_diffusion.ops.local_retrieval import coordinate_retrieval, locality_mask, wiener_filter_matrix
from analytic_diffusion.ops.wiener_mask import WienerMasks, studio_locality_mask

SIGMAS = (1e-3, 1e-2, 0.1, 1.0, 10.0, 1e3)
THETAS = (0.005, 0.05, 0.3)


def dense_rule(lam, U, sigma, theta):
    return locality_mask(wiener_filter_matrix(lam, U, sigma), theta)


def random_sets(rng):
    """White noise (flat spectrum), smoothed noise (spread spectrum: columns get dropped) and a set with
    constant pixels (zero pivots, rows left unnormalised, the max off the diagonal)."""
    white = torch.rand(150, 2, 4, 5, generator=rng) * 2 - 1
    smooth = torch.nn.functional.avg_pool2d(torch.rand(300, 1, 10, 10, generator=rng), 3, 1, 1) * 2 - 1
    const = torch.rand(30, 1, 8, 8, generator=rng) * 2 - 1
    const[:, :, 0, :] = -1.0
    const[:, 0, :, 0] = 0.25 + 1e-4 * torch.rand(30, 8, generator=rng)  # tiny but non-zero variance
    return [Dataset.from_array(a) for a in (white, smooth, const)]


def test_bounded_masks_equal_the_dense_rule_on_random_data(rng):
    forms = set()
    for ds in random_sets(rng):
        _, lam, U = ds.pca()
        masks = WienerMasks(lam, U)
        for sigma in SIGMAS:
            for theta in THETAS:
                assert torch.equal(masks(sigma, theta), dense_rule(lam, U, sigma, theta)), (
                    ds.image_shape,
                    sigma,
                    theta,
                )
                forms.add((masks.last_complement, masks.last_kept < ds.dim))
        assert torch.equal(masks(0.5, 0.0), torch.ones_like(masks(0.5, 0.1)))
        with pytest.raises(ValueError, match="threshold"):
            masks(0.5, float("nan"))
    assert {(False, False), (True, True), (False, True)} <= forms, forms  # both forms ran; columns dropped in each


def test_bounded_masks_equal_the_dense_rule_on_mnist(mnist2000):
    _, lam, U = mnist2000.pca()
    masks = WienerMasks(lam, U)
    redecided = 0
    for sigma, theta in [(s, t) for s in SIGMAS for t in (0.005, 0.05)]:
        assert torch.equal(masks(sigma, theta), dense_rule(lam, U, sigma, theta)), (sigma, theta)
        redecided += masks.last_band
    assert redecided > 0  # the float64 re-decision ran (entries the float32 value alone could not decide)


def test_denoiser_masks_and_output_unchanged(rng):
    ds = random_sets(rng)[1]
    den = PCALocality(ds, threshold=0.02, dtype=torch.float64)
    _, lam, U = ds.pca()
    x = ds.images_float()[:3].double() + 0.3 * torch.randn(3, *ds.image_shape, generator=rng, dtype=torch.float64)
    for sigma in (0.05, 0.7, 4.0):
        mask = den.mask_for(sigma)
        assert torch.equal(mask, dense_rule(lam, U, sigma, 0.02))
        ref = coordinate_retrieval(x, ds.keys(), sigma, dense_rule(lam, U, sigma, 0.02), dtype=torch.float64)
        assert torch.equal(den(x, sigma), ref)


# --------------------------------------------------------------------------- the studio's rule
def studio_reference(images: np.ndarray, sigma: float, theta: float):
    """The studio's formula in float64 numpy: unbiased covariance of the flattened images, its factors (the SVD
    of a PSD matrix is its eigendecomposition, Vh = Uᵀ), s = ᾱλ/(β̄+ᾱλ) with ᾱ = 1/(1+σ²), A = U diag(s) Vh,
    row n divided by A[n, n] (|.| < 1e-6 -> 1), binarised at θ·max|M|. Returns (mask, |M|, θ·max|M|)."""
    X = images.reshape(images.shape[0], -1).astype(np.float64)
    C = X - X.mean(0)
    S = C.T @ C / (X.shape[0] - 1)
    lam, u = np.linalg.eigh(S)
    lam = np.clip(lam, 0.0, None)
    abar = 1.0 / (1.0 + sigma**2)
    s = abar * lam / ((1.0 - abar) + abar * lam)
    A = (u * s) @ u.T
    d = np.diag(A).copy()
    d[np.abs(d) < 1e-6] = 1.0
    M = np.abs(A / d[:, None])
    return theta * M.max() <= M, M, theta * M.max()


def check_studio(ds, sigma, theta, rel_band, dtype=torch.float32):
    imgs = ds.images_float().numpy()
    ref, M, thr = studio_reference(imgs, sigma, theta)
    got = studio_locality_mask(ds.covariance(), ds.n, sigma, theta, dtype).numpy()
    clear = np.abs(M - thr) > rel_band * thr  # entries the float32 rounding cannot move across the threshold
    assert (got[clear] == ref[clear]).all(), (sigma, theta, int((got[clear] != ref[clear]).sum()))
    return int((got != ref).sum())


def test_studio_rule_matches_an_independent_float64_formula(rng):
    white, smooth, _ = random_sets(rng)
    for ds in (white, smooth):
        for sigma, theta in ((0.05, 0.02), (0.5, 0.2), (5.0, 0.02)):
            check_studio(ds, sigma, theta, 1e-3)


def test_studio_rule_uses_the_unbiased_covariance(rng):
    # with 4 candidates λ·4/3 vs λ: the engine rule (1/n) and the studio rule (1/(n−1)) part somewhere on a σ grid
    ds = Dataset.from_array(torch.rand(4, 1, 4, 4, generator=rng) * 2 - 1)
    _, lam, U = ds.pca()
    parted = 0
    for sigma in np.geomspace(0.05, 5, 25):
        check_studio(ds, float(sigma), 0.1, 1e-3)
        parted += int((studio_locality_mask(ds.covariance(), ds.n, sigma, 0.1) != dense_rule(lam, U, sigma, 0.1)).sum())
    assert parted > 0


def test_studio_rule_on_mnist(mnist2000):
    # The formula in float64 agrees with the reference to rounding. (In float32 — the studio's own precision —
    # MNIST's near-constant border pixels give tiny pivots whose rounding moves max|M| by per cents, and with it
    # thousands of entries: that is the studio's behaviour, not checked against a float64 reference here.)
    for sigma in (0.1, 10.0):
        check_studio(mnist2000, sigma, 0.005, 1e-8, torch.float64)


def test_mask_rule_option(rng):
    ds = random_sets(rng)[0]
    with pytest.raises(ValueError, match="mask_rule"):
        PCALocality(ds, mask_rule="paper")
    den = PCALocality(ds, threshold=0.05, mask_rule="studio")
    assert den.config()["mask_rule"] == "studio"
    assert torch.equal(den.mask_for(0.3), studio_locality_mask(ds.covariance(), ds.n, 0.3, 0.05))


def test_mask_rule_on_the_cli():
    from analytic_diffusion.cli import build_parser
    from analytic_diffusion.cli.sample import _method_options

    opts = _method_options(
        build_parser().parse_args(
            ["sample", "--method", "pca_locality", "--mask-rule", "studio", "--threshold", "0.05"]
        )
    )
    assert opts["mask_rule"] == "studio" and opts["threshold"] == 0.05
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sample", "--method", "pca_locality", "--mask-rule", "paper"])
