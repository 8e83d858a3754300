"""Denoiser Jacobians ∂D/∂x: their eigen-spectrum, top eigenvectors and effective dimensionality against σ.

Kadkhodaie et al. (arXiv 2310.02557) read a trained denoiser's Jacobian as an adaptive linear filter: its top
eigenvectors are the image features the denoiser keeps at that noise level, and its trace (the effective
dimensionality) falls as σ grows. For the analytic denoisers the Jacobian is known exactly:

* optimal: ∂E[x0|x]/∂x = Cov[x0|x] / (σ²T), the posterior covariance over the training images (symmetric,
  positive semi-definite). It is computed here in float64 from direct distances ‖x − y_j‖², with the weights
  below 1e-300 of the largest dropped (their share of the covariance is below N·1e-300).
* wiener: U diag(λ/(λ + σ²)) Uᵀ, the same for every x.

For any other denoiser (a trained network through its adapter, or a differentiable analytic one) autograd gives
Jacobian-vector products; :func:`jacobian_spectrum` runs Lanczos on the symmetric part ½(J + Jᵀ) (a trained
denoiser's Jacobian is close to symmetric; the asymmetry ‖J − Jᵀ‖/‖J‖ is reported on request via
:func:`jacobian_matrix`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, cast

import torch

from ..ops.local_retrieval import wiener_filter_matrix

if TYPE_CHECKING:
    from ..denoisers import Optimal, Wiener

__all__ = [
    "JacobianSpectrum",
    "effective_dimensionality",
    "jacobian_matrix",
    "jacobian_rows",
    "jacobian_spectrum",
    "lanczos",
]


@dataclass
class JacobianSpectrum:
    """Eigen-decomposition of ∂D/∂x at one point: ``eigenvalues`` (k,) descending, ``eigenvectors`` (k, C, H, W),
    ``trace`` (the effective dimensionality Σλ, exact when the full matrix was formed, else the sum of the k found),
    ``participation_ratio`` (Σλ)²/Σλ² of the eigenvalues found, ``method`` ("exact" | "autograd" | "lanczos")."""

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    trace: float
    participation_ratio: float
    method: str


def _point(den: object, x: torch.Tensor, sigma: float) -> tuple[torch.Tensor, float]:
    shape = tuple(getattr(den, "image_shape", x.shape[-3:]))
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise TypeError(f"x: expected a floating tensor, got {type(x).__name__}")
    x = x.reshape(1, *shape) if x.dim() == 3 else x
    if x.dim() != 4 or x.shape[0] != 1 or tuple(x.shape[1:]) != shape:
        raise ValueError(
            f"x: expected one image of shape {shape} (or (1, {', '.join(map(str, shape))})), got {tuple(x.shape)}"
        )
    s = float(sigma)
    if not (0 < s < math.inf):
        raise ValueError(f"sigma: expected a finite σ > 0, got {sigma!r}")
    return x, s


def _optimal_jacobian(den: Optimal, x: torch.Tensor, s: float, label: int | None) -> torch.Tensor:
    ds = den.dataset
    y = ds.images_float(dtype=torch.float64)[: ds.num_stored].reshape(ds.num_stored, -1)
    labels = ds.labels
    if den.flips:
        y = torch.cat([y, y.reshape(-1, *ds.image_shape).flip(-1).reshape(y.shape[0], -1)])
        labels = None if labels is None else torch.cat([labels, labels])
    if label is not None:
        if labels is None:
            raise ValueError("class_label: this dataset has no labels")
        keep = labels.to(y.device) == int(label)
        if not bool(keep.any()):
            raise ValueError(f"class_label: no training image has label {label}")
        y = y[keep]
    q = x.reshape(1, -1).to(y.device, torch.float64)
    logits = -((y - q) ** 2).sum(1) / (2 * s * s * den.temperature)
    w = torch.softmax(logits, 0)
    support = w > w.max() * 1e-300
    w, y = w[support], y[support]
    w = w / w.sum()
    yc = y - w @ y
    return (yc.t() * w) @ yc / (s * s * den.temperature)


def _function(den: Any, x: torch.Tensor, s: float, label: int | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """x ↦ D(x, σ) with gradients: a network adapter's differentiable core, else the denoiser itself."""
    kw = {} if label is None else {"class_labels": torch.as_tensor([int(label)])}
    evaluate = getattr(den, "_evaluate", None)
    if evaluate is not None:  # networks.adapters run the network under no_grad in __call__; its core does not
        dev = den.device or x.device
        dt = den.dtype or x.dtype
        sig = torch.tensor([s], dtype=torch.float64, device=dev)
        lab = None if label is None else den._labels(torch.as_tensor([int(label)]), dev)
        return lambda v: evaluate(v.to(dev, dt), sig, lab).to(x.dtype)
    return lambda v: den(v, torch.tensor([s], dtype=v.dtype), **kw)


def jacobian_matrix(
    den: Callable[..., torch.Tensor], x: torch.Tensor, sigma: float, *, class_label: int | None = None
) -> torch.Tensor:
    """The full Jacobian (D, D) float64 at one image: exact for optimal and wiener, autograd otherwise
    (D backward passes: keep D small, e.g. MNIST's 784)."""
    x, s = _point(den, x, sigma)
    name = getattr(den, "name", "")
    if name == "optimal":
        return _optimal_jacobian(cast("Optimal", den), x, s, class_label)
    if name == "wiener":
        wiener = cast("Wiener", den)
        return wiener_filter_matrix(wiener.eigvals, wiener.U, s)  # J = U diag(λ/(λ+σ²)) Uᵀ
    f = _function(den, x, s, class_label)
    with torch.enable_grad():
        jac = torch.autograd.functional.jacobian(lambda v: f(v.reshape(x.shape)).reshape(-1), x.reshape(-1).clone())
    return jac.to(torch.float64)


def lanczos(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    dim: int,
    k: int,
    *,
    iters: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k eigenpairs (by value, descending) of a symmetric operator on R^dim from ``iters`` Lanczos steps with
    full re-orthogonalisation (stable for the few dozen steps a spectrum needs). Returns (values (k,), vectors
    (dim, k)). ``iters`` defaults to min(dim, max(2k + 10, 30))."""
    if not (isinstance(k, int) and 1 <= k <= dim):
        raise ValueError(f"k: expected an integer in [1, {dim}], got {k!r}")
    m = min(dim, iters if iters is not None else max(2 * k + 10, 30))
    if m < k:
        raise ValueError(f"iters: expected at least k = {k}, got {m}")
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(dim, generator=gen, dtype=dtype)
    Q = torch.zeros(dim, m, dtype=dtype)
    alpha, beta = torch.zeros(m, dtype=dtype), torch.zeros(m, dtype=dtype)
    q = q / q.norm()
    used = m
    for j in range(m):
        Q[:, j] = q
        w = matvec(q).detach().to(dtype)
        alpha[j] = q @ w
        w = w - Q[:, : j + 1] @ (Q[:, : j + 1].t() @ w)
        w = w - Q[:, : j + 1] @ (Q[:, : j + 1].t() @ w)  # twice is enough (Kahan–Parlett)
        b = w.norm()
        if j + 1 < m:
            beta[j] = b
            if b <= 1e-12 * max(1.0, float(alpha[: j + 1].abs().max())):  # an invariant subspace: exact
                used = j + 1
                break
            q = w / b
    T = torch.diag(alpha[:used]) + torch.diag(beta[: used - 1], 1) + torch.diag(beta[: used - 1], -1)
    vals, vecs = torch.linalg.eigh(T)
    order = torch.argsort(vals, descending=True)[: min(k, used)]
    return vals[order], Q[:, :used] @ vecs[:, order]


def _spectrum(
    vals: torch.Tensor, vecs: torch.Tensor, shape: tuple[int, ...], trace: float | torch.Tensor, method: str
) -> JacobianSpectrum:
    pr = float(vals.sum() ** 2 / (vals**2).sum()) if float((vals**2).sum()) > 0 else 0.0
    return JacobianSpectrum(vals, vecs.t().reshape(-1, *shape), float(trace), pr, method)


def jacobian_spectrum(
    den: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigma: float,
    *,
    k: int = 16,
    method: str = "auto",
    iters: int | None = None,
    class_label: int | None = None,
    seed: int = 0,
) -> JacobianSpectrum:
    """The top-k eigenvalues and eigenvectors of ∂D/∂x at one image x (C, H, W) and noise level σ.

    method: "exact" forms the full matrix (optimal / wiener exactly, other denoisers by autograd) and
    diagonalises its symmetric part; "lanczos" uses Jacobian-vector and vector-Jacobian products only (any
    differentiable denoiser; memory O(D·iters)); "auto" is exact for optimal and wiener, lanczos otherwise.
    """
    if method not in ("auto", "exact", "lanczos"):
        raise ValueError(f"method: expected 'auto', 'exact' or 'lanczos', got {method!r}")
    x, s = _point(den, x, sigma)
    shape, dim = tuple(x.shape[1:]), x[0].numel()
    if not (isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= dim):
        raise ValueError(f"k: expected an integer in [1, {dim}], got {k!r}")
    exact_known = getattr(den, "name", "") in ("optimal", "wiener")
    if method == "exact" or (method == "auto" and exact_known):
        J = jacobian_matrix(den, x, s, class_label=class_label)
        vals, vecs = torch.linalg.eigh((J + J.t()) / 2)
        order = torch.argsort(vals, descending=True)[:k]
        return _spectrum(vals[order], vecs[:, order], shape, torch.trace(J), "exact" if exact_known else "autograd")
    f = _function(den, x, s, class_label)
    x0 = x.detach()

    def sym(v: torch.Tensor) -> torch.Tensor:  # ½(J + Jᵀ)v from one jvp and one vjp
        v4 = v.reshape(x.shape).to(x.dtype)
        with torch.enable_grad():
            # torch types jvp / vjp as 2- or 3-tuples (the third with has_aux=True, not used here)
            _, jv = torch.func.jvp(f, (x0,), (v4,))  # type: ignore[misc, unused-ignore]
            _, pullback = torch.func.vjp(f, x0)  # type: ignore[misc, unused-ignore]
            (vj,) = pullback(v4)
        return 0.5 * (jv + vj).reshape(-1).to(torch.float64)

    vals, vecs = lanczos(sym, dim, k, iters=iters, seed=seed)
    return _spectrum(vals, vecs, shape, vals.sum(), "lanczos")


def effective_dimensionality(
    den: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: Sequence[float],
    *,
    k: int = 32,
    method: str = "auto",
    class_label: int | None = None,
) -> dict[str, Any]:
    """trace(∂D/∂x) and the participation ratio at each σ (one image). Exact for optimal / wiener (the trace of
    the full Jacobian); with Lanczos the trace is that of the top-k part, a lower bound for a PSD Jacobian."""
    rows = []
    k = min(int(k), x[0].numel() if x.dim() == 4 else x.numel())
    for s in sigmas:
        sp = jacobian_spectrum(den, x, s, k=k, method=method, class_label=class_label)
        rows.append(
            {
                "sigma": float(s),
                "trace": sp.trace,
                "participation_ratio": sp.participation_ratio,
                "top_eigenvalue": float(sp.eigenvalues[0]),
                "method": sp.method,
            }
        )
    return {"sigmas": [r["sigma"] for r in rows], "rows": rows}


def jacobian_rows(
    den: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigma: float,
    pixels: Sequence[int],
    *,
    class_label: int | None = None,
) -> torch.Tensor:
    """Rows ∂D_p/∂x (len(pixels), C, H, W) for flat output indices p, by one vector-Jacobian product each (for
    the optimal and Wiener denoisers, rows of the exact Jacobian): the input region each output depends on."""
    x, s = _point(den, x, sigma)
    dim = x[0].numel()
    idx = [int(p) for p in pixels]
    if not idx or min(idx) < 0 or max(idx) >= dim:
        raise ValueError(f"pixels: expected flat indices in [0, {dim}), got {list(pixels)}")
    if getattr(den, "name", "") in ("optimal", "wiener"):
        return jacobian_matrix(den, x, s, class_label=class_label)[idx].reshape(len(idx), *x.shape[1:])
    f = _function(den, x, s, class_label)
    with torch.enable_grad():
        _, pullback = torch.func.vjp(f, x.detach())  # type: ignore[misc, unused-ignore]  # a 2-tuple without has_aux
        rows = []
        for p in idx:
            e = torch.zeros_like(x).reshape(-1)
            e[p] = 1
            rows.append(pullback(e.reshape(x.shape))[0][0].to(torch.float64))
    return torch.stack(rows)
