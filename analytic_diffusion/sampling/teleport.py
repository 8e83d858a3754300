"""Analytic teleportation: skip the high-noise part of sampling with the Gaussian model's exact flow.

At high noise the posterior mean of any image distribution is close to that of the Gaussian with the data's mean
and covariance (Wang & Vastola, arXiv 2303.02984), and for that Gaussian the probability-flow ODE has a closed-form
solution (:meth:`analytic_diffusion.denoisers.Wiener.flow`). :func:`sample_teleported` draws the same initial noise
as :func:`~analytic_diffusion.sampling.sample` (sample i from seed + i), moves it from σ_max to ``sigma_skip`` in
one exact jump, and integrates the rest of the same σ grid with any denoiser, analytic or trained.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Callable

import torch

from ..grids import Schedule, get_schedule
from .generate import SampleResult, initial_noise
from .samplers import SAMPLERS, get_sampler

if TYPE_CHECKING:
    from ..denoisers import Wiener

__all__ = ["sample_teleported", "teleport_grid"]


def teleport_grid(sigmas: torch.Tensor, sigma_skip: float) -> tuple[torch.Tensor, int]:
    """(remaining grid, steps skipped): the grid points below ``sigma_skip``, with ``sigma_skip`` put in front.

    The steps skipped are those that start above ``sigma_skip``; sigma_skip at or above σ_0 skips nothing.
    """
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1)
    s = float(sigma_skip)
    if not (0 < s < float("inf")):
        raise ValueError(f"sigma_skip: expected a finite σ > 0, got {sigma_skip!r}")
    if s >= float(sigmas[0]):
        return sigmas.clone(), 0
    below = sigmas[sigmas < s]
    if below.numel() == 0:
        raise ValueError(f"sigma_skip={s}: no grid point lies below it (grid ends at {float(sigmas[-1])})")
    skipped = int((sigmas[:-1] > s).sum())  # steps whose start lies above σ_skip
    return torch.cat([sigmas.new_tensor([s]), below]), skipped


@torch.no_grad()
def sample_teleported(
    denoiser: Callable[..., torch.Tensor],
    gaussian: Wiener,
    n: int = 16,
    *,
    sigma_skip: float,
    steps: int = 18,
    sampler: str = "heun",
    schedule: str | Schedule = "karras",
    schedule_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    class_labels: torch.Tensor | Sequence[int] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> SampleResult:
    """Samples whose first part, σ_0 → ``sigma_skip``, is the exact Gaussian flow, continued by ``denoiser``.

    gaussian:   a :class:`~analytic_diffusion.denoisers.Wiener` (its mean and PCA define the Gaussian).
    sigma_skip: where the denoiser takes over; the steps of the grid that start above it are not run.
    Other arguments as for :func:`~analytic_diffusion.sampling.sample`; with the same seeds the samples start
    from the same noise, so a teleported run can be compared with the full run sample by sample. Deterministic
    samplers (euler, heun, ddim with eta=0) only: a stochastic sampler's draws would no longer line up.
    """
    if not callable(getattr(gaussian, "flow", None)):
        raise TypeError(f"gaussian: expected a Wiener denoiser (with .flow), got {type(gaussian).__name__}")
    if sampler not in SAMPLERS or sampler == "ddpm":
        raise ValueError(f"sampler: expected a deterministic sampler (euler, heun, ddim), got {sampler!r}")
    sched = schedule if isinstance(schedule, Schedule) else get_schedule(schedule, steps, **(schedule_kwargs or {}))
    if sched.kind != "ve":
        raise ValueError(
            f"schedule: teleportation starts from N(0, σ_0²) noise (a VE grid such as karras); "
            f"{sched.name!r} is {sched.kind}"
        )
    shape = tuple(gaussian.image_shape)
    if tuple(getattr(denoiser, "image_shape", shape)) != shape:
        raise ValueError(f"denoiser works on {denoiser.image_shape}, the Gaussian on {shape}")  # type: ignore[attr-defined]
    grid, skipped = teleport_grid(sched.sigmas, sigma_skip)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    batch_size = n if batch_size is None else int(batch_size)
    device = torch.device(device if device is not None else (getattr(denoiser, "device", None) or "cpu"))
    seeds = [seed + i for i in range(n)]
    labels = None if class_labels is None else torch.as_tensor(class_labels).reshape(-1)
    fn = get_sampler(sampler)
    out, t0 = [], time.perf_counter()
    for start in range(0, n, batch_size):
        gens, x = initial_noise(seeds[start : start + batch_size], shape, sched.init_sigma, device, dtype)
        if skipped:
            x = gaussian.flow(x, float(sched.sigmas[0]), float(grid[0]))
        kw = {} if labels is None else {"class_labels": labels[start : start + batch_size].to(device)}
        x = fn(denoiser, x, grid, generators=gens, progress=progress, denoiser_kwargs=kw)
        out.append(x.cpu())
    config = {
        "denoiser": str(getattr(denoiser, "name", type(denoiser).__name__)),
        "n": n,
        "steps": sched.steps,
        "steps_run": sched.steps - skipped,
        "steps_skipped": skipped,
        "sigma_skip": float(grid[0]),
        "sampler": sampler,
        "schedule": sched.name,
        "seed": seed,
        "shape": list(shape),
        "dtype": str(dtype).replace("torch.", ""),
    }
    return SampleResult(torch.cat(out), seeds, grid, config, time.perf_counter() - t0)
