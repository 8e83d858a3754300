"""Training sets held once on a device (uint8 + affine map when 8-bit), and loaders for real formats."""

from .dataset import Dataset
from .embedded import load_mnist
from .loaders import load_array, load_cifar, load_dataset, load_edm_zip, load_idx, load_image_folder, load_numpy

__all__ = [
    "Dataset",
    "load_array",
    "load_cifar",
    "load_dataset",
    "load_edm_zip",
    "load_idx",
    "load_image_folder",
    "load_mnist",
    "load_numpy",
]
