"""A ≥ 100k-image training set built from the embedded MNIST: every image shifted by one pixel in each of the
four directions or not at all, each with its left-right mirror (10 000 × 5 × 2 = 100 000 images, 1×28×28).

Shifts fill with the background (0). Nothing is downloaded. ``python bench/shifted_mnist.py out.npz`` writes the
images and labels (uint8, int64); :func:`shifted_mnist` builds the Dataset in memory (about 1 s).
"""

from __future__ import annotations

import sys

import numpy as np

SHIFTS = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))


def shifted_mnist_arrays():
    from analytic_diffusion.data import load_dataset

    ds = load_dataset("mnist")
    keys = ds.keys()
    images = keys.values.reshape(-1, 28, 28).numpy()
    labels = keys.labels.numpy()
    out, lab = [], []
    for dy, dx in SHIFTS:
        moved = np.zeros_like(images)
        ys, yd = (slice(0, 28 - dy), slice(dy, 28)) if dy >= 0 else (slice(-dy, 28), slice(0, 28 + dy))
        xs, xd = (slice(0, 28 - dx), slice(dx, 28)) if dx >= 0 else (slice(-dx, 28), slice(0, 28 + dx))
        moved[:, yd, xd] = images[:, ys, xs]
        for flip in (False, True):
            out.append(moved[:, :, ::-1] if flip else moved)
            lab.append(labels)
    return np.ascontiguousarray(np.concatenate(out)[:, None]), np.concatenate(lab)


def shifted_mnist():
    """The 100 000-image Dataset (uint8, labelled)."""
    from analytic_diffusion.data import load_array

    images, labels = shifted_mnist_arrays()
    return load_array(images, labels, source="mnist-shift-flip")


if __name__ == "__main__":
    images, labels = shifted_mnist_arrays()
    path = sys.argv[1] if len(sys.argv) > 1 else "mnist-shift-flip.npz"
    np.savez(path, images=images, labels=labels)
    print(f"wrote {path}: {images.shape} {images.dtype}")
