"""One-call sampling: seeds, batching and schedules around the samplers in :mod:`samplers`."""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, cast

import torch

from ..denoisers.sample_seeds import sample_identity
from ..grids import Schedule, get_schedule
from .samplers import SAMPLERS, dict_callback, get_sampler, per_sample_noise

__all__ = ["SampleResult", "sample"]


@dataclass
class SampleResult:
    """samples: (n, C, H, W) on CPU; seeds[i] seeded sample i; sigmas: the float64 grid used;
    config: JSON-serialisable description of the run; elapsed_s: wall time of the sampling loop."""

    samples: torch.Tensor
    seeds: list[int]
    sigmas: torch.Tensor
    config: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float = 0.0


def _positive_int(name: str, v: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    return v


def initial_noise(
    seeds: Sequence[int], shape: Sequence[int], init_std: float, device: torch.device | str, dtype: torch.dtype
) -> tuple[list[torch.Generator], torch.Tensor]:
    """(generators, x): one CPU generator per seed and each sample's starting noise, drawn in float32 on the CPU
    (so it is the same on every device and dtype), scaled by ``init_std``."""
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    x = torch.stack([torch.randn(tuple(shape), generator=g) for g in gens]).to(device=device, dtype=dtype)
    return gens, x * init_std


def check_seeds(seed: int, n: int) -> None:
    """Sample i is seeded with seed + i by a torch.Generator, which takes seeds in [0, 2^64)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(n, int) and seed + max(n, 1) - 1 >= 2**64:
        raise ValueError(
            f"seed: sample i uses seed + i, which must stay below 2^64 = {2**64}; got seed {seed} with n = {n}"
        )


def sample(
    denoiser: Callable[..., torch.Tensor],
    n: int = 64,
    *,
    steps: int = 18,
    sampler: str | Callable[..., torch.Tensor] = "heun",
    schedule: str | Schedule = "karras",
    schedule_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
    shape: Sequence[int] | None = None,
    batch_size: int | None = None,
    eta: float = 0.0,
    clip_x0: bool = False,
    class_labels: torch.Tensor | Sequence[int] | None = None,
    callback: Callable[..., object] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> SampleResult:
    """Draw n samples from ``denoiser`` (``D(x, sigma, **kw) -> x0_hat``, docs/design.md §2).

    Sample i starts from noise drawn (in float32, then cast to ``dtype``) by a CPU torch.Generator seeded with
    seed + i, scaled by the schedule's initial std (VE: σ_0, VP: sqrt(1 + σ_0²)); the same generator then drives
    that sample's stochastic steps, so results do not depend on ``batch_size``.

    sampler:       a name in SAMPLERS, or any k-diffusion-style sampler function
                   ``fn(model, x, sigmas, extra_args=None, callback=None, disable=None, ...)`` (e.g.
                   ``k_diffusion.sampling.sample_dpmpp_2m``), called with σ in x's dtype and device, the
                   class labels as extra_args, a dict callback and, when fn takes ``noise_sampler``, one that
                   draws each sample's noise from its own seeded generator (fn's other noise comes from fn's
                   own RNG, so it may depend on the batch).
    schedule:      a name for :func:`get_schedule` (built with ``steps`` and ``schedule_kwargs``) or a Schedule
                   (then ``steps`` and ``schedule_kwargs`` are not used).
    shape:         (C, H, W); defaults to ``denoiser.image_shape``.
    eta:           DDIM stochasticity, only for sampler="ddim" ("ddpm" is η = 1).
    class_labels:  (n,) labels, passed per batch as ``class_labels=`` when given.
    callback:      callback(step, x, sigma, x0_hat) per step, called batch by batch (batch k holds samples
                   k*batch_size, ...).
    device:        defaults to ``denoiser.device`` when it has one, else CPU.
    """
    n = _positive_int("n", n)
    external = callable(sampler) and not isinstance(sampler, str)
    if external:
        sampler_fn = cast("Callable[..., torch.Tensor]", sampler)  # callable and not a str
        if clip_x0:
            raise ValueError("clip_x0 applies only to the engine's own samplers (named ones), not to sampler=fn")
    elif sampler not in SAMPLERS:
        raise ValueError(
            f"sampler must be one of {', '.join(SAMPLERS)} or a k-diffusion-style sampler function; got {sampler!r}"
        )
    else:
        sampler_fn = get_sampler(sampler)
    if not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta!r}")
    if eta != 0 and sampler != "ddim":
        raise ValueError(f"eta applies only to sampler='ddim', got sampler={sampler!r} with eta={eta!r}")
    if isinstance(schedule, Schedule):
        if schedule_kwargs:
            raise ValueError("schedule_kwargs cannot be used with a Schedule instance")
        sched = schedule
    elif isinstance(schedule, str):
        sched = get_schedule(schedule, steps, **(schedule_kwargs or {}))
    else:
        raise ValueError(f"schedule must be a name or a Schedule, got {type(schedule).__name__}")
    if shape is None:
        shape = getattr(denoiser, "image_shape", None)
        if shape is None:
            raise ValueError("shape is required when the denoiser has no image_shape attribute")
    shape = tuple(int(v) for v in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be (C, H, W) with positive sizes, got {shape}")
    batch_size = n if batch_size is None else _positive_int("batch_size", batch_size)
    check_seeds(seed, n)
    if class_labels is not None:
        class_labels = torch.as_tensor(class_labels)
        if class_labels.shape != (n,):
            raise ValueError(f"class_labels must have shape ({n},), got {tuple(class_labels.shape)}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    if device is None:
        device = getattr(denoiser, "device", None) or "cpu"
    device = torch.device(device)

    seeds = [seed + i for i in range(n)]
    init_std = sched.init_sigma
    out = []
    t0 = time.perf_counter()
    for start in range(0, n, batch_size):
        gens, x = initial_noise(seeds[start : start + batch_size], shape, init_std, device, dtype)
        kw: dict[str, Any] = {}
        if class_labels is not None:
            kw["class_labels"] = class_labels[start : start + batch_size].to(device)
        if external:
            x = _run_external(sampler_fn, denoiser, x, sched.sigmas, kw, callback, progress, gens)
        else:
            sampler_kw = {"eta": eta} if sampler == "ddim" else {}
            x = sampler_fn(
                denoiser,
                x,
                sched.sigmas,
                callback=callback,
                clip_x0=clip_x0,
                generators=gens,
                progress=progress,
                denoiser_kwargs=kw,
                **sampler_kw,
            )
        out.append(x.cpu())
    elapsed = time.perf_counter() - t0

    config = {
        "denoiser": str(
            getattr(denoiser, "name", None) or getattr(denoiser, "__name__", None) or type(denoiser).__name__
        ),
        "n": n,
        "steps": sched.steps,
        "sampler": _sampler_name(sampler) if external else sampler,
        "schedule": sched.name,
        "schedule_kind": sched.kind,
        "schedule_kwargs": dict(schedule_kwargs or {}),
        "seed": seed,
        "shape": list(shape),
        "batch_size": batch_size,
        "eta": float(eta),
        "clip_x0": bool(clip_x0),
        "class_labels": None if class_labels is None else class_labels.tolist(),
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
    }
    return SampleResult(torch.cat(out), seeds, sched.sigmas.clone(), config, elapsed)


def _run_external(
    fn: Callable[..., torch.Tensor],
    denoiser: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor,
    kw: dict[str, Any],
    callback: Callable[..., object] | None,
    progress: bool,
    gens: list[torch.Generator],
) -> torch.Tensor:
    """Call a k-diffusion-style sampler with k-diffusion's keyword names."""
    extra: dict[str, Any] = {}
    try:
        if "noise_sampler" in inspect.signature(fn).parameters:
            extra["noise_sampler"] = per_sample_noise(x, gens)
    except (TypeError, ValueError):
        pass
    s = sigmas.to(device=x.device, dtype=x.dtype)
    with torch.no_grad(), sample_identity([g.initial_seed() for g in gens]):  # draws keyed by sample (§14.4)
        return fn(denoiser, x, s, extra_args=kw, callback=dict_callback(callback), disable=not progress, **extra)


def _sampler_name(fn: object) -> str:
    mod, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None) or type(fn).__name__
    return f"{mod}.{name}" if mod else name
