"""Does posterior variance make samples novel? A study helper (docs/methods.md §7).

:func:`variance_sweep` samples the same seeds with :class:`PosteriorSampleDenoiser` at several λ and reports
the memorisation ratio and nearest-neighbour distances per λ, with a side-by-side grid (one row per λ). The
posterior moments, exact draws and the denoiser live in :mod:`analytic_diffusion.denoisers.posterior_sample`
and are re-exported here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..denoisers.posterior_sample import (
    MODES,
    PosteriorSampleDenoiser,
    posterior_draw,
    posterior_moments,
    posterior_variance,
)

if TYPE_CHECKING:
    from ..data import Dataset

__all__ = [
    "MODES",
    "PosteriorSampleDenoiser",
    "SweepResult",
    "posterior_draw",
    "posterior_moments",
    "posterior_variance",
    "variance_sweep",
]


# --------------------------------------------------------------------------------------------- study
@dataclass
class SweepResult:
    """One row per λ: scale, memorization_ratio, nn_distance_median, nn_ratio_median, distinct_nn (how many
    different training images are nearest to the n samples) and nn_changed (the share of samples whose nearest
    training image differs from the first λ's run: copies of *other* images still count as copies).
    samples[λ] is (n, C, H, W)."""

    rows: list[dict[str, Any]]
    samples: dict[float, torch.Tensor] = field(default_factory=dict)
    grid_path: str | None = None

    def table(self) -> str:
        head = (
            f"{'lambda':>7} {'mem ratio':>9} {'median NN dist':>14} {'median d1/d2':>12} {'distinct NN':>11} "
            f"{'NN changed':>10}"
        )
        lines = [head] + [
            f"{r['scale']:>7.3g} {r['memorization_ratio']:>9.3f} {r['nn_distance_median']:>14.3f} "
            f"{r['nn_ratio_median']:>12.3f} {r['distinct_nn']:>11d} {r['nn_changed']:>10.3f}"
            for r in self.rows
        ]
        return "\n".join(lines)


def variance_sweep(
    dataset: Dataset,
    scales: Sequence[float] = (0.0, 0.25, 0.5, 1.0),
    n: int = 16,
    steps: int = 18,
    *,
    mode: str = "draw",
    seed: int = 0,
    draw_seed: int = 0,
    sampler: str = "heun",
    schedule: str = "karras",
    schedule_kwargs: dict[str, Any] | None = None,
    class_labels: torch.Tensor | Sequence[int] | None = None,
    grid_path: str | os.PathLike[str] | None = None,
    progress: bool = False,
    **options: Any,
) -> SweepResult:
    """Sample n images at each λ in ``scales`` from the same seeds (sampler noise seed..seed+n−1, denoiser
    stream ``draw_seed``) and measure memorisation (d(NN1)/d(NN2) < 1/3) against ``dataset``.

    ``options`` go to :class:`PosteriorSampleDenoiser` (flips, temperature, dtype, memory_budget, ...).
    ``grid_path``: writes a PNG with one row per λ (label on the left).
    """
    from ..metrics.memorization import memorization
    from ..sampling.generate import sample

    scales = [float(v) for v in scales]
    if not scales:
        raise ValueError("scales: expected at least one λ")
    rows: list[dict[str, Any]]
    samples: dict[float, torch.Tensor]
    first_nn: torch.Tensor | None
    rows, samples, first_nn = [], {}, None
    for lam in scales:
        den = PosteriorSampleDenoiser(dataset, mode=mode, scale=lam, seed=draw_seed, **options)
        res = sample(
            den,
            n,
            steps=steps,
            sampler=sampler,
            schedule=schedule,
            schedule_kwargs=schedule_kwargs,
            seed=seed,
            class_labels=class_labels,
            progress=progress,
        )
        rep = memorization(res.samples, dataset, flips=den.flips)
        first_nn = rep.nn_index if first_nn is None else first_nn
        row = {
            "scale": lam,
            "mode": mode,
            **rep.summary(),
            "distinct_nn": int(torch.unique(rep.nn_index).numel()),
            "nn_changed": float((rep.nn_index != first_nn).double().mean()),
        }
        rows.append(row)
        samples[lam] = res.samples
    out = SweepResult(rows, samples)
    if grid_path is not None:
        _save_sweep_grid(grid_path, out)
        out.grid_path = str(grid_path)
    return out


def _save_sweep_grid(path: str | os.PathLike[str], result: SweepResult) -> None:
    """One row per λ, labelled with λ, the memorisation ratio and the median nearest-neighbour distance."""
    import numpy as np

    from ..viz.images import tile
    from ..viz.plots import labelled_rows

    strips = []
    for r in result.rows:
        imgs = result.samples[r["scale"]]
        strips.append(
            (
                f"λ = {r['scale']:g}\nmem {100 * r['memorization_ratio']:.0f}%\nNN {r['nn_distance_median']:.2f}",
                np.asarray(tile(imgs, imgs.shape[0])),
            )
        )
    labelled_rows(path, strips)
