"""The MNIST test set shipped in the package."""

import numpy as np
import pytest
import torch

from analytic_diffusion.data import embedded, load_dataset, load_mnist


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("AD_CACHE_DIR", str(tmp_path / "stats-cache"))


@pytest.fixture(scope="module")
def mnist():
    return load_mnist()


def test_embedded_mnist_shape_labels_and_values(mnist):
    assert mnist.images.shape == (10000, 1, 28, 28) and mnist.images.dtype == torch.uint8
    assert mnist.labels.shape == (10000,) and mnist.classes == list(range(10))
    assert mnist.labels[:8].tolist() == [7, 2, 1, 0, 4, 1, 4, 9]  # the well-known first t10k labels
    assert torch.bincount(mnist.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert int(mnist.images.max()) == 255 and int(mnist.images[:, :, 0].max()) == 0  # black top row
    assert mnist.split == "test" and "mnist" in mnist.source
    assert torch.equal(load_dataset("mnist").images, mnist.images)


def test_mnist32_is_zero_padded(mnist):
    padded = load_dataset("mnist32")
    assert padded.images.shape == (10000, 1, 32, 32) and padded.transform == "pad32x32"
    assert torch.equal(padded.images[:, :, 2:30, 2:30], mnist.images)
    border = padded.images_float(torch.arange(0, 10000, 97))
    assert float(border[..., :2, :].max()) == -1.0 and float(border[..., :, -2:].max()) == -1.0
    assert torch.equal(load_mnist(pad_to=32).images, padded.images)
    assert torch.equal(padded.labels, mnist.labels)


def test_train_split_is_not_embedded():
    with pytest.raises(ValueError, match=r"only the MNIST test split .* is embedded.*split='train'"):
        load_mnist("train")
    with pytest.raises(ValueError, match="only the MNIST test split"):
        load_dataset("mnist", split="train")


def test_md5_is_checked(monkeypatch, tmp_path):
    for name in (embedded.IMAGES_FILE, embedded.LABELS_FILE):
        (tmp_path / name).write_bytes((embedded.MNIST_DIR / name).read_bytes())
    (tmp_path / "MD5SUMS").write_text((embedded.MNIST_DIR / "MD5SUMS").read_text().replace("9fb6", "0000"))
    monkeypatch.setattr(embedded, "MNIST_DIR", tmp_path)
    monkeypatch.setattr(embedded, "_verified", False)
    with pytest.raises(RuntimeError, match="t10k-images-idx3-ubyte.gz: MD5 .* does not match MD5SUMS"):
        load_mnist()


def test_subset_classes_and_cached_pca_on_mnist(mnist):
    ones = mnist.filter_classes([1]).subset(200, random=True, seed=1)
    assert ones.classes == [1] and ones.num_stored == 200
    mean, vals, _U = ones.pca(rank=10)
    x = ones.images_float(dtype=torch.float64).reshape(200, -1).numpy()
    assert np.allclose(mean.numpy(), x.mean(0), atol=1e-12)
    assert np.allclose(vals.numpy(), np.linalg.eigvalsh(np.cov(x.T, bias=True))[::-1][:10], atol=1e-9)
