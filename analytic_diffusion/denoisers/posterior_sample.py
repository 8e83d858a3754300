"""Posterior variance, exact posterior draws and variance-injected denoisers (docs/methods.md §7).

Under the empirical training distribution the posterior p(x0 | x) at noise σ puts weight
w_j = softmax_j(−‖x − y_j‖² / 2σ²T) on training image y_j. The optimal denoiser returns its mean; this module
adds, from the same exact chunked scan (torch reference backend, memory-bounded, float32/float64, per-sample
σ, class labels, flips):

* :func:`posterior_moments` — mean and per-pixel variance Var[x0|x] = Σ_j w_j (y_j − mean)², i.e. the diagonal
  of the posterior covariance Cov[x0|x] = Σ_j w_j (y_j − m)(y_j − m)ᵀ. The second moment is accumulated
  centred (see :class:`analytic_diffusion.ops.PartialState`), so float32 stays close to float64 and never goes
  negative (tiny negatives from rounding are clamped to 0).
* :func:`posterior_draw` — one exact draw j ~ w per query by the Gumbel-max trick, one streaming scan.
* :class:`PosteriorSampleDenoiser` (method name ``"optimal-draw"``) — a *heuristic stand-in* inspired by
  Vastola, "Generalization through variance" (ICLR 2025). It is not that paper's effective SDE: the
  normalisation of the paper's V-kernel and its relation to the number of training draws were not checked, so
  ``scale`` (λ) is a free knob, not a calibrated constant.

  - mode ``"draw"``:  x̂0 = (1 − λ)·E[x0|x] + λ·y_J, J ~ w. λ = 1 is the "naive estimator": the denoiser
    returns one posterior draw, the noisy target a network is regressed on in denoising score matching
    (unbiased for the optimal denoiser, with covariance Cov[x0|x]). λ = 0 is the optimal denoiser exactly.
  - mode ``"noise"``: x̂0 = E[x0|x] + λ·sqrt(Var[x0|x])·ξ, ξ ~ N(0, I). The injected noise has the posterior's
    *diagonal* covariance only (per-pixel variances, no correlations between pixels), unlike a draw.

  Its randomness is per sample: a stream seeded by a hash of (``seed``, the sample's identity in the sampler,
  σ, label), never of x's values (:mod:`.sample_seeds`; the draw uses counter-based Gumbel noise from that
  seed), so the denoiser is a pure function of each sample whatever the batch size or call order, shards and
  instruction sets change it only where rounding flips a near-tie of the draw, and the sampler's per-sample
  generators (initial noise, stochastic steps) stay aligned with those of any other denoiser run from the same
  seeds.
The study helper :func:`analytic_diffusion.analysis.variance.variance_sweep` samples the same seeds at several λ.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, cast, overload

import torch

from ..ops import DEFAULT_MEMORY_BUDGET, KeyBank, PartialState, RetrievalResult, softmax_retrieval
from ..ops import posterior_draw as _ops_posterior_draw
from .optimal import Optimal, RetrievalDenoiser
from .sample_seeds import row_generators, row_seeds

if TYPE_CHECKING:
    from ..data import Dataset

__all__ = ["MODES", "PosteriorSampleDenoiser", "posterior_draw", "posterior_moments", "posterior_variance"]

MODES = ("draw", "noise")


# --------------------------------------------------------------------------------------------- plumbing
def _resolve(
    source: RetrievalDenoiser | Dataset | KeyBank,
    x: torch.Tensor,
    sigma: float | torch.Tensor,
    class_labels: torch.Tensor | Sequence[int] | int | None,
    flips: bool | None,
    temperature: float | None,
    dtype: torch.dtype | None,
    memory_budget: int | None,
) -> tuple[torch.Tensor, KeyBank, float | torch.Tensor, torch.Tensor | None, dict[str, Any]]:
    """(flattened x, keys, σ, labels, options) from a RetrievalDenoiser, a Dataset or a KeyBank."""
    s: float | torch.Tensor
    labels: torch.Tensor | Sequence[int] | int | None
    if isinstance(source, RetrievalDenoiser):
        if x.dim() != 4:
            raise ValueError(f"x: expected (B, C, H, W) for a denoiser, got shape {tuple(x.shape)}")
        s, labels = source._check(x, sigma, class_labels)
        keys = source.keys
        flips = source.flips if flips is None else bool(flips)
        temperature = source.temperature if temperature is None else temperature
        dtype = source.dtype if dtype is None else dtype
        memory_budget = source.memory_budget if memory_budget is None else memory_budget
    else:
        if isinstance(source, KeyBank):
            keys, default_flips = source, False
        elif hasattr(source, "keys") and hasattr(source, "flips"):  # a Dataset
            keys, default_flips = source.keys(), bool(source.flips)
        else:
            raise TypeError(
                f"source: expected an Optimal-style denoiser, a Dataset or a KeyBank, got {type(source).__name__}"
            )
        flips = default_flips if flips is None else bool(flips)
        s, labels = sigma, class_labels
        if labels is not None:
            labels = torch.as_tensor(labels, dtype=torch.long, device=x.device).reshape(-1)
            if labels.numel() == 1 and x.shape[0] > 1:
                labels = labels.expand(x.shape[0])
        temperature = 1.0 if temperature is None else temperature
        memory_budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget
    if not torch.is_tensor(x) or x.dim() < 2:
        raise ValueError(f"x: expected a (B, D) or (B, C, H, W) tensor, got {getattr(x, 'shape', type(x))}")
    q = x.reshape(x.shape[0], -1)
    return (
        q,
        keys,
        s,
        labels,
        dict(flips=flips, temperature=float(temperature), dtype=dtype, memory_budget=int(memory_budget)),
    )


@overload
def posterior_moments(
    x: torch.Tensor,
    source: RetrievalDenoiser | Dataset | KeyBank,
    sigma: float | torch.Tensor,
    *,
    class_labels: torch.Tensor | Sequence[int] | int | None = ...,
    flips: bool | None = ...,
    temperature: float | None = ...,
    dtype: torch.dtype | None = ...,
    memory_budget: int | None = ...,
    return_partial: Literal[False] = ...,
) -> tuple[torch.Tensor, torch.Tensor]: ...


@overload
def posterior_moments(
    x: torch.Tensor,
    source: RetrievalDenoiser | Dataset | KeyBank,
    sigma: float | torch.Tensor,
    *,
    class_labels: torch.Tensor | Sequence[int] | int | None = ...,
    flips: bool | None = ...,
    temperature: float | None = ...,
    dtype: torch.dtype | None = ...,
    memory_budget: int | None = ...,
    return_partial: Literal[True],
) -> PartialState: ...


@overload
def posterior_moments(
    x: torch.Tensor,
    source: RetrievalDenoiser | Dataset | KeyBank,
    sigma: float | torch.Tensor,
    *,
    class_labels: torch.Tensor | Sequence[int] | int | None = ...,
    flips: bool | None = ...,
    temperature: float | None = ...,
    dtype: torch.dtype | None = ...,
    memory_budget: int | None = ...,
    return_partial: bool = ...,
) -> tuple[torch.Tensor, torch.Tensor] | PartialState: ...


def posterior_moments(
    x: torch.Tensor,
    source: RetrievalDenoiser | Dataset | KeyBank,
    sigma: float | torch.Tensor,
    *,
    class_labels: torch.Tensor | Sequence[int] | int | None = None,
    flips: bool | None = None,
    temperature: float | None = None,
    dtype: torch.dtype | None = None,
    memory_budget: int | None = None,
    return_partial: bool = False,
) -> tuple[torch.Tensor, torch.Tensor] | PartialState:
    """(E[x0|x], Var[x0|x]) per pixel, from one exact scan over the candidates (shaped like ``x``).

    source: an :class:`Optimal` (or any RetrievalDenoiser: its flips, temperature, dtype and memory budget are
    the defaults), a Dataset (its flips flag) or a KeyBank. ``sigma`` is a scalar or one value per sample.
    With ``return_partial=True`` the raw :class:`PartialState` (with ``o2``) comes back, for combining shards.
    Results are in the working dtype (``dtype``, default float32 for float32 queries).
    """
    q, keys, s, labels, opts = _resolve(source, x, sigma, class_labels, flips, temperature, dtype, memory_budget)
    r = softmax_retrieval(
        q,
        keys,
        s,
        temperature=opts["temperature"],
        query_labels=labels,
        flips=opts["flips"],
        backend="torch",
        dtype=opts["dtype"],
        memory_budget=opts["memory_budget"],
        return_partial=return_partial,
        second_moment=True,
    )
    if return_partial:
        return cast(PartialState, r)
    r = cast(RetrievalResult, r)
    return r.mean.reshape(x.shape), cast(torch.Tensor, r.variance).reshape(x.shape)  # second_moment=True


def posterior_variance(
    denoiser: RetrievalDenoiser,
    x: torch.Tensor,
    sigma: float | torch.Tensor,
    class_labels: torch.Tensor | Sequence[int] | int | None = None,
) -> torch.Tensor:
    """Var[x0|x] per pixel (B, C, H, W) under ``denoiser``'s posterior (an ``Optimal.posterior_variance``)."""
    return posterior_moments(x, denoiser, sigma, class_labels=class_labels)[1].to(x.dtype)


def posterior_draw(
    x: torch.Tensor,
    source: RetrievalDenoiser | Dataset | KeyBank,
    sigma: float | torch.Tensor,
    *,
    generator: torch.Generator,
    class_labels: torch.Tensor | Sequence[int] | int | None = None,
    flips: bool | None = None,
    temperature: float | None = None,
    dtype: torch.dtype | None = None,
    memory_budget: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One exact posterior draw per query: (candidate index (B,), drawn image shaped like ``x``).

    With flips, index i ≥ N is training image i − N and the returned image is the mirrored copy.
    Deterministic given ``generator``'s state.
    """
    q, keys, s, labels, opts = _resolve(source, x, sigma, class_labels, flips, temperature, dtype, memory_budget)
    idx, rows = _ops_posterior_draw(q, keys, s, generator=generator, query_labels=labels, **opts)
    return idx, rows.reshape(x.shape)


# --------------------------------------------------------------------------------------------- denoiser
class PosteriorSampleDenoiser(Optimal):
    """Optimal denoiser with posterior randomness injected into x̂0 (heuristic stand-in for Vastola 2025).

    mode="draw":  x̂0 = (1 − λ)·E[x0|x] + λ·(one exact posterior draw);  λ ∈ [0, 1], λ = 1 the naive estimator.
    mode="noise": x̂0 = E[x0|x] + λ·sqrt(Var[x0|x])·ξ, ξ ~ N(0, I) — a *diagonal* posterior covariance.
    λ = 0 returns the optimal denoiser's output exactly (same scan, no random numbers used).

    ``seed`` enters the hash that seeds each query's stream (the same query gets the same draw on every call).
    Draws and noise use the torch reference backend; the mean uses ``backend`` as :class:`Optimal` does.
    """

    name = "optimal-draw"

    def __init__(
        self,
        dataset: Dataset,
        *,
        mode: str = "draw",
        scale: float = 1.0,
        seed: int = 0,
        backend: str = "auto",
        dtype: torch.dtype = torch.float32,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        flips: bool | None = None,
        temperature: float = 1.0,
        tolerance: float = 0.0,
    ) -> None:
        super().__init__(
            dataset,
            backend=backend,
            dtype=dtype,
            memory_budget=memory_budget,
            flips=flips,
            temperature=temperature,
            tolerance=tolerance,
        )
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
        try:
            scale = float(scale)
        except (TypeError, ValueError):
            raise ValueError(f"scale: expected a number, got {scale!r}") from None
        if not math.isfinite(scale) or scale < 0:
            raise ValueError(f"scale: expected a finite λ >= 0, got {scale!r}")
        if mode == "draw" and scale > 1:
            raise ValueError(
                f"scale: mode 'draw' mixes mean and draw, so λ must be in [0, 1]; got {scale!r} "
                "(use mode='noise' for larger injections)"
            )
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
        self.mode, self.scale, self.seed = mode, scale, seed

    def posterior_variance(
        self,
        x: torch.Tensor,
        sigma: float | torch.Tensor,
        class_labels: torch.Tensor | Sequence[int] | int | None = None,
    ) -> torch.Tensor:
        return posterior_variance(self, x, sigma, class_labels)

    def _has_exact_jacobian(self) -> bool:
        return self.scale == 0.0  # a random draw or injected noise has no Jacobian of the posterior-mean kind

    def denoise(self, x: torch.Tensor, s: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        lam = self.scale
        if lam == 0.0:
            return super().denoise(x, s, labels)  # exactly Optimal, its gradient included
        q = x.reshape(x.shape[0], -1)
        common: dict[str, Any] = dict(
            temperature=self.temperature,
            query_labels=labels,
            flips=self.flips,
            dtype=self.dtype,
            memory_budget=self.memory_budget,
        )
        if self.mode == "draw":
            seeds = torch.tensor(row_seeds(self.name, self.seed, s, labels), dtype=torch.int64)
            _, draw = _ops_posterior_draw(q, self.keys, s, row_seeds=seeds, **common)
            draw = draw.reshape(x.shape)
            if lam == 1.0:
                return draw.to(x.dtype)
            mean = self._posterior(x, s, labels).mean.to(draw.dtype)
            return ((1.0 - lam) * mean + lam * draw).to(x.dtype)
        r = softmax_retrieval(q, self.keys, s, backend="torch", second_moment=True, **common)
        gens = row_generators(self.name, self.seed, s, labels)
        # float64 draws whatever the working dtype: float32 and float64 runs see the same noise
        xi = torch.stack([torch.randn(r.mean.shape[1], generator=g, dtype=torch.float64) for g in gens]).to(
            r.mean.device, r.mean.dtype
        )
        out = r.mean + lam * cast(torch.Tensor, r.variance).sqrt() * xi  # second_moment=True
        return out.reshape(x.shape).to(x.dtype)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "mode": self.mode, "scale": self.scale, "seed": self.seed}
