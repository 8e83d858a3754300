"""The denoiser interface: ``D(x, sigma, class_labels=None) -> x0_hat`` in σ-space (x = x0 + σ·ε).

Every denoiser also offers the score and ε forms, and retrieval denoisers the posterior summary that
memorisation studies use (largest weight, effective number of neighbours 1/Σw²).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..ops import sigma_rows


def class_label_rows(labels, device) -> torch.Tensor:
    """Class labels as a flat int64 tensor; refuses non-integral values (1.7 is no class) and booleans."""
    t = labels if torch.is_tensor(labels) else torch.as_tensor(labels)
    if not (t.is_floating_point() or t.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)):
        raise TypeError(f"class_labels: expected integer class indices, got {t.dtype}")
    if t.is_floating_point() and not bool((torch.isfinite(t) & (t == t.round())).all()):
        raise ValueError(f"class_labels: expected integer class indices, got non-integral values "
                         f"{t[~(torch.isfinite(t) & (t == t.round()))].reshape(-1)[:3].tolist()}")
    return t.to(device=device, dtype=torch.long).reshape(-1)


@dataclass
class Posterior:
    """Posterior mean (B, C, H, W) with per-sample summaries of the weights."""
    mean: torch.Tensor
    max_weight: torch.Tensor  # (B,)
    effective_neighbours: torch.Tensor  # (B,)


class Denoiser:
    """Base class. Subclasses implement :meth:`denoise` on validated inputs."""

    name = "denoiser"
    # Options a base class takes that this method does not use (hidden from denoiser_options and the CLI).
    hidden_options: tuple = ()

    def __init__(self, image_shape: Tuple[int, int, int]):
        self.image_shape = tuple(int(v) for v in image_shape)

    # -- subclasses --------------------------------------------------------------------------------------
    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: Optional[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def config(self) -> dict:
        """JSON-serialisable description of the method and its options."""
        return {"method": self.name}

    # -- public API ------------------------------------------------------------------------------------
    def _check(self, x: torch.Tensor, sigma, class_labels):
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise TypeError(f"x: expected a floating tensor, got {getattr(x, 'dtype', type(x))}")
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"x: expected shape (B, {', '.join(map(str, self.image_shape))}), "
                             f"got {tuple(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x: contains NaN or Inf")
        s = sigma_rows(sigma, x.shape[0], x.device, x)
        if class_labels is not None:
            class_labels = class_label_rows(class_labels, x.device)
            if class_labels.numel() == 1 and x.shape[0] > 1:
                class_labels = class_labels.expand(x.shape[0])
            if class_labels.shape != (x.shape[0],):
                raise ValueError(f"class_labels: expected one label per sample ({x.shape[0]}), "
                                 f"got {tuple(class_labels.shape)}")
        return s, class_labels

    def __call__(self, x: torch.Tensor, sigma, class_labels=None) -> torch.Tensor:
        s, labels = self._check(x, sigma, class_labels)
        if x.shape[0] == 0:  # an empty batch has an empty answer
            return x.clone()
        return self.denoise(x, s, labels).to(x.dtype)

    def score(self, x: torch.Tensor, sigma, class_labels=None) -> torch.Tensor:
        """∇ log p_σ(x) = (x̂0 − x) / σ²."""
        s, labels = self._check(x, sigma, class_labels)
        if x.shape[0] == 0:
            return x.clone()
        s4 = s.to(x.dtype).view(-1, 1, 1, 1)
        return (self.denoise(x, s, labels).to(x.dtype) - x) / (s4 * s4)

    def eps(self, x: torch.Tensor, sigma, class_labels=None) -> torch.Tensor:
        """ε̂ = (x − x̂0) / σ."""
        s, labels = self._check(x, sigma, class_labels)
        if x.shape[0] == 0:
            return x.clone()
        return (x - self.denoise(x, s, labels).to(x.dtype)) / s.to(x.dtype).view(-1, 1, 1, 1)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "method")
        return f"{type(self).__name__}({opts})"
