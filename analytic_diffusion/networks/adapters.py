"""Trained networks in, :class:`~analytic_diffusion.denoisers.base.Denoiser` out (docs/design.md §2).

Every adapter is a ``Denoiser``: call it as ``D(x, sigma, class_labels=None) -> x̂0`` in σ-space
(x = x0 + σ·ε, sigma a scalar or a (B,) tensor), and get ``score`` / ``eps`` and input validation for free. Common
options (all adapters):

device, dtype:  where and in what precision the network runs (default: those of its first parameter or buffer;
                a callable without parameters runs in the caller's own device and dtype). Inputs are moved/cast
                there; the output comes back in the caller's dtype and device.
batch_size:     evaluate the network in chunks of at most this many rows (bounds memory; results are identical).
label_kw:       how class labels reach the network: None passes them as the third positional argument, a string
                as that keyword argument. Labels are passed only when given (unconditional calls pass nothing).
All evaluation runs under ``torch.no_grad()``.

* :class:`EDMAdapter`      EDM-preconditioned networks (raw F with c_skip/c_out/c_in/c_noise, or EDMPrecond-style
                           nets that already return D(x; σ)).
* :class:`VPAdapter`       networks on VP timesteps (DDPM / diffusers ``model(x_t, t).sample``, Kamb & Ganguli's
                           continuous legacy cosine), predicting ε, v or x0.
* :class:`CallableAdapter` any plain ``fn(x, sigma[, class_labels])`` returning x̂0, ε̂ or the score.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Sequence
from typing import Any, Callable, cast

import torch

from ..denoisers.base import Denoiser

__all__ = ["PREDICTIONS", "T_MAPPINGS", "CallableAdapter", "EDMAdapter", "VPAdapter", "vp_alphas_cumprod"]

PREDICTIONS = ("epsilon", "v", "x0")
_PREDICTION_ALIASES = {
    "eps": "epsilon",
    "epsilon": "epsilon",
    "v": "v",
    "v_prediction": "v",
    "x0": "x0",
    "sample": "x0",
}
T_MAPPINGS = ("nearest", "interp")
KINDS = ("x0", "eps", "score")


def _unwrap(out: object) -> torch.Tensor:
    """Network outputs: a tensor, an object with ``.sample`` (diffusers), or a tuple/list (first element)."""
    if hasattr(out, "sample") and not torch.is_tensor(out):
        out = out.sample
    elif isinstance(out, (tuple, list)):
        if not out:
            raise TypeError("the network returned an empty tuple")
        out = out[0]
    elif isinstance(out, dict) and "sample" in out:
        out = out["sample"]
    if not torch.is_tensor(out):
        raise TypeError(
            f"the network returned {type(out).__name__}; expected a tensor, an object with .sample "
            "or a tuple whose first element is a tensor"
        )
    return out


def _first_param(net: object) -> torch.Tensor | None:
    if isinstance(net, torch.nn.Module):
        for p in net.parameters():
            return p
        for b in net.buffers():
            return b
    return None


def _describe(obj: object) -> str:
    return getattr(obj, "__name__", None) or type(obj).__name__


class _NetworkDenoiser(Denoiser):
    """Device/dtype handling, chunking, no_grad and label passing; subclasses implement :meth:`_evaluate`."""

    hidden_options = ("device", "dtype", "batch_size", "label_kw")
    _casts_with_module = True  # .half() / .to(dtype) change the network's precision, and with it this adapter's

    def __init__(
        self,
        net: Callable[..., Any],
        image_shape: Sequence[int],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        batch_size: int | None = None,
        label_kw: str | None = None,
    ) -> None:
        if not callable(net):
            raise TypeError(f"expected a callable network (nn.Module or function), got {type(net).__name__}")
        if image_shape is None or len(tuple(image_shape)) != 3 or min(int(v) for v in image_shape) < 1:
            raise ValueError(f"image_shape must be (C, H, W) with positive sizes, got {image_shape!r}")
        super().__init__(image_shape)
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise ValueError(f"batch_size must be an integer >= 1 or None, got {batch_size!r}")
        if label_kw is not None and not isinstance(label_kw, str):
            raise TypeError(f"label_kw must be a keyword name (str) or None, got {label_kw!r}")
        p = _first_param(net)
        self.net = net
        # A network with parameters runs on their device and dtype; a parameterless callable, unless told
        # otherwise, sees the caller's own device and dtype (device / dtype stay None).
        self.device = torch.device(device) if device is not None else (p.device if p is not None else None)
        if dtype is None and p is not None and p.is_floating_point():
            dtype = p.dtype
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.dtype = dtype
        self.batch_size = batch_size
        self.label_kw = label_kw

    def _call_net(self, fn: Callable[..., Any], *args: Any, labels: Any = None) -> Any:
        if labels is None:
            return fn(*args)
        if self.label_kw is not None:
            return fn(*args, **{self.label_kw: labels})
        return fn(*args, labels)

    def _evaluate(self, x: torch.Tensor, sigma: torch.Tensor, labels: Any) -> torch.Tensor:
        """x (b, C, H, W) in the network dtype/device, sigma (b,) float64 on that device → x̂0 (any float dtype)."""
        raise NotImplementedError

    def _labels(self, labels: torch.Tensor, device: torch.device) -> torch.Tensor:
        return labels.to(device)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        out_dtype, out_device = x.dtype, x.device
        n = x.shape[0]
        step = n if self.batch_size is None else self.batch_size
        outs = []
        dev, dt = self.device or out_device, self.dtype or out_dtype
        with torch.no_grad():
            for i in range(0, n, max(step, 1)):
                xb = x[i : i + step].to(device=dev, dtype=dt)
                sb = sigma[i : i + step].to(device=dev, dtype=torch.float64)
                lb = None if class_labels is None else self._labels(class_labels[i : i + step], dev)
                outs.append(self._evaluate(xb, sb, lb).to(device=out_device, dtype=out_dtype))
        return torch.cat(outs) if outs else x.new_zeros(x.shape)

    def _common_config(self) -> dict[str, Any]:
        return {
            "network": _describe(self.net),
            "device": "caller's" if self.device is None else str(self.device),
            "dtype": "caller's" if self.dtype is None else str(self.dtype).replace("torch.", ""),
            "batch_size": self.batch_size,
            "label_kw": self.label_kw,
        }


class EDMAdapter(_NetworkDenoiser):
    """EDM-preconditioned network (Karras et al. 2022).

    precondition=False: ``net(x, sigma, class_labels)`` already returns D(x; σ) (NVlabs ``EDMPrecond`` style;
    sigma is passed as a (B,) tensor in the network dtype).
    precondition=True:  ``net`` is the raw F, called as ``net(c_in·x, c_noise[, class_labels])`` and
    D = c_skip·x + c_out·F with c_skip = σd²/(σ²+σd²), c_out = σ·σd/sqrt(σ²+σd²), c_in = 1/sqrt(σ²+σd²),
    c_noise = ln(σ)/4 (σd = ``sigma_data``). The coefficients are computed in float64 and cast to the net dtype.

    label_dim > 0: integer labels are turned into one-hot (B, label_dim) float rows (EDM's convention) before they
    reach the network; label_dim = 0 passes the integer labels as they are.
    """

    name = "edm-network"

    def __init__(
        self,
        net: Callable[..., Any],
        image_shape: Sequence[int],
        *,
        sigma_data: float = 0.5,
        label_dim: int = 0,
        precondition: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        batch_size: int | None = None,
        label_kw: str | None = None,
    ) -> None:
        super().__init__(net, image_shape, device=device, dtype=dtype, batch_size=batch_size, label_kw=label_kw)
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data!r}")
        if isinstance(label_dim, bool) or not isinstance(label_dim, int) or label_dim < 0:
            raise ValueError(f"label_dim must be an integer >= 0, got {label_dim!r}")
        self.sigma_data = float(sigma_data)
        self.label_dim = label_dim
        self.precondition = bool(precondition)

    def _labels(self, labels: torch.Tensor, device: torch.device) -> torch.Tensor:
        labels = labels.to(device)
        if self.label_dim > 0:
            if int(labels.min()) < 0 or int(labels.max()) >= self.label_dim:
                raise ValueError(
                    f"class_labels must lie in [0, {self.label_dim}), got [{int(labels.min())}, {int(labels.max())}]"
                )
            return torch.nn.functional.one_hot(labels, self.label_dim).to(self.dtype or torch.float32)
        return labels

    def _evaluate(self, x: torch.Tensor, sigma: torch.Tensor, labels: Any) -> torch.Tensor:
        if not self.precondition:
            return _unwrap(self._call_net(self.net, x, sigma.to(x.dtype), labels=labels))
        sd2 = self.sigma_data**2
        s4 = sigma.view(-1, 1, 1, 1)
        c_skip = (sd2 / (s4**2 + sd2)).to(x.dtype)
        c_out = (s4 * self.sigma_data / (s4**2 + sd2).sqrt()).to(x.dtype)
        c_in = (1 / (s4**2 + sd2).sqrt()).to(x.dtype)
        c_noise = (sigma.log() / 4).to(x.dtype)
        f = _unwrap(self._call_net(self.net, c_in * x, c_noise, labels=labels))
        return c_skip * x + c_out * f.to(x.dtype)

    def config(self) -> dict[str, Any]:
        cfg = {
            "method": self.name,
            **self._common_config(),
            "sigma_data": self.sigma_data,
            "label_dim": self.label_dim,
            "precondition": self.precondition,
        }
        net_cfg = getattr(self.net, "config", None)
        if callable(net_cfg):
            with contextlib.suppress(Exception):  # a foreign module's config() may need arguments; informative only
                cfg["net"] = net_cfg()
        return cfg


# ---------------------------------------------------------------------------------------------- VP networks
KAMB_T_MAX = 1.0
# Relative slack at the ends of a VP network's σ range: two float32 ulps, so that a σ grid cast to float32
# (σ(t_0) = 0.0100005 becomes 0.0100004999) is not reported as clamped.
RANGE_ROUNDING = 2.0**-22


def vp_alphas_cumprod(name: str, num_train_timesteps: int = 1000) -> torch.Tensor:
    """ᾱ_t (T,) float64 for "linear" (DDPM β = linspace(1e-4, 0.02, T)) or "cosine" (iDDPM / diffusers
    ``squaredcos_cap_v2``, s = 0.008, β ≤ 0.999)."""
    T = int(num_train_timesteps)
    if name == "linear":
        betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    elif name == "cosine":
        u = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((u + 0.008) / 1.008 * (math.pi / 2)) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    else:
        raise ValueError(
            f"unknown VP schedule {name!r}; expected 'linear', 'cosine', 'kamb' or an alphas_cumprod tensor"
        )
    return torch.cumprod(1 - betas, 0)


class VPAdapter(_NetworkDenoiser):
    """A network on VP timesteps: x_vp = sqrt(ᾱ_t)·x0 + sqrt(1−ᾱ_t)·ε, predicting ε, v or x0.

    alphas_cumprod: a (T,) tensor of ᾱ at the integer train timesteps 0 ... T−1 (decreasing), or "linear" /
        "cosine" (T = 1000, diffusers' "linear" and "squaredcos_cap_v2"), or "kamb": Kamb & Ganguli's continuous
        legacy cosine, ᾱ(t) = cos²(t/1.008·π/2) for t in [0, 1]; there t is continuous and the map σ → t is exact
        (t = 1.008·(2/π)·atan σ), whatever ``t_mapping`` says.
    prediction: "epsilon" (alias "eps"), "v" ("v_prediction") or "x0" ("sample").
    t_mapping (discrete tables): σ → ᾱ* = 1/(1+σ²), then
        "nearest": the integer t minimising |ᾱ_t − ᾱ*|. **σ is quantised**: the input is treated as if it were at
            σ_t = sqrt((1−ᾱ_t)/ᾱ_t), i.e. the network sees x_vp = sqrt(ᾱ_t)·x, and x̂0 is converted with ᾱ_t. The
            result is the network's x̂0 at the grid σ_t nearest to σ, not at σ itself.
        "interp": a fractional t, linear in log-SNR between the neighbouring steps, passed as a float tensor;
            the network sees x_vp = x/sqrt(1+σ²) exactly and x̂0 is converted with ᾱ* (the network must accept
            non-integer timesteps, e.g. sinusoidal embeddings).
    call: ``call(model, x_vp, t, class_labels) -> output`` to adapt an unusual signature (default:
        ``model(x_vp, t)``, labels appended as described for ``label_kw``); t is a (b,) tensor (int64 for
        "nearest", the network dtype otherwise) on the network device. ``t_scale`` multiplies the continuous
        "kamb" t before the call (e.g. 1000 for a network trained on t·1000).
    Outputs may be tensors, objects with ``.sample`` or tuples; an output with 2·C channels (learned variance)
    keeps its first C channels.

    σ outside the network's range [σ(t_0), σ(t_{T−1})] (or [0, σ(t = 1) ≈ 80.2] for "kamb") is clamped to the
    range: the network is evaluated at the end of its range and x̂0 converted consistently there. Each clamped row
    is counted in ``clamped`` (a running total; the first clamp also issues a warning). σ within float32 rounding
    (relative :data:`RANGE_ROUNDING`) of an end is that end, not a clamp: a float32 run of the engine's own VP grid
    rounds σ(t_0) to just below its float64 value.
    """

    name = "vp-network"

    def __init__(
        self,
        model: Callable[..., Any],
        *,
        image_shape: Sequence[int] | None = None,
        alphas_cumprod: str | torch.Tensor = "linear",
        prediction: str = "epsilon",
        t_mapping: str = "nearest",
        call: Callable[..., Any] | None = None,
        t_scale: float = 1.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        batch_size: int | None = None,
        label_kw: str | None = None,
    ) -> None:
        if image_shape is None:
            image_shape = _infer_image_shape(model)
        super().__init__(model, image_shape, device=device, dtype=dtype, batch_size=batch_size, label_kw=label_kw)
        if prediction not in _PREDICTION_ALIASES:
            raise ValueError(
                f"prediction must be one of {', '.join(map(repr, PREDICTIONS))} (or 'eps', "
                f"'v_prediction', 'sample'); got {prediction!r}"
            )
        if t_mapping not in T_MAPPINGS:
            raise ValueError(f"t_mapping must be one of {', '.join(map(repr, T_MAPPINGS))}; got {t_mapping!r}")
        if call is not None and not callable(call):
            raise TypeError(f"call must be callable, got {type(call).__name__}")
        self.prediction = _PREDICTION_ALIASES[prediction]
        self.t_mapping = t_mapping
        self.call = call
        self.t_scale = float(t_scale)
        self.clamped = 0
        self._warned = False
        if isinstance(alphas_cumprod, str) and alphas_cumprod == "kamb":
            self.schedule = "kamb"
            self.alphas_cumprod: torch.Tensor | None = None
            self.sigma_min, self.sigma_max = 0.0, math.tan(KAMB_T_MAX / 1.008 * math.pi / 2)
        else:
            if isinstance(alphas_cumprod, str):
                self.schedule = alphas_cumprod
                ac = vp_alphas_cumprod(alphas_cumprod)
            else:
                self.schedule = "custom"
                ac = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64).reshape(-1)
            if ac.numel() < 1 or not bool(((ac > 0) & (ac < 1)).all()):
                raise ValueError("alphas_cumprod must be a non-empty 1-D tensor with values in (0, 1)")
            if ac.numel() > 1 and not bool((ac[1:] < ac[:-1]).all()):
                raise ValueError("alphas_cumprod must be strictly decreasing in t")
            self.alphas_cumprod = ac
            self._log_snr = (ac / (1 - ac)).log()  # decreasing in t
            sig = ((1 - ac) / ac).sqrt()
            self.sigma_min, self.sigma_max = float(sig[0]), float(sig[-1])

    # σ → (t, ᾱ at which the network is evaluated); all float64 on CPU/device of sigma
    def _map(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        if self.schedule == "kamb":
            s = sigma.clamp(max=self.sigma_max)
            clamped = int((sigma > self.sigma_max * (1 + RANGE_ROUNDING)).sum())
            t = 1.008 * (2 / math.pi) * torch.atan(s)
            abar = 1 / (1 + s * s)
            return t * self.t_scale, abar, clamped
        ac = cast(torch.Tensor, self.alphas_cumprod).to(sigma.device)  # a table: set unless schedule is kamb
        lo, hi = self.sigma_min, self.sigma_max
        clamped = int(((sigma < lo * (1 - RANGE_ROUNDING)) | (sigma > hi * (1 + RANGE_ROUNDING))).sum())
        if self.t_mapping == "nearest":
            target = 1 / (1 + sigma * sigma)
            t = (ac[None, :] - target[:, None]).abs().argmin(dim=1)
            return t, ac[t], clamped
        s = sigma.clamp(lo, hi)
        lam = -2 * s.log()  # log-SNR of the (clamped) σ
        ls = self._log_snr.to(sigma.device)
        if ls.numel() == 1:
            return torch.zeros_like(s), ac[:1].expand_as(s), clamped
        # ls is decreasing; find i with ls[i] >= lam >= ls[i+1]
        i = torch.searchsorted(-ls, -lam, right=True).sub(1).clamp(0, ls.numel() - 2)
        frac = ((ls[i] - lam) / (ls[i] - ls[i + 1])).clamp(0, 1)
        return i.to(torch.float64) + frac, 1 / (1 + s * s), clamped

    def _evaluate(self, x: torch.Tensor, sigma: torch.Tensor, labels: Any) -> torch.Tensor:
        t, abar, clamped = self._map(sigma)
        if clamped:
            self.clamped += clamped
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"VPAdapter: {clamped} σ value(s) outside the network's range "
                    f"[{self.sigma_min:.4g}, {self.sigma_max:.4g}] were clamped to it (counted in "
                    ".clamped)",
                    RuntimeWarning,
                    stacklevel=4,
                )
        a = abar.sqrt().view(-1, 1, 1, 1)
        b = (1 - abar).sqrt().view(-1, 1, 1, 1)
        a_n, b_n = a.to(x.dtype), b.to(x.dtype)
        x_vp = a_n * x  # nearest: sqrt(ᾱ_t)·x (σ quantised); interp/kamb: ᾱ = 1/(1+σ²) exactly
        # integer timesteps stay int64; fractional ones go in the network dtype, at least float32
        t_in = t if t.dtype == torch.int64 else t.to(x.dtype if x.dtype.itemsize >= 4 else torch.float32)
        if self.call is not None:
            out = _unwrap(self.call(self.net, x_vp, t_in, labels))
        else:
            out = _unwrap(self._call_net(self.net, x_vp, t_in, labels=labels))
        c = self.image_shape[0]
        if out.dim() == 4 and out.shape[1] == 2 * c:
            out = out[:, :c]
        out = out.to(x.dtype)
        if self.prediction == "epsilon":
            return (x_vp - b_n * out) / a_n
        if self.prediction == "v":
            return a_n * x_vp - b_n * out
        return out

    def config(self) -> dict[str, Any]:
        return {
            "method": self.name,
            **self._common_config(),
            "schedule": self.schedule,
            "num_train_timesteps": None if self.alphas_cumprod is None else int(self.alphas_cumprod.numel()),
            "prediction": self.prediction,
            "t_mapping": "exact" if self.schedule == "kamb" else self.t_mapping,
            "t_scale": self.t_scale,
            "sigma_range": [self.sigma_min, self.sigma_max],
            "custom_call": self.call is not None,
        }


def _infer_image_shape(model: object) -> tuple[int, int, int]:
    cfg: Any = getattr(model, "config", None)
    try:
        c, s = cfg.in_channels, cfg.sample_size  # diffusers UNet2DModel
        h, w = (s, s) if isinstance(s, int) else tuple(s)
        return (int(c), int(h), int(w))
    except Exception:
        raise ValueError(
            "image_shape is required (it could not be read from model.config.in_channels / sample_size)"
        ) from None


# ---------------------------------------------------------------------------------------------- plain callables
class CallableAdapter(_NetworkDenoiser):
    """Any ``fn(x, sigma[, class_labels])`` (sigma a (B,) tensor in the network dtype) returning, by ``kind``:
    "x0" the denoised image, "eps" the noise estimate ε̂ (x̂0 = x − σ·ε̂) or "score" ∇log p_σ(x)
    (x̂0 = x + σ²·score)."""

    name = "callable"

    def __init__(
        self,
        fn: Callable[..., Any],
        image_shape: Sequence[int],
        *,
        kind: str = "x0",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        batch_size: int | None = None,
        label_kw: str | None = None,
    ) -> None:
        super().__init__(fn, image_shape, device=device, dtype=dtype, batch_size=batch_size, label_kw=label_kw)
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(map(repr, KINDS))}; got {kind!r}")
        self.kind = kind

    def _evaluate(self, x: torch.Tensor, sigma: torch.Tensor, labels: Any) -> torch.Tensor:
        s = sigma.to(x.dtype)
        out = _unwrap(self._call_net(self.net, x, s, labels=labels)).to(x.dtype)
        s4 = s.view(-1, 1, 1, 1)
        if self.kind == "x0":
            return out
        if self.kind == "eps":
            return x - s4 * out
        return x + s4 * s4 * out

    def config(self) -> dict[str, Any]:
        return {"method": self.name, **self._common_config(), "kind": self.kind}
