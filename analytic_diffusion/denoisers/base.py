"""The denoiser interface: ``D(x, sigma, class_labels=None) -> x0_hat`` in σ-space (x = x0 + σ·ε).

Every denoiser also offers the score and ε forms, and retrieval denoisers the posterior summary that
memorisation studies use (largest weight, effective number of neighbours 1/Σw²).

A denoiser is a ``torch.nn.Module``: the tensors it keeps resident (the training images, labels, PCA factors)
are non-persistent buffers, so ``.to(device)`` / ``.cuda()`` / ``.cpu()`` move them and ``state_dict()`` stays
empty. Its working precision is the ``dtype=`` option, so ``.to(dtype)`` / ``.double()`` are refused. The
method's description is the :meth:`Denoiser.config` *method* (a JSON-ready dict); ecosystems that expect a
``.config`` attribute (diffusers) get one on the wrappers in :mod:`analytic_diffusion.integrations`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch

from ..ops import check_has_values, sigma_rows


def class_label_rows(labels: torch.Tensor | Sequence[int] | int, device: torch.device | str) -> torch.Tensor:
    """Class labels as a flat int64 tensor; refuses non-integral values (1.7 is no class) and booleans."""
    t = labels if torch.is_tensor(labels) else torch.as_tensor(labels)
    if not (t.is_floating_point() or t.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)):
        raise TypeError(f"class_labels: expected integer class indices, got {t.dtype}")
    if t.is_floating_point() and not bool((torch.isfinite(t) & (t == t.round())).all()):
        raise ValueError(
            f"class_labels: expected integer class indices, got non-integral values "
            f"{t[~(torch.isfinite(t) & (t == t.round()))].reshape(-1)[:3].tolist()}"
        )
    return t.to(device=device, dtype=torch.long).reshape(-1)


@dataclass
class Posterior:
    """Posterior mean (B, C, H, W) with per-sample summaries of the weights."""

    mean: torch.Tensor
    max_weight: torch.Tensor  # (B,)
    effective_neighbours: torch.Tensor  # (B,)
    # Certified pruning (``tolerance`` > 0, see analytic_diffusion.ops.pruning): bounds per sample, else None.
    error_bound: torch.Tensor | None = None  # (B,) ≥ ‖mean − exact posterior mean‖₂
    skipped_weight: torch.Tensor | None = None  # (B,) ≥ posterior weight of the skipped candidates
    scored_fraction: torch.Tensor | None = None  # (B,) candidates scored / candidates


class Denoiser(torch.nn.Module):
    """Base class. Subclasses implement :meth:`denoise` on validated inputs."""

    name = "denoiser"
    # Options a base class takes that this method does not use (hidden from denoiser_options and the CLI).
    hidden_options: tuple[str, ...] = ()
    # Whether .to(dtype) / .half() / .double() may change the working precision (network adapters: yes).
    _casts_with_module = False
    # J·v in closed form, for the methods whose _has_exact_jacobian() is True (their own signature: x, σ, labels, v)
    _exact_jvp: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]

    def __init__(self, image_shape: Sequence[int]) -> None:
        super().__init__()
        self.image_shape = cast("tuple[int, int, int]", tuple(int(v) for v in image_shape))

    # -- subclasses --------------------------------------------------------------------------------------
    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """JSON-serialisable description of the method and its options."""
        return {"method": self.name}

    def _has_exact_jacobian(self) -> bool:
        """Whether :meth:`_exact_jvp` (a closed form) gives J·v; otherwise :meth:`jvp` goes through autograd."""
        return False

    def _moved(self, device: torch.device) -> None:
        """Called by :meth:`_apply` once the buffers are on ``device``: rebuild views of them (retrieval keys)."""

    # -- nn.Module ---------------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype | None:
        """Working precision (the ``dtype=`` option); None for an adapter that runs in the caller's dtype."""
        return self.__dict__.get("_dtype")

    @dtype.setter
    def dtype(self, value: torch.dtype | None) -> None:
        self.__dict__["_dtype"] = value

    @property
    def device(self) -> torch.device | None:
        """Where the resident tensors live (None: an adapter that runs on the caller's device)."""
        if "_device" in self.__dict__:
            return self.__dict__["_device"]
        for t in self.buffers():
            return t.device
        for t in self.parameters():
            return t.device
        return None

    @device.setter
    def device(self, value: torch.device | str | None) -> None:
        self.__dict__["_device"] = None if value is None else torch.device(value)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Denoiser:
        # fn is opaque (.to, .cuda, .half, ...): probe it on empty tensors to learn the target device and
        # whether it casts floats, and refuse a cast before anything has moved.
        here = self.device or torch.device("cpu")
        probes = {dt: fn(torch.empty(0, dtype=dt, device=here)) for dt in (torch.float32, torch.float64)}
        casts = any(p.dtype != dt for dt, p in probes.items())
        if casts and not self._casts_with_module:
            raise TypeError(
                f"{type(self).__name__}: .to(dtype) / .half() / .double() do not apply to an analytic "
                f"denoiser; its working precision is the dtype= option (now {self.dtype}). "
                ".to(device) / .cuda() / .cpu() move it"
            )
        target = probes[torch.float32].device
        self._before_move(target)
        out = super()._apply(fn, recurse)
        if casts and isinstance(self.dtype, torch.dtype):
            self.dtype = fn(torch.empty(0, dtype=self.dtype, device=here)).dtype
        if "_device" in self.__dict__ and self.__dict__["_device"] is not None:
            self.__dict__["_device"] = target
        self._moved(target)
        return out

    def _before_move(self, device: torch.device) -> None:
        """Called by :meth:`_apply` before the buffers move (a retrieval denoiser moves its dataset here)."""

    # -- public API ------------------------------------------------------------------------------------
    def _check(
        self, x: torch.Tensor, sigma: float | torch.Tensor, class_labels: torch.Tensor | Sequence[int] | int | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        for value, name in ((x, "x"), (sigma, "sigma"), (class_labels, "class_labels")):
            check_has_values(value, name)
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise TypeError(f"x: expected a floating tensor, got {getattr(x, 'dtype', type(x))}")
        if x.dim() != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"x: expected shape (B, {', '.join(map(str, self.image_shape))}), got {tuple(x.shape)}")
        _check_sigma_is_float(sigma)
        if torch.compiler.is_compiling():
            # Inside torch.compile: shapes and dtypes are checked above, values (NaN, σ ≤ 0) only in eager calls,
            # so a compiled sampler step has no data-dependent branch.
            s = torch.as_tensor(sigma, dtype=torch.float64).to(x.device).reshape(-1).expand(x.shape[0])
        else:
            if not bool(torch.isfinite(x).all()):
                raise ValueError("x: contains NaN or Inf")
            s = sigma_rows(sigma, x.shape[0], x.device, x)
        if class_labels is not None:
            class_labels = class_label_rows(class_labels, x.device)
            if class_labels.numel() == 1 and x.shape[0] > 1:
                class_labels = class_labels.expand(x.shape[0])
            if class_labels.shape != (x.shape[0],):
                raise ValueError(
                    f"class_labels: expected one label per sample ({x.shape[0]}), got {tuple(class_labels.shape)}"
                )
        return s, class_labels

    def forward(
        self,
        x: torch.Tensor,
        sigma: float | torch.Tensor,
        class_labels: torch.Tensor | Sequence[int] | int | None = None,
    ) -> torch.Tensor:
        """x̂0 = D(x, σ) for x (B, C, H, W) and σ a float, a 0-d or a (B,) floating tensor."""
        s, labels = self._check(x, sigma, class_labels)
        if x.shape[0] == 0:  # an empty batch has an empty answer
            return x.clone()
        return self.denoise(x, s, labels).to(x.dtype)

    def score(
        self,
        x: torch.Tensor,
        sigma: float | torch.Tensor,
        class_labels: torch.Tensor | Sequence[int] | int | None = None,
    ) -> torch.Tensor:
        """∇ log p_σ(x) = (x̂0 − x) / σ²."""
        s, labels = self._check(x, sigma, class_labels)
        if x.shape[0] == 0:
            return x.clone()
        s4 = s.to(x.dtype).view(-1, 1, 1, 1)
        return (self.denoise(x, s, labels).to(x.dtype) - x) / (s4 * s4)

    def eps(
        self,
        x: torch.Tensor,
        sigma: float | torch.Tensor,
        class_labels: torch.Tensor | Sequence[int] | int | None = None,
    ) -> torch.Tensor:
        """ε̂ = (x − x̂0) / σ."""
        s, labels = self._check(x, sigma, class_labels)
        if x.shape[0] == 0:
            return x.clone()
        return (x - self.denoise(x, s, labels).to(x.dtype)) / s.to(x.dtype).view(-1, 1, 1, 1)

    def jvp(
        self,
        x: torch.Tensor,
        sigma: float | torch.Tensor,
        v: torch.Tensor,
        class_labels: torch.Tensor | Sequence[int] | int | None = None,
    ) -> torch.Tensor:
        """J·v for J = ∂D(x, σ)/∂x, per sample (each output depends on its own input only).

        Exact in closed form for ``optimal``, ``topk`` and ``smoothed`` (one more retrieval pass: J = Cov[x0 | x]/σ²T
        over the candidates, symmetric, so this is also the vector-Jacobian product; smoothed averages it over its
        perturbed queries, at fixed perturbations) and ``nearest`` (0: piecewise constant). Through autograd for
        ``wiener`` and the local family (ls, els, bbels, pspc, pspc-flex, pca_locality: their torch reference is
        differentiated, per pixel ∂x̂0(p)/∂x = Cov over that pixel's candidates / σ²T) and for ``knn`` at fixed tail
        draws.
        """
        s, labels = self._check(x, sigma, class_labels)
        if not torch.is_tensor(v) or v.shape != x.shape:
            raise ValueError(
                f"v: expected a tensor of the shape of x {tuple(x.shape)}, got {tuple(getattr(v, 'shape', ()))}"
            )
        if self._has_exact_jacobian():
            return self._exact_jvp(x.detach(), s, labels, v.detach()).to(x.dtype)
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            out = self.denoise(xr, s, labels)
            if not out.requires_grad:
                raise TypeError(
                    f"{type(self).__name__}: no gradient (a random posterior draw or injected noise "
                    "has no Jacobian); the retrieval, Gaussian and local denoisers have exact ones"
                )
            # out depends on xr linearly through J: J·v = ∂/∂u [uᵀ J v] = grad of <grad(out·u), v> in u, u = 0.
            u = torch.zeros_like(out, requires_grad=True)
            (g,) = torch.autograd.grad(out, xr, u, create_graph=True)
            (jv,) = torch.autograd.grad(g, u, v.to(g.dtype))
        return jv.to(x.dtype)

    def __repr__(self) -> str:
        cfg = {k: v for k, v in self.config().items() if k != "method"}
        if "device" not in cfg and self.device is not None:
            cfg["device"] = str(self.device)
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in cfg.items())})"


def _check_sigma_is_float(sigma: object) -> None:
    """Refuse integer σ: ``den(x, 500)`` is almost always a diffusers-style timestep, not σ = 500."""
    if isinstance(sigma, (bool, int, np.integer)):
        bad = repr(sigma)
    elif torch.is_tensor(sigma) or isinstance(sigma, np.ndarray):
        if torch.as_tensor(sigma).is_floating_point():
            return
        bad = f"a {sigma.dtype} tensor"
    elif isinstance(sigma, (list, tuple)) and sigma and not torch.as_tensor(sigma).is_floating_point():
        bad = "a list of integers"
    else:
        return
    raise TypeError(
        f"sigma: got {bad}; a denoiser takes the noise level σ (x = x0 + σ·ε) as a float, not an "
        "integer diffusion timestep. For diffusers-style model(x, t) calls wrap it with "
        "analytic_diffusion.integrations.to_diffusers(denoiser, scheduler); for an integral σ pass "
        "a float (e.g. 2.0)"
    )
