"""Equivariant local score machines of Kamb & Ganguli (arXiv 2412.20292): ELS and boundary-broken ELS.

Both estimate each output pixel p by its own softmax over training *patches* (docs/methods.md §1.2):

    x̂0(p) = Σ_j softmax_j(−‖P_p(x) − y_j‖² / 2σ²T) · centre(y_j)

* ``els`` (:class:`EquivariantLocalScore`): P_p(x) is the k×k patch at p of x padded *circularly* by d = k//2;
  the candidates y_j are every fully interior k×k patch of every training image (N·(H−k+1)(W−k+1), ×2 with
  flips). Needs k ≤ min(H, W).
* ``bbels`` (:class:`BoundaryBrokenELS`): x is zero-padded (the value 0.0 of the σ-space image). A pixel
  within d of no border is *interior* (candidates as ELS); within d of exactly one border it is in an *edge
  band* (candidates: patches of the zero-padded training images at the same offset from the same border, at
  any position along it that is interior along the edge); within d of two or more borders it is a *corner*
  (candidates: the training patches at exactly the same position, the LS rule). Any odd k works; k ≥ H makes
  every pixel a corner, i.e. LS.

Both run on :func:`analytic_diffusion.ops.patch_retrieval.patch_softmax_partial`: the exact torch reference
(chunked, online softmax, memory bounded) or, with ``backend="triton"`` / ``"cuda"`` / ``"cpu"`` (``auto`` for
float32 work), the fused implicit-im2col kernels. :meth:`partial` returns the per-pixel partial state over a shard
[start, stop) of the stored images, so that shards combine exactly (:meth:`from_partial` finishes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..ops.partial import PartialState
from ..ops.patch_retrieval import effective_budget, interior_positions, patch_offsets, patch_softmax_partial
from .local import check_patch_backend
from .local_base import LocalDenoiser

if TYPE_CHECKING:
    from ..data import Dataset


class _PatchScore(LocalDenoiser):
    """Shared driver: pad x, cut query patches group by group, one exact retrieval per group."""

    padding_mode = "zeros"

    def __init__(self, dataset: Dataset, **kw: Any) -> None:
        check_patch_backend(kw.get("backend", "auto"), self.name)
        super().__init__(dataset, **kw)

    # -- subclasses -------------------------------------------------------------------------------------
    def _groups(self, k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(query pixel centres (P_q, 2), candidate centres (P_c, 2))] covering every pixel once."""
        raise NotImplementedError

    def pairs_per_image(self, k: int) -> int:
        """(query pixel, candidate patch) pairs one output image costs at patch size k: one distance and one
        exponential each (flips double the candidates). The unit of the exp / MMA roofline floors."""
        self._check_patch(k)
        per_train_image = sum(q.shape[0] * c.shape[0] for q, c in self._groups(k))
        return per_train_image * self.num_candidates

    # -- machinery --------------------------------------------------------------------------------------
    def _pad(self, x: torch.Tensor, k: int) -> torch.Tensor:
        d = k // 2
        if d == 0:
            return x
        if self.padding_mode == "circular":
            return F.pad(x, (d, d, d, d), mode="circular")
        return F.pad(x, (d, d, d, d), mode="constant", value=0.0)

    def partial(
        self,
        x: torch.Tensor,
        sigma: float | torch.Tensor,
        class_labels: torch.Tensor | Sequence[int] | int | None = None,
        *,
        k: int | None = None,
        start: int = 0,
        stop: int | None = None,
    ) -> PartialState:
        """Per-pixel partial state over stored images start:stop: rows ordered (b, i, j), o = (B·H·W, C).

        ``k`` defaults to the schedule's patch size at σ (all samples must then share one k).
        """
        s, labels = self._check(x, sigma, class_labels)
        if k is None:
            ks = self.patch_sizes(s).unique()
            if ks.numel() != 1:
                raise ValueError("k: samples at different σ use different patch sizes; pass k explicitly")
            k = int(ks[0])
        self._check_patch(k)
        return self._partial_k(x, s, labels, k, start=start, stop=stop)

    def from_partial(self, state: PartialState, batch: int) -> torch.Tensor:
        """(B, C, H, W) posterior mean from a (combined) per-pixel state."""
        c, h, w = self.image_shape
        return state.mean().reshape(batch, h, w, c).permute(0, 3, 1, 2).contiguous()

    def _denoise_k(self, x: torch.Tensor, s: torch.Tensor, labels: torch.Tensor | None, k: int) -> torch.Tensor:
        return self.from_partial(self._partial_k(x, s, labels, k), x.shape[0])

    def _partial_k(
        self,
        x: torch.Tensor,
        s: torch.Tensor,
        labels: torch.Tensor | None,
        k: int,
        *,
        start: int = 0,
        stop: int | None = None,
    ) -> PartialState:
        c, h, w = self.image_shape
        B = x.shape[0]
        feat = c * k * k
        dt = self.dtype
        item = torch.empty((), dtype=dt).element_size()
        budget = effective_budget(self.memory_budget)
        xp = self._pad(x.to(dt), k)
        hp, wp = xp.shape[-2:]
        xflat = xp.reshape(B, -1)
        state = PartialState.empty(B * h * w, c, dtype=dt, device=x.device)
        # Query rows per block: the gathered block and its int64 gather index take at most 1/8 of the budget;
        # the retrieval gets the rest (the block itself stays alive during it).
        rows_per_block = max(1, (budget // 8) // (feat * (item + 8)))
        for qpos, cpos in self._groups(k):
            qpos = qpos.to(x.device)
            offs = patch_offsets(c, hp, wp, k, qpos[:, 0], qpos[:, 1])  # top-left in padded = centre
            pix = qpos[:, 0] * w + qpos[:, 1]
            n_rows = B * qpos.shape[0]
            for t0 in range(0, n_rows, rows_per_block):
                t = torch.arange(t0, min(t0 + rows_per_block, n_rows), device=x.device)
                b, p = t // qpos.shape[0], t % qpos.shape[0]
                q = xflat[b[:, None], offs[p]]
                sub = patch_softmax_partial(
                    q,
                    self.keys,
                    s[b],
                    cpos,
                    k,
                    temperature=self.temperature,
                    query_labels=None if labels is None else labels[b],
                    flips=self.flips,
                    dtype=dt,
                    memory_budget=max(1, budget - q.numel() * item),
                    start=start,
                    stop=stop,
                    backend=self._backend_for(x),
                )
                rows = b * (h * w) + pix[p]
                state.m[rows], state.l[rows], state.l2[rows], state.o[rows] = sub.m, sub.l, sub.l2, sub.o
                del q, sub
        return state


class EquivariantLocalScore(_PatchScore):
    """ELS: circular padding; every interior training patch competes for every pixel."""

    name = "els"
    padding_mode = "circular"
    default_patch = 3

    def _check_patch(self, k: int) -> None:
        _, h, w = self.image_shape
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
            raise ValueError(f"patch: patch sizes must be odd positive integers, got {k!r}")
        if k > min(h, w):
            raise ValueError(
                f"patch: ELS needs k <= min(H, W) = {min(h, w)} (training patches must fit inside "
                f"the {h}×{w} images), got k = {k}"
            )

    def _groups(self, k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        _, h, w = self.image_shape
        every = torch.cartesian_prod(torch.arange(h), torch.arange(w)).reshape(-1, 2)
        return [(every, interior_positions(h, w, k))]


class BoundaryBrokenELS(_PatchScore):
    """bbELS: zero padding; interior pixels as ELS, edge bands equivariant along their edge, corners as LS."""

    name = "bbels"
    padding_mode = "zeros"
    default_patch = 3

    def _check_patch(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
            raise ValueError(f"patch: patch sizes must be odd positive integers, got {k!r}")

    def _groups(self, k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        _, h, w = self.image_shape
        d = k // 2
        rows_in = torch.arange(d, max(d, h - d))  # interior along a vertical edge
        cols_in = torch.arange(d, max(d, w - d))
        groups: list[tuple[torch.Tensor, torch.Tensor]] = []
        if rows_in.numel() and cols_in.numel():
            inner = torch.cartesian_prod(rows_in, cols_in).reshape(-1, 2)
            groups.append((inner, inner))

        # Edge bands: one group per (border, offset); query pixels = candidate centres.
        def band_rows(
            i: int,
        ) -> torch.Tensor:  # pixels (i, j), j interior along the edge, if row i is within d of one border only
            return torch.stack([torch.full_like(cols_in, i), cols_in], 1)

        def band_cols(j: int) -> torch.Tensor:
            return torch.stack([rows_in, torch.full_like(rows_in, j)], 1)

        for i in range(h):
            top, bottom = i < d, i >= h - d
            if top != bottom and cols_in.numel():
                g = band_rows(i)
                groups.append((g, g))
        for j in range(w):
            left, right = j < d, j >= w - d
            if left != right and rows_in.numel():
                g = band_cols(j)
                groups.append((g, g))
        # Corners (≥ 2 borders): the LS rule, each pixel alone with the same-location candidates.
        for i in range(h):
            for j in range(w):
                nb = int(i < d) + int(i >= h - d) + int(j < d) + int(j >= w - d)
                if nb >= 2:
                    g = torch.tensor([[i, j]])
                    groups.append((g, g))
        return groups


__all__ = ["BoundaryBrokenELS", "EquivariantLocalScore"]
