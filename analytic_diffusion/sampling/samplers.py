"""Samplers over σ grids, in the style of k-diffusion (docs/design.md §2, §11).

A denoiser is any callable ``D(x, sigma, **kwargs) -> x0_hat`` with x of shape (B, C, H, W) and sigma of
shape (B,). Every sampler has the signature

    fn(denoiser, x, sigmas, *, callback=None, clip_x0=False, generators=None, progress=False,
       denoiser_kwargs=None, extra_args=None, disable=None) -> x

and steps x from sigmas[0] to sigmas[-1]. ``x`` must already carry the initial noise (see
``Schedule.init_sigma``). ``sigmas`` is (n+1,) for a grid shared by the batch or (n+1, B) for one grid per
sample; every entry but the last must be > 0 and each grid non-increasing.

callback(step, x, sigma, x0_hat) runs after the main denoiser evaluation of every step, with the state before
the update: the step index, x, the (B,) σ and the denoiser's raw (unclipped) x̂0. A callback that takes exactly
one positional argument gets k-diffusion's dict instead: {"x", "i", "sigma", "sigma_hat", "denoised"} (σ 0-d
when the batch shares it, else (B,)).
extra_args (k-diffusion's name) is an alias of denoiser_kwargs: keyword arguments of every denoiser call.
disable (k-diffusion's name) overrides progress: disable=True hides the bar, False shows it.
clip_x0 clamps x̂0 to [-1, 1] where the step uses it as x̂0 (diffusers' clip_sample); ε̂ = (x - x̂0)/σ still
comes from the unclipped x̂0 in DDIM, as in diffusers.
generators: B torch.Generator, one per sample, for stochastic noise, so that sample i's noise does not depend on
the batch it runs in (default: the global RNG).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from typing import Any, Callable, TypeVar, cast

import torch
from tqdm.auto import tqdm

from ..denoisers.sample_seeds import sample_identity

__all__ = [
    "SAMPLERS",
    "dict_callback",
    "get_sampler",
    "per_sample_noise",
    "sample_ddim",
    "sample_ddpm",
    "sample_euler",
    "sample_heun",
]


def _prepare(
    x: torch.Tensor, sigmas: torch.Tensor | Sequence[float], generators: Sequence[torch.Generator] | None
) -> torch.Tensor:
    """Validate and return the grid as an (n+1, B) tensor in x's dtype and device."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] < 1:
        raise ValueError("x must be a tensor with a non-empty batch dimension")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    B = x.shape[0]
    s = torch.as_tensor(sigmas, dtype=torch.float64).cpu()
    if s.dim() == 1:
        s = s[:, None].expand(-1, B)
    if s.dim() != 2 or s.shape[1] != B or s.shape[0] < 2:
        raise ValueError(f"sigmas must have shape (n+1,) or (n+1, B={B}) with n >= 1, got {tuple(s.shape)}")
    if not torch.isfinite(s).all() or (s[:-1] <= 0).any() or (s[-1] < 0).any():
        raise ValueError("sigmas must be finite, > 0 except for the last entry, which must be >= 0")
    if (s[1:] > s[:-1]).any():
        raise ValueError("sigmas must be non-increasing along the grid")
    if generators is not None and len(generators) != B:
        raise ValueError(f"generators must hold one torch.Generator per sample ({B}), got {len(generators)}")
    return s.to(device=x.device, dtype=x.dtype)


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (x.dim() - 1)))


def _options(
    denoiser_kwargs: dict[str, Any] | None,
    extra_args: dict[str, Any] | None,
    progress: bool,
    disable: bool | None,
    callback: Callable[..., object] | None,
) -> tuple[dict[str, Any], bool, Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], object]]:
    """(denoiser keyword arguments, progress, emit) from the engine's and k-diffusion's spellings of each;
    emit(i, x, sigma, x0) calls the callback in its own convention, decided once per run."""
    if denoiser_kwargs and extra_args:
        raise ValueError("pass the denoiser's keyword arguments as denoiser_kwargs= or extra_args=, not both")
    kw = denoiser_kwargs or extra_args or {}
    if not isinstance(kw, dict):
        raise TypeError(f"extra_args / denoiser_kwargs: expected a dict, got {type(kw).__name__}")
    return kw, (progress if disable is None else not disable), _emitter(callback)


def _takes_one_argument(callback: Callable[..., object]) -> bool:
    """True for a callback in k-diffusion's style, fn(info_dict): exactly one positional parameter, no *args."""
    try:
        params = list(inspect.signature(callback).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature: the engine's positional style
        return False
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return False
    required = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    return len(required) == 1


def _emitter(
    callback: Callable[..., object] | None,
) -> Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], object]:
    """fn(i, x, sigma, x0) that reports a step to ``callback`` (None: does nothing)."""
    if callback is None:
        return lambda i, x, sigma, x0: None
    if not _takes_one_argument(callback):
        return callback

    def emit(
        i: int, x: torch.Tensor, sigma: torch.Tensor, x0: torch.Tensor
    ) -> None:  # k-diffusion's dict, with a scalar σ when the batch shares one
        s = sigma[0] if bool((sigma == sigma[0]).all()) else sigma
        callback({"x": x, "i": i, "sigma": s, "sigma_hat": s, "denoised": x0})

    return emit


def dict_callback(callback: Callable[..., object] | None) -> Callable[..., object] | None:
    """A callback for k-diffusion-style samplers (called with one dict) from either convention; None stays None."""
    if callback is None or _takes_one_argument(callback):
        return callback
    return lambda d: callback(d["i"], d["x"], d["sigma"], d["denoised"])


def per_sample_noise(
    x: torch.Tensor, generators: Sequence[torch.Generator] | None
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A k-diffusion ``noise_sampler(sigma, sigma_next)`` that draws each sample's noise from its own generator."""
    return lambda sigma, sigma_next: _noise(x, generators)


def _noise(x: torch.Tensor, generators: Sequence[torch.Generator] | None) -> torch.Tensor:
    if generators is None:
        return torch.randn_like(x)
    # Per-sample draws on each generator's own device keep a sample's stream independent of the batch.
    return torch.stack([torch.randn(x.shape[1:], generator=g, device=g.device, dtype=x.dtype) for g in generators]).to(
        x.device
    )


def _denoise(
    denoiser: Callable[..., torch.Tensor], x: torch.Tensor, sigma: torch.Tensor, kwargs: dict[str, Any]
) -> torch.Tensor:
    return denoiser(x, sigma, **kwargs).to(x.dtype)


def _derivative(
    denoiser: Callable[..., torch.Tensor], x: torch.Tensor, sigma: torch.Tensor, kw: dict[str, Any], clip_x0: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂0, dx/dσ) with dx/dσ = (x − x̂0)/σ; x̂0 clipped first when asked (as diffusers' clip_sample)."""
    x0 = _denoise(denoiser, x, sigma, kw)
    return x0, (x - (x0.clamp(-1, 1) if clip_x0 else x0)) / _bcast(sigma, x)


_Sampler = TypeVar("_Sampler", bound=Callable[..., torch.Tensor])


def _keyed_by_sample(sampler: _Sampler) -> _Sampler:
    """The sampler with each row's random draws inside the denoiser keyed by its sample (the seed of its generator;
    docs/design.md §14.4): stochastic denoisers then see the same draws for sample i whatever the batch."""

    @functools.wraps(sampler)
    def run(
        denoiser: Callable[..., torch.Tensor],
        x: torch.Tensor,
        sigmas: torch.Tensor | Sequence[float],
        *args: Any,
        generators: Sequence[torch.Generator] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        ids = None if generators is None else [g.initial_seed() for g in generators]
        with nullcontext() if ids is None else sample_identity(ids):
            return sampler(denoiser, x, sigmas, *args, generators=generators, **kwargs)

    return cast(_Sampler, run)


def _steps(n: int, progress: bool) -> Iterable[int]:
    return tqdm(range(n), disable=not progress, leave=False)


@_keyed_by_sample
@torch.no_grad()
def sample_euler(
    denoiser: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor | Sequence[float],
    *,
    callback: Callable[..., object] | None = None,
    clip_x0: bool = False,
    generators: Sequence[torch.Generator] | None = None,
    progress: bool = False,
    denoiser_kwargs: dict[str, Any] | None = None,
    extra_args: dict[str, Any] | None = None,
    disable: bool | None = None,
) -> torch.Tensor:
    """Euler on the probability-flow ODE dx/dσ = (x - x̂0)/σ; n denoiser calls."""
    s = _prepare(x, sigmas, generators)
    kw, progress, emit = _options(denoiser_kwargs, extra_args, progress, disable, callback)
    for i in _steps(len(s) - 1, progress):
        sigma, sigma_next = s[i], s[i + 1]
        x0, d = _derivative(denoiser, x, sigma, kw, clip_x0)
        emit(i, x, sigma, x0)
        x = x + d * _bcast(sigma_next - sigma, x)
    return x


@_keyed_by_sample
@torch.no_grad()
def sample_heun(
    denoiser: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor | Sequence[float],
    *,
    callback: Callable[..., object] | None = None,
    clip_x0: bool = False,
    generators: Sequence[torch.Generator] | None = None,
    progress: bool = False,
    denoiser_kwargs: dict[str, Any] | None = None,
    extra_args: dict[str, Any] | None = None,
    disable: bool | None = None,
) -> torch.Tensor:
    """EDM Algorithm 1 (Heun, no churn): trapezoidal correction on every step except those ending at σ = 0,
    where the ODE's derivative is undefined; 2n - 1 denoiser calls on a grid ending at 0."""
    s = _prepare(x, sigmas, generators)
    kw, progress, emit = _options(denoiser_kwargs, extra_args, progress, disable, callback)
    for i in _steps(len(s) - 1, progress):
        sigma, sigma_next = s[i], s[i + 1]
        x0, d = _derivative(denoiser, x, sigma, kw, clip_x0)
        emit(i, x, sigma, x0)
        x_euler = x + d * _bcast(sigma_next - sigma, x)
        last = sigma_next == 0
        if bool(last.all()):
            x = x_euler
            continue
        # Per-sample grids may mix final and non-final steps: evaluate the final rows at their current point
        # (a valid σ > 0) and keep their Euler result.
        sig2 = torch.where(last, sigma, sigma_next)
        x2 = torch.where(_bcast(last, x), x, x_euler)
        _, d2 = _derivative(denoiser, x2, sig2, kw, clip_x0)
        x_heun = x + (d + d2) * _bcast((sigma_next - sigma) / 2, x)
        x = torch.where(_bcast(last, x), x_euler, x_heun)
    return x


@_keyed_by_sample
@torch.no_grad()
def sample_ddim(
    denoiser: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigmas: torch.Tensor | Sequence[float],
    *,
    eta: float = 0.0,
    callback: Callable[..., object] | None = None,
    clip_x0: bool = False,
    generators: Sequence[torch.Generator] | None = None,
    progress: bool = False,
    denoiser_kwargs: dict[str, Any] | None = None,
    extra_args: dict[str, Any] | None = None,
    disable: bool | None = None,
) -> torch.Tensor:
    """DDIM in σ-space; n denoiser calls.

    With ε̂ = (x - x̂0)/σ and s_up = η·σ'·sqrt(1 - σ'²/σ²) for the next level σ':
        x' = x̂0 + sqrt(σ'² - s_up²)·ε̂ + s_up·z.
    This is diffusers' DDIM step (variance η²·(1-ᾱ')/(1-ᾱ)·(1-ᾱ/ᾱ')) divided by sqrt(ᾱ'). η = 0 is the
    deterministic DDIM (algebraically equal to Euler), η = 1 is DDPM ancestral sampling.
    """
    if not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta!r}")
    s = _prepare(x, sigmas, generators)
    kw, progress, emit = _options(denoiser_kwargs, extra_args, progress, disable, callback)
    for i in _steps(len(s) - 1, progress):
        sigma, sigma_next = s[i], s[i + 1]
        x0 = _denoise(denoiser, x, sigma, kw)
        emit(i, x, sigma, x0)
        eps = (x - x0) / _bcast(sigma, x)
        s_up = eta * sigma_next * (1 - (sigma_next / sigma) ** 2).clamp(min=0).sqrt()
        s_dir = (sigma_next**2 - s_up**2).clamp(min=0).sqrt()
        x = (x0.clamp(-1, 1) if clip_x0 else x0) + _bcast(s_dir, x) * eps
        if eta > 0:
            x = x + _bcast(s_up, x) * _noise(x, generators)
    return x


def sample_ddpm(
    denoiser: Callable[..., torch.Tensor], x: torch.Tensor, sigmas: torch.Tensor | Sequence[float], **kw: Any
) -> torch.Tensor:
    """DDPM ancestral sampling: :func:`sample_ddim` with η = 1."""
    return sample_ddim(denoiser, x, sigmas, eta=1.0, **kw)


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "euler": sample_euler,
    "heun": sample_heun,
    "ddim": sample_ddim,
    "ddpm": sample_ddpm,
}


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    """Look up a sampler function by name."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; valid names: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]
