"""pca_locality (Lukoianov, Yuan, Solomon & Sitzmann, arXiv 2509.09672): locality masks from the Wiener filter.

docs/methods.md §5 and docs/design.md §10.1 give the rules; this is a thin configuration of
:func:`analytic_diffusion.ops.local_retrieval.coordinate_retrieval`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from ..ops.local_retrieval import (
    COORDINATE_FUSED_KERNELS,
    SOFTMAX_MODES,
    coordinate_retrieval,
    locality_mask,
    wiener_filter_matrix,
)
from ..ops.wiener_mask import MASK_RULES, WienerMasks, studio_factors, studio_mask
from .local import check_patch_backend, sigma_key
from .local_base import LocalDenoiser

if TYPE_CHECKING:
    from ..data import Dataset


class PCALocality(LocalDenoiser):
    """The analytic denoiser of Lukoianov et al. in σ-space.

    Per σ: the Wiener filter W_σ = U diag(λ/(λ+σ²)) Uᵀ (the σ-space form of their U diag(ᾱλ/(1−ᾱ+ᾱλ)) Vᵀ; λ, U from
    the PCA of the candidate set, i.e. mirrored images included when the denoiser's ``flips`` is on), each row
    divided by its diagonal entry (|diag| < 1e-6 -> 1), then binarised mask[n, m] = |M[n, m]| ≥ θ·max|M|. Every
    output coordinate m (pixel AND channel) has its own input support mask[:, m]; its distance to training image j
    is d_j(m) = Σ_n mask[n, m]·(x[n] − y_j[n])², and it gets its own softmax over the N (± mirrored,
    ± class-filtered) images of −d_j(m)/(2σ²T), with value y_j[m].
    Masks are computed once per σ and cached (keyed by σ to 12 significant digits). On the CPU a new σ does not
    form W in float64: :class:`~analytic_diffusion.ops.wiener_mask.WienerMasks` decides every entry from a float32
    product with a rigorous error bound and re-decides in float64 the entries within that bound of the threshold,
    so the masks are the float64 rule's (docs/methods.md §5); with the statistics on a GPU the dense float64
    product is formed there.

    Options:
      ``threshold`` θ (default 0.005, the authors' setting for 1-channel 28/32-px MNIST/Fashion-MNIST; they use
        0.05 for CIFAR-10 and 0.02 for CelebA-HQ/AFHQ). θ ≤ 0 gives the full mask (every input in every distance:
        the optimal denoiser). NaN is rejected.
      ``mask`` — ``"wiener"`` (default, as above) or ``"full"`` (force the full mask, no PCA needed).
      ``mask_rule`` — ``"engine"`` (default: the rule above, decided as in float64) or ``"studio"`` (the Analytic
        Diffusion Studio's pipeline, for parity with its numbers): the same formula, but from the covariance with
        the unbiased 1/(n−1) denominator, its float32 SVD U·diag(λ)·Vh, the factors s = ᾱλ/(β̄+ᾱλ) with ᾱ =
        1/(1+σ²), W = U·diag(s)·Vh, the pivots, max|M| and the comparison all in float32. In exact arithmetic the
        two rules differ only by the n/(n−1) scaling of λ; in practice the float32 rounding moves max|M| where a
        row's pivot is tiny (near-constant pixels: MNIST's border), and with it the threshold of every entry.
      ``softmax`` — ``"exact"`` (default): the true posterior mean per coordinate. ``"chunked"``: the studio's
        weighted streaming softmax ("WSSM"): the softmax is normalised within each consecutive block of
        ``chunk_size`` training images in dataset order (stored images, then mirrors), and the per-block means are
        averaged with equal weight. **This is NOT the posterior mean** — a block of poor matches counts as much as
        the block holding the best match, and the result depends on the block size and the dataset order. Its only
        purpose is parity with the studio's published numbers (they used the DataLoader batch, 256 or 512).
        With ``chunk_size`` = N (one block) it equals the exact mode.
      ``chunk_size`` — the WSSM block size K ≥ 1 (required with ``softmax="chunked"``, rejected otherwise).
      ``backend`` — ``auto`` (for float32 work the fused kernel with the masks as sparse stencils: Triton on CUDA,
        else the CUDA extension; the C++ kernel on the CPU; else the reference), ``torch`` (the reference: dense
        mask matmul), ``triton``, ``cuda`` or ``cpu``.
      Plus ``flips`` (default: the dataset's flag), ``temperature``, ``dtype``, ``memory_budget``.

    There is no patch size: ``patch`` is not accepted (the Wiener masks carry the locality).
    """

    name = "pca_locality"
    hidden_options = ("patch",)
    default_patch = 1  # LocalDenoiser wants a schedule; never used (denoise groups samples by σ, not by k)

    def __init__(
        self,
        dataset: Dataset,
        *,
        threshold: float = 0.005,
        mask: str = "wiener",
        softmax: str = "exact",
        chunk_size: int | None = None,
        mask_rule: str = "engine",
        **kw: Any,
    ) -> None:
        if kw.get("patch") is not None:
            raise ValueError("patch: pca_locality has no patch size; its locality comes from the Wiener masks")
        kw.pop("patch", None)
        check_patch_backend(kw.get("backend", "auto"), self.name, ("auto", "torch") + COORDINATE_FUSED_KERNELS)
        try:
            threshold = float(threshold)
        except (TypeError, ValueError):
            raise ValueError(f"threshold: expected a number, got {threshold!r}") from None
        if math.isnan(threshold):
            raise ValueError("threshold: got NaN")
        if mask not in ("wiener", "full"):
            raise ValueError(f"mask: expected 'wiener' or 'full', got {mask!r}")
        if softmax not in SOFTMAX_MODES:
            raise ValueError(f"softmax: expected one of {', '.join(SOFTMAX_MODES)}, got {softmax!r}")
        if mask_rule not in MASK_RULES:
            raise ValueError(f"mask_rule: expected one of {', '.join(MASK_RULES)}, got {mask_rule!r}")
        if softmax == "chunked":
            if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
                raise ValueError(
                    f"chunk_size: the chunked softmax needs an integer block size >= 1, got {chunk_size!r}"
                )
        elif chunk_size is not None:
            raise ValueError("chunk_size: only used with softmax='chunked'")
        super().__init__(dataset, **kw)
        self.threshold = threshold
        self.mask = mask
        self.softmax = softmax
        self.chunk_size = chunk_size
        self.mask_rule = mask_rule
        self._cache: dict[float, torch.Tensor] = {}
        self._masks: WienerMasks | None = None  # their σ-independent factors (CPU), built at the first σ
        self._studio: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = (
            None  # mask_rule='studio': its σ-independent SVD, at the first σ
        )

    def mask_for(self, sigma: float) -> torch.Tensor:
        """The (D, D) bool mask at σ: mask[n, m] = input n enters output m's distance (cached per σ)."""
        key = sigma_key(sigma)
        if key not in self._cache:
            D = self.keys.dim
            if self.mask == "full" or self.threshold <= 0:
                out = torch.ones(D, D, dtype=torch.bool)
            elif self.mask_rule == "studio":
                if self._studio is None:  # the SVD is σ-independent: once per denoiser
                    stats = self.dataset.with_flips(self.flips)
                    self._studio = studio_factors(stats.covariance(), stats.n)
                out = studio_mask(self._studio, key, self.threshold)
            else:
                # the statistics of the candidate set searched: flips=True here means ds.with_flips(True)
                eigvals, U = self.dataset.with_flips(self.flips).pca()[1:]
                if U.is_cuda:  # a GPU forms the dense float64 product in milliseconds: the rule as written
                    out = locality_mask(wiener_filter_matrix(eigvals, U, key), self.threshold)
                else:  # on the CPU the bounded float32 route decides the same booleans at half the cost
                    if self._masks is None:
                        self._masks = WienerMasks(eigvals, U)
                    out = self._masks(key, self.threshold)
            self._cache[key] = out.to(self.keys.device)
        return self._cache[key]

    def denoise(self, x: torch.Tensor, s: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return self.grouped(
            x,
            s,
            labels,
            [sigma_key(v) for v in s.cpu().tolist()],
            lambda xr, sr, lr, key: coordinate_retrieval(
                xr,
                self.keys,
                sr,
                self.mask_for(key),
                temperature=self.temperature,
                query_labels=lr,
                flips=self.flips,
                softmax=self.softmax,
                chunk_size=self.chunk_size,
                dtype=self.dtype,
                memory_budget=self.memory_budget,
                backend=self._backend_for(x),
            ),
        )

    def config(self) -> dict[str, Any]:
        cfg = {k: v for k, v in super().config().items() if k != "patch"}
        cfg.update(
            threshold=self.threshold,
            mask=self.mask,
            softmax=self.softmax,
            chunk_size=self.chunk_size,
            mask_rule=self.mask_rule,
        )
        return cfg
