"""Load-time image transforms on NCHW numpy arrays (uint8, or float32 in [-1, 1]): grayscale, resize, pad.

Each returns the new array; :func:`apply_transforms` also returns the text recorded in the Dataset metadata
(and so in statistics cache keys).
"""

from __future__ import annotations

from typing import Any, Union, cast

import numpy as np
from PIL import Image

Resolution = Union[int, tuple[int, int]]


def as_size(resolution: Resolution, name: str = "resolution") -> tuple[int, int]:
    """An int or (height, width) -> (height, width), validated."""
    size: tuple[Any, ...] = (
        (resolution, resolution) if np.isscalar(resolution) else tuple(cast("tuple[int, int]", resolution))
    )
    if len(size) != 2 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in size):
        raise ValueError(f"{name}: expected a positive int or (height, width), got {resolution!r}")
    return int(size[0]), int(size[1])


def to_grayscale(x: np.ndarray) -> np.ndarray:
    """RGB(A) -> one channel with ITU-R 601 luma weights, in Pillow's exact integer form for uint8."""
    if x.shape[1] == 1:
        return x
    if x.shape[1] not in (3, 4):
        raise ValueError(f"grayscale: expected 1, 3 or 4 channels, got {x.shape[1]}")
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    if x.dtype == np.uint8:  # Pillow's convert("L"): (R·19595 + G·38470 + B·7471 + 2^15) >> 16
        luma = r.astype(np.uint32) * 19595 + g.astype(np.uint32) * 38470 + b.astype(np.uint32) * 7471 + 0x8000
        return (luma >> 16).astype(np.uint8)
    return (0.299 * r + 0.587 * g + 0.114 * b).astype(x.dtype)


def to_rgb(x: np.ndarray) -> np.ndarray:
    """One channel -> three (repeated); RGBA -> RGB (alpha dropped)."""
    if x.shape[1] == 1:
        return np.repeat(x, 3, axis=1)
    return x[:, :3] if x.shape[1] == 4 else x


def resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize with Pillow (antialiased when shrinking), channel by channel (mode L or F)."""
    h, w = size
    if x.shape[2:] == (h, w):
        return x
    src = x if x.dtype == np.uint8 else x.astype(np.float32)
    out = np.empty((x.shape[0], x.shape[1], h, w), dtype=src.dtype)
    for i in range(x.shape[0]):
        for c in range(x.shape[1]):
            out[i, c] = np.asarray(Image.fromarray(src[i, c]).resize((w, h), Image.BILINEAR))  # type: ignore[attr-defined, unused-ignore]
    if out.dtype != np.uint8:
        np.clip(out, -1.0, 1.0, out=out)  # bilinear weights are convex, but guard rounding
    return out.astype(x.dtype, copy=False)


def pad(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Centre the images on a size[0]×size[1] canvas of black: uint8 0, i.e. -1 in [-1, 1]."""
    h, w = x.shape[2:]
    if size[0] < h or size[1] < w:
        raise ValueError(f"pad_to: {size[0]}x{size[1]} is smaller than the images ({h}x{w})")
    top, left = (size[0] - h) // 2, (size[1] - w) // 2
    out = np.full(x.shape[:2] + tuple(size), 0 if x.dtype == np.uint8 else -1.0, dtype=x.dtype)
    out[:, :, top : top + h, left : left + w] = x
    return out


def apply_transforms(
    x: np.ndarray,
    *,
    resolution: Resolution | None = None,
    grayscale: bool | None = None,
    pad_to: Resolution | None = None,
) -> tuple[np.ndarray, str]:
    """grayscale (True: to one channel, False: to RGB, None: as stored) -> resize -> pad; plus a description."""
    steps: list[str] = []
    if grayscale is not None:
        x = to_grayscale(x) if grayscale else to_rgb(x)
        steps.append("grayscale" if grayscale else "rgb")
    if resolution is not None:
        size = as_size(resolution)
        x = resize(x, size)
        steps.append(f"resize{size[0]}x{size[1]}bilinear")
    if pad_to is not None:
        size = as_size(pad_to, "pad_to")
        x = pad(x, size)
        steps.append(f"pad{size[0]}x{size[1]}")
    return x, ",".join(steps) or "none"
