"""Same-location local denoisers: LS (Kamb & Ganguli), PSPC-Square and PSPC-Flex (Niedoba et al.).

Thin configurations of :mod:`analytic_diffusion.ops.local_retrieval` (the exact, memory-bounded torch reference).
docs/methods.md §1.2 and §2 give the rules; docs/design.md §3 the shared primitive.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Callable, TypeVar, Union, cast

import torch

from ..grids import karras
from ..ops.local_retrieval import (
    _check_masks,
    local_score,
    mask_composite,
    masks_from_heatmap,
    pspc_square,
    wiener_filter_matrix,
)
from ..ops.patch_retrieval import PATCH_BACKENDS
from .local_base import LocalDenoiser
from .patch_presets import as_patch_schedule, load_patch_schedule
from .patch_schedule import PatchSchedule

if TYPE_CHECKING:
    from ..data import Dataset

_V = TypeVar("_V")

# The PSPC paper's CIFAR-10 PSPC-Flex mass fractions over the 18-step EDM/Karras grid, high noise first.
PSPC_CIFAR_TAUS = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.7, 0.7, 0.5, 0.4, 0.4, 0.4, 0.4, 0.3, 0.3, 0.3, 0.3)


def karras_sigmas(n: int) -> list[float]:
    """The PSPC code's EDM grid (σ_max 80, σ_min 0.002, ρ 7) without the trailing 0, high noise first."""
    return karras(n).sigmas[:-1].tolist()


def sigma_key(sigma: float) -> float:
    """Cache key of a noise level: σ rounded to 12 significant digits."""
    return float(f"{float(sigma):.12g}")


def check_patch_backend(backend: str, name: str, backends: Sequence[str] = PATCH_BACKENDS) -> None:
    """LS, ELS, bbELS and PSPC run on the torch reference or the fused Triton / CUDA / C++ CPU kernels;
    pca_locality passes its own list (``COORDINATE_FUSED_KERNELS``)."""
    if backend not in backends:
        raise ValueError(f"backend: {name} runs on {', '.join(backends)}, got {backend!r}")


def check_reference_backend(backend: str, name: str) -> None:
    """Only the exact torch reference exists for PSPC-Flex so far."""
    if backend not in ("auto", "torch"):
        raise ValueError(
            f"backend: {name} has only the torch reference backend so far ('auto' or 'torch'), got {backend!r}"
        )


def _nearest(table: dict[float, _V], sigma: float) -> tuple[float, _V]:
    """Value of a {σ: value} table at the grid point nearest in log σ (as :class:`PatchSchedule` looks up)."""
    best = min(table, key=lambda s: abs(math.log(s) - math.log(sigma)))
    return best, table[best]


# ----------------------------------------------------------------------------------------------- LS
class LocalScore(LocalDenoiser):
    """LS, the local score machine of Kamb & Ganguli (docs/methods.md §1.2).

    For every pixel p, one softmax over the N training images (± mirrors with ``flips``, only the sample's class
    with class labels) of −Σ_{q ∈ k×k window at p} ‖x(q) − y_j(q)‖² / (2σ²T), window positions outside the image
    adding 0 (zero padding of both images); the output pixel is the weighted mean of the candidates' pixel p.
    No averaging over overlapping windows.

    Options: ``patch`` — an odd k ≥ 1 or a :class:`PatchSchedule` / preset (k per σ; required). k ≥ 2·max(H, W) − 1
    sees the whole image from every pixel and equals ``optimal``. Plus the retrieval options of
    :class:`RetrievalDenoiser` (``flips`` default: the dataset's flag, ``temperature``, ``dtype``, ``memory_budget``).
    """

    name = "ls"

    def __init__(self, dataset: Dataset, *, patch: int | str | PatchSchedule | None = None, **kw: Any) -> None:
        check_patch_backend(kw.get("backend", "auto"), self.name)
        super().__init__(dataset, patch=patch, **kw)

    def _check_patch(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
            raise ValueError(f"patch: LS needs odd patch sizes k >= 1 (a window centred on each pixel), got {k!r}")

    def _denoise_k(self, x: torch.Tensor, s: torch.Tensor, labels: torch.Tensor | None, k: int) -> torch.Tensor:
        return local_score(
            x,
            self.keys,
            s,
            patch=k,
            temperature=self.temperature,
            query_labels=labels,
            flips=self.flips,
            dtype=self.dtype,
            memory_budget=self.memory_budget,
            backend=self._backend_for(x),
        )


# ----------------------------------------------------------------------------------------------- PSPC-Square
def pspc_cifar_schedule(max_size: int | None = None) -> PatchSchedule:
    """The paper's CIFAR-10 PSPC-Square schedule (preset ``pspc-cifar10``); sizes above ``max_size`` are clipped
    (32 means "the whole image" there, so on 28×28 data it becomes 28)."""
    preset = load_patch_schedule("pspc-cifar10")
    sizes = [k if max_size is None else min(k, max_size) for k in preset.sizes]
    return PatchSchedule(sizes, preset.sigmas, name=preset.name, odd=False)


class PSPC(LocalDenoiser):
    """PSPC-Square (Niedoba et al., docs/methods.md §2): the Patch Set Posterior Composite with square crops.

    For every k×k crop fully inside the image (no padding), the posterior mean of the whole crop over the same crop
    of every training image (logits −‖x_c − y_{j,c}‖² / (2σ²T)); each pixel averages the crop means covering it.

    Options: ``patch`` — any integer 1 ≤ k ≤ min(H, W) (even sizes are fine: a crop needs no centre pixel, and the
    paper's schedule uses 32 = H), a ``{σ: k}`` dict, a :class:`PatchSchedule` or a preset name. Default: the
    paper's CIFAR-10 schedule (32, …, 23, 15, 11, 7, 5, 3, …) on the 18-step Karras grid with sizes clipped to
    min(H, W). ``flips`` defaults to True as in the paper (``None`` means True here; pass False to turn it off).
    k = H = W equals ``optimal`` with the same flips. ``backend``: ``auto`` (a fused kernel for float32: the C++
    one on CPU, Triton / CUDA on a GPU; else the reference), ``torch``, ``triton``, ``cuda`` or ``cpu``.
    """

    name = "pspc"

    def __init__(
        self,
        dataset: Dataset,
        *,
        patch: int | str | dict[float, int] | PatchSchedule | None = None,
        flips: bool | None = None,
        **kw: Any,
    ) -> None:
        check_patch_backend(kw.get("backend", "auto"), self.name)
        _, H, W = dataset.image_shape
        if patch is None:
            patch = pspc_cifar_schedule(min(H, W))
        elif isinstance(patch, dict):
            items = sorted(patch.items())
            patch = PatchSchedule([k for _, k in items], [s for s, _ in items], name="custom", odd=False)
        elif isinstance(patch, int) and not isinstance(patch, bool):
            patch = PatchSchedule([patch], name=f"k={patch}", odd=False)
        elif not isinstance(patch, PatchSchedule):
            patch = as_patch_schedule(patch)
        super().__init__(dataset, patch=patch, flips=True if flips is None else flips, **kw)

    def _check_patch(self, k: int) -> None:
        _, H, W = self.image_shape
        if not 1 <= k <= min(H, W):
            raise ValueError(
                f"patch: PSPC crops lie fully inside the {H}×{W} image, so k must be in [1, {min(H, W)}]; got {k}"
            )

    def _denoise_k(self, x: torch.Tensor, s: torch.Tensor, labels: torch.Tensor | None, k: int) -> torch.Tensor:
        return pspc_square(
            x,
            self.keys,
            s,
            patch=k,
            temperature=self.temperature,
            query_labels=labels,
            flips=self.flips,
            dtype=self.dtype,
            memory_budget=self.memory_budget,
            backend=self._backend_for(x),
        )


# ----------------------------------------------------------------------------------------------- PSPC-Flex
# Heatmap entries below this fraction of the largest are float64 rounding, not sensitivity: W's entries carry
# errors of about D·eps ≈ 1e-13 of its largest (the eigenvectors' arbitrary mixing in the null space included),
# while a pixel that varies in a single one of 10⁵ images by one grey level still reaches ~1e-7 at σ = 80.
HEATMAP_NOISE_FLOOR = 1e-9


def wiener_heatmap(dataset: Dataset, sigma: float) -> torch.Tensor:
    """A data-driven PSPC-Flex heatmap without a network: |W_σ| with W_σ = U diag(λ/(λ+σ²)) Uᵀ the σ-space Wiener
    filter of the dataset (its PCA, flips included when on), summed over output and input channels.
    Returns (H, W, H, W) float64, heatmap[i, j] = sensitivity of output pixel (i, j) to every input pixel.

    The heatmap must not depend on how the eigensolver chose a basis (thread count, library): eigenvalues below
    the numerical rank's cut (D·eps·λ_max) count as 0, so the null space adds nothing whatever its basis, and
    entries under ``HEATMAP_NOISE_FLOOR`` of the largest are set to 0 (a pixel with no variance then has an
    all-zero row rather than rounding noise that would pick its mask at random; docs/design.md §14.4)."""
    C, H, W = dataset.image_shape
    _, eigvals, U = dataset.pca()
    lam = eigvals.to(torch.float64)
    lam = torch.where(lam > lam.numel() * torch.finfo(torch.float64).eps * lam.max(), lam, torch.zeros_like(lam))
    A = wiener_filter_matrix(lam, U, sigma).abs().reshape(C, H * W, C, H * W)
    heat = A.sum(dim=(0, 2))
    heat = torch.where(heat > HEATMAP_NOISE_FLOOR * heat.max(), heat, torch.zeros_like(heat))
    return heat.reshape(H, W, H, W)


MaskSpec = Union[str, torch.Tensor, Callable[[float], torch.Tensor], dict[float, torch.Tensor]]


class PSPCFlex(LocalDenoiser):
    """PSPC-Flex (Niedoba et al., docs/methods.md §2): the patch-set composite over per-output-pixel masks.

    out(q) = Σ_p [q ∈ mask_p]·(posterior mean of mask p's pixels)(q) / #{p : q ∈ mask_p}; each mask applies to all
    channels; the posterior of mask p uses logits −Σ_{q ∈ mask_p} ‖x(q) − y_j(q)‖² / (2σ²T) over the same pixels of
    every training image (± mirrors).

    Options:
      ``masks`` — one of
        * a (H·W, H, W) bool tensor (mask p = the crop of output pixel p), used at every σ;
        * a callable σ -> such a tensor (evaluated once per σ and cached);
        * a ``{σ: tensor}`` table, looked up at the grid point nearest in log σ;
        * ``"wiener"`` (default): masks from :func:`wiener_heatmap` (the dataset's Wiener filter, no trained
          network needed) thresholded by :func:`masks_from_heatmap` at mass fraction τ(σ); output pixel p's own
          mask is forced to contain p, so every pixel is covered (a pixel with no variance, whose Wiener row is
          zero, gets the mask {p}).
      ``tau`` — only with ``masks="wiener"``: a constant in (0, 1], a ``{σ: τ}`` table (nearest in log σ), or None
        (default) = the paper's CIFAR-10 τ list (1 ×7, 0.7, 0.7, 0.5, 0.4 ×4, 0.3 ×4) on the 18-step Karras grid
        (σ 80 … 0.002). The paper calibrated τ on network gradient heatmaps; with Wiener heatmaps it is a
        reasonable, documented stand-in, not a reproduction.
      ``flips`` — default True as in the paper (None means True). Plus ``temperature``, ``dtype``, ``memory_budget``.

    There is no patch size: ``patch`` is not accepted (the masks carry the locality).
    """

    name = "pspc-flex"
    hidden_options = ("patch",)
    default_patch = 1  # LocalDenoiser wants a schedule; it is never used (denoise groups by σ, not by k)

    def __init__(
        self,
        dataset: Dataset,
        *,
        masks: MaskSpec = "wiener",
        tau: float | dict[float, float] | None = None,
        flips: bool | None = None,
        **kw: Any,
    ) -> None:
        if kw.get("patch") is not None:
            raise ValueError("patch: pspc-flex has no patch size; its locality comes from `masks`")
        kw.pop("patch", None)
        check_reference_backend(kw.get("backend", "auto"), self.name)
        super().__init__(dataset, flips=True if flips is None else flips, **kw)
        _C, H, W = self.image_shape
        self._cache: dict[float, torch.Tensor] = {}
        self._mask_spec = masks
        self._tau: dict[float, float] | None = None
        if isinstance(masks, str):
            if masks != "wiener":
                raise ValueError(
                    f"masks: expected 'wiener', a ({H * W}, {H}, {W}) bool tensor, a callable "
                    f"σ -> masks or a {{σ: masks}} dict, got {masks!r}"
                )
            self._tau = self._make_tau(tau)
        else:
            if tau is not None:
                raise ValueError("tau: only used with masks='wiener'")
            if torch.is_tensor(masks):
                self._fixed = self._validate(masks)
            elif isinstance(masks, dict):
                if not masks:
                    raise ValueError("masks: the {σ: masks} table is empty")
                bad = [s for s in masks if not (float(s) > 0 and math.isfinite(float(s)))]
                if bad:
                    raise ValueError(f"masks: table σ values must be finite and > 0, got {bad[:3]}")
                self._table = {float(s): self._validate(v) for s, v in masks.items()}
            elif not callable(masks):
                raise ValueError(
                    f"masks: expected 'wiener', a bool tensor, a callable or a dict, got {type(masks).__name__}"
                )

    @staticmethod
    def _make_tau(tau: float | dict[float, float] | None) -> dict[float, float]:
        if tau is None:
            return dict(zip(karras_sigmas(len(PSPC_CIFAR_TAUS)), PSPC_CIFAR_TAUS))
        if isinstance(tau, dict):
            out = {float(s): float(t) for s, t in tau.items()}
            if not out or any(not (s > 0 and math.isfinite(s)) for s in out):
                raise ValueError("tau: a {σ: τ} table needs finite σ > 0 keys")
        else:
            out = {1.0: float(tau)}
        for t in out.values():
            if not 0.0 < t <= 1.0:  # also rejects NaN
                raise ValueError(f"tau: expected mass fractions in (0, 1], got {t}")
        return out

    def _validate(self, masks: torch.Tensor) -> torch.Tensor:
        _, H, W = self.image_shape
        if torch.is_tensor(masks) and masks.dim() == 3 and masks.shape[0] != H * W:
            raise ValueError(
                f"masks: pspc-flex needs one mask per output pixel, shape ({H * W}, {H}, {W}); got "
                f"{tuple(masks.shape)} (mask_composite in ops takes any number of masks)"
            )
        _check_masks(masks, self.image_shape)
        return masks

    def tau_for(self, sigma: float) -> float:
        taus = cast("dict[float, float]", self._tau)  # masks='wiener' (the only caller) sets it
        if len(taus) == 1:
            return next(iter(taus.values()))
        return _nearest(taus, sigma)[1]

    def masks_for(self, sigma: float) -> torch.Tensor:
        """The (H·W, H, W) bool masks used at σ (computed once per σ and cached)."""
        spec = self._mask_spec
        if torch.is_tensor(spec):
            return self._fixed
        if isinstance(spec, dict):
            return _nearest(self._table, sigma)[1]
        key = sigma_key(sigma)
        if key not in self._cache:
            if isinstance(spec, str):
                # the statistics of the candidate set this denoiser searches: flips as the denoiser has them
                heat = wiener_heatmap(self.dataset.with_flips(self.flips), key)
                hw = heat.shape[0] * heat.shape[1]
                flat = heat.view(hw, hw)
                # Pixels with no variance (e.g. MNIST's zero padding) have an all-zero Wiener row: their mask is
                # the pixel itself (a 1-pixel same-location posterior), the only choice that needs no heatmap.
                dead = (flat.sum(1) <= 0).nonzero().flatten()
                flat[dead, dead] = 1.0
                out = masks_from_heatmap(heat, self.tau_for(key))
                # Each output pixel's own mask always holds that pixel (the Wiener filter's diagonal is normally
                # the largest entry anyway), so every pixel is covered and the composite is always defined.
                out.view(hw, hw)[torch.arange(hw), torch.arange(hw)] = True
            else:
                out = self._validate(spec(key))
            self._cache[key] = out
        return self._cache[key]

    def denoise(self, x: torch.Tensor, s: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return self.grouped(
            x,
            s,
            labels,
            [sigma_key(v) for v in s.cpu().tolist()],
            lambda xr, sr, lr, key: mask_composite(
                xr,
                self.keys,
                sr,
                self.masks_for(key),
                temperature=self.temperature,
                query_labels=lr,
                flips=self.flips,
                dtype=self.dtype,
                memory_budget=self.memory_budget,
            ),
        )

    def config(self) -> dict[str, Any]:
        cfg = {k: v for k, v in super().config().items() if k != "patch"}
        spec = self._mask_spec
        cfg["masks"] = spec if isinstance(spec, str) else type(spec).__name__
        if self._tau is not None:
            cfg["tau"] = {repr(s): t for s, t in self._tau.items()}
        return cfg
