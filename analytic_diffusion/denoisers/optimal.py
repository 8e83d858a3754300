"""The exact empirical (optimal) denoiser: the posterior mean over the whole training set."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import torch

from ..ops import DEFAULT_MEMORY_BUDGET, all_labels, softmax_retrieval
from ..ops.precision import check_mode
from ..ops.pruning import certified_retrieval, check_tolerance
from .base import Denoiser, Posterior
from .custom_ops import handle_of, needs_op, optimal_mean
from .gradients import posterior_jvp

if TYPE_CHECKING:
    from ..data import Dataset


class RetrievalDenoiser(Denoiser):
    """Shared configuration of every denoiser that retrieves training images.

    ``flips`` (default: the dataset's own flag) adds every training image mirrored left-right as a candidate;
    ``temperature`` divides the logits (1 = the true posterior); ``dtype`` is the working precision;
    ``precision`` (exact | tf32 | bf16) lets the GPU kernels use faster dots within a stated logit error bound;
    ``tolerance`` > 0 lets the methods built on the full softmax (optimal, smoothed, optimal-draw) skip training
    images whose total posterior weight is provably below it, per sample, and certify the result
    (:mod:`analytic_diffusion.ops.pruning`; :meth:`pruning_summary` sums the certificates up). 0 is the exact scan.
    """

    dtype: torch.dtype  # the working precision, always set (float32 or float64)
    train_images: torch.Tensor  # non-persistent buffers: the dataset's tensors
    train_labels: torch.Tensor | None

    def __init__(
        self,
        dataset: Dataset,
        *,
        backend: str = "auto",
        dtype: torch.dtype = torch.float32,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        flips: bool | None = None,
        temperature: float = 1.0,
        precision: str = "exact",
        tolerance: float = 0.0,
    ) -> None:
        super().__init__(dataset.image_shape)
        check_mode(precision)
        self.tolerance = check_tolerance(tolerance)
        self._certificates = {
            "calls": 0,
            "samples": 0,
            "scored": 0.0,
            "error_bound_max": 0.0,
            "error_bound_sum": 0.0,
            "skipped_weight_max": 0.0,
        }
        if not temperature > 0:
            raise ValueError(f"temperature: expected > 0, got {temperature}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype: expected torch.float32 or torch.float64, got {dtype}")
        self.dataset = dataset
        self.keys = dataset.keys()
        self._register_resident(dataset)
        self.backend = backend
        self.dtype = dtype
        self.memory_budget = int(memory_budget)
        self.flips = bool(dataset.flips if flips is None else flips)
        self.temperature = float(temperature)
        self.precision = precision

    def _register_resident(self, dataset: Dataset) -> None:
        # The dataset's tensors as non-persistent buffers: .to(device) moves them, state_dict() stays empty.
        self.register_buffer("train_images", dataset.images, persistent=False)
        self.register_buffer("train_labels", dataset.labels, persistent=False)

    def _before_move(self, device: torch.device) -> None:
        if device != self.dataset.device:
            self.dataset = self.dataset.to(device)  # keeps its content fingerprint, so cached statistics still hit
            self._register_resident(self.dataset)  # already on device: nn.Module's own pass leaves them be

    def _moved(self, device: torch.device) -> None:
        if self.keys.device != self.dataset.device:
            self.keys = self.dataset.keys()
            cache = self.__dict__.get("_cache")
            if isinstance(cache, dict):  # per-σ masks kept on the old device (pspc-flex, pca-locality)
                cache.clear()

    @property
    def num_candidates(self) -> int:
        return self.keys.total * (2 if self.flips else 1)  # over every shard

    def _check(
        self, x: torch.Tensor, sigma: float | torch.Tensor, class_labels: torch.Tensor | Sequence[int] | int | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        s, labels = super()._check(x, sigma, class_labels)
        if labels is not None and not torch.compiler.is_compiling():  # value checks stay out of compiled graphs
            if self.keys.labels is None:
                raise ValueError(
                    "class_labels: this dataset has no labels, so class-conditional candidates are not available"
                )
            present = torch.unique(all_labels(self.keys))
            missing = sorted(set(labels.cpu().tolist()) - set(present.tolist()))
            if missing:
                raise ValueError(
                    f"class_labels: no training image has label(s) {missing}; "
                    f"the dataset's classes are {present.tolist()}"
                )
        return s, labels

    def _retrieval_kwargs(self) -> dict[str, Any]:
        return dict(
            flips=self.flips,
            backend=self.backend,
            dtype=self.dtype,
            memory_budget=self.memory_budget,
            precision=self.precision,
        )

    def posterior(
        self,
        x: torch.Tensor,
        sigma: float | torch.Tensor,
        class_labels: torch.Tensor | Sequence[int] | int | None = None,
    ) -> Posterior:
        s, labels = self._check(x, sigma, class_labels)
        if x.shape[0] == 0:
            empty = torch.empty(0, dtype=self.dtype, device=x.device)
            return Posterior(x.clone(), empty, empty.clone())
        return self._posterior(x, s, labels)

    def _posterior(self, x: torch.Tensor, s: torch.Tensor, labels: torch.Tensor | None) -> Posterior:
        raise NotImplementedError

    def denoise(self, x: torch.Tensor, s: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return self._posterior(x, s, labels).mean

    def config(self) -> dict[str, Any]:
        return {
            "method": self.name,
            "dataset": repr(self.dataset),
            "flips": self.flips,
            "temperature": self.temperature,
            "backend": self.backend,
            "dtype": str(self.dtype),
            "precision": self.precision,
            "tolerance": self.tolerance,
        }

    def _record(self, post: Posterior) -> Posterior:
        """Add a pruned call's certificates to the running summary (metrics.json's ``certificate``)."""
        c = self._certificates
        c["calls"] += 1
        bound = cast(torch.Tensor, post.error_bound)  # a pruned call's posterior carries its certificates
        c["samples"] += int(bound.numel())
        c["scored"] += float(cast(torch.Tensor, post.scored_fraction).sum())
        c["error_bound_sum"] += float(bound.sum())
        c["error_bound_max"] = max(c["error_bound_max"], float(bound.max()))
        c["skipped_weight_max"] = max(c["skipped_weight_max"], float(cast(torch.Tensor, post.skipped_weight).max()))
        return post

    def pruning_summary(self) -> dict[str, Any] | None:
        """Certificates of every pruned call so far: tolerance, mean scored fraction, mean/max error bound."""
        c = self._certificates
        if self.tolerance == 0.0 or c["samples"] == 0:
            return None
        return {
            "tolerance": self.tolerance,
            "denoiser_calls": c["calls"],
            "scored_fraction": c["scored"] / c["samples"],
            "error_bound_mean": c["error_bound_sum"] / c["samples"],
            "error_bound_max": c["error_bound_max"],
            "skipped_weight_max": c["skipped_weight_max"],
        }


class Optimal(RetrievalDenoiser):
    """E[x0 | x] = Σ_j softmax_j(−‖x − y_j‖² / 2σ²T) y_j over all N training images (exact online softmax)."""

    name = "optimal"

    def __init__(self, dataset: Dataset, **kw: Any) -> None:
        super().__init__(dataset, **kw)
        handle_of(self)  # registered eagerly: a compiled graph reads the handle as a constant

    def __setstate__(
        self, state: dict[str, Any]
    ) -> None:  # unpickling and deepcopy: a copy is a new denoiser with its own handle
        super().__setstate__({k: v for k, v in state.items() if k != "_op_handle"})
        handle_of(self)

    def denoise(self, x: torch.Tensor, s: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        # A torch.library op: exact autograd (denoisers/gradients.py) and torch.compile without graph breaks.
        if needs_op(x):
            return optimal_mean(x, s, labels, handle_of(self))
        return self._optimal_posterior(x, s, labels).mean

    def _has_exact_jacobian(self) -> bool:
        return True

    def _exact_jvp(
        self, x: torch.Tensor, s: torch.Tensor, labels: torch.Tensor | None, v: torch.Tensor
    ) -> torch.Tensor:
        return self._optimal_jvp(x, s, labels, v)

    def _optimal_jvp(
        self, x: torch.Tensor, s: torch.Tensor, labels: torch.Tensor | None, v: torch.Tensor
    ) -> torch.Tensor:
        """J·v of the optimal posterior mean (what the custom op's backward calls; subclasses compose it)."""
        flat = posterior_jvp(
            x.reshape(x.shape[0], -1),
            self.keys,
            s,
            v.reshape(v.shape[0], -1),
            temperature=self.temperature,
            flips=self.flips,
            query_labels=labels,
            dtype=self.dtype,
        )
        return flat.reshape(x.shape)

    def _optimal_posterior(self, x: torch.Tensor, s: torch.Tensor, labels: torch.Tensor | None) -> Posterior:
        return Optimal._posterior(self, x, s, labels)

    def _posterior(self, x: torch.Tensor, s: torch.Tensor, labels: torch.Tensor | None) -> Posterior:
        if self.tolerance > 0:
            r = certified_retrieval(
                x.reshape(x.shape[0], -1),
                self.keys,
                s,
                tolerance=self.tolerance,
                temperature=self.temperature,
                query_labels=labels,
                **self._retrieval_kwargs(),
            )
            return self._record(
                Posterior(
                    r.mean.reshape(x.shape).to(x.dtype),
                    r.max_weight,
                    r.effective_neighbours,
                    r.error_bound,
                    r.skipped_weight,
                    r.scored_fraction,
                )
            )
        r = softmax_retrieval(
            x.reshape(x.shape[0], -1),
            self.keys,
            s,
            temperature=self.temperature,
            query_labels=labels,
            **self._retrieval_kwargs(),
        )
        return Posterior(r.mean.reshape(x.shape).to(x.dtype), r.max_weight, r.effective_neighbours)
