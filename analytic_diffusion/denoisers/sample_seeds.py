"""Per-sample random streams for the stochastic methods (smoothed, knn, optimal-draw), keyed by identity.

A denoiser must be a pure function of each sample's input: batch size, call order, shards, thread count and
instruction set may change it by rounding only. So a stochastic method draws from a stream whose seed is a hash
of what *names* the row, never of a computed value (docs/design.md §14.4):

* the method's name and ``seed``;
* the sample's identity: its seed in the sampler (``sample`` and the engine's samplers set it from each sample's
  generator, see :func:`sample_identity`); outside a sampler, no identity: every row at one σ shares one set of
  draws;
* the row's σ, rounded to float32 (so float32 and float64 runs of one grid draw alike);
* the row's class label.

Hashing the query's bytes instead made a one-ulp change of x — a different combine order of shards, another
instruction set — redraw everything, and sampled trajectories then parted by O(1). With identity keys, the draws
of sample i at σ are a constant of that sample: the denoiser it sees at σ is one fixed, smooth function of x
(the ``smoothed`` Jacobian is the derivative of that function, and a finite difference agrees with it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np
import torch

__all__ = ["current_identity", "row_generators", "row_seeds", "sample_identity"]

_IDENTITY: ContextVar[tuple[int, ...] | None] = ContextVar("analytic_diffusion_sample_identity", default=None)


@contextmanager
def sample_identity(ids: Sequence[int] | None) -> Iterator[None]:
    """Within the block, row b of every denoiser call belongs to sample ``ids[b]`` (non-negative integers, one per
    row of the batch being sampled; None: no identity). Calls on another number of rows are refused."""
    if ids is not None:
        ids = tuple(int(i) for i in ids)
        if any(i < 0 for i in ids):
            raise ValueError(f"sample_identity: expected non-negative sample ids, got {list(ids)[:4]}")
    token = _IDENTITY.set(ids)
    try:
        yield
    finally:
        _IDENTITY.reset(token)


def current_identity() -> tuple[int, ...] | None:
    return _IDENTITY.get()


def row_seeds(tag: str, seed: int, sigma: torch.Tensor, labels: torch.Tensor | None = None) -> list[int]:
    """One 63-bit seed per row (``sigma`` holds one σ per row) from (tag, seed, sample identity, σ, label)."""
    sig = sigma.detach().to("cpu", torch.float32).reshape(-1).numpy()
    ids = _IDENTITY.get()
    if ids is not None and len(ids) != sig.shape[0]:
        raise ValueError(
            f"sample_identity: {len(ids)} sample ids are set, but the denoiser was called on {sig.shape[0]} rows; "
            "call it on the sampled batch, or outside the sample_identity block"
        )
    lab = None if labels is None else labels.detach().cpu().reshape(-1).tolist()
    head = f"{tag}\0{int(seed)}\0".encode()
    out = []
    for b in range(sig.shape[0]):
        h = hashlib.blake2b(head, digest_size=8)
        h.update(b"-" if ids is None else str(ids[b]).encode())
        h.update(b"\0")
        h.update(np.float32(sig[b]).tobytes())
        h.update(b"-" if lab is None else str(int(lab[b])).encode())
        out.append(int.from_bytes(h.digest(), "little") >> 1)
    return out


def row_generators(
    tag: str, seed: int, sigma: torch.Tensor, labels: torch.Tensor | None = None
) -> list[torch.Generator]:
    """A CPU torch.Generator per row, seeded by :func:`row_seeds`."""
    return [torch.Generator().manual_seed(s) for s in row_seeds(tag, seed, sigma, labels)]
