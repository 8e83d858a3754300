"""Sampling: σ grids (re-exported from :mod:`analytic_diffusion.grids`), samplers with one signature, the one-call
:func:`sample`, and :func:`run_sample`, which writes a run folder (what ``analytic-diffusion sample`` does)."""
from ..grids import SCHEDULES, Schedule, get_schedule, kamb_sigma, karras, vp_cosine, vp_linear
from .generate import SampleResult, sample
from .run import prepare_dataset, run_sample
from .teleport import sample_teleported, teleport_grid
from .samplers import SAMPLERS, get_sampler, sample_ddim, sample_ddpm, sample_euler, sample_heun

__all__ = ["Schedule", "SCHEDULES", "get_schedule", "karras", "vp_linear", "vp_cosine", "kamb_sigma",
           "SampleResult", "sample", "run_sample", "prepare_dataset", "SAMPLERS", "get_sampler", "sample_euler",
           "sample_heun", "sample_ddim", "sample_ddpm", "sample_teleported", "teleport_grid"]
