"""Pictures people would rather look at than read: sample grids, nearest-neighbour panels, x̂0 strips."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(n, C, H, W) in [-1, 1] -> (n, H, W, C) uint8 (values outside [-1, 1] are clipped for display only)."""
    x = images.detach().to(torch.float32).cpu().clamp(-1, 1)
    return ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _upscale(h: int) -> int:
    """Integer zoom so that tiny images (MNIST) are visible: at least ~64 px per tile."""
    return max(1, 64 // h)


def tile(
    images: torch.Tensor,
    nrow: int,
    *,
    pad: int = 2,
    pad_value: int = 255,
    borders: Sequence[tuple[int, int, int] | None] | None = None,
) -> Image.Image:
    """Tile (n, C, H, W) images into a grid with ``nrow`` images per row; optional coloured border per image."""
    arr = to_uint8(images)
    n, h, w, c = arr.shape
    z = _upscale(h)
    h, w = h * z, w * z
    ncol = max(1, min(nrow, n))
    nrows = math.ceil(n / ncol)
    canvas = Image.new("RGB", (ncol * (w + pad) + pad, nrows * (h + pad) + pad), (pad_value,) * 3)
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        img = arr[i].repeat(z, 0).repeat(z, 1)
        pil = Image.fromarray(img[..., 0] if c == 1 else img[..., :3]).convert("RGB")
        x0, y0 = pad + (i % ncol) * (w + pad), pad + (i // ncol) * (h + pad)
        canvas.paste(pil, (x0, y0))
        if borders is not None and borders[i] is not None:
            draw.rectangle([x0 - 1, y0 - 1, x0 + w, y0 + h], outline=borders[i], width=2)
    return canvas


def save_grid(path: str | os.PathLike[str], images: torch.Tensor, nrow: int | None = None) -> None:
    tile(images, nrow or math.ceil(math.sqrt(images.shape[0]))).save(path)


def save_nearest_panel(
    path: str | os.PathLike[str],
    samples: torch.Tensor,
    neighbours: torch.Tensor,
    memorized: torch.Tensor,
    per_row: int = 8,
) -> None:
    """Pairs of rows: samples, then each one's nearest training image; red frame = copy, green = novel."""
    n = samples.shape[0]
    groups = []
    for s in range(0, n, per_row):
        e = min(s + per_row, n)
        flags = [(220, 30, 30) if bool(m) else (40, 160, 60) for m in memorized[s:e]]
        groups.append(tile(torch.cat([samples[s:e], neighbours[s:e]]), e - s, pad=4, borders=flags + flags))
    caption = f"{int(memorized.sum())}/{n} copies (red: d1/d2 < 1/3); sample rows, then nearest training images"
    gap, top = 10, 18
    width = max(g.width for g in groups)
    canvas = Image.new("RGB", (width, top + sum(g.height + gap for g in groups)), (255, 255, 255))
    ImageDraw.Draw(canvas).text((4, 3), caption, fill=(0, 0, 0))
    y = top
    for g in groups:
        canvas.paste(g, (0, y))
        y += g.height + gap
    canvas.save(path)


def save_x0_strips(path: str | os.PathLike[str], trajectory: torch.Tensor) -> None:
    """trajectory (steps, n, C, H, W): one row per sample, x̂0 from the first step to the last."""
    steps, n = trajectory.shape[:2]
    tile(trajectory.transpose(0, 1).reshape(steps * n, *trajectory.shape[2:]), steps).save(path)
