"""Per-sample random streams for the stochastic methods (smoothed, knn, optimal-draw).

A denoiser must be a pure function of each sample's (x, σ, label, configuration): batch size, call order and
the number of samples change nothing. So a stochastic method does not hold a generator that advances with
every call; each row draws from a stream whose seed is a hash of what belongs to that row: the method's name
and ``seed``, the row's values (rounded to float32, so float32 and float64 queries with the same values get the
same stream), its σ (float64) and its class label. The same query twice gets the same draw; two samples, or
one sample at two steps, have different rows and so independent draws.

The hash amplifies any rounding difference in x: a retrieval backend that returned x̂0 differing in the last
bit for a different batch size would give different draws from then on (the fixed-order kernels do not).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

__all__ = ["row_generators", "row_seeds"]


def row_seeds(
    tag: str, seed: int, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None
) -> list[int]:
    """One 63-bit seed per row of ``x`` from (tag, seed, the row's float32 bytes, σ, label)."""
    rows = np.ascontiguousarray(x.detach().reshape(x.shape[0], -1).to("cpu", torch.float32).numpy())
    sig = sigma.detach().to("cpu", torch.float64).reshape(-1).numpy()
    lab = None if labels is None else labels.detach().cpu().reshape(-1).tolist()
    head = f"{tag}\0{int(seed)}\0".encode()
    out = []
    for b in range(rows.shape[0]):
        h = hashlib.blake2b(head, digest_size=8)
        h.update(rows[b].tobytes())
        h.update(sig[b].tobytes())
        h.update(b"-" if lab is None else str(int(lab[b])).encode())
        out.append(int.from_bytes(h.digest(), "little") >> 1)
    return out


def row_generators(
    tag: str, seed: int, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor | None = None
) -> list[torch.Generator]:
    """A CPU torch.Generator per row, seeded by :func:`row_seeds`."""
    return [torch.Generator().manual_seed(s) for s in row_seeds(tag, seed, x, sigma, labels)]
