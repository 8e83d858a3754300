"""How closely one denoiser tracks another (an analytic method vs a trained network), per σ and per step.

Per-sample metrics (every one returns a (B,) float64 tensor on CPU; the caller averages):

* :func:`mse`         mean over the C·H·W entries of (a − b)².
* :func:`r2`          Lukoianov et al. / the studio (docs/methods.md §5):
                      r² = 1 − ‖pred − ref‖² / (D · Var(ref)), with the *reference's* unbiased variance over that
                      sample's D entries; a zero variance is replaced by 1. Asymmetric: the reference (the
                      network) sets the scale.
* :func:`pearson_r`   Kamb & Ganguli's final-sample agreement (docs/methods.md §1.5): subtract each image's global
                      mean, scale to unit norm, dot product. This is the Pearson correlation r over the whole C×H×W
                      tensor. The paper's plots say "r²" but their code does not square; we report r, not squared.
                      A constant image (zero norm after centring) gives r = 0.
* :func:`score_cosine` cosine similarity of two scores over the whole image (Kamb's calibration metric,
                      docs/methods.md §1.4); a zero score gives 0.

The comparisons that run samplers (single-step and trajectory agreement) build on these in
:mod:`analytic_diffusion.analysis.agreement`. Results are plain dicts of floats, lists and tensors; :func:`to_jsonable` turns one into something
``json.dump`` accepts (tensors become lists, NaN/Inf become None).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["mse", "pearson_r", "r2", "score_cosine", "seed_list", "to_jsonable"]


# ----------------------------------------------------------------------------------------- per-sample metrics
def _flat(t: torch.Tensor, name: str) -> torch.Tensor:
    if not torch.is_tensor(t):
        t = torch.as_tensor(t)
    if t.dim() < 1 or t.shape[0] < 1:
        raise ValueError(f"{name}: expected a tensor with a batch dimension, got shape {tuple(t.shape)}")
    return t.detach().to("cpu", torch.float64).reshape(t.shape[0], -1)


def _pair(a: torch.Tensor, b: torch.Tensor, names: tuple[str, str] = ("a", "b")) -> tuple[torch.Tensor, torch.Tensor]:
    fa, fb = _flat(a, names[0]), _flat(b, names[1])
    if fa.shape != fb.shape:
        raise ValueError(f"{names[0]} and {names[1]}: shapes differ ({tuple(a.shape)} vs {tuple(b.shape)})")
    return fa, fb


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error over all non-batch entries: (B,) float64."""
    fa, fb = _pair(a, b)
    return (fa - fb).pow(2).mean(1)


def r2(pred: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-sample r² = 1 − Σ(pred − ref)² / (D·Var(ref)); Var unbiased over the sample's D entries, 0 → 1.

    Can be negative (worse than predicting the reference's own mean). Needs D ≥ 2.
    """
    fp, fr = _pair(pred, ref, ("pred", "ref"))
    d = fr.shape[1]
    if d < 2:
        raise ValueError("r2: needs at least 2 entries per sample for an unbiased variance")
    var = fr.var(1, unbiased=True)
    var = torch.where(var == 0, torch.ones_like(var), var)
    return 1.0 - (fp - fr).pow(2).sum(1) / (d * var)


def _unit(v: torch.Tensor) -> torch.Tensor:
    n = v.norm(dim=1, keepdim=True)
    return torch.where(n > 0, v / torch.where(n > 0, n, torch.ones_like(n)), torch.zeros_like(v))


def pearson_r(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample Pearson r over the whole image (Kamb & Ganguli; not squared). Constant image → 0."""
    fa, fb = _pair(a, b)
    fa = _unit(fa - fa.mean(1, keepdim=True))
    fb = _unit(fb - fb.mean(1, keepdim=True))
    return (fa * fb).sum(1).clamp(-1.0, 1.0)


def score_cosine(score_a: torch.Tensor, score_b: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine similarity of two scores over the whole image (no centring). Zero vector → 0."""
    fa, fb = _pair(score_a, score_b, ("score_a", "score_b"))
    return (_unit(fa) * _unit(fb)).sum(1).clamp(-1.0, 1.0)


def _score(x0_hat: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s = sigma.to(torch.float64).reshape(-1, *([1] * (x.dim() - 1)))
    return (x0_hat.to(torch.float64) - x.to(torch.float64)) / (s * s)


# ----------------------------------------------------------------------------------------- helpers
def to_jsonable(obj: Any, skip: Sequence[str] = ()) -> Any:
    """Tensors / arrays → lists, numpy scalars → Python, NaN/Inf → None; dict keys in ``skip`` are dropped."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v, skip) for k, v in obj.items() if k not in skip}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, skip) for v in obj]
    if torch.is_tensor(obj):
        return to_jsonable(obj.detach().cpu().tolist(), skip)
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist(), skip)
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def seed_list(seeds: int | Iterable[int], n: int | None = None, first: int = 0) -> list[int]:
    """Seeds as a validated list: an int is a count (seeds first … first + count − 1), else explicit seeds."""
    if isinstance(seeds, bool):
        raise ValueError(f"seeds: expected a count or a list of non-negative integers, got {seeds!r}")
    if isinstance(seeds, int):
        if seeds < 1:
            raise ValueError(f"seeds: the number of seeds must be >= 1, got {seeds}")
        if isinstance(first, bool) or not isinstance(first, int) or first < 0:
            raise ValueError(f"seed: expected a non-negative integer, got {first!r}")
        out = list(range(first, first + seeds))
    else:
        out = list(seeds)
        if not out:
            raise ValueError("seeds: empty list")
        for s in out:
            if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0:
                raise ValueError(f"seeds: expected non-negative integers, got {s!r}")
        out = [int(s) for s in out]
        if len(set(out)) != len(out):
            raise ValueError(f"seeds: duplicate seeds in {out}")
    if n is not None and len(out) != n:
        raise ValueError(f"seeds: expected {n} seeds, got {len(out)}")
    return out
