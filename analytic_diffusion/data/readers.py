"""What every loader builds on: the idx reader and the shared finishing step (validate, transform, wrap).

Its own module so that the format loaders and the embedded MNIST both import it without importing each other.
"""

from __future__ import annotations

import gzip
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .dataset import ArrayLike, Dataset, standardize_images
from .transforms import Resolution, apply_transforms

IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC = 2051, 2049


# ==================================================================== shared finishing step
def _finish(
    images: ArrayLike,
    labels: ArrayLike | Sequence[int] | None,
    *,
    source: str,
    split: str | None,
    resolution: Resolution | None = None,
    grayscale: bool | None = None,
    pad_to: Resolution | None = None,
    labels_wanted: bool = True,
    device: torch.device | str | None = "cpu",
    value_range: tuple[float, float] | None = None,
    class_names: Sequence[str] | None = None,
    layout: str | None = None,
) -> Dataset:
    """Validate/standardise, apply the transforms, record them in the metadata, and build the Dataset."""
    x = standardize_images(images, source, value_range, layout=layout)
    transform = "none"
    if resolution is not None or grayscale is not None or pad_to is not None:
        arr, transform = apply_transforms(x.cpu().numpy(), resolution=resolution, grayscale=grayscale, pad_to=pad_to)
        x = torch.from_numpy(np.ascontiguousarray(arr))
    keep = labels_wanted and labels is not None
    label_tensor = torch.from_numpy(np.array(labels)) if keep else None  # np.array copies: read-only buffers are fine
    return Dataset(
        x,
        label_tensor,
        source=source,
        split=split,
        transform=transform,
        class_names=class_names if keep else None,
        device=device,
    )


def _options(kw: dict[str, Any]) -> dict[str, Any]:
    """The user-facing ``labels=`` flag is called labels_wanted inside, so it cannot clash with the data."""
    kw = dict(kw)
    if "labels" in kw:
        kw["labels_wanted"] = bool(kw.pop("labels"))
    return kw


# ==================================================================== MNIST / Fashion-MNIST idx
def read_idx(path: str | os.PathLike[str], magic: int) -> np.ndarray:
    """One idx file (gzip or raw, detected from its bytes) as a uint8 array; checks magic, dims and length."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such idx file")
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (EOFError, OSError, gzip.BadGzipFile) as e:
            raise ValueError(f"{path}: truncated or corrupt gzip data ({e})") from None
    kind = {IDX_IMAGES_MAGIC: "images (idx3)", IDX_LABELS_MAGIC: "labels (idx1)"}[magic]
    if len(data) < 4:
        raise ValueError(f"{path}: truncated: {len(data)} bytes, shorter than the idx header")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: wrong magic number {found} (expected {magic} for an idx {kind} file)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated inside the idx header")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    count = math.prod(dims)  # Python ints: a header claiming huge sizes cannot overflow into a small product
    body = len(data) - header
    if body < count:
        raise ValueError(
            f"{path}: truncated: header says {'x'.join(map(str, dims))} = {count} bytes of data, found {body}"
        )
    if body > count:
        raise ValueError(f"{path}: {body - count} unexpected bytes after the {'x'.join(map(str, dims))} data")
    return np.frombuffer(data, dtype=np.uint8, count=count, offset=header).reshape(dims)
