"""Shared machinery of the local denoisers: a patch size per σ, and samples grouped by patch size."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .base import Posterior
from .optimal import RetrievalDenoiser
from .patch_presets import as_patch_schedule
from .patch_schedule import PatchSchedule

if TYPE_CHECKING:
    from ..data import Dataset


class LocalDenoiser(RetrievalDenoiser):
    """A retrieval denoiser whose locality (patch side k) follows a :class:`PatchSchedule`.

    Subclasses implement ``_denoise_k(x, s, labels, k)`` for one patch size and may override
    ``_check_patch(k)`` to reject sizes the image cannot take. Samples of one batch at different σ may need
    different k: they are grouped by k, so each group is one exact call.
    """

    default_patch: int | None = None

    def __init__(self, dataset: Dataset, *, patch: int | str | PatchSchedule | None = None, **kw: Any) -> None:
        super().__init__(dataset, **kw)
        self.patch = as_patch_schedule(patch, self.default_patch)
        for k in set(self.patch.sizes):
            self._check_patch(k)

    def _check_patch(self, k: int) -> None:
        """Raise ValueError naming ``patch`` if k cannot be used on this image size."""

    def _backend_for(self, x: torch.Tensor) -> str:
        """The backend of this call. The fused kernels have no backward, so a call that autograd records (x
        requires grad) runs the torch reference: the same function in the same working dtype, differentiated
        exactly by autograd (per pixel, ∂x̂0(p)/∂x = Cov over that pixel's candidates of (value, patch) / σ²T)."""
        return "torch" if torch.is_grad_enabled() and x.requires_grad else self.backend

    def _denoise_k(self, x: torch.Tensor, s: torch.Tensor, labels: torch.Tensor | None, k: int) -> torch.Tensor:
        raise NotImplementedError

    def patch_sizes(self, s: torch.Tensor) -> torch.Tensor:
        return torch.tensor([self.patch.k_for(float(v)) for v in s.cpu()], dtype=torch.long)

    def grouped(
        self,
        x: torch.Tensor,
        s: torch.Tensor,
        labels: torch.Tensor | None,
        group_keys: Sequence[float],
        fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, float], torch.Tensor],
    ) -> torch.Tensor:
        """Run ``fn(x, s, labels, key)`` once per distinct key (a patch size, a σ) on the rows that share it."""
        out = torch.empty_like(x, dtype=self.dtype)
        keys = torch.as_tensor(group_keys, dtype=torch.float64)
        for key in torch.unique(keys).tolist():
            rows = (keys == key).nonzero().flatten().to(x.device)
            out[rows] = fn(x[rows], s[rows], None if labels is None else labels[rows], key).to(self.dtype)
        return out

    def denoise(self, x: torch.Tensor, s: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return self.grouped(
            x, s, labels, self.patch_sizes(s).tolist(), lambda xr, sr, lr, k: self._denoise_k(xr, sr, lr, int(k))
        )

    def _posterior(self, x: torch.Tensor, s: torch.Tensor, labels: torch.Tensor | None) -> Posterior:
        raise NotImplementedError(f"{self.name}: per-pixel posteriors have no single summary; use __call__")

    def config(self) -> dict[str, Any]:
        return {**super().config(), "patch": self.patch.to_json()}
