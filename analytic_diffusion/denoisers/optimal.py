"""The exact empirical (optimal) denoiser: the posterior mean over the whole training set."""
from __future__ import annotations

from typing import Optional

import torch

from ..ops import DEFAULT_MEMORY_BUDGET, all_labels, softmax_retrieval
from ..ops.precision import check_mode
from .base import Denoiser, Posterior


class RetrievalDenoiser(Denoiser):
    """Shared configuration of every denoiser that retrieves training images.

    ``flips`` (default: the dataset's own flag) adds every training image mirrored left-right as a candidate;
    ``temperature`` divides the logits (1 = the true posterior); ``dtype`` is the working precision;
    ``precision`` (exact | tf32 | bf16) lets the GPU kernels use faster dots within a stated logit error bound.
    """

    def __init__(self, dataset, *, backend: str = "auto", dtype: torch.dtype = torch.float32,
                 memory_budget: int = DEFAULT_MEMORY_BUDGET, flips: Optional[bool] = None,
                 temperature: float = 1.0, precision: str = "exact"):
        super().__init__(dataset.image_shape)
        check_mode(precision)
        if not temperature > 0:
            raise ValueError(f"temperature: expected > 0, got {temperature}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype: expected torch.float32 or torch.float64, got {dtype}")
        self.dataset = dataset
        self.keys = dataset.keys()
        self.backend = backend
        self.dtype = dtype
        self.memory_budget = int(memory_budget)
        self.flips = bool(dataset.flips if flips is None else flips)
        self.temperature = float(temperature)
        self.precision = precision

    @property
    def num_candidates(self) -> int:
        return self.keys.total * (2 if self.flips else 1)  # over every shard

    def _check(self, x, sigma, class_labels):
        s, labels = super()._check(x, sigma, class_labels)
        if labels is not None:
            if self.keys.labels is None:
                raise ValueError("class_labels: this dataset has no labels, so class-conditional "
                                 "candidates are not available")
            present = torch.unique(all_labels(self.keys))
            missing = sorted(set(labels.cpu().tolist()) - set(present.tolist()))
            if missing:
                raise ValueError(f"class_labels: no training image has label(s) {missing}; "
                                 f"the dataset's classes are {present.tolist()}")
        return s, labels

    def _retrieval_kwargs(self) -> dict:
        return dict(flips=self.flips, backend=self.backend, dtype=self.dtype, memory_budget=self.memory_budget,
                    precision=self.precision)

    def posterior(self, x: torch.Tensor, sigma, class_labels=None) -> Posterior:
        s, labels = self._check(x, sigma, class_labels)
        return self._posterior(x, s, labels)

    def _posterior(self, x, s, labels) -> Posterior:
        raise NotImplementedError

    def denoise(self, x, s, labels):
        return self._posterior(x, s, labels).mean

    def config(self) -> dict:
        return {"method": self.name, "dataset": repr(self.dataset), "flips": self.flips,
                "temperature": self.temperature, "backend": self.backend, "dtype": str(self.dtype), "precision": self.precision}


class Optimal(RetrievalDenoiser):
    """E[x0 | x] = Σ_j softmax_j(−‖x − y_j‖² / 2σ²T) y_j over all N training images (exact online softmax)."""

    name = "optimal"

    def _posterior(self, x, s, labels) -> Posterior:
        r = softmax_retrieval(x.reshape(x.shape[0], -1), self.keys, s, temperature=self.temperature,
                              query_labels=labels, **self._retrieval_kwargs())
        return Posterior(r.mean.reshape(x.shape).to(x.dtype), r.max_weight, r.effective_neighbours)
