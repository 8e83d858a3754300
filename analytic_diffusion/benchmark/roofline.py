"""Roofline floors of the global retrieval and of the patch (ELS / bbELS) softmax (docs/design.md §9).

Global, per call: bytes = the key matrix once (N·D·element size) + queries and outputs (2·B·D·4);
FLOPs = 4·B·N·D (logits GEMM + weighted sum). Floor = max(bytes / bandwidth, FLOPs / rate of the math used).

Patch softmax (docs/design.md §9.3), per (query pixel, candidate patch) pair: one exponential, and on tensor cores
2·(P_pad + 16) FLOPs (the logit dot over P = C·k² features padded to 16, the value update padded to 16);
floor = max(pairs / exp rate, MMA FLOPs / bf16 rate), the "exp / MMA floor". The fused kernels compute direct
distances on CUDA cores (3 FLOPs per feature: subtract, fused multiply-add) for exactness at every σ; that
math's own floor, max(exp, 3·pairs·P / fp32 SIMT rate), is reported beside it.

Peak figures: H100 SXM ~3.0 TB/s measured copy (2026-11-13), H200 4.8 TB/s datasheet; fp32 SIMT 60, tf32 400,
bf16 790 TFLOP/s; MUFU exp2 3.9e12/s (132 SMs × 16/clk × 1.83 GHz). Devices we have no figures for get no floor
(None), never a guess.
"""

from __future__ import annotations

from typing import Any

import torch

DEVICES = {
    "H100": {"bandwidth": 3.0e12, "fp32": 60e12, "tf32": 400e12, "bf16": 790e12, "exp": 3.9e12},
    "H200": {"bandwidth": 4.8e12, "fp32": 60e12, "tf32": 400e12, "bf16": 790e12, "exp": 3.9e12},
}
# Which math each precision mode runs on (exact = fp32 on CUDA cores).
MODE_MATH = {"exact": "fp32", "tf32": "tf32", "bf16": "bf16"}


def device_peaks(device: torch.device) -> dict[str, Any] | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in DEVICES.items():
        if key in name:
            return dict(peaks, name=name)
    return None


def floor_seconds(n: int, d: int, b: int, key_bytes: int, precision: str, peaks: dict[str, Any] | None) -> float | None:
    if peaks is None:
        return None
    bytes_moved = n * d * key_bytes + 2 * b * d * 4
    flops = 4.0 * b * n * d
    return max(bytes_moved / peaks["bandwidth"], flops / peaks[MODE_MATH[precision]])


def patch_floor_seconds(pairs: int, features: int, peaks: dict[str, Any] | None) -> dict[str, float] | None:
    """Floors of one patch-softmax call with ``pairs`` (query pixel, candidate) pairs over ``features`` = C·k²:
    {"exp_mma": the exp / bf16-MMA floor, "simt": the floor of direct distances on CUDA cores}, in seconds."""
    if peaks is None:
        return None
    exp = pairs / peaks["exp"]
    padded = -(-features // 16) * 16
    return {
        "exp_mma": max(exp, 2.0 * pairs * (padded + 16) / peaks["bf16"]),
        "simt": max(exp, 3.0 * pairs * features / peaks["fp32"]),
    }
