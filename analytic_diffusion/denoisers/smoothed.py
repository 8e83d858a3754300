"""σ-CFDM (Scarvelis et al., arXiv 2310.12395): the optimal denoiser averaged over perturbed queries."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch

from .base import Posterior
from .optimal import Optimal
from .sample_seeds import row_generators

if TYPE_CHECKING:
    from ..data import Dataset


class Smoothed(Optimal):
    """x̂0(x) = (1/M) Σ_m D_opt(x + s·ξ_m), ξ_m ~ N(0, I).

    The M perturbations of all B queries go through one scan of the training set. Each query's perturbations
    come from a stream of its own, seeded by a hash of (``seed``, the sample's identity in the sampler, σ, label),
    never of x's values (:mod:`.sample_seeds`): for a given sample and σ the denoiser is one fixed smooth function
    of x, so batch size, call order, shards, threads and instruction sets change it by rounding only, and the
    sampler's random streams stay aligned with any other method run from the same seeds. Outside a sampler (no
    identity) the rows at one σ share one set of perturbations. With s = 0 this is ``optimal``. Samples
    concentrate near barycentres of M-tuples of training images.

    ``smoothing`` is an absolute per-pixel scale in [-1, 1] units. In high dimension a perturbation only
    changes which training image a query snaps to once s·√D is comparable to the distance between images, so
    small s still returns copies: on MNIST (28×28) s = 1 gave 98% copies, s = 2.5 with M = 4 about 2%.
    """

    name = "smoothed"

    def __init__(
        self, dataset: Dataset, *, num_perturbations: int = 4, smoothing: float = 2.5, seed: int = 0, **kw: Any
    ) -> None:
        super().__init__(dataset, **kw)
        if not isinstance(num_perturbations, int) or num_perturbations < 1:
            raise ValueError(f"num_perturbations: expected a positive integer, got {num_perturbations!r}")
        if not smoothing >= 0:
            raise ValueError(f"smoothing: expected s >= 0, got {smoothing}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
        self.num_perturbations = num_perturbations
        self.smoothing = float(smoothing)
        self.seed = seed

    def _perturbed(
        self, x: torch.Tensor, s: torch.Tensor, labels: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The M·B perturbed queries (row m·B + b is perturbation m of sample b) with their σ and labels.

        ξ does not depend on x (only on the sample's identity, σ and label), so x + s·ξ carries x's gradient and
        J = (1/M) Σ_m J_opt(x + s·ξ_m) is the Jacobian of the denoiser itself: finite differences agree with it.
        """
        M = self.num_perturbations
        # Drawn in float64 whatever the working dtype, so float32 and float64 runs see the same perturbations.
        gens = row_generators(self.name, self.seed, s, labels)
        xi = torch.stack(
            [torch.randn((M,) + tuple(x.shape[1:]), generator=g, dtype=torch.float64) for g in gens], 1
        ).to(x.device, x.dtype)
        xs = (x[None] + self.smoothing * xi).reshape(M * x.shape[0], *x.shape[1:])
        rep = lambda t: None if t is None else t.repeat(M)  # noqa: E731
        return xs, cast(torch.Tensor, rep(s)), rep(labels)

    def _posterior(self, x: torch.Tensor, s: torch.Tensor, labels: torch.Tensor | None) -> Posterior:
        B, M = x.shape[0], self.num_perturbations
        p = self._optimal_posterior(*self._perturbed(x, s, labels))
        mean = p.mean.reshape(M, *x.shape).mean(0)
        # The mean of the M bounds bounds the error of the mean of the M posterior means.
        avg = lambda t: None if t is None else t.reshape(M, B).mean(0)  # noqa: E731
        return Posterior(
            mean,
            cast(torch.Tensor, avg(p.max_weight)),
            cast(torch.Tensor, avg(p.effective_neighbours)),
            avg(p.error_bound),
            avg(p.skipped_weight),
            avg(p.scored_fraction),
        )

    def denoise(self, x: torch.Tensor, s: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        # The optimal denoiser on each perturbed query (its custom op where autograd needs it).
        xs, ss, ls = self._perturbed(x, s, labels)
        mean = super().denoise(xs, ss, ls)
        return mean.reshape(self.num_perturbations, *x.shape).mean(0)

    def _exact_jvp(
        self, x: torch.Tensor, s: torch.Tensor, labels: torch.Tensor | None, v: torch.Tensor
    ) -> torch.Tensor:
        xs, ss, ls = self._perturbed(x, s, labels)
        M = self.num_perturbations
        jv = self._optimal_jvp(xs, ss, ls, v.repeat(M, *([1] * (v.dim() - 1))))
        return jv.reshape(M, *x.shape).mean(0)

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "num_perturbations": self.num_perturbations,
            "smoothing": self.smoothing,
            "seed": self.seed,
        }
