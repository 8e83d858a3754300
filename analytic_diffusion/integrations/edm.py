"""EDM (Karras et al. 2022, NVlabs/edm): an analytic denoiser as an EDM-style preconditioned network.

``to_edm(den)`` has the attributes and call EDM's sampler loop and its EDMPrecond users read:
``img_resolution``, ``img_channels``, ``label_dim`` (the dataset's number of classes, 0 if unlabelled),
``sigma_min = 0``, ``sigma_max = inf`` (an analytic denoiser takes any σ > 0), ``round_sigma(σ)`` (the
identity, as a tensor) and ``forward(x, sigma, class_labels=None, force_fp32=False, **kwargs) → D(x; σ)``, with
σ a scalar, (B,) or (B, 1, 1, 1) and class labels one-hot (B, label_dim) as EDM passes them, or integer (B,).
An all-zero label row means unconditional (EDM's convention): that sample sees every training image.
The reverse direction, EDM network pickles into the engine, is :func:`analytic_diffusion.networks.load_network`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ..denoisers import Denoiser

__all__ = ["EDMNet", "to_edm"]


class EDMNet(torch.nn.Module):
    """See the module docstring."""

    sigma_min = 0.0
    sigma_max = float("inf")

    def __init__(self, denoiser: Denoiser, label_dim: int | None = None) -> None:
        super().__init__()
        shape = getattr(denoiser, "image_shape", None)
        if not callable(denoiser) or shape is None or len(tuple(shape)) != 3:
            raise TypeError(
                "denoiser: expected an analytic_diffusion Denoiser (callable with image_shape=(C, H, W)), "
                f"got {type(denoiser).__name__}"
            )
        c, h, w = (int(v) for v in shape)
        if h != w:
            raise ValueError(f"denoiser: EDM networks are square (img_resolution), got image shape {tuple(shape)}")
        if label_dim is None:
            labels = getattr(getattr(denoiser, "keys", None), "labels", None)
            label_dim = 0 if labels is None else int(labels.max()) + 1
        self.denoiser = denoiser
        self.img_resolution, self.img_channels, self.label_dim = h, c, int(label_dim)

    @property
    def device(self) -> torch.device | None:
        return getattr(self.denoiser, "device", None)

    def round_sigma(self, sigma: float | torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(sigma)

    def forward(
        self,
        x: torch.Tensor,
        sigma: float | torch.Tensor,
        class_labels: torch.Tensor | None = None,
        force_fp32: bool = False,
        **kwargs: Any,
    ) -> torch.Tensor:
        # Python numbers as float64 (as_tensor would round them to float32); EDM's own σ tensors are float64.
        s = sigma if torch.is_tensor(sigma) else torch.as_tensor(sigma, dtype=torch.float64)
        s = s.to(x.device).reshape(-1)
        if class_labels is None or not self.label_dim:
            return self.denoiser(x, s)
        cl = torch.as_tensor(class_labels, device=x.device)
        if cl.dim() != 2:
            return self.denoiser(x, s, cl)  # integer labels: the denoiser checks them
        labels, conditional = self._one_hot_rows(cl, x.shape[0])
        if bool(conditional.all()):
            return self.denoiser(x, s, labels)
        if not bool(conditional.any()):
            return self.denoiser(x, s)
        # EDM's convention: an all-zero row asks for the unconditional model. A denoiser is a pure function of each
        # sample, so the two kinds of rows can go through two calls and be put back in place.
        s = s.expand(x.shape[0]) if s.numel() == 1 else s
        out = torch.empty_like(x)
        out[conditional] = self.denoiser(x[conditional], s[conditional], labels[conditional]).to(x.dtype)
        out[~conditional] = self.denoiser(x[~conditional], s[~conditional]).to(x.dtype)
        return out

    def _one_hot_rows(self, cl: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(class index per row, whether the row is conditional) from EDM's (B, label_dim) label rows: one-hot rows
        name a class, all-zero rows mean unconditional; anything else is refused rather than guessed."""
        if tuple(cl.shape) != (batch, self.label_dim):
            raise ValueError(
                f"class_labels: expected one-hot rows of shape ({batch}, {self.label_dim}), got {tuple(cl.shape)}"
            )
        ones, zeros = (cl == 1).sum(1), (cl == 0).sum(1)
        conditional = ones == 1
        valid = (conditional & (zeros == self.label_dim - 1)) | (zeros == self.label_dim)
        if not bool(valid.all()):
            bad = int((~valid).nonzero()[0])
            raise ValueError(
                f"class_labels: row {bad} is {cl[bad].tolist()}; expected a one-hot row (one class) or an all-zero "
                "row (unconditional), as EDM passes them"
            )
        return cl.argmax(dim=1), conditional

    def __repr__(self) -> str:
        return f"EDMNet({self.denoiser!r}, img_resolution={self.img_resolution}, label_dim={self.label_dim})"


def to_edm(denoiser: Denoiser, label_dim: int | None = None) -> EDMNet:
    """An analytic denoiser as an EDM-style network (``label_dim`` defaults to the dataset's class count)."""
    return EDMNet(denoiser, label_dim)
