"""Analytic denoisers as other ecosystems' models (one module per ecosystem; none imports its package).

* :func:`to_diffusers`     a UNet2DModel-style ε / v model for a diffusers scheduler (DDPMPipeline, DDIMPipeline).
* :func:`to_edm`           an EDM-style network (img_resolution, round_sigma, forward(x, sigma, class_labels)).
* :func:`to_smalldiffusion` a smalldiffusion model (rand_input, predict_eps, σ as [] or [B, 1, …, 1]);
  :func:`load_smalldiffusion` its schedules and ``samples`` where ``import smalldiffusion`` needs torchvision.

k-diffusion needs no wrapper: a denoiser is already ``model(x, sigma, **extra_args)``, and ``ad.sample`` runs
k-diffusion's samplers (``sampler=fn``).
"""

from .diffusers import DiffusersModel, DiffusersOutput, float64_alphas_cumprod, to_diffusers
from .edm import EDMNet, to_edm
from .smalldiffusion import SmallDiffusionModel, load_smalldiffusion, to_smalldiffusion

__all__ = [
    "DiffusersModel",
    "DiffusersOutput",
    "EDMNet",
    "SmallDiffusionModel",
    "float64_alphas_cumprod",
    "load_smalldiffusion",
    "to_diffusers",
    "to_edm",
    "to_smalldiffusion",
]
