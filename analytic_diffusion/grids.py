"""Noise-level grids in σ-space (EDM / k-diffusion convention, docs/design.md §2).

A sample at noise level σ is x = x0 + σ·ε. A VP process x_vp = a·x0 + b·ε (a = sqrt(ᾱ), b = sqrt(1-ᾱ))
maps in by x = x_vp / a, σ = b / a = sqrt((1-ᾱ)/ᾱ), so one sampler serves EDM and DDPM-style grids alike.

Every grid is a :class:`Schedule` whose ``sigmas`` has ``steps + 1`` float64 entries, decreasing, normally
ending at 0. Discrete VP grids reproduce diffusers' ``DDIMScheduler.set_timesteps`` timestep spacings.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, overload

import numpy as np
import torch

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = [
    "SCHEDULES",
    "SPACINGS",
    "Schedule",
    "get_schedule",
    "kamb_sigma",
    "karras",
    "vp_cosine",
    "vp_linear",
]

SPACINGS = ("leading", "trailing", "linspace")
_FINALS = ("zero", "alpha0")


@dataclass
class Schedule:
    """A σ grid for sampling.

    sigmas:    float64 (steps + 1,), non-increasing; the sampler steps sigmas[i] -> sigmas[i + 1].
    kind:      "ve" (start from N(0, σ_0²)) or "vp" (start from x_vp ~ N(0, I), i.e. std sqrt(1 + σ_0²)).
    name:      grid name, for logs and configs.
    timesteps: the timesteps each step evaluates at (discrete VP grids: integer train timesteps; the Kamb
               cosine grid: continuous t in [0, 1]); None for σ-native grids.
    """

    sigmas: torch.Tensor
    kind: str
    name: str
    timesteps: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.sigmas = torch.as_tensor(self.sigmas, dtype=torch.float64)
        if self.sigmas.dim() != 1 or len(self.sigmas) < 2:
            raise ValueError(f"sigmas must be 1-D with at least 2 entries, got shape {tuple(self.sigmas.shape)}")
        _check_choice("kind", self.kind, ("ve", "vp"))

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    # A Schedule stands in for its σ tensor (k-diffusion samplers index it, numpy / torch.as_tensor convert it).
    def __len__(self) -> int:
        return len(self.sigmas)

    def __getitem__(self, i: int | slice | torch.Tensor) -> torch.Tensor:
        return self.sigmas[i]

    def __array__(self, dtype: npt.DTypeLike | None = None, copy: bool | None = None) -> np.ndarray:
        a = self.sigmas.numpy()
        return a if dtype is None else a.astype(dtype)

    def tensor(self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The σ grid as a tensor on ``device`` in ``dtype`` (k-diffusion samplers take it in x's dtype)."""
        return self.sigmas.to(device=device, dtype=dtype)

    @property
    def init_sigma(self) -> float:
        """Standard deviation of the σ-space initial noise."""
        s0 = float(self.sigmas[0])
        return s0 if self.kind == "ve" else math.sqrt(1.0 + s0 * s0)


def _check_steps(steps: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    return int(steps)


def _check_choice(arg: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{arg} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def karras(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Schedule:
    """EDM (Karras et al. 2022) grid: σ_i = (σ_max^(1/ρ) + i/(n-1)·(σ_min^(1/ρ) - σ_max^(1/ρ)))^ρ, then 0."""
    steps = _check_steps(steps)
    if not sigma_min > 0:
        raise ValueError(f"sigma_min must be > 0, got {sigma_min!r}")
    if not sigma_max > sigma_min:
        raise ValueError(f"sigma_max must be > sigma_min ({sigma_min!r}), got {sigma_max!r}")
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho!r}")
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)  # steps == 1 gives [0]: a single σ_max -> 0 step
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return Schedule(torch.cat([sigmas, sigmas.new_zeros(1)]), "ve", "karras")


def _ddim_timesteps(steps: int, spacing: str, num_train_timesteps: int, steps_offset: int) -> np.ndarray:
    """Timesteps exactly as diffusers' DDIMScheduler.set_timesteps computes them."""
    T = num_train_timesteps
    if spacing == "leading":
        t = (np.arange(0, steps) * (T // steps)).round()[::-1].copy().astype(np.int64) + steps_offset
    elif spacing == "trailing":
        t = np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
    else:
        t = np.linspace(0, T - 1, steps).round()[::-1].copy().astype(np.int64)
    return t


def _discrete_vp(
    alphas_cumprod: torch.Tensor, name: str, steps: int, spacing: str, steps_offset: int, final: str
) -> Schedule:
    T = len(alphas_cumprod)
    _check_choice("spacing", spacing, SPACINGS)
    _check_choice("final", final, _FINALS)
    if steps > T:
        raise ValueError(f"steps ({steps}) must be <= num_train_timesteps ({T})")
    if steps_offset < 0:
        raise ValueError(f"steps_offset must be >= 0, got {steps_offset!r}")
    t = _ddim_timesteps(steps, spacing, T, steps_offset)
    if len(t) != steps or t.max() >= T or t.min() < 0 or np.any(np.diff(t) >= 0):
        raise ValueError(
            f"spacing={spacing!r} with steps={steps}, steps_offset={steps_offset} gives invalid "
            f"timesteps {t.tolist()} for num_train_timesteps={T}"
        )
    sig = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
    # The last step lands at ᾱ = 1 (set_alpha_to_one=True) or at ᾱ_0. Note diffusers' DDIM step targets
    # t - T//steps rather than the next listed timestep; the two agree for "leading" (and for "trailing" when
    # steps divides T). Elsewhere this grid uses the next listed timestep, which is the consistent choice.
    last = sig.new_zeros(1) if final == "zero" else sig[:1]
    # With final="alpha0" and a last timestep of 0 the final step has zero length; diffusers takes it too
    # (the identity unless x̂0 is clipped), so it is kept rather than silently dropped.
    return Schedule(torch.cat([sig[torch.from_numpy(t)], last]), "vp", name, torch.from_numpy(t))


def vp_linear(
    steps: int,
    spacing: str = "leading",
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    num_train_timesteps: int = 1000,
    steps_offset: int = 0,
    final: str = "zero",
) -> Schedule:
    """DDPM linear-β grid (diffusers ``beta_schedule="linear"``) at DDIM timesteps.

    β = linspace(beta_start, beta_end, T), ᾱ_t = Π_{s<=t}(1 - β_s), σ_t = sqrt((1-ᾱ_t)/ᾱ_t). ᾱ is computed in
    float64 (diffusers uses float32; σ agrees to ~1e-6 relative). E.g. 10 "leading" steps visit t = 900, ..., 0.
    final="zero" matches set_alpha_to_one=True; final="alpha0" ends at σ(ᾱ_0) instead, leaving that tiny
    noise in the σ-space result (diffusers' VP output is that x times sqrt(ᾱ_0)).
    """
    steps = _check_steps(steps)
    if not 0 < beta_start <= beta_end < 1:
        raise ValueError(f"need 0 < beta_start <= beta_end < 1, got beta_start={beta_start!r}, beta_end={beta_end!r}")
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps!r}")
    betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    return _discrete_vp(torch.cumprod(1 - betas, 0), "vp-linear", steps, spacing, steps_offset, final)


@overload
def kamb_sigma(t: float) -> float: ...


@overload
def kamb_sigma(t: torch.Tensor) -> torch.Tensor: ...


def kamb_sigma(t: float | torch.Tensor) -> float | torch.Tensor:
    """σ of Kamb & Ganguli's legacy cosine schedule at continuous time t in [0, 1].

    1 - ᾱ(t) = 1 - cos²(t/1.008 · π/2), so σ = sqrt((1-ᾱ)/ᾱ) = tan(t/1.008 · π/2). Accepts floats or tensors.
    """
    if isinstance(t, torch.Tensor):
        return torch.tan(t.to(torch.float64) / 1.008 * (math.pi / 2))
    return math.tan(t / 1.008 * (math.pi / 2))


def vp_cosine(
    steps: int,
    kind: str = "iddpm",
    *,
    spacing: str = "leading",
    num_train_timesteps: int = 1000,
    steps_offset: int = 0,
    final: str = "zero",
    s: float = 0.008,
    max_beta: float = 0.999,
    include_t1: bool = False,
) -> Schedule:
    """Cosine VP grids.

    kind="iddpm": improved-DDPM / diffusers ``squaredcos_cap_v2``: f(u) = cos²((u + s)/(1 + s)·π/2),
        β_i = min(1 - f((i+1)/T)/f(i/T), max_beta), ᾱ_t = Π_{i<=t}(1 - β_i); timesteps as in :func:`vp_linear`.
    kind="kamb": Kamb & Ganguli's continuous legacy cosine (no offset: σ(0) = 0, see :func:`kamb_sigma`).
        The grid is t = i/n for i = n-1, ..., 1, then t = 0, with n = steps + 1: steps=19 is their analytic
        machine's grid (t = 0.95 ... 0.05, 0). include_t1=True uses n = steps and starts at t = 1, as their
        network sampler does (steps=20). Only ``include_t1`` applies to this kind.
    """
    steps = _check_steps(steps)
    _check_choice("kind", kind, ("iddpm", "kamb"))
    if kind == "kamb":
        n = steps if include_t1 else steps + 1
        t = torch.arange(steps, -1, -1, dtype=torch.float64) / n
        t[-1] = 0.0
        sig = kamb_sigma(t)
        sig[-1] = 0.0
        return Schedule(sig, "vp", "kamb-cosine", t)
    if include_t1:
        raise ValueError("include_t1 applies only to kind='kamb'")
    if not 0 < max_beta < 1:
        raise ValueError(f"max_beta must be in (0, 1), got {max_beta!r}")
    if not s >= 0:
        raise ValueError(f"s must be >= 0, got {s!r}")
    T = num_train_timesteps
    if T < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {T!r}")
    u = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((u + s) / (1 + s) * (math.pi / 2)) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
    return _discrete_vp(torch.cumprod(1 - betas, 0), "vp-cosine", steps, spacing, steps_offset, final)


def _kamb_cosine(steps: int, include_t1: bool = False) -> Schedule:
    return vp_cosine(steps, "kamb", include_t1=include_t1)


SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "karras": karras,
    "edm": karras,
    "vp-linear": vp_linear,
    "vp-cosine": vp_cosine,
    "kamb-cosine": _kamb_cosine,
}


def schedule_options(name: str) -> list[str]:
    """The keyword options of the grid ``name`` (beside ``steps``)."""
    return [p for p in inspect.signature(SCHEDULES[name]).parameters if p != "steps"]


def get_schedule(name: str, steps: int, **kw: Any) -> Schedule:
    """Build a grid by name ("karras"/"edm", "vp-linear", "vp-cosine", "kamb-cosine") with its keyword options."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid names: {', '.join(SCHEDULES)}")
    takes = schedule_options(name)
    unknown = sorted(set(kw) - set(takes))
    if unknown:
        others = sorted(other for other in SCHEDULES if set(unknown) <= set(schedule_options(other)))
        raise ValueError(
            f"{', '.join(unknown)}: not an option of schedule {name!r} (it takes {', '.join(takes) or 'none'})"
            + (f"; {', '.join(others)} take{'s' if len(others) == 1 else ''} it" if others else "")
        )
    try:
        return SCHEDULES[name](steps, **kw)
    except TypeError as e:  # an option of the wrong type (a string σ, ...)
        raise ValueError(f"schedule {name!r}: {e}") from None
