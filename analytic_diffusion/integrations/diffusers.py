"""diffusers: an analytic denoiser as a UNet2DModel-style ε- / v-prediction model (docs/design.md §2).

``to_diffusers(den, scheduler)`` returns an ``nn.Module`` called as ``model(sample, timestep,
class_labels=None, return_dict=True)`` → an object with ``.sample`` (or a 1-tuple), with the ``.config``
(``sample_size``, ``in_channels``, ``out_channels``), ``.dtype`` and ``.device`` that DDPMPipeline,
DDIMPipeline and hand-written scheduler loops read. Timesteps map to σ through the scheduler's own ᾱ table:
sample = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·ε, so x = sample / sqrt(ᾱ_t) sits at σ_t = sqrt((1 − ᾱ_t) / ᾱ_t), and

    ε̂ = (sample − sqrt(ᾱ_t)·x̂0) / sqrt(1 − ᾱ_t),    v̂ = sqrt(ᾱ_t)·ε̂ − sqrt(1 − ᾱ_t)·x̂0.

Fractional timesteps (EulerDiscreteScheduler and the like) interpolate σ linearly in t (log σ with
``interpolation="log_linear"``); the default is the scheduler's own ``interpolation_type``, else linear, as
diffusers' discrete schedulers place their fractional σ. (Karras-σ options of those schedulers invert log σ
instead, so their timesteps map back to σ within the interpolation error only.)
diffusers itself is not imported here: the scheduler is read through its ``config`` and ``alphas_cumprod``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ..denoisers import Denoiser

__all__ = ["PREDICTION_TYPES", "DiffusersModel", "DiffusersOutput", "float64_alphas_cumprod", "to_diffusers"]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
INTERPOLATIONS = ("linear", "log_linear")


@dataclass
class DiffusersOutput:
    """What UNet2DModel returns: ``.sample``, and ``out[0]`` as diffusers' BaseOutput allows."""

    sample: torch.Tensor

    def __getitem__(self, i: int) -> torch.Tensor:
        return (self.sample,)[i]


class _Config(dict[str, Any]):
    """A read-only dict with attribute access, as diffusers' FrozenDict."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def float64_alphas_cumprod(scheduler: Any) -> torch.Tensor:
    """The scheduler's ᾱ table recomputed in float64 from its config (diffusers builds it in float32).

    Assign it to ``scheduler.alphas_cumprod`` as well to make a pipeline's own update float64 too.
    """
    cfg = scheduler.config
    T = int(cfg.num_train_timesteps)
    if getattr(cfg, "rescale_betas_zero_snr", False):
        raise ValueError("scheduler: rescale_betas_zero_snr=True is not supported by the float64 table")
    trained = getattr(cfg, "trained_betas", None)
    kind = getattr(cfg, "beta_schedule", None)
    if trained is not None:
        betas = torch.as_tensor(trained, dtype=torch.float64)
    elif kind == "linear":
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float64)
    elif kind == "scaled_linear":
        betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, T, dtype=torch.float64) ** 2
    elif kind == "squaredcos_cap_v2":
        abar = [math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(T + 1)]
        betas = torch.tensor([min(1 - abar[i + 1] / abar[i], 0.999) for i in range(T)], dtype=torch.float64)
    else:
        raise ValueError(
            f"scheduler: beta_schedule {kind!r} has no float64 rebuild here; expected linear, "
            "scaled_linear, squaredcos_cap_v2 or trained_betas (or pass float64=False)"
        )
    return torch.cumprod(1 - betas, 0)


class DiffusersModel(torch.nn.Module):
    """An analytic denoiser behind UNet2DModel's calling convention (see the module docstring)."""

    alphas_cumprod: torch.Tensor  # non-persistent buffers, float64
    sigmas: torch.Tensor

    def __init__(
        self,
        denoiser: Denoiser,
        scheduler: Any,
        prediction_type: str = "epsilon",
        *,
        float64: bool = False,
        dtype: torch.dtype = torch.float32,
        interpolation: str | None = None,
    ) -> None:
        super().__init__()
        if interpolation is None:
            interpolation = getattr(getattr(scheduler, "config", None), "interpolation_type", "linear")
            interpolation = interpolation if interpolation in INTERPOLATIONS else "linear"
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation: expected one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
        self.interpolation = interpolation
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type: expected one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
        shape = getattr(denoiser, "image_shape", None)
        if not callable(denoiser) or shape is None or len(tuple(shape)) != 3:
            raise TypeError(
                "denoiser: expected an analytic_diffusion Denoiser (callable with image_shape=(C, H, W)), "
                f"got {type(denoiser).__name__}"
            )
        ac = getattr(scheduler, "alphas_cumprod", None)
        if not torch.is_tensor(ac) or ac.dim() != 1 or ac.numel() < 2:
            raise TypeError(
                "scheduler: expected a diffusers scheduler with a 1-D alphas_cumprod table, got "
                f"{type(scheduler).__name__}"
            )
        sched_pred = getattr(getattr(scheduler, "config", None), "prediction_type", prediction_type)
        if sched_pred != prediction_type:
            raise ValueError(
                f"prediction_type: the scheduler expects {sched_pred!r} outputs but "
                f"prediction_type={prediction_type!r}; build both with the same prediction type"
            )
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
        self.denoiser = denoiser
        self.prediction_type = prediction_type
        table = float64_alphas_cumprod(scheduler) if float64 else ac.detach().to("cpu", torch.float64)
        if float64 and (table - ac.detach().cpu().double()).abs().max() > 1e-5:
            raise ValueError("scheduler: its alphas_cumprod does not match the table rebuilt from its config")
        self.register_buffer("alphas_cumprod", table, persistent=False)
        self.register_buffer("sigmas", ((1 - table) / table).sqrt(), persistent=False)
        self._dtype = dtype
        c, h, w = (int(v) for v in shape)
        self.config = _Config(
            sample_size=h if h == w else (h, w),
            in_channels=c,
            out_channels=c,
            prediction_type=prediction_type,
            num_train_timesteps=int(table.numel()),
        )

    @property
    def dtype(self) -> torch.dtype:
        """The dtype pipelines draw their noise in (the ``dtype=`` option)."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        dev = getattr(self.denoiser, "device", None)
        return dev if dev is not None else self.alphas_cumprod.device

    def _alphas(self, timestep: float | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
        """(B,) float64 ᾱ at the timesteps: integral ones index the table, fractional ones interpolate log σ."""
        t = torch.as_tensor(timestep).to(self.alphas_cumprod.device)
        if t.dim() == 0:
            t = t.expand(batch)
        t = t.reshape(-1)
        if t.numel() != batch:
            raise ValueError(f"timestep: expected a scalar or one per sample ({batch}), got {t.numel()}")
        T = self.alphas_cumprod.numel()
        tf = t.to(torch.float64)
        if not bool(torch.isfinite(tf).all()) or bool((tf < 0).any()) or bool((tf > T - 1).any()):
            raise ValueError(f"timestep: expected values in [0, {T - 1}], got {t.tolist()}")
        if not t.is_floating_point() or bool((tf == tf.round()).all()):
            return self.alphas_cumprod[tf.round().long()].to(device)
        lo = tf.floor().long().clamp(max=T - 2)
        frac = tf - lo
        s0, s1 = self.sigmas[lo], self.sigmas[lo + 1]
        if self.interpolation == "linear":
            sigma = (1 - frac) * s0 + frac * s1
        else:
            sigma = ((1 - frac) * s0.log() + frac * s1.log()).exp()
        return (1 / (1 + sigma * sigma)).to(device)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: float | torch.Tensor,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> DiffusersOutput | tuple[torch.Tensor]:
        if not torch.is_tensor(sample) or sample.dim() != 4:
            raise ValueError(f"sample: expected a (B, C, H, W) tensor, got {getattr(sample, 'shape', type(sample))}")
        abar = self._alphas(timestep, sample.shape[0], sample.device)
        a = abar.sqrt().view(-1, 1, 1, 1)
        b = (1 - abar).sqrt().view(-1, 1, 1, 1)
        if bool((b == 0).any()):
            raise ValueError("timestep: ᾱ_t = 1 there (σ = 0); a denoiser is never evaluated at σ = 0")
        xt = sample.to(torch.float64) if self._dtype == torch.float64 else sample
        x = (xt / a.to(xt.dtype)).to(xt.dtype)
        x0 = self.denoiser(x, (b / a).reshape(-1), class_labels).to(torch.float64)
        xt64 = xt.to(torch.float64)
        if self.prediction_type == "sample":
            out = x0
        else:
            eps = (xt64 - a * x0) / b
            out = eps if self.prediction_type == "epsilon" else a * eps - b * x0
        out = out.to(sample.dtype)
        return DiffusersOutput(out) if return_dict else (out,)

    def __repr__(self) -> str:
        return (
            f"DiffusersModel({self.denoiser!r}, prediction_type={self.prediction_type!r}, "
            f"num_train_timesteps={self.config.num_train_timesteps})"
        )


def to_diffusers(
    denoiser: Denoiser,
    scheduler: Any,
    prediction_type: str = "epsilon",
    *,
    float64: bool = False,
    dtype: torch.dtype = torch.float32,
    interpolation: str | None = None,
) -> DiffusersModel:
    """An analytic denoiser as a diffusers model for ``scheduler`` (e.g. ``DDIMPipeline(unet=to_diffusers(den,
    sched), scheduler=sched)``).

    prediction_type: "epsilon", "v_prediction" or "sample"; must equal the scheduler's own.
    float64:         map t → σ through ᾱ recomputed in float64 from the scheduler's config instead of its
                     float32 table (see :func:`float64_alphas_cumprod`).
    dtype:           the model's ``.dtype``, in which pipelines draw their initial noise.
    interpolation:   σ at fractional timesteps: "linear" or "log_linear" in t (default: the scheduler's).
    """
    return DiffusersModel(
        denoiser, scheduler, prediction_type, float64=float64, dtype=dtype, interpolation=interpolation
    )
