"""smalldiffusion (Permenter & Yuan): an analytic denoiser as a smalldiffusion model.

smalldiffusion calls models as ``model(x, sigma, cond=None)`` returning ε̂, with σ of shape [] (one level for the
batch) or [B, 1, …, 1]; its ``samples()`` draws the initial point with ``model.rand_input(batchsize)`` and steps
with ``model.predict_eps_cfg(x, sigma, cond, cfg_scale)``. Its noise model is the engine's, x = x0 + σ·ε, so
ε̂ = (x − D(x, σ)) / σ. ``cond`` (class labels) is passed to the denoiser as ``class_labels``; classifier-free
guidance is not defined for an analytic denoiser (cfg_scale must be 0).

:func:`load_smalldiffusion` returns smalldiffusion's schedules, ``samples`` and models where ``import
smalldiffusion`` fails for want of a working torchvision (its ``data`` module imports torchvision; the schedules,
the sampler and the models do not).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import types
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..denoisers import Denoiser

__all__ = ["SmallDiffusionModel", "load_smalldiffusion", "to_smalldiffusion"]


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


# The modules of smalldiffusion that need no torchvision: diffusion.py (schedules, samples; needs accelerate) and
# model.py (ModelMixin, IdealDenoiser, ...; needs einops). Neither imports another module of the package.
_TORCHVISION_FREE = ("diffusion", "model")


@functools.cache
def load_smalldiffusion() -> types.ModuleType | types.SimpleNamespace:
    """smalldiffusion's API: the package itself where ``import smalldiffusion`` works, else a namespace holding what
    its ``diffusion`` and ``model`` modules define (``ScheduleLogLinear``, ``samples``, ``IdealDenoiser``,
    ...), run from the installed package's own files.

    ``import smalldiffusion`` imports its ``data`` module, which imports torchvision; installed with ``--no-deps``
    (so that it cannot replace the installed torch), or with a torchvision built for another torch, that import
    fails. The two modules loaded instead need accelerate and einops (the ``integrations`` extra). Raises
    ImportError when smalldiffusion is not installed, or when neither way imports it.
    """
    try:
        return importlib.import_module("smalldiffusion")
    except ImportError as exc:
        if exc.name == "smalldiffusion":
            raise ImportError(
                "smalldiffusion is not installed: pip install --no-deps smalldiffusion "
                "(and the integrations extra: accelerate, einops)"
            ) from exc
        package_error: Exception = exc
    except RuntimeError as exc:  # a torchvision built for another torch fails while registering its operators
        package_error = exc
    spec = importlib.util.find_spec("smalldiffusion")  # the package's location, without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("smalldiffusion: the package cannot be located") from package_error
    folder = next(iter(spec.submodule_search_locations))
    names: dict[str, object] = {}
    for part in _TORCHVISION_FREE:
        path = os.path.join(folder, f"{part}.py")
        mod_spec = importlib.util.spec_from_file_location(f"_analytic_diffusion_smalldiffusion_{part}", path)
        if mod_spec is None or mod_spec.loader is None:
            raise ImportError(f"smalldiffusion: no module file {path}") from package_error
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[mod_spec.name] = module  # as an import would (pickle and inspect look modules up there)
        try:
            mod_spec.loader.exec_module(module)
        except ImportError as exc:
            del sys.modules[mod_spec.name]
            raise ImportError(
                f"smalldiffusion: `import smalldiffusion` failed ({package_error}) and its {part}.py needs "
                f"{exc.name} (the package's integrations extra installs accelerate and einops)"
            ) from exc
        names.update(  # what the module defines, not what it imports
            {k: v for k, v in vars(module).items() if getattr(v, "__module__", None) == module.__name__}
        )
    return types.SimpleNamespace(**names)
