"""smalldiffusion (Permenter & Yuan): an analytic denoiser as a smalldiffusion model.

smalldiffusion calls models as ``model(x, sigma, cond=None)`` returning ε̂, with σ of shape [] (one level for the
batch) or [B, 1, …, 1]; its ``samples()`` draws the initial point with ``model.rand_input(batchsize)`` and steps
with ``model.predict_eps_cfg(x, sigma, cond, cfg_scale)``. Its noise model is the engine's, x = x0 + σ·ε, so
ε̂ = (x − D(x, σ)) / σ. ``cond`` (class labels) is passed to the denoiser as ``class_labels``; classifier-free
guidance is not defined for an analytic denoiser (cfg_scale must be 0).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..denoisers import Denoiser

__all__ = ["SmallDiffusionModel", "to_smalldiffusion"]


class SmallDiffusionModel(torch.nn.Module):
    """See the module docstring."""

    def __init__(self, denoiser: Denoiser) -> None:
        super().__init__()
        shape = getattr(denoiser, "image_shape", None)
        if not callable(denoiser) or shape is None or len(tuple(shape)) != 3:
            raise TypeError(
                "denoiser: expected an analytic_diffusion Denoiser (callable with image_shape=(C, H, W)), "
                f"got {type(denoiser).__name__}"
            )
        self.denoiser = denoiser
        self.input_dims = tuple(int(v) for v in shape)

    def rand_input(self, batchsize: int) -> torch.Tensor:
        return torch.randn((int(batchsize),) + self.input_dims)

    def forward(self, x: torch.Tensor, sigma: float | torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        s = sigma if torch.is_tensor(sigma) else torch.as_tensor(sigma, dtype=torch.float64)
        s = s.to(x.device)
        if s.dim() > 0 and (s.shape[0] != x.shape[0] or s.numel() != x.shape[0]):
            raise ValueError(f"sigma: expected shape [] or [B, 1, ..., 1] with B = {x.shape[0]}, got {tuple(s.shape)}")
        s = s.reshape(-1)
        x0 = self.denoiser(x, s, cond)
        return (x - x0) / s.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))

    def predict_eps(
        self, x: torch.Tensor, sigma: float | torch.Tensor, cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self(x, sigma, cond=cond)

    def predict_eps_cfg(
        self, x: torch.Tensor, sigma: float | torch.Tensor, cond: torch.Tensor | None, cfg_scale: float
    ) -> torch.Tensor:
        if cfg_scale:
            raise ValueError("cfg_scale: classifier-free guidance is not defined for an analytic denoiser; use 0")
        return self.predict_eps(x, sigma, cond=cond)

    def __repr__(self) -> str:
        return f"SmallDiffusionModel({self.denoiser!r})"


def to_smalldiffusion(denoiser: Denoiser) -> SmallDiffusionModel:
    """An analytic denoiser as a smalldiffusion model (run it with ``smalldiffusion.samples``)."""
    return SmallDiffusionModel(denoiser)
