"""Is a sample a copy? The nearest / second-nearest training distance ratio (Yoon et al.; Gu et al.).

A sample counts as memorised when d(NN1) / d(NN2) < 1/3 (L2 in pixel space; the scale cancels).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..ops import knn_search

if TYPE_CHECKING:
    from ..data import Dataset

MEMORIZATION_THRESHOLD = 1.0 / 3.0


@dataclass
class MemorizationReport:
    nn_index: torch.Tensor  # (n,) index of the nearest training candidate (i >= N: mirrored copy)
    nn_distance: torch.Tensor  # (n,) L2 distance to it
    nn2_distance: torch.Tensor  # (n,) L2 distance to the second nearest
    ratio: torch.Tensor  # (n,) nn_distance / nn2_distance
    threshold: float

    @property
    def memorized(self) -> torch.Tensor:
        return self.ratio < self.threshold

    @property
    def share(self) -> float:
        """Fraction of samples that are copies (the memorisation ratio)."""
        return float(self.memorized.double().mean())

    def summary(self) -> dict[str, Any]:
        return {
            "memorization_ratio": self.share,
            "threshold": self.threshold,
            "nn_distance_median": float(self.nn_distance.median()),
            "nn_ratio_median": float(self.ratio.median()),
            "num_samples": int(self.ratio.numel()),
        }


def memorization(
    samples: torch.Tensor,
    dataset: Dataset,
    *,
    threshold: float = MEMORIZATION_THRESHOLD,
    flips: bool | None = None,
    backend: str = "auto",
    memory_budget: int | None = None,
) -> MemorizationReport:
    """Nearest and second-nearest training distances of each sample, in float64, by exact scan
    (``memory_budget``: bytes of working memory, default the ops' own)."""
    if samples.dim() != 4 or tuple(samples.shape[1:]) != tuple(dataset.image_shape):
        raise ValueError(
            f"samples: expected shape (n, {', '.join(map(str, dataset.image_shape))}), got {tuple(samples.shape)}"
        )
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold: expected a value in (0, 1], got {threshold}")
    flips = dataset.flips if flips is None else flips
    keys = dataset.keys()
    total = keys.total * (2 if flips else 1)
    if total < 2:
        raise ValueError("memorization: needs at least 2 training images")
    q = samples.reshape(samples.shape[0], -1).to(device=keys.device, dtype=torch.float64)
    budget: dict[str, Any] = {} if memory_budget is None else {"memory_budget": int(memory_budget)}
    d2, idx = knn_search(q, keys, 2, flips=flips, backend=backend, dtype=torch.float64, **budget)
    d = d2.clamp_min(0).sqrt()
    ratio = d[:, 0] / d[:, 1].clamp_min(torch.finfo(torch.float64).tiny)
    return MemorizationReport(idx[:, 0].cpu(), d[:, 0].cpu(), d[:, 1].cpu(), ratio.cpu(), threshold)
