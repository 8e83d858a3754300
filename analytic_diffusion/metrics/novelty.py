"""Are generated samples closer to the training set than fresh data is? (docs/methods.md §9 d.)

For generated samples and for held-out test images, the L2 distance to the nearest training image (exact scan,
:func:`analytic_diffusion.ops.knn_search` in float64; mirrored candidates when the dataset has flips). The two
distance distributions are compared by a Mann–Whitney U statistic, as in the per-cell statistic of Meehan et
al.'s C_T test (here computed over the whole set: one cell, no partition of the training set):

    U = #{(i, j): d_gen_i > d_test_j} + ½ #{(i, j): d_gen_i = d_test_j}
    z = (U − m n / 2) / sqrt(m n / 12 · ((N + 1) − Σ_t (t³ − t) / (N (N − 1))))

(mid-ranks for ties, the usual tie-corrected variance, no continuity correction; N = m + n, t = size of each tie
group). z ≪ 0: the generated samples sit closer to the training set than held-out data does (data copying);
z ≫ 0: farther (under-fitting / novel); z ≈ 0: like fresh data. ``auc`` = U / (m n) is P(d_gen > d_test).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..ops import knn_search
from .memorization import memorization

if TYPE_CHECKING:
    from ..data import Dataset

__all__ = ["QUANTILES", "distance_quantiles", "mann_whitney_u", "nearest_train_distance", "novelty"]

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def nearest_train_distance(
    images: torch.Tensor, dataset: Dataset, *, flips: bool | None = None, backend: str = "auto"
) -> torch.Tensor:
    """(n,) float64 L2 distance of each image to its nearest training candidate (exact scan)."""
    if not torch.is_tensor(images) or images.dim() != 4 or tuple(images.shape[1:]) != tuple(dataset.image_shape):
        raise ValueError(
            f"images: expected shape (n, {', '.join(map(str, dataset.image_shape))}), "
            f"got {tuple(getattr(images, 'shape', ()))}"
        )
    flips = dataset.flips if flips is None else flips
    keys = dataset.keys()
    q = images.reshape(images.shape[0], -1).to(device=keys.device, dtype=torch.float64)
    d2, _ = knn_search(q, keys, 1, flips=flips, backend=backend, dtype=torch.float64)
    return d2[:, 0].clamp_min(0).sqrt().cpu()


def _midranks(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mid-ranks (1-based) of a 1-D float64 tensor, and the sizes of its tie groups."""
    order = torch.argsort(values, stable=True)
    sorted_v = values[order]
    _uniq, inverse, counts = torch.unique_consecutive(sorted_v, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)  # last 1-based rank of each group
    mid = ends - (counts.to(torch.float64) - 1) / 2
    ranks = torch.empty_like(values)
    ranks[order] = mid[inverse]
    return ranks, counts


def mann_whitney_u(a: torch.Tensor | Sequence[float], b: torch.Tensor | Sequence[float]) -> dict[str, float]:
    """Mann–Whitney U of sample ``a`` against ``b`` (see module doc); ties by mid-ranks.

    Returns {"U": U_a, "U_b": m n − U_a, "z", "p_value" (two-sided, normal approximation), "auc": U_a/(m n),
    "n_a", "n_b"}. z is 0 when every value is tied.
    """
    a = torch.as_tensor(a, dtype=torch.float64).reshape(-1).cpu()
    b = torch.as_tensor(b, dtype=torch.float64).reshape(-1).cpu()
    m, n = a.numel(), b.numel()
    if m < 1 or n < 1:
        raise ValueError(f"mann_whitney_u: both samples must be non-empty (got {m} and {n})")
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        raise ValueError("mann_whitney_u: values must be finite")
    N = m + n
    ranks, counts = _midranks(torch.cat([a, b]))
    U = float(ranks[:m].sum()) - m * (m + 1) / 2
    t = counts.to(torch.float64)
    tie = float((t**3 - t).sum())
    var = m * n / 12.0 * ((N + 1) - (tie / (N * (N - 1)) if N > 1 else 0.0))
    z = (U - m * n / 2.0) / math.sqrt(var) if var > 0 else 0.0
    return {
        "U": U,
        "U_b": m * n - U,
        "z": z,
        "p_value": math.erfc(abs(z) / math.sqrt(2.0)),
        "auc": U / (m * n),
        "n_a": m,
        "n_b": n,
    }


def distance_quantiles(d: torch.Tensor, quantiles: Sequence[float] = QUANTILES) -> dict[str, float]:
    d = torch.as_tensor(d, dtype=torch.float64).reshape(-1)
    q = torch.quantile(d, torch.tensor(list(quantiles), dtype=torch.float64))
    out = {f"q{round(100 * p):02d}": float(v) for p, v in zip(quantiles, q)}
    out.update({"mean": float(d.mean()), "min": float(d.min()), "max": float(d.max()), "n": int(d.numel())})
    return out


def novelty(
    samples: torch.Tensor,
    dataset: Dataset,
    test_images: torch.Tensor | None = None,
    *,
    test_distances: torch.Tensor | None = None,
    backend: str = "auto",
) -> dict[str, Any]:
    """Distance-to-train statistics of ``samples`` (and vs held-out ``test_images`` when given).

    Returns {"samples": quantiles, "test": quantiles, "mann_whitney": mann_whitney_u(samples, test),
    "memorization": memorisation summary (NN1/NN2 ratio < 1/3)}. Pass ``test_distances`` (from
    :func:`nearest_train_distance`) to reuse the test scan across several sample sets.
    """
    mem = memorization(samples, dataset, backend=backend)
    d_gen = mem.nn_distance.to(torch.float64)  # the same exact float64 scan as nearest_train_distance
    out: dict[str, Any] = {"samples": distance_quantiles(d_gen), "memorization": mem.summary()}
    if test_distances is None and test_images is not None:
        test_distances = nearest_train_distance(test_images, dataset, backend=backend)
    if test_distances is not None:
        out["test"] = distance_quantiles(test_distances)
        out["mann_whitney"] = mann_whitney_u(d_gen, test_distances)
    return out
