"""How linear is a denoiser? Li, Dai & Qu (arXiv 2410.24060; docs/methods.md §4).

* :func:`fit_linear_denoiser`: the best affine map x ↦ W x + b to D's outputs on noisy probes x0 + σε, per σ
  ("linear distillation"). Li et al. fit it with Adam; we solve the same least-squares problem in closed form
  (normal equations in float64 on centred data, so b is not penalised):

      W = (Yc^T Xc)(Xc^T Xc + λ I)^{-1},   b = ȳ − W x̄,

  with Xc, Yc the inputs and outputs minus their means. With M noisy probes in D dimensions, Xc has rank at
  most M − 1; when M − 1 < D the problem is under-determined, and ``ridge="auto"`` then adds
  λ = 1e-6 · trace(Xc^T Xc) / D, which picks (very nearly) the minimum-norm solution: W is identified only on
  the span of the probes, so use M > D probes (n images × n_noise draws) to compare W itself with the Wiener
  matrix. With M − 1 ≥ D and ``ridge="auto"`` no ridge is added, so an affine D is recovered to float64
  rounding. The fit's R² is 1 − Σ‖y − ŷ‖² / Σ‖y − ȳ‖² pooled over all outputs.
* :func:`wiener_distance`: how far a fitted (W, b) is from the Gaussian (Wiener) denoiser's
  W_σ = U diag(λ/(λ+σ²)) Uᵀ, b_σ = (I − W_σ) μ of the dataset's PCA: relative Frobenius distance of the matrices,
  relative distance of the biases and of the outputs on noisy dataset images.
* :func:`linearity_score`: the form implemented is the cosine similarity between D(α y1 + β y2) and
  α D(y1) + β D(y2), α = β = 1/√2, for noisy inputs y_j = x_j + σ ε_j (the mix then has noise level σ too),
  over the whole image, averaged over pairs. This follows the description in docs/methods.md §4, which was
  written from memory of the paper: the paper's exact form was not retrieved. An *affine* map with a non-zero
  offset does not score 1 in this form (α + β ≠ 1); pass ``center`` (e.g. the dataset mean) to measure the
  linearity of x − c ↦ D(x) − c instead, for which every affine map with D(c) = c (Wiener with c = μ) scores 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal, overload

import torch

from ..ops.local_retrieval import wiener_filter_matrix

if TYPE_CHECKING:
    from ..data import Dataset

__all__ = ["LinearFit", "fit_linear_denoiser", "linearity_score", "wiener_distance", "wiener_matrix"]


@dataclass
class LinearFit:
    """y ≈ W x + b on flattened images (W: (D, D) float64, b: (D,) float64), with the fit's R²."""

    W: torch.Tensor
    b: torch.Tensor
    r2: float
    sigma: float
    num_samples: int
    ridge: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1).to(self.W.dtype)
        return (flat @ self.W.T + self.b).reshape(x.shape)

    def summary(self) -> dict[str, Any]:
        return {"sigma": self.sigma, "r2": self.r2, "num_samples": self.num_samples, "ridge": self.ridge}


def _den_call(
    D: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigma: float,
    class_labels: torch.Tensor | None,
    batch_size: int | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    dev = torch.device(getattr(D, "device", None) or "cpu")
    outs = []
    step = x.shape[0] if batch_size is None else int(batch_size)
    for s in range(0, x.shape[0], step):
        xb = x[s : s + step].to(dev, dtype)
        sb = torch.full((xb.shape[0],), float(sigma), device=dev, dtype=dtype)
        kw = {} if class_labels is None else {"class_labels": class_labels[s : s + step].to(dev)}
        outs.append(D(xb, sb, **kw).detach().to("cpu", torch.float64))
    return torch.cat(outs)


def _check_sigma(sigma: float) -> float:
    s = float(sigma)
    if not math.isfinite(s) or s <= 0:
        raise ValueError(f"sigma: expected a finite value > 0, got {sigma!r}")
    return s


def _check_images(x: torch.Tensor, name: str) -> None:
    if not torch.is_tensor(x) or x.dim() != 4 or x.shape[0] < 1:
        raise ValueError(f"{name}: expected images (n, C, H, W), got {getattr(x, 'shape', type(x))}")


def fit_linear_denoiser(
    D: Callable[..., torch.Tensor],
    sigma: float,
    probes: torch.Tensor,
    n_noise: int = 1,
    *,
    seed: int = 0,
    ridge: str | float = "auto",
    class_labels: torch.Tensor | Sequence[int] | None = None,
    batch_size: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> LinearFit:
    """Least-squares affine fit of D at noise level σ on the M = n·n_noise inputs x0 + σε (see module doc).

    probes: clean images (n, C, H, W), each noised ``n_noise`` times (ε from a CPU generator seeded ``seed``).
    ridge: "auto" (none when M − 1 ≥ D, else 1e-6·trace/D), or a λ ≥ 0 in units of trace(Xc^T Xc)/D.
    """
    s = _check_sigma(sigma)
    _check_images(probes, "probes")
    if isinstance(n_noise, bool) or not isinstance(n_noise, int) or n_noise < 1:
        raise ValueError(f"n_noise: expected an integer >= 1, got {n_noise!r}")
    x0 = probes.detach().to("cpu", torch.float64).repeat(n_noise, 1, 1, 1)
    labels = None
    if class_labels is not None:
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1).repeat(n_noise)
    gen = torch.Generator().manual_seed(int(seed))
    x = x0 + s * torch.randn(x0.shape, generator=gen, dtype=torch.float32).to(torch.float64)
    x = x.to(dtype).to(torch.float64)  # the inputs D actually sees
    y = _den_call(D, x, s, labels, batch_size, dtype)
    M, d = x.shape[0], x[0].numel()
    X, Y = x.reshape(M, d), y.reshape(M, d)
    xm, ym = X.mean(0), Y.mean(0)
    Xc, Yc = X - xm, Y - ym
    G = Xc.T @ Xc
    scale = float(G.diagonal().sum()) / d
    if ridge == "auto":
        lam = 0.0 if d <= M - 1 else 1e-6
    else:
        lam = float(ridge)
        if not math.isfinite(lam) or lam < 0:
            raise ValueError(f"ridge: expected 'auto' or a value >= 0, got {ridge!r}")
    lam_abs = lam * scale
    G = G + lam_abs * torch.eye(d, dtype=torch.float64)
    # W^T = G^{-1} Xc^T Yc  (G symmetric); lstsq copes with a singular G when no ridge was asked for.
    rhs = Xc.T @ Yc
    try:
        Wt = torch.linalg.solve(G, rhs)
    except RuntimeError:
        Wt = torch.linalg.lstsq(G, rhs).solution
    W = Wt.T.contiguous()
    b = ym - W @ xm
    resid = (Y - (X @ Wt + b)).pow(2).sum()
    total = Yc.pow(2).sum()
    fit_r2 = float(1.0 - resid / total) if float(total) > 0 else (1.0 if float(resid) == 0 else float("-inf"))
    return LinearFit(W, b, fit_r2, s, M, lam_abs)


def wiener_matrix(dataset: Dataset, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_σ, b_σ) of the Gaussian denoiser μ + U diag(λ/(λ+σ²)) Uᵀ (x − μ): W_σ (D, D), b_σ = (I − W_σ) μ."""
    s = _check_sigma(sigma)
    mean, lam, U = dataset.pca()
    mean = mean.cpu().double()
    W = wiener_filter_matrix(lam.cpu(), U.cpu(), s)
    return W, mean - W @ mean


def wiener_distance(
    W: torch.Tensor, b: torch.Tensor, dataset: Dataset, sigma: float, *, n_probe: int = 256, seed: int = 0
) -> dict[str, float]:
    """Distances of an affine map (W, b) from the dataset's Wiener denoiser at σ.

    matrix:  ‖W − W_σ‖_F / ‖W_σ‖_F;  bias: ‖b − b_σ‖ / ‖b_σ‖ (inf-safe: 0/0 → 0);
    outputs: ‖(W x + b) − (W_σ x + b_σ)‖_F / ‖W_σ x + b_σ‖_F over x = the first ``n_probe`` dataset images
             noised with σ (ε seeded ``seed``).
    """
    s = _check_sigma(sigma)
    Ww, bw = wiener_matrix(dataset, s)
    W, b = W.detach().cpu().double(), b.detach().cpu().double().reshape(-1)
    if W.shape != Ww.shape or b.shape != bw.shape:
        raise ValueError(
            f"W, b: expected shapes {tuple(Ww.shape)} and {tuple(bw.shape)}, got {tuple(W.shape)} and {tuple(b.shape)}"
        )

    def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
        num, den = float((a - ref).norm()), float(ref.norm())
        return num / den if den > 0 else (0.0 if num == 0 else float("inf"))

    n = min(int(n_probe), dataset.n)
    x0 = dataset.images_float(torch.arange(n), dtype=torch.float64).cpu().reshape(n, -1)
    gen = torch.Generator().manual_seed(int(seed))
    x = x0 + s * torch.randn(x0.shape, generator=gen, dtype=torch.float32).to(torch.float64)
    return {"sigma": s, "matrix": rel(W, Ww), "bias": rel(b, bw), "outputs": rel(x @ W.T + b, x @ Ww.T + bw)}


@overload
def linearity_score(
    D: Callable[..., torch.Tensor],
    x1: torch.Tensor,
    x2: torch.Tensor,
    sigma: float,
    *,
    seed: int = ...,
    center: torch.Tensor | None = ...,
    class_labels: torch.Tensor | Sequence[int] | None = ...,
    batch_size: int | None = ...,
    dtype: torch.dtype = ...,
    per_pair: Literal[False] = ...,
) -> float: ...


@overload
def linearity_score(
    D: Callable[..., torch.Tensor],
    x1: torch.Tensor,
    x2: torch.Tensor,
    sigma: float,
    *,
    seed: int = ...,
    center: torch.Tensor | None = ...,
    class_labels: torch.Tensor | Sequence[int] | None = ...,
    batch_size: int | None = ...,
    dtype: torch.dtype = ...,
    per_pair: Literal[True],
) -> tuple[float, torch.Tensor]: ...


@overload
def linearity_score(
    D: Callable[..., torch.Tensor],
    x1: torch.Tensor,
    x2: torch.Tensor,
    sigma: float,
    *,
    seed: int = ...,
    center: torch.Tensor | None = ...,
    class_labels: torch.Tensor | Sequence[int] | None = ...,
    batch_size: int | None = ...,
    dtype: torch.dtype = ...,
    per_pair: bool = ...,
) -> float | tuple[float, torch.Tensor]: ...


def linearity_score(
    D: Callable[..., torch.Tensor],
    x1: torch.Tensor,
    x2: torch.Tensor,
    sigma: float,
    *,
    seed: int = 0,
    center: torch.Tensor | None = None,
    class_labels: torch.Tensor | Sequence[int] | None = None,
    batch_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    per_pair: bool = False,
) -> float | tuple[float, torch.Tensor]:
    """Mean cosine similarity between D(α y1 + β y2) and α D(y1) + β D(y2), α = β = 1/√2 (see module doc).

    x1, x2: clean image pairs (n, C, H, W); y_j = x_j + σ ε_j with ε drawn from a CPU generator seeded ``seed``.
    center: None (the form above), or an image (C, H, W) / (D,) c: then inputs and outputs are taken relative
            to c: D(c + α(y1 − c) + β(y2 − c)) − c vs α(D(y1) − c) + β(D(y2) − c).
    class_labels: one label per pair, used for all three calls.
    Returns the mean (float), or (mean, per-pair (n,) tensor) with ``per_pair=True``.
    """
    from .agreement import score_cosine

    s = _check_sigma(sigma)
    _check_images(x1, "x1")
    _check_images(x2, "x2")
    if x1.shape != x2.shape:
        raise ValueError(f"x1, x2: shapes differ ({tuple(x1.shape)} vs {tuple(x2.shape)})")
    gen = torch.Generator().manual_seed(int(seed))
    y1 = x1.detach().to("cpu", torch.float64) + s * torch.randn(x1.shape, generator=gen).to(torch.float64)
    y2 = x2.detach().to("cpu", torch.float64) + s * torch.randn(x2.shape, generator=gen).to(torch.float64)
    c = torch.zeros((), dtype=torch.float64)
    if center is not None:
        c = torch.as_tensor(center).detach().to("cpu", torch.float64).reshape(1, *x1.shape[1:])
    a = b = 1.0 / math.sqrt(2.0)
    mix = c + a * (y1 - c) + b * (y2 - c)
    n = x1.shape[0]
    labels = None if class_labels is None else torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
    out = _den_call(D, torch.cat([mix, y1, y2]), s, None if labels is None else labels.repeat(3), batch_size, dtype)
    d_mix, d1, d2 = out[:n] - c, out[n : 2 * n] - c, out[2 * n :] - c
    cos = score_cosine(d_mix, a * d1 + b * d2)
    return (float(cos.mean()), cos) if per_pair else float(cos.mean())
