"""The MNIST test set (10k images, 28×28) shipped inside the package, so examples and tests run offline."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from .dataset import Dataset
from .readers import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, _finish, _options, read_idx
from .transforms import Resolution

MNIST_DIR = Path(__file__).with_name("mnist")
IMAGES_FILE, LABELS_FILE = "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"
# Built-in names for load_dataset -> pad_to. Kamb & Ganguli's experiments use 32×32 MNIST.
NAMES = {"mnist": None, "mnist32": 32}
_verified = False

TRAIN_SPLIT_HELP = (
    "only the MNIST test split (10,000 images, t10k-*) is embedded in the package. For the 60,000-image "
    "training set, put train-images-idx3-ubyte.gz and train-labels-idx1-ubyte.gz in a folder and call "
    "load_dataset('/path/to/folder', split='train') (or load_idx)."
)


def verify_embedded() -> None:
    """Check the shipped files against MD5SUMS once per process; a mismatch means a broken install."""
    global _verified
    if _verified:
        return
    sums = dict(line.split()[::-1] for line in (MNIST_DIR / "MD5SUMS").read_text().splitlines() if line.strip())
    for name in (IMAGES_FILE, LABELS_FILE):
        got = hashlib.md5((MNIST_DIR / name).read_bytes()).hexdigest()
        if got != sums.get(name):
            raise RuntimeError(
                f"{MNIST_DIR / name}: MD5 {got} does not match MD5SUMS ({sums.get(name)}); "
                f"the embedded copy is corrupt, reinstall analytic_diffusion"
            )
    _verified = True


def load_mnist(split: str = "test", pad_to: Resolution | None = None, **options: Any) -> Dataset:
    """The embedded MNIST test set: 10000×1×28×28 uint8, labels 0-9; ``pad_to=32`` centres it on black 32×32.

    Other options (``resolution``, ``grayscale``, ``labels``, ``device``) as for every loader.
    """
    if split not in ("test", "t10k"):
        raise ValueError(f"split={split!r}: {TRAIN_SPLIT_HELP}")
    verify_embedded()
    images = read_idx(MNIST_DIR / IMAGES_FILE, IDX_IMAGES_MAGIC)
    labels = read_idx(MNIST_DIR / LABELS_FILE, IDX_LABELS_MAGIC)
    return _finish(images, labels, source="mnist(embedded)", split="test", pad_to=pad_to, **_options(options))


def load_embedded(name: str, split: str | None = None, pad_to: Resolution | None = None, **options: Any) -> Dataset:
    """``load_dataset`` entry for the built-in names in :data:`NAMES`."""
    default_pad = NAMES[name]
    if pad_to is not None and default_pad is not None and pad_to != default_pad:
        raise ValueError(f"{name!r} is already padded to {default_pad}; got pad_to={pad_to}")
    return load_mnist(split or "test", pad_to=pad_to if pad_to is not None else default_pad, **options)
