"""Sampling: σ grids (re-exported from :mod:`analytic_diffusion.grids`), samplers with one signature, the one-call
:func:`sample`, and :func:`run_sample`, which writes a run folder (what ``analytic-diffusion sample`` does)."""

from ..grids import SCHEDULES, Schedule, get_schedule, kamb_sigma, karras, vp_cosine, vp_linear
from .generate import SampleResult, sample
from .run import prepare_dataset, run_sample
from .samplers import SAMPLERS, get_sampler, sample_ddim, sample_ddpm, sample_euler, sample_heun
from .teleport import sample_teleported, teleport_grid

__all__ = [
    "SAMPLERS",
    "SCHEDULES",
    "SampleResult",
    "Schedule",
    "get_sampler",
    "get_schedule",
    "kamb_sigma",
    "karras",
    "prepare_dataset",
    "run_sample",
    "sample",
    "sample_ddim",
    "sample_ddpm",
    "sample_euler",
    "sample_heun",
    "sample_teleported",
    "teleport_grid",
    "vp_cosine",
    "vp_linear",
]
