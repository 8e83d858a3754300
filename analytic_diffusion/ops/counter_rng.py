"""Counter-based random numbers: uniform(seed_b, j) for row b and candidate j, by SplitMix64.

A stateful generator hands out numbers in call order, so a draw that scans the candidates chunk by chunk for
a batch of rows would depend on the chunking and on which rows share the batch. Here every number is a pure
function of (the row's seed, the candidate's index): any chunk size, batch composition or device gives the
same draw. SplitMix64 (Steele, Lea & Flood 2014) is computed in wrapping int64 arithmetic; the right shifts
are made logical by masking.
"""

from __future__ import annotations

import torch

__all__ = ["splitmix64", "uniform"]

_M64 = 1 << 64


def _s64(v: int) -> int:
    v %= _M64
    return v - _M64 if v >= 1 << 63 else v


_GOLDEN = _s64(0x9E3779B97F4A7C15)
_MIX1 = _s64(0xBF58476D1CE4E5B9)
_MIX2 = _s64(0x94D049BB133111EB)


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 values."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def splitmix64(z: torch.Tensor) -> torch.Tensor:
    """The SplitMix64 finaliser of int64 ``z`` (bit pattern as uint64), wrapping arithmetic."""
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def uniform(seeds: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(len(index), B) float64 uniforms in (0, 1): entry [j, b] depends only on (seeds[b], index[j])."""
    seeds = seeds.to(torch.int64)
    index = index.to(device=seeds.device, dtype=torch.int64)
    z = splitmix64(seeds[None, :] + (index[:, None] + 1) * _GOLDEN)
    return (_shr(z, 11).to(torch.float64) + 0.5) * (1.0 / (1 << 53))
